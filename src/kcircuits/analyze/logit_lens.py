"""Logit lens: where does the answer emerge, node by node and layer by layer?

Every source's output and the residual stream after every layer are read as if they were the
model's last hidden state: through the final norm and the unembedding, at the answer position.
For each we report the answer's rank (1 = top) and probability, and the top tokens. With a circuit,
the same is read from the patched pass (edges outside the circuit carry the ablated run), which
shows whether the answer still emerges inside the circuit alone.

Shapes: ``b`` prompts, ``n_src`` sources, ``L`` layers, ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kcircuits.batching import Batch
from kcircuits.engine import Engine
from kcircuits.graph import Circuit
from kcircuits.metrics import rank_of


@dataclass
class LensResult:
    """Answer rank/probability under the logit lens, per prompt (what :func:`logit_lens` returns).

    node_names:             the sources, in graph order (``input``, ``a0.h0``, ..., ``m{L-1}``).
    node_rank, node_prob:   ``[b, n_src]`` for every source's own output.
    layer_rank, layer_prob: ``[b, L + 1]`` for the residual stream after the embeddings (index 0)
                            and after every layer (the last entry is the model's own prediction).
    node_top:               ``[b, n_src, k]`` token ids of each node's top-k logits.
    node_top_prob:          ``[b, n_src, k]`` their probabilities under the lens.
    """

    node_names: list[str]
    node_rank: torch.Tensor
    node_prob: torch.Tensor
    layer_rank: torch.Tensor
    layer_prob: torch.Tensor
    node_top: torch.Tensor
    node_top_prob: torch.Tensor

    @classmethod
    def cat(cls, parts: list[LensResult]) -> LensResult:
        """Join the results of several batches along the prompt dimension.

        Args:
            parts: the per-batch results, in prompt order (at least one).
        """
        return cls(parts[0].node_names, *(torch.cat([getattr(p, f) for p in parts]) for f in
                                          ("node_rank", "node_prob", "layer_rank", "layer_prob", "node_top",
                                           "node_top_prob")))

    def first_layer_at_rank(self, k: int = 1) -> torch.Tensor:
        """Per prompt, the first residual position (0 = embeddings, l = after layer l) where the
        answer ranks within k and stays there until the end; -1 if it never settles, ``[b]``."""
        ok = self.layer_rank <= k  # [b, L+1]
        settled = torch.flip(torch.cumprod(torch.flip(ok, [1]).int(), 1), [1]).bool()
        first = torch.where(settled.any(1), settled.int().argmax(1),
                            torch.full_like(settled[:, 0], -1, dtype=torch.long))
        return first

    def to_json(self, tokenizer=None) -> dict:
        """The result as plain lists (``lens.json``'s ``clean`` and ``circuit`` entries).

        Args:
            tokenizer: decodes ``node_top`` to token strings (None: keep the ids).
        """
        decode = (lambda ids: [tokenizer.decode([i]) for i in ids]) if tokenizer is not None else (lambda ids: ids)
        return {
            "nodes": self.node_names,
            "node_rank": self.node_rank.tolist(),
            "node_prob": self.node_prob.tolist(),
            "layer_rank": self.layer_rank.tolist(),
            "layer_prob": self.layer_prob.tolist(),
            "node_top": [[decode(row) for row in prompt.tolist()] for prompt in self.node_top],
            "node_top_prob": self.node_top_prob.tolist(),
        }


def _read(engine: Engine, hidden: torch.Tensor, answer: torch.Tensor, k: int):
    """hidden ``[..., d]`` -> (rank ``[...]``, prob ``[...]``, top-k ids and probs ``[..., k]``); answer broadcasts."""
    w = engine.w
    logits = F.linear(w.ln_final(hidden), w.W_U, w.b_U).float()
    target = logits.gather(-1, answer[..., None].expand(*logits.shape[:-1], 1))
    rank = rank_of(logits, target)
    probs = torch.softmax(logits, -1)
    prob = probs.gather(-1, answer[..., None].expand(*logits.shape[:-1], 1))[..., 0]
    top_prob, top = probs.topk(k, dim=-1)
    return rank, prob, top, top_prob


@torch.no_grad()
def logit_lens(engine: Engine, batch: Batch, *, circuit: Circuit | None = None, ablated: torch.Tensor | None = None,
               top_k: int = 10, nodes: bool = True) -> LensResult:
    """Logit lens at the first answer position of every prompt in ``batch``: where the answer emerges.

    Args:
        engine: the :class:`~kcircuits.engine.Engine` of the model.
        batch: the prompt pairs (:class:`~kcircuits.batching.Batch`), on the engine's device.
        circuit: read the circuit-only (patched) pass instead of the clean run.
        ablated: with ``circuit``, what patched edges carry (see below).
        top_k: top tokens kept per node (``node_top``).
        nodes: compute the per-node lens (False: only the per-layer trace).

    Returns:
        A :class:`LensResult` on the CPU.

    Without ``circuit``: the clean run. With ``circuit``: the patched pass in which edges outside
    the circuit carry ``ablated`` (the corrupted run's source outputs, or None for zero ablation).
    A node's output in the patched pass is computed from its own, possibly patched, inputs; the
    residual after layer l is the sum of those outputs (what a destination keeping every edge
    would read). ``nodes=False`` skips the node lens (its fields are then ``[b, 0]``): the layer
    trace alone costs ``L + 1`` unembeddings per prompt instead of ``n_src + L + 1``.
    """
    g, w = engine.graph, engine.w
    embeds = engine.embed(batch.clean)
    mask = None if circuit is None else circuit.mask().to(embeds.device)
    acts = engine.run(embeds, batch.target_pos, record=True, mask=mask, ablated=ablated).acts  # [n_src, b, p, d]
    pos = batch.target_pos[:, 0]
    rows = torch.arange(len(batch), device=pos.device)
    at_answer = acts[:, rows, pos]  # [n_src, b, d]
    answer = batch.target_ids[:, 0]
    node_rank, node_prob, node_top, node_top_prob = _read(engine, at_answer if nodes else at_answer[:0],
                                                          answer[None, :], top_k)
    # residual after the embeddings and after each layer: cumulative sums over whole layers, plus
    # the attention output biases, which belong to no source
    bounds = [1] + [g.src_index_mlp(layer) + 1 for layer in range(g.n_layers)]
    cumulative = at_answer.cumsum(0)[torch.tensor(bounds) - 1]  # [L+1, b, d]
    biases = [torch.zeros(w.d_model, dtype=acts.dtype, device=acts.device)]
    for blk in w.blocks:
        biases.append(biases[-1] + (blk.attn.b_O if blk.attn.b_O is not None else 0))
    resid = cumulative + torch.stack(biases)[:, None, :]
    layer_rank, layer_prob, _, _ = _read(engine, resid, answer[None, :], 1)
    return LensResult(g.src_names, node_rank.T.cpu(), node_prob.T.cpu(), layer_rank.T.cpu(), layer_prob.T.cpu(),
                      node_top.permute(1, 0, 2).cpu(), node_top_prob.permute(1, 0, 2).cpu())
