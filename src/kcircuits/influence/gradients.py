"""Per-sequence gradients of tracked modules, from one forward and one backward per batch.

Why hooks and not ``param.grad``: a batch's backward gives, for every tracked module, the gradient
``g`` ``[B, T, d_out]`` wrt its output and (from the forward) its homogeneous input ``ā``
``[B, T, d_in(+1)]``. Sequences do not interact, so the per-sequence gradient matrix is
``G_b = Σ_t g[b, t] ā[b, t]ᵀ`` ``[d_out, d_in(+1)]`` and per-token quantities come for free.

The loss is defined by an *objective* (duck-typed): :class:`LMObjective` is the causal-LM masked
summed cross-entropy of :mod:`kcircuits.influence.sequences`; tests plug in e.g. a squared-error
objective to get a model where the Kronecker factorisation is exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kcircuits.errors import KcircuitsError
from kcircuits.influence.modules import matrix_to_params, module_params, param_to_matrix
from kcircuits.influence.sequences import Sequences


class LMObjective:
    """``L = Σ_t loss_mask[t] · CE(logits[t−1], input_ids[t])`` of a causal LM, per sequence.

    ``output`` gives logits ``[B, T, V]``; position t−1 predicts token t.
    """

    def output(self, model: torch.nn.Module, batch: Sequences) -> torch.Tensor:
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()

    def losses(self, out: torch.Tensor, batch: Sequences, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sequence summed loss ``[B]`` against ``labels`` ``[B, T−1]`` (default: the real next tokens)."""
        labels = batch.input_ids[:, 1:] if labels is None else labels
        nll = -out[:, :-1].log_softmax(-1).gather(-1, labels[..., None])[..., 0]
        return (nll * batch.loss_mask[:, 1:].to(nll.dtype)).sum(1)

    def sampled_losses(self, out: torch.Tensor, batch: Sequences, generator: torch.Generator) -> torch.Tensor:
        """Pseudo-loss of the true Fisher: labels drawn from the model's own distribution (seeded)."""
        with torch.no_grad():
            probs = out[:, :-1].softmax(-1)
            flat = probs.reshape(-1, probs.shape[-1]).cpu()
            labels = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:2]).to(out.device)
        return self.losses(out, batch, labels)

    def _probs(self, out: torch.Tensor, batch: Sequences) -> tuple[torch.Tensor, torch.Tensor]:
        return out[:, :-1].detach().softmax(-1), batch.loss_mask[:, 1:].to(out.dtype)

    def hessian_vp(self, out: torch.Tensor, batch: Sequences, u: torch.Tensor) -> torch.Tensor:
        """``H u`` with ``H_t = diag(p_t) − p_t p_tᵀ`` the CE Hessian wrt logits, per scored position."""
        p, mask = self._probs(out, batch)
        v = u[:, :-1]
        hu = (p * v - p * (p * v).sum(-1, keepdim=True)) * mask[..., None]
        return torch.cat([hu, torch.zeros_like(u[:, :1])], dim=1)

    def hessian_sqrt(self, out: torch.Tensor, batch: Sequences, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Rows of ``H^{1/2}`` for one sequence (``B = 1``), ``chunk`` at a time: ``(t, rows [k, V])`` with
        ``r_{t,v} = √p_v (e_v − p_t)`` at scored position t, so that ``Σ_v r_{t,v} r_{t,v}ᵀ = H_t``."""
        p, mask = self._probs(out, batch)
        V = out.shape[-1]
        for t in torch.nonzero(mask[0] > 0)[:, 0].tolist():
            pt = p[0, t]
            for v0 in range(0, V, chunk):
                v1 = min(v0 + chunk, V)
                rows = -pt.sqrt()[v0:v1, None] * pt[None, :]
                rows[torch.arange(v1 - v0), torch.arange(v0, v1)] += pt[v0:v1].sqrt()
                yield t, rows


class MarginObjective(LMObjective):
    """``L = −Σ_t loss_mask[t] · (z_t[y_t] − logsumexp_{j≠y_t} z_t[j])``: minus the log-odds
    ``log p/(1−p)`` of each scored token (the "margin" measurement of TRAK, Park et al. 2023).

    Why, for queries: ``∂ log p_y/∂z = e_y − p`` vanishes as ``p_y → 1``, so on a fact the model
    already predicts with certainty every document's influence on ``log p`` is ~0 and the ranking
    is noise. The log-odds gradient is ``(e_y − p)/(1 − p_y)``: the same direction, never vanishing.
    Computed as ``z_y − logsumexp`` over the *other* logits, which stays exact in float32 where
    ``log(1 − p)`` would cancel."""

    def losses(self, out: torch.Tensor, batch: Sequences, labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = batch.input_ids[:, 1:] if labels is None else labels
        z = out[:, :-1]
        z_y = z.gather(-1, labels[..., None])[..., 0]
        others = z.scatter(-1, labels[..., None], float("-inf")).logsumexp(-1)
        return ((others - z_y) * batch.loss_mask[:, 1:].to(z.dtype)).sum(1)


MEASUREMENTS = {"logprob": LMObjective, "margin": MarginObjective}


class Capture:
    """Forward hooks recording each tracked module's input ``ā`` and its output (kept in the graph).

    Inside the context the tracked parameters require grad (restored on exit), so outputs are
    differentiable even for a frozen model.
    """

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    def __enter__(self):  # -> Capture
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules.items()]
        self._saved = [(p, p.requires_grad) for m in self.modules.values() for p in module_params(m)]
        for p, _ in self._saved:
            p.requires_grad_(True)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for p, flag in self._saved:
            p.requires_grad_(flag)

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if name in self.outputs:
                raise KcircuitsError(f"module {name} is called twice in one forward; weight sharing is not supported "
                                     "for influence, exclude it with --include")
            a = inputs[0].detach().float()
            if module.bias is not None:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            self.inputs[name] = a
            self.outputs[name] = output
        return hook

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def output_grads(self, loss: torch.Tensor, retain_graph: bool = False) -> dict[str, torch.Tensor]:
        """``g`` ``[B, T, d_out]`` per module: gradient of the scalar ``loss`` wrt each module's output."""
        names = list(self.outputs)
        grads = torch.autograd.grad(loss, [self.outputs[n] for n in names], retain_graph=retain_graph,
                                    allow_unused=True)
        return {n: (torch.zeros_like(self.outputs[n]) if g is None else g).float()
                for n, g in zip(names, grads, strict=True)}


def token_grads(model: torch.nn.Module, batch: Sequences, modules: dict[str, torch.nn.Module], objective,
                generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(ā, g)`` per module for one batch: ``ā`` ``[B, T, d_in(+1)]`` zeroed on padding, ``g`` ``[B, T, d_out]``.

    With a ``generator`` the loss is the sampled pseudo-loss (true Fisher), otherwise the real loss.
    """
    with Capture(modules) as cap, torch.enable_grad():
        out = objective.output(model, batch)
        losses = objective.losses(out, batch) if generator is None else objective.sampled_losses(out, batch, generator)
        g = cap.output_grads(losses.sum())
        keep = batch.attention_mask.to(torch.float32)[..., None]
        return {n: a * keep for n, a in cap.inputs.items()}, g


def sequence_grads(a: dict[str, torch.Tensor], g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``G_b = Σ_t g[b, t] ā[b, t]ᵀ`` ``[B, d_out, d_in(+1)]`` per module."""
    return {n: torch.einsum("bto,bti->boi", g[n], a[n]) for n in a}


def check_finite(grads: dict[str, torch.Tensor], rows: range, seqs: Sequences, what: str) -> None:
    """Raise naming the first sequence whose gradient has a NaN/inf in any module.

    Checks one sum per sequence and module (a NaN or inf anywhere makes the sum NaN or inf), which
    costs one reduction instead of an elementwise test and a second reduction.
    """
    ok = torch.ones(len(rows), dtype=torch.bool)
    for G in grads.values():
        ok &= torch.isfinite(G.flatten(1).sum(1)).cpu()
    if not ok.all():
        i = rows[int(torch.nonzero(~ok)[0, 0])]
        raise KcircuitsError(f"NaN/inf gradient for {what} sequence {i} ({seqs.texts[i][:80]!r}); check the model "
                             "weights and dtype (use float32) or drop that sequence")


def iter_sequence_grads(model, seqs: Sequences, modules, objective, batch_size: int, what: str,
                        keep_tokens: bool = False, progress: bool = False) -> Iterator[tuple]:
    """Yield ``(rows, G dict [B, d_out, d_in], (ā, g) or None)`` over consecutive batches of the real loss."""
    from tqdm.auto import tqdm

    batches = list(seqs.batches(batch_size))
    for rows, batch in tqdm(batches, desc=f"gradients ({what})", disable=not progress):
        a, g = token_grads(model, batch, modules, objective)
        G = sequence_grads(a, g)
        check_finite(G, rows, seqs, what)
        yield rows, G, ((a, g) if keep_tokens else None)


# ----------------------------------------------------------------------------- flat vectors
def flatten(mats: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """``{name: [..., d_out, d_in]}`` -> ``[..., P]`` in ``names`` order."""
    return torch.cat([mats[n].flatten(-2) for n in names], dim=-1)


def unflatten(vec: torch.Tensor, shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for n, (o, i) in shapes.items():
        out[n] = vec[..., start: start + o * i].reshape(*vec.shape[:-1], o, i)
        start += o * i
    return out


# ----------------------------------------------------------------------------- Gauss-Newton products
def gn_vector_product(model, batch: Sequences, modules: dict[str, torch.nn.Module], objective,
                      vec: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``G v = (1/B) Σ_b J_bᵀ H_b J_b v`` on one batch (exact, no label sampling).

    ``J v`` uses the double-backward trick: ``Jᵀu`` is linear in a dummy ``u``, so ``∂(⟨Jᵀu, v⟩)/∂u = J v``.
    ``vec``: ``{name: [d_out, d_in(+1)]}``; returns the same layout.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = list(modules)
    params = [p for n in names for p in module_params(modules[n])]
    flat_v = [t for n in names for t in matrix_to_params(modules[n], vec[n].to(torch.float32))]
    # the double backward needs the math attention kernel: the fused CPU/flash kernels have no
    # derivative of their backward (HF models default to SDPA attention)
    with Capture(modules), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        out = objective.output(model, batch)
        u = torch.zeros_like(out, requires_grad=True)
        jt_u = torch.autograd.grad(out, params, grad_outputs=u, create_graph=True)
        jv = torch.autograd.grad(sum((a * b).sum() for a, b in zip(jt_u, flat_v, strict=True)), u)[0]
        hjv = objective.hessian_vp(out.detach(), batch, jv.detach())
        grads = torch.autograd.grad(out, params, grad_outputs=hjv)
    result, k = {}, 0
    for n in names:
        count = len(module_params(modules[n]))
        result[n] = param_to_matrix(modules[n], list(grads[k: k + count])) / len(batch)
        k += count
    return result


def exact_gauss_newton(model, train: Sequences, modules: dict[str, torch.nn.Module], objective,
                       max_elements: int = 2**24, progress: bool = False) -> torch.Tensor:
    """Dense ``G = (1/N) Σ_seq J_seqᵀ H J_seq`` ``[P, P]`` (float64) over the tracked parameters.

    Rows of ``H^{1/2} J`` come from batched backward passes (``is_grads_batched``) seeded with the
    objective's ``hessian_sqrt`` rows; a chunk's seed tensor ``[k, 1, T, V]`` holds at most
    ``max_elements`` numbers. Costs about ``(scored tokens) × V`` backward passes: tiny models only.
    """
    from tqdm.auto import tqdm

    names = list(modules)
    G = None
    for rows, batch in tqdm(list(train.batches(1)), desc="exact Gauss-Newton", disable=not progress):
        with Capture(modules) as cap, torch.enable_grad():
            out = objective.output(model, batch)
            outs = [cap.outputs[n] for n in names]
            T, V = out.shape[1], out.shape[2]
            for t, r in objective.hessian_sqrt(out.detach(), batch, max(1, max_elements // (T * V))):
                seed = torch.zeros(r.shape[0], 1, T, V, dtype=out.dtype, device=out.device)
                seed[:, 0, t] = r
                gs = torch.autograd.grad(out, outs, grad_outputs=seed, is_grads_batched=True, retain_graph=True)
                J = torch.cat([torch.einsum("kbto,bti->koi", g.float(), cap.inputs[n]).flatten(1)
                               for n, g in zip(names, gs, strict=True)], dim=1).double()
                G = J.T @ J if G is None else G + J.T @ J
        check_finite({"G": G[None]}, range(rows.start, rows.start + 1), train, "training")
    return G / len(train)
