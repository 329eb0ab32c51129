"""Edge attribution patching: EAP, EAP-IG (inputs) and clean-corrupted.

score(u -> v) = Σ_{batch, pos} (a_u(clean) - a_u(ablated)) · ∂m/∂x_v, averaged over prompts,
which is exactly ∂m̄/∂mask[u, v] at mask = 1 for the patched forward of :mod:`kcircuits.engine`
(m̄ the mean metric over prompts). Positive scores mark edges whose removal lowers the metric:
the edges that carry the answer. (DESIGN.md writes the same quantity as Σ (a_corr - a_clean)·∂L/∂x_v
with the loss L = -m, which is the EAP-IG code's convention.)

The gradients ∂m/∂x_v at every destination come from one backward pass per step: autograd gives
the gradient at each layer's q/k/v projections and MLP norm output; the gradient at a head's own
residual input is that, pulled back through the head's rows of W_Q/W_K/W_V and the shared norm's
closed-form Jacobian (:meth:`Norm.backward`). No residual copy per head is ever built.

EAP-IG averages ∂m/∂x_v over m points on the straight line from the ablated to the clean input
embeddings (α = k/m, k = 1..m, so m = 1 is plain EAP). The activation difference does not depend
on α, so the gradients are summed over steps first and contracted with the difference once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from kcircuits.ablation import ablated_acts, ablated_input, check_ablation
from kcircuits.batching import Batch
from kcircuits.engine import Engine, RunResult
from kcircuits.errors import KcircuitsError
from kcircuits.discover.registry import register
from kcircuits.metrics import Metric, check_finite, get_metric

METHODS = ("eap", "eap-ig", "clean-corrupted")


def integration_points(method: str, steps: int) -> list[float]:
    """The α of every gradient a method averages (raises a clear error for a bad method or step count)."""
    if method == "eap":
        return [1.0]
    if method == "eap-ig":
        if steps < 1:
            raise KcircuitsError("EAP-IG needs at least 1 step")
        return [k / steps for k in range(1, steps + 1)]
    if method == "clean-corrupted":
        return [1.0, 0.0]
    raise KcircuitsError(f"unknown attribution method {method!r}: use one of {', '.join(METHODS)}")


class _DestinationWeights:
    """Per layer, the q/k/v rows of every attention destination stacked and pre-multiplied by the
    ln1 weight, ``W[n_attn_dst, e, d]``, and their sums over d, ``[n_attn_dst, e]`` (built once per
    :func:`attribute` call)."""

    def __init__(self, engine: Engine):
        self.weights, self.row_sums = [], []
        for blk in engine.w.blocks:
            per_group = [group.weight for group in engine.dest_groups(blk.attn)]  # q, k, v destination rows
            W = (torch.cat(per_group) * blk.ln1.weight).detach().float().contiguous()
            self.weights.append(W)
            self.row_sums.append(W.sum(-1))


def _add_attention_grads(out: torch.Tensor, g_proj: torch.Tensor, W: torch.Tensor, row_sums: torch.Tensor,
                         resid: torch.Tensor, norm) -> None:
    """out[n] += ∂m/∂x_n for every attention destination n of a layer, without a residual copy per head.

    With ĝ_n = W_nᵀ g_n (the cotangent at the norm output, weight folded into W) the norm's VJP is
    dx_n = s · (ĝ_n − mean(ĝ_n) − x̂ · mean(ĝ_n x̂)) (no mean(ĝ_n) term for RMSNorm), s = 1/σ or 1/r.
    Both means are computed in head space (``e`` dims, from W_n 1 and W_n x̂), so the ``[n, b, p, d]``
    tensor is touched only twice: one batched matrix product accumulated in place, one correction.

    out: ``[n, b, p, d]`` (contiguous block of the destination buffer); g_proj: ``[b, p, n, e]``;
    W: ``[n, e, d]``; row_sums: ``[n, e]``; resid: ``[b, p, d]`` the layer input.
    """
    n, b, p, d = out.shape
    x_hat, scale = norm.stats(resid)  # [b, p, d], [b, p, 1]
    g = (g_proj.float() * scale[..., None]).permute(2, 0, 1, 3)  # [n, b, p, e], scaled by s
    W_x = (W @ x_hat.reshape(b * p, d).T).transpose(1, 2)  # W_n x̂, [n, b*p, e]
    c = (g.reshape(n, b * p, -1) * W_x).sum(-1).view(n, b, p) / d  # s · mean(ĝ x̂)
    out.view(n, b * p, d).baddbmm_(g.reshape(n, b * p, -1), W)
    out.addcmul_(c[..., None], x_hat[None], value=-1)
    if norm.kind == "layer":
        out.sub_((torch.einsum("nbpe,ne->nbp", g, row_sums) / d)[..., None])


def destination_grads(engine: Engine, run: RunResult, objective: torch.Tensor, out: torch.Tensor,
                      dest_weights: _DestinationWeights | None = None) -> None:
    """Add ∂objective/∂x_v for every destination v into ``out [n_dst, b, p, d]``."""
    g, w = engine.graph, engine.w
    dest_weights = dest_weights or _DestinationWeights(engine)
    tensors = [t for cap in run.layers for t in (cap.q, cap.k, cap.v, cap.mlp_in)] + [run.resid_final]
    grads = torch.autograd.grad(objective, tensors)
    with torch.no_grad():
        for layer, (cap, blk) in enumerate(zip(run.layers, w.blocks, strict=True)):
            gq, gk, gv, gmlp = grads[4 * layer : 4 * layer + 4]
            _add_attention_grads(out[g.dst_slice_attn(layer)], torch.cat([gq, gk, gv], dim=2),
                                 dest_weights.weights[layer], dest_weights.row_sums[layer], cap.resid_pre, blk.ln1)
            out[g.dst_index_mlp(layer)] += blk.ln2.backward(cap.resid_mlp, gmlp)
        out[g.dst_index_logits] += grads[-1]


def contract(engine: Engine, diff: torch.Tensor, grads: torch.Tensor, scores: torch.Tensor, weight: float) -> None:
    """scores[:n_before(v), v] += weight · Σ_{b,p,d} diff[u] · grads[v], one matrix product per layer block.

    diff: ``[n_src, b, p, d]``; grads: ``[n_dst, b, p, d]``; scores: ``[n_src, n_dst]``.
    """
    g = engine.graph
    diff_flat, grad_flat = diff.flatten(1).to(grads.dtype), grads.flatten(1)
    blocks = [(g.dst_slice_attn(layer), int(g.n_src_before[g.dst_slice_attn(layer).start]))
              for layer in range(g.n_layers)]
    blocks += [(slice(g.dst_index_mlp(layer), g.dst_index_mlp(layer) + 1), int(g.n_src_before[g.dst_index_mlp(layer)]))
               for layer in range(g.n_layers)]
    blocks.append((slice(g.n_dst - 1, g.n_dst), g.n_src))
    for cols, n_before in blocks:
        scores[:n_before, cols] += weight * (diff_flat[:n_before] @ grad_flat[cols].T).to(scores.dtype)


def _prompts_per_pass(engine: Engine, batch: Batch, max_buffer_gb: float) -> int:
    g = engine.graph
    per_prompt = (g.n_src + g.n_dst) * batch.clean.shape[1] * engine.w.d_model * 4
    return max(1, int(max_buffer_gb * 2**30 // per_prompt))


def attribute(
    engine: Engine,
    batches: Sequence[Batch],
    *,
    method: str = "eap-ig",
    metric: str | Metric = "logit_diff",
    steps: int = 5,
    ablation: str = "corrupt",
    mean: torch.Tensor | None = None,
    progress: bool = True,
    max_buffer_gb: float = 2.0,
    resume: tuple[int, torch.Tensor, str] | None = None,
    on_batch: Callable[[int, str, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Edge scores ``[n_src, n_dst]`` (zero where no edge exists), averaged over all prompts.

    Per pass the engine holds the activation difference ``[n_src, b, p, d]`` and the destination
    gradients ``[n_dst, b, p, d]`` (float32); batches whose two buffers would exceed
    ``max_buffer_gb`` are split into smaller ones, so memory stays bounded for any model size.

    Long runs can be checkpointed: ``on_batch(done, layout, partial_scores)`` is called after each
    batch, and ``resume=(done, partial_scores, layout)`` continues from such a checkpoint. ``layout``
    (the prompts per pass, e.g. ``"8,8,3"``) must match, else the checkpoint is ignored.

    Args:
        engine: the engine of the model, over the graph whose edges are scored.
        batches: the discovery prompt pairs, batched (clean, corrupt, answer tokens).
        method: ``"eap"`` (gradient at the clean input), ``"eap-ig"`` (integrated gradients along the
            straight path from the ablated input, ``steps`` points) or ``"clean-corrupted"`` (the mean
            of the gradients at both ends).
        metric: ``"logit_diff"``, ``"logprob"``, ``"prob"`` or a callable ``metric(logits, batch) -> [b]``.
        steps: integration points of EAP-IG.
        ablation: what a patched edge carries: ``"corrupt"``, ``"zero"`` or ``"mean"``.
        mean: the dataset means ``[n_src, 1, 1, d]`` for ``ablation="mean"``.
        progress: show a progress bar.
        max_buffer_gb: memory bound of one pass's two buffers (batches are split to fit).
        resume: ``(done, partial_scores, layout)`` of a checkpoint to continue from.
        on_batch: called after each batch with ``(done, layout, partial_scores)``.

    Returns:
        Edge scores ``[n_src, n_dst]`` (float32, on the batches' device).
    """
    alphas = integration_points(method, steps)
    check_ablation(ablation)
    metric_fn = get_metric(metric) if isinstance(metric, str) else metric
    n_total = sum(len(b) for b in batches)
    if n_total == 0:
        raise KcircuitsError("no prompts to attribute over")
    g = engine.graph
    scores = torch.zeros(g.n_src, g.n_dst, dtype=torch.float32, device=batches[0].clean.device)
    batches = [part for batch in batches for part in batch.split(_prompts_per_pass(engine, batch, max_buffer_gb))]
    dest_weights = None
    done = 0
    layout = ",".join(str(len(b)) for b in batches)
    if resume is not None and resume[2] == layout and 0 <= resume[0] <= len(batches):
        done, scores = resume[0], resume[1].to(scores)
    bar = tqdm(total=len(batches) * len(alphas), initial=done * len(alphas), desc=f"{method} attribution",
               disable=not progress, unit="pass")
    for index, batch in enumerate(batches[done:], start=done + 1):
        ablated = ablated_acts(engine, batch, ablation, mean)
        with torch.no_grad():
            clean_in = engine.embed(batch.clean)
            clean_acts = engine.run(clean_in, batch.target_pos, record=True).acts
            diff = clean_acts if ablated is None else clean_acts - ablated
            start = ablated_input(engine, batch, ablated)
        # float32 whatever the model dtype: gradients are summed over steps before the contraction
        grads = torch.zeros(g.n_dst, *clean_in.shape, dtype=torch.float32, device=clean_in.device)
        dest_weights = dest_weights or _DestinationWeights(engine)
        for alpha in alphas:
            embeds = (start + alpha * (clean_in - start)).detach().requires_grad_(True)
            run = engine.run(embeds, batch.target_pos, capture=True)
            values = check_finite(metric_fn(run.logits, batch), "the attribution metric")
            destination_grads(engine, run, values.sum() / n_total, grads, dest_weights)
            del run
            bar.update(1)
        contract(engine, diff, grads, scores, 1.0 / len(alphas))
        if on_batch is not None:
            on_batch(index, layout, scores)
    bar.close()
    return scores * g.edge_exists().to(scores.device)


def _find(name: str, engine: Engine, batches: Sequence[Batch], *, scoring, attribution,
          mean: torch.Tensor | None = None, progress: bool = True, resume=None, on_batch=None) -> torch.Tensor:
    """The registry's entry point for the three gradient methods (they differ only in ``method``)."""
    return attribute(engine, list(batches), method=name, metric=scoring.metric, steps=attribution.steps,
                     ablation=scoring.ablation, mean=mean, progress=progress, resume=resume, on_batch=on_batch)


# One literal register(...) per method: the CLI lists the names by reading them from this file,
# without importing torch (kcircuits.discover.registry.method_names).
@register("eap", "edge attribution patching: one gradient at the clean input", resumable=True)
def find_eap(engine: Engine, batches: Sequence[Batch], **settings) -> torch.Tensor:
    return _find("eap", engine, batches, **settings)


@register("eap-ig", "EAP with integrated gradients over --steps points from the ablated input", resumable=True)
def find_eap_ig(engine: Engine, batches: Sequence[Batch], **settings) -> torch.Tensor:
    return _find("eap-ig", engine, batches, **settings)


@register("clean-corrupted", "the mean of the gradients at the clean and at the ablated input", resumable=True)
def find_clean_corrupted(engine: Engine, batches: Sequence[Batch], **settings) -> torch.Tensor:
    return _find("clean-corrupted", engine, batches, **settings)
