"""Destination inputs of the patched forward pass (DESIGN.md decision 4).

Destination v reads ``x_v = x - Σ_{u < n(v)} (1 - mask[u, v]) · delta_u``, with x the pass's own
residual stream, ``delta_u = a_u - ablated_u`` and ``n(v)`` the number of sources computed before v.
:class:`Patcher` collects each source's ``delta_u`` as :class:`kcircuits.engine.Engine` computes it
and builds the inputs of every block of destinations; the engine only decides *what* to project.

The module is kept apart from the engine because the bookkeeping (three storage modes chosen by how
sparse the mask is and whether autograd is on) is independent of the model's layers.
"""

from __future__ import annotations

import bisect
import warnings
from typing import Literal

import torch

#: torch's one-time notice on the first sparse CSR tensor (matched at the start of the message).
_CSR_BETA_WARNING = r"Sparse CSR tensor support is in beta"

#: How a :class:`Patcher` stores the deltas (see its docstring).
PatchMode = Literal["chunks", "sparse", "dense"]

#: What :meth:`Patcher.inputs` returns for a block of destinations: one input per destination
#: ``[n_cols, b, p, d]`` (or ``[b, p, d]`` for a single one), or, in sparse mode, the shared fully
#: patched input plus the few destinations with their own: ``(base [b, p, d], own_cols [k], own [k, b, p, d])``.
DestInputs = torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def weighted_sum(delta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_u weights[u, v] · delta[u] for a block of destinations.

    delta: ``[s, b, p, d]``; weights: ``[s, v]`` or per prompt ``[b, s, v]`` -> ``[v, b, p, d]``.
    """
    if delta.shape[0] == 0:
        return delta.new_zeros(weights.shape[-1], *delta.shape[1:])
    if weights.dim() == 2:
        s, rest = delta.shape[0], delta.shape[1:]
        return (weights.T @ delta.reshape(s, -1)).view(weights.shape[1], *rest)
    return torch.einsum("sbpd,bsv->vbpd", delta, weights)


def sparse_weighted_sum(delta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`weighted_sum` for a mostly-zero 2-D ``weights`` (a circuit's kept edges): a sparse
    product reads only the rows each destination keeps.

    Falls back to the dense product where torch's CSR matmul is not worth it or not available
    (per-prompt weights, empty delta, non-CPU or non-float32 tensors). Shapes as :func:`weighted_sum`.
    """
    if weights.dim() == 3 or delta.shape[0] == 0 or delta.device.type != "cpu" or delta.dtype != torch.float32:
        return weighted_sum(delta, weights)
    s, rest = delta.shape[0], delta.shape[1:]
    with warnings.catch_warnings():  # silence torch's beta notice only; any other warning still surfaces
        warnings.filterwarnings("ignore", message=_CSR_BETA_WARNING, category=UserWarning)
        out = weights.T.to_sparse_csr() @ delta.reshape(s, -1)
    return out.view(weights.shape[1], *rest)


def _cols(m: torch.Tensor, n_rows: int, cols: slice) -> torch.Tensor:
    """Rows ``:n_rows`` and destination columns ``cols`` of a 2-D or per-prompt 3-D mask."""
    return m[:n_rows, cols] if m.dim() == 2 else m[:, :n_rows, cols]


def _nonzero_rows(block: torch.Tensor) -> torch.Tensor:
    """Source rows of a ``[s, v]`` or ``[b, s, v]`` mask block with any non-zero entry."""
    nz = block != 0
    return torch.nonzero(nz.any(-1).any(0) if nz.dim() == 3 else nz.any(-1)).flatten()


class Patcher:
    """Holds ``delta_u = a_u - ablated_u`` for the sources computed so far and builds destination inputs.

    A block of destinations reads ``x - Σ_{u < n} (1 - mask[u, v]) · delta_u``. Three ways to get it:

    * ``chunks`` (autograd on: learned masks, mask gradients): in-place writes are not allowed, so
      deltas are kept per layer and the term is summed chunk by chunk.
    * ``sparse`` (small circuits: fewer sources with a kept edge than with a patched one): only the
      deltas of sources with a kept edge (the *needed* sources) are stored, in a compact buffer, plus
      the running sum of all deltas; an input is ``(x - Σ_u delta_u) + Σ_u mask[u, v] · delta_u``
      over the kept rows. Destinations with no kept edge all read the same tensor, which the engine
      projects once.
    * ``dense`` (large circuits): every delta in one buffer; the term is summed over patched rows.

    Sources are handed over in order, with :meth:`emit_all` (every output of a chunk of sources) or,
    in sparse mode only, :meth:`emit_needed` (only the needed outputs plus the chunk's sum).
    """

    def __init__(self, mask: torch.Tensor, ablated: torch.Tensor | None, like: torch.Tensor, n_src: int,
                 differentiable: bool):
        """
        Args:
            mask: ``[n_src, n_dst]`` or per prompt ``[b, n_src, n_dst]``; 1 keeps an edge, 0 patches it.
            ablated: what patched edges carry, broadcastable to ``[n_src, b, p, d]``; None is zero ablation.
            like: a ``[b, p, d]`` tensor giving the residual shape, device and dtype.
            n_src: number of sources of the graph.
            differentiable: autograd must flow through the inputs (forces ``chunks`` mode).
        """
        self.mask = mask.to(device=like.device, dtype=like.dtype)
        self.inv = 1 - self.mask
        self.ablated = ablated
        self.chunks: list[tuple[int, torch.Tensor]] = []  # (first source, deltas [k, b, p, d]), chunks mode
        self.prefix: dict[int, torch.Tensor] = {}  # n -> Σ_{u < n} delta_u [b, p, d], at chunk boundaries
        self._running = torch.zeros_like(like)
        needed = _nonzero_rows(self.mask)  # sources with some kept edge
        self.mode: PatchMode
        if differentiable:
            self.mode = "chunks"
        elif len(needed) <= len(_nonzero_rows(self.inv)):
            self.mode = "sparse"
            self._needed = needed.tolist()
            self._compact = {u: i for i, u in enumerate(self._needed)}  # source -> row of buf
            self._needed_mask = torch.zeros(n_src, dtype=torch.bool, device=like.device)
            self._needed_mask[needed] = True
            self.keep = self.mask[needed] if self.mask.dim() == 2 else self.mask[:, needed]  # compact rows
            self.buf = like.new_empty(len(needed), *like.shape)  # [n_needed, b, p, d]
        else:
            self.mode = "dense"
            self.buf = like.new_empty(n_src, *like.shape)  # [n_src, b, p, d]

    @property
    def sparse(self) -> bool:
        """True in sparse mode, where the engine may hand over only the needed outputs (:meth:`emit_needed`)."""
        return self.mode == "sparse"

    def needed(self, start: int, n: int) -> torch.Tensor:
        """Indices i in 0..n-1 of the sources ``start + i`` that have a kept edge (sparse mode)."""
        return torch.nonzero(self._needed_mask[start : start + n]).flatten()

    def emit_all(self, start: int, out: torch.Tensor) -> None:
        """Take the outputs ``out [n, b, p, d]`` of every source ``start .. start + n - 1`` (any mode)."""
        stop = start + out.shape[0]
        delta = out if self.ablated is None else out - self.ablated[start:stop]
        if self.mode == "chunks":
            self.chunks.append((start, delta))
        elif self.mode == "dense":
            self.buf[start:stop] = delta
        else:
            rows = self._needed_rows(start, stop)
            if rows:
                self._store_needed(rows, delta[[u - start for u in rows]])
        self._advance(stop, delta.sum(0))

    def emit_needed(self, start: int, needed_out: torch.Tensor, n: int, total: torch.Tensor) -> None:
        """Take a chunk of ``n`` sources ``start ..`` of which only the needed ones were materialised.

        Sparse mode only: the engine then skips the per-head outputs nobody reads on their own.

        Args:
            needed_out: ``[k, b, p, d]`` outputs of the chunk's needed sources (those
                :meth:`needed` lists), in order.
            n: number of sources in the chunk.
            total: ``[b, p, d]`` sum of all n outputs, from which the chunk's Σ delta is taken.
        """
        if self.mode != "sparse":
            raise ValueError(f"emit_needed needs sparse mode, the patcher is in {self.mode} mode")
        stop = start + n
        total_delta = total if self.ablated is None else total - self.ablated[start:stop].sum(0)
        rows = self._needed_rows(start, stop)
        if rows:
            self._store_needed(rows, needed_out if self.ablated is None else needed_out - self.ablated[rows])
        self._advance(stop, total_delta)

    def _needed_rows(self, start: int, stop: int) -> list[int]:
        """Needed sources (absolute indices) among ``start .. stop - 1``, in order (sparse mode)."""
        return [u for u in range(start, stop) if u in self._compact]

    def _store_needed(self, rows: list[int], deltas: torch.Tensor) -> None:
        """Write ``deltas [len(rows), b, p, d]`` of the needed sources ``rows`` into the compact buffer."""
        first = self._compact[rows[0]]  # needed rows of one chunk are consecutive in the buffer
        self.buf[first : first + len(rows)] = deltas

    def _advance(self, stop: int, total_delta: torch.Tensor) -> None:
        """Add a chunk's Σ delta ``[b, p, d]`` to the running sum and record the prefix at ``stop``."""
        self._running = self._running + total_delta
        self.prefix[stop] = self._running

    def inputs(self, x: torch.Tensor, n_before: int, cols: slice, single: bool = False) -> DestInputs:
        """The inputs of a block of destinations ``cols`` reading sources ``:n_before``.

        ``x [b, p, d]`` is this pass's residual stream at the block. Returns ``[n_cols, b, p, d]``
        (``[b, p, d]`` with ``single``), or in sparse mode ``(base [b, p, d], own_cols LongTensor [k],
        own [k, b, p, d])``: every destination not in ``own_cols`` reads ``base``, the fully patched
        input (with ``single``, sparse mode also returns one ``[b, p, d]`` tensor).
        """
        if self.mode == "sparse":
            base = x - self.prefix[n_before]
            m = bisect.bisect_left(self._needed, n_before)  # compact rows of sources before the block
            keep = self.keep[:m, cols] if self.keep.dim() == 2 else self.keep[:, :m, cols]
            own_cols = _nonzero_rows(keep.transpose(-1, -2))
            if single:
                return base if len(own_cols) == 0 else base + sparse_weighted_sum(self.buf[:m], keep)[0]
            own = base[None] + sparse_weighted_sum(self.buf[:m], keep[..., own_cols])
            return base, own_cols, own
        inv = _cols(self.inv, n_before, cols)
        if self.mode == "dense":
            rows = _nonzero_rows(inv)
            term = weighted_sum(self.buf[rows], inv[rows] if inv.dim() == 2 else inv[:, rows])
        else:
            term = 0
            for start, delta in self.chunks:
                if start >= n_before:
                    break
                stop = min(start + delta.shape[0], n_before)
                rows_inv = self.inv[start:stop, cols] if self.inv.dim() == 2 else self.inv[:, start:stop, cols]
                term = term + weighted_sum(delta[: stop - start], rows_inv)
        out = x[None] - term
        return out[0] if single else out
