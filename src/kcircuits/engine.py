"""The functional forward pass over adapter weights, with the graph's sources and destinations exposed.

One function, :meth:`Engine.run`, serves every purpose:

* ``record=True`` caches every source's output ``acts[n_src, batch, pos, d_model]`` (clean and
  corrupted runs);
* ``mask=...`` runs the *patched* forward of DESIGN.md item 4: destination v reads
  ``x_v = x - Σ_u (1 - mask[u, v]) · (a_u - ablated_u)``, where x is this pass's own residual
  stream and ``ablated_u`` the cached corrupted (or zero / mean) output of u. One pass evaluates a
  whole circuit; masks may be fractional and may differ per prompt (``[batch, n_src, n_dst]``).
  The bookkeeping of the deltas lives in :class:`kcircuits.patching.Patcher`;
* ``capture=True`` keeps the tensors from which :mod:`kcircuits.discover.eap` recovers the gradient
  at every destination input with one backward pass (q/k/v projections, MLP norm outputs, the
  final residual), without materialising a residual copy per head.

Logits are computed only at the requested target positions (``[batch, T]``): the unembedding of
every position is most of a small model's cost and no metric needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kcircuits.graph import Graph
from kcircuits.models.weights import Attention, Block, ModelWeights
from kcircuits.patching import Patcher

#: torch >= 2.5 shares kv heads inside attention, without materialising repeated k/v.
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class DestGroup(NamedTuple):
    """The q, k or v destinations of one layer, as :meth:`Engine.dest_groups` lists them."""

    first: int  # column of the group's first destination within the layer's attention block
    weight: torch.Tensor  # [n, e, d] each destination's rows of W_Q / W_K / W_V
    bias: torch.Tensor | None  # [n, e] their biases, None when the projection has none


@dataclass
class LayerCapture:
    """Tensors of one layer kept for the attribution backward pass (see :mod:`kcircuits.discover.eap`)."""

    resid_pre: torch.Tensor  # [b, p, d] input of the layer (read by q/k/v through ln1), detached
    q: torch.Tensor  # [b, p, H, e] q projection (before rotary), in the autograd graph
    k: torch.Tensor  # [b, p, Hk, e] k projection, one per k destination
    v: torch.Tensor  # [b, p, Hk, e]
    resid_mlp: torch.Tensor  # [b, p, d] the MLP's residual input (read through ln2), detached
    mlp_in: torch.Tensor  # [b, p, d] ln2 output, in the autograd graph


@dataclass
class RunResult:
    logits: torch.Tensor  # [b, T, V]
    acts: torch.Tensor | None = None  # [n_src, b, p, d]
    layers: list[LayerCapture] = field(default_factory=list)
    resid_final: torch.Tensor | None = None  # [b, p, d] input of the logits destination (in the graph)


class Engine:
    """Runs a model (its :class:`ModelWeights`) over a :class:`Graph`'s sources and destinations.

    Args:
        weights: the model's weights in the uniform layout (``LoadedModel.weights``).
        graph: the computation graph (default: :meth:`Graph.from_model` of ``weights``, k/v grouped).
    """

    def __init__(self, weights: ModelWeights, graph: Graph | None = None):
        self.w = weights
        self.graph = graph or Graph.from_model(weights)
        g = self.graph
        if (g.n_layers, g.n_heads, g.n_kv_heads) != (weights.n_layers, weights.n_heads, weights.n_kv_heads):
            raise ValueError("graph and model shapes differ")
        H, K = weights.n_heads, weights.n_kv_heads
        self._kv_of_dst = torch.arange(g.n_kv_dst) if g.grouped_kv or K == H else torch.arange(H) // (H // K)

    # ------------------------------------------------------------------ helpers
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Output of the ``input`` source: token (+ learned position) embeddings, ``[b, p, d]``, of token
        ids ``ids [b, p]``."""
        x = F.embedding(ids, self.w.W_E)
        if self.w.W_pos is not None:
            x = x + self.w.W_pos[: ids.shape[1]]
        return x

    def _heads(self, W: torch.Tensor, n: int) -> torch.Tensor:
        """``[n*e, d]`` projection weight -> ``[n, e, d]`` per head."""
        return W.unflatten(0, (n, -1))

    def _kv_weights(self, attn: Attention, W: torch.Tensor,
                    b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per k/v *destination* weights ``[Hk, e, d]`` and biases ``[Hk, e]`` (repeated when ungrouped)."""
        Wh = self._heads(W, attn.n_kv_heads)
        bh = None if b is None else b.view(attn.n_kv_heads, -1)
        if self.graph.n_kv_dst != attn.n_kv_heads:
            Wh = Wh[self._kv_of_dst]
            bh = None if bh is None else bh[self._kv_of_dst]
        return Wh, bh

    def _project_shared(self, blk: Block, x: torch.Tensor):
        """q/k/v from one shared residual input ``x [b, p, d]``: ``[b,p,H,e]``, ``[b,p,Hk,e]`` x2."""
        a = blk.attn
        h = blk.ln1(x)
        q = F.linear(h, a.W_Q, a.b_Q).unflatten(-1, (a.n_heads, -1))
        k = F.linear(h, a.W_K, a.b_K).unflatten(-1, (a.n_kv_heads, -1))
        v = F.linear(h, a.W_V, a.b_V).unflatten(-1, (a.n_kv_heads, -1))
        if self.graph.n_kv_dst != a.n_kv_heads:  # ungrouped destinations: one k/v per query head
            k, v = k[:, :, self._kv_of_dst], v[:, :, self._kv_of_dst]
        return q, k, v

    def dest_groups(self, a: Attention) -> tuple[DestGroup, DestGroup, DestGroup]:
        """The q, k and v destination groups of a layer, in the graph's column order.

        Each destination projects its own residual input through its head's rows only; the
        patched forward and the attribution backward pass (:mod:`kcircuits.discover.eap`) both need
        those rows per destination. k/v rows are repeated per query head when the graph does not
        group kv destinations.
        """
        H, Hk = a.n_heads, self.graph.n_kv_dst
        q = DestGroup(0, self._heads(a.W_Q, H), None if a.b_Q is None else a.b_Q.view(H, -1))
        k = DestGroup(H, *self._kv_weights(a, a.W_K, a.b_K))
        v = DestGroup(H + Hk, *self._kv_weights(a, a.W_V, a.b_V))
        return q, k, v

    @staticmethod
    def _project_heads(h: torch.Tensor, Wh: torch.Tensor, bh: torch.Tensor | None) -> torch.Tensor:
        """Each of n normed inputs ``h [n, b, p, d]`` through its own head's rows -> ``[b, p, n, e]``."""
        out = torch.einsum("nbpd,ned->bpne", h, Wh)
        return out if bh is None else out + bh

    def _project_patched(self, blk: Block, x_dst: torch.Tensor):
        """q/k/v when every destination has its own input ``x_dst [H + 2Hk, b, p, d]``."""
        h = blk.ln1(x_dst)
        groups = self.dest_groups(blk.attn)
        bounds = [group.first for group in groups] + [x_dst.shape[0]]
        return tuple(self._project_heads(h[lo:hi], Wh, bh)
                     for (lo, Wh, bh), hi in zip(groups, bounds[1:], strict=True))

    def _project_mixed(self, blk: Block, base: torch.Tensor, cols: torch.Tensor, x_own: torch.Tensor):
        """q/k/v when only destinations ``cols`` have their own inputs ``x_own [len(cols), b, p, d]``
        and all the others read ``base [b, p, d]`` (small circuits: most destinations are fully patched)."""
        q, k, v = self._project_shared(blk, base)
        h = blk.ln1(x_own)
        groups = self.dest_groups(blk.attn)
        bounds = [group.first for group in groups] + [self.graph.n_attn_dst]
        for out, (lo, Wh, bh), hi in zip((q, k, v), groups, bounds[1:], strict=True):
            sel = torch.nonzero((cols >= lo) & (cols < hi)).flatten()
            if len(sel):
                heads = cols[sel] - lo
                out[:, :, heads] = self._project_heads(h[sel], Wh[heads], None if bh is None else bh[heads])
        return q, k, v

    def _attend(self, blk: Block, q, k, v, cos, sin) -> torch.Tensor:
        """Causal attention; returns the per-head mixed values ``z [b, p, H, e]``."""
        a = blk.attn
        q, k = self._rotate(q, k, cos, sin)
        extra = {}
        if k.shape[2] != a.n_heads:  # grouped-query attention: share each kv head across its group
            if _SDPA_GQA:
                extra["enable_gqa"] = True
            else:
                rep = a.n_heads // k.shape[2]
                k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=a.scale, **extra)
        return z.transpose(1, 2)

    def _rotate(self, q: torch.Tensor, k: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        if self.w.rotary is None:
            return q, k
        return self.w.rotary.apply(q, cos, sin), self.w.rotary.apply(k, cos, sin)

    def attention_pattern(self, layer: int, capture: LayerCapture) -> torch.Tensor:
        """Attention probabilities of layer ``layer``, recomputed from a captured run (``capture``, that
        layer's :class:`LayerCapture`): ``[b, H, p, p]`` (query position, key position), causal.

        The forward pass uses fused SDPA, which returns no weights; analyses that need them (head
        roles, the viewer's attention bars) recompute them here from the captured q and k, with the
        same rotary embedding and key sharing. Padding sits after every scored position, so the
        causal mask alone keeps it out of the rows that matter.
        """
        a = self.w.blocks[layer].attn
        q, k = capture.q, capture.k  # [b, p, H, e], [b, p, Hk, e]
        p = q.shape[1]
        cos = sin = None
        if self.w.rotary is not None:
            cos, sin = self.w.rotary.cos_sin(torch.arange(p, device=q.device))
        q, k = self._rotate(q, k, cos, sin)
        if k.shape[2] != a.n_heads:
            k = k.repeat_interleave(a.n_heads // k.shape[2], dim=2)
        scores = torch.einsum("bqhe,bkhe->bhqk", q.float(), k.float()) * a.scale
        causal = torch.ones(p, p, dtype=torch.bool, device=q.device).tril()
        return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)

    # ------------------------------------------------------------------ the forward pass
    def run(
        self,
        embeds: torch.Tensor,
        target_pos: torch.Tensor,
        *,
        record: bool = False,
        mask: torch.Tensor | None = None,
        ablated: torch.Tensor | None = None,
        capture: bool = False,
    ) -> RunResult:
        """Forward pass from input embeddings.

        Args:
            embeds: ``[b, p, d]`` output of the input source (see :meth:`embed`); may be interpolated.
            target_pos: ``[b, T]`` positions whose logits are returned.
            record: return every source's output ``acts [n_src, b, p, d]``.
            mask: ``[n_src, n_dst]`` or ``[b, n_src, n_dst]``; 1 keeps an edge, 0 patches it.
            ablated: what patched edges carry, broadcastable to ``[n_src, b, p, d]`` (the corrupted
                run's ``acts``, a dataset mean ``[n_src, 1, 1, d]``); None means zero ablation.
            capture: keep what the attribution backward pass needs (see :class:`LayerCapture`).
        """
        g, w = self.graph, self.w
        b, p, d = embeds.shape
        H = w.n_heads
        patching = mask is not None
        acts = embeds.new_empty(g.n_src, b, p, d) if record else None
        cos = sin = None
        if w.rotary is not None:
            cos, sin = w.rotary.cos_sin(torch.arange(p, device=embeds.device))
        result = RunResult(logits=None, acts=acts if record else None)  # type: ignore[arg-type]
        differentiable = torch.is_grad_enabled() and (embeds.requires_grad or (mask is not None and mask.requires_grad))
        patcher = Patcher(mask, ablated, embeds, g.n_src, differentiable) if patching else None

        def emit(start: int, out: torch.Tensor) -> None:
            """Record source outputs ``out [n, b, p, d]`` and hand them to the patcher."""
            if record:
                acts[start : start + out.shape[0]] = out.detach() if differentiable else out
            if patcher is not None:
                patcher.emit_all(start, out)

        emit(0, embeds[None])
        x = embeds
        for layer, blk in enumerate(w.blocks):
            first = g.src_index_head(layer, 0)
            if patching:
                x_dst = patcher.inputs(x, first, g.dst_slice_attn(layer))
                if isinstance(x_dst, tuple):  # few destinations keep edges; the rest share one input
                    q, k, v = self._project_mixed(blk, *x_dst)
                else:
                    q, k, v = self._project_patched(blk, x_dst)
            else:
                q, k, v = self._project_shared(blk, x)
            z = self._attend(blk, q, k, v, cos, sin)
            W_O_heads = self._heads(blk.attn.W_O.T, H)  # [H, e, d]
            if patching and not record and patcher.sparse:
                # Small circuit: only heads that feed some kept edge need their own output; the
                # others enter through the prefix sum, which the summed attention output gives.
                attn_out = F.linear(z.flatten(2), blk.attn.W_O, blk.attn.b_O)
                needed = patcher.needed(first, H)
                head_out = torch.einsum("bphe,hed->hbpd", z[:, :, needed], W_O_heads[needed])
                bias = blk.attn.b_O if blk.attn.b_O is not None else 0
                patcher.emit_needed(first, head_out, n=H, total=attn_out - bias)
            elif record or patching:
                head_out = torch.einsum("bphe,hed->hbpd", z, W_O_heads)
                emit(first, head_out)
                attn_out = head_out.sum(0)
                if blk.attn.b_O is not None:
                    attn_out = attn_out + blk.attn.b_O
            else:
                attn_out = F.linear(z.flatten(2), blk.attn.W_O, blk.attn.b_O)
            resid_mlp = x if blk.parallel else x + attn_out
            mlp_resid_in = resid_mlp
            if patching:
                mlp_dst = g.dst_index_mlp(layer)
                mlp_resid_in = patcher.inputs(resid_mlp, int(g.n_src_before[mlp_dst]), slice(mlp_dst, mlp_dst + 1),
                                              True)
            mlp_in = blk.ln2(mlp_resid_in)
            mlp_out = blk.mlp(mlp_in)
            emit(g.src_index_mlp(layer), mlp_out[None])
            if capture:
                result.layers.append(LayerCapture(x.detach(), q, k, v, mlp_resid_in.detach(), mlp_in))
            x = x + attn_out + mlp_out
        if patching:
            x = patcher.inputs(x, g.n_src, slice(g.n_dst - 1, g.n_dst), True)
        result.resid_final = x
        picked = x.gather(1, target_pos[..., None].expand(-1, -1, d))  # [b, T, d]
        result.logits = F.linear(w.ln_final(picked), w.W_U, w.b_U)
        return result

