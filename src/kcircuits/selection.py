"""Choosing circuits from a graph: by score (top-n, greedy, threshold) and at random (the baselines).

A circuit is only as good as its baseline. A random circuit that is compared with a found circuit
must have the found circuit's *exact* size after pruning, or "random faithfulness 0.00" only says
that a near-empty circuit does nothing. :func:`random_circuit` therefore grows random circuits
that are valid by construction (every edge lies on an input -> logits path, so pruning removes
nothing) and stop at exactly the requested number of edges. Two kinds are drawn
(:data:`RANDOM_KINDS`):

``same_size``
    the circuit's number of edges and (as far as the edge budget allows) its number of active
    nodes; everything else uniformly random.
``same_logit_edges``
    the same, and also exactly the circuit's number of edges into the logits (a circuit's direct
    paths to the output carry much of its effect, so this baseline gives random circuits the same
    direct access to the logits).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kcircuits.errors import KcircuitsError
from kcircuits.settings import SELECTIONS  # the one list of selection rules
from kcircuits.graph import (
    Circuit,
    Graph,
    dsts_read_by,
    prune,
    select_greedy,
    select_threshold,
    select_topn,
)

#: The random baselines drawn for every evaluated circuit (see the module docstring).
RANDOM_KINDS = ("same_size", "same_logit_edges")


def select(graph: Graph, scores: torch.Tensor, n_edges: int, *, selection: str = "topn", absolute: bool = True,
           do_prune: bool = True) -> Circuit:
    """Select ``n_edges`` edges by ``selection``, then drop edges off any input -> logits path.

    Args:
        graph: the model's :class:`~kcircuits.graph.Graph`.
        scores: edge scores ``[n_src, n_dst]`` (e.g. ``RunOutput.scores``), on the CPU; NaN is refused.
        n_edges: edges to select before pruning (pruning may leave fewer).
        selection: ``"topn"`` (the highest-scoring edges) or ``"greedy"`` (grown from the logits,
            always adding the best edge that enters the circuit; see
            :func:`~kcircuits.graph.select_greedy`).
        absolute: rank edges by ``|score|`` (False: by signed score).
        do_prune: drop edges that lie on no input -> logits path (:func:`~kcircuits.graph.prune`).

    Returns:
        The :class:`~kcircuits.graph.Circuit`, its ``scores`` set to ``scores``.
    """
    if selection == "topn":
        circuit = select_topn(graph, scores, n_edges, absolute)
    elif selection == "greedy":
        circuit = select_greedy(graph, scores, n_edges, absolute)
    else:
        raise KcircuitsError(f"unknown selection {selection!r}: use one of {', '.join(SELECTIONS)} (or a threshold)")
    return prune(circuit) if do_prune else circuit


def select_by_threshold(graph: Graph, scores: torch.Tensor, threshold: float, *, absolute: bool = True,
                        do_prune: bool = True) -> Circuit:
    """Select every edge scoring at least ``threshold``, then drop edges off any input -> logits path.

    Args:
        graph: the model's :class:`~kcircuits.graph.Graph`.
        scores: edge scores ``[n_src, n_dst]``, on the CPU; NaN is refused.
        threshold: the smallest score kept (compared with ``|score|`` when ``absolute``).
        absolute: compare ``|score|`` (False: the signed score).
        do_prune: drop edges that lie on no input -> logits path (:func:`~kcircuits.graph.prune`).

    Returns:
        The :class:`~kcircuits.graph.Circuit`, its ``scores`` set to ``scores``.
    """
    circuit = select_threshold(graph, scores, threshold, absolute)
    return prune(circuit) if do_prune else circuit


@dataclass(frozen=True)
class CircuitShape:
    """What a random baseline copies from a circuit (:func:`random_circuit`).

    Attributes:
        n_edges: the circuit's number of edges.
        n_nodes: its active sources (those with an edge out), the input excluded.
        n_logit_edges: its edges into the logits.
    """

    n_edges: int
    n_nodes: int
    n_logit_edges: int

    @classmethod
    def of(cls, circuit: Circuit) -> CircuitShape:
        """The shape of ``circuit`` (a :class:`~kcircuits.graph.Circuit`)."""
        e = circuit.edges
        active = e.any(1)
        return cls(int(e.sum()), int(active[1:].sum()), int(e[:, circuit.graph.dst_index_logits].sum()))

    def to_json(self) -> dict:
        """``{"n_edges", "n_nodes", "n_logit_edges"}`` (as in ``metrics.json``)."""
        return asdict(self)


def _pick(mask: torch.Tensor, gen: torch.Generator, k: int = 1) -> torch.Tensor:
    """``k`` distinct indices (rows of ``nonzero``) drawn uniformly from the True entries of ``mask``."""
    idx = torch.nonzero(mask)
    return idx[torch.randperm(idx.shape[0], generator=gen)[:k]]


class _Grower:
    """A circuit that stays valid (every edge on an input -> logits path) while edges are added.

    ``active[s]``: source s has an edge out (it is then reached from the input and reaches the
    logits); ``open_dst[d]``: destination d is read by an active source, or is the logits. An edge
    from the input or an active source into an open destination keeps the circuit valid; a new
    source joins with an edge out of it into an open destination and, unless it is reached
    already, an edge into a destination it reads.
    """

    def __init__(self, graph: Graph, gen: torch.Generator):
        self.g, self.gen = graph, gen
        self.exists = graph.edge_exists()
        self.edges = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
        self.active = torch.zeros(graph.n_src, dtype=torch.bool)
        self.open_dst = torch.zeros(graph.n_dst, dtype=torch.bool)
        self.open_dst[graph.dst_index_logits] = True
        self.reads = dsts_read_by(graph)
        self.logits = graph.dst_index_logits

    @property
    def n_active(self) -> int:
        return int(self.active[1:].sum())

    @property
    def n_logit_edges(self) -> int:
        return int(self.edges[:, self.logits].sum())

    def _senders(self) -> torch.Tensor:
        senders = self.active.clone()
        senders[0] = True
        return senders

    def candidates(self, *, logits: bool | None) -> torch.Tensor:
        """``[n_src, n_dst]`` edges that keep the circuit valid; ``logits`` True/False: only/never into the logits."""
        cand = self._senders()[:, None] & self.open_dst[None, :] & self.exists & ~self.edges
        if logits is True:
            cand[:, : self.logits] = False
        elif logits is False:
            cand[:, self.logits] = False
        return cand

    def add_edges(self, mask: torch.Tensor, k: int) -> int:
        """Add ``k`` edges drawn uniformly from ``mask`` (fewer if it has fewer); returns how many."""
        picked = _pick(mask, self.gen, k)
        self.edges[picked[:, 0], picked[:, 1]] = True
        return int(picked.shape[0])

    def add_node(self, out: str, max_cost: int = 2, prefer_cheap: bool = False) -> int:
        """Bring a random inactive source in; returns the edges it took (0: none could join).

        The new source needs an edge out, into an open destination after it: ``out`` "any",
        "logits" (only the logits) or "other" (never the logits). It also needs an edge in, from
        the input or an active source into a destination it reads, unless it already has one: a
        grouped k/v destination is read by several heads, so an edge into it reaches them all. Such
        a source joins for one edge; ``max_cost`` 1 admits only those, ``prefer_cheap`` tries them first.
        """
        g = self.g
        outs = self.open_dst.clone()
        if out == "logits":
            outs[:] = False
        outs[self.logits] = out != "other"
        if not outs.any() or max_cost < 1:
            return 0
        last = int(g.n_src_before[outs].max())  # a source joins only if some open destination comes after it
        order = torch.randperm(g.n_src, generator=self.gen)
        joinable = order[~self.active[order] & (order > 0) & (order < last)].tolist()
        senders = self._senders()
        into = self.edges[senders].any(0)  # destinations that already have an edge from a sender

        def is_reached(w: int) -> bool:
            return bool(into[self.reads[w]].any())

        if prefer_cheap or max_cost < 2:
            cheap = [w for w in joinable if is_reached(w)]
            joinable = cheap + ([w for w in joinable if w not in set(cheap)] if max_cost >= 2 else [])
        for w in joinable:
            reads = self.reads[w]
            reached = is_reached(w)
            if not reached:
                in_mask = senders[:, None] & self.exists[:, reads] & ~self.edges[:, reads]  # [n_src, len(reads)]
                if not in_mask.any():
                    continue
                (u, j), = _pick(in_mask, self.gen).tolist()
                self.edges[u, reads[j]] = True
            (v,), = _pick(outs & (g.n_src_before > w), self.gen).tolist()
            self.edges[w, v] = True
            self.active[w] = True
            self.open_dst[reads] = True
            return 1 if reached else 2
        return 0


def random_circuit(graph: Graph, n_edges: int | CircuitShape, seed: int, *, match_logit_edges: bool = False) -> Circuit:
    """A random circuit with exactly ``n_edges`` edges, every one on an input -> logits path (a baseline).

    Given a :class:`CircuitShape`, the random circuit also gets the shape's number of active nodes
    (as far as the edge budget allows: a new node costs two edges, one if it is already reached), and with
    ``match_logit_edges`` exactly its number of edges into the logits. Nodes are drawn uniformly among the
    sources, edges uniformly among those that keep the circuit valid. Given a plain number, nodes and edges are
    added by a fair coin while two or more edges remain. Pruning the result changes nothing.

    Args:
        graph: the model's :class:`~kcircuits.graph.Graph`.
        n_edges: the number of edges, or the :class:`CircuitShape` of the circuit to match.
        seed: the draw's seed (the same seed gives the same circuit).
        match_logit_edges: with a shape, also match its number of edges into the logits.

    Returns:
        The random :class:`~kcircuits.graph.Circuit` (without scores).
    """
    shape = n_edges if isinstance(n_edges, CircuitShape) else None
    n = shape.n_edges if shape else int(n_edges)
    if not 1 <= n <= graph.n_edges:
        raise KcircuitsError(f"a random circuit needs between 1 and {graph.n_edges} edges, got {n}")
    quota = shape.n_logit_edges if (shape and match_logit_edges) else None
    if quota is not None and not 1 <= quota <= min(n, graph.n_src):
        raise KcircuitsError(f"a circuit needs between 1 and {min(n, graph.n_src)} edges into the logits, got {quota}")
    for attempt in range(_ATTEMPTS):
        gen = torch.Generator().manual_seed(seed if attempt == 0 else hash((seed, attempt)) % 2**62)
        edges = _grow(graph, n, shape, quota, gen)
        if edges is not None:
            circuit = Circuit(graph, edges)
            if prune(circuit).n_edges != n:  # a broken invariant, not bad input
                raise AssertionError("random_circuit produced edges off every input -> logits path")
            return circuit
    what = f" with {quota} edges into the logits" if quota is not None else ""
    raise KcircuitsError(f"cannot grow a random circuit of {n} edges{what} on this graph ({_ATTEMPTS} attempts)")


#: Growth can paint itself into a corner on tiny graphs (one edge left, none that keeps the circuit
#: valid); it then restarts from a seed derived from (seed, attempt), so draws stay reproducible.
_ATTEMPTS = 20


def _grow(graph: Graph, n: int, shape: CircuitShape | None, quota: int | None,
          gen: torch.Generator) -> torch.Tensor | None:
    """One growth of :func:`random_circuit`: the ``[n_src, n_dst]`` edges, or None when it got stuck."""
    grow = _Grower(graph, gen)
    taken, nodes_done = 0, False
    while taken < n:
        left = n - taken
        logit_left = None if quota is None else quota - grow.n_logit_edges
        reserve = logit_left or 0  # edges that must still go into the logits
        if not nodes_done:
            rows_short = logit_left is not None and logit_left > int(grow.candidates(logits=True).sum())
            # a node costs one or two edges; when its out-edge must go into the logits (the first node's can
            # go nowhere else) one of them is an edge the logits quota reserves anyway
            into_logits = rows_short or grow.n_active == 0
            max_cost = min(left, left - reserve + (1 if into_logits and reserve else 0))
            want = grow.n_active < shape.n_nodes if shape is not None else bool(torch.rand(1, generator=gen) < 0.5)
            if max_cost >= 1 and (want or rows_short or grow.n_active == 0):
                out = "logits" if rows_short else ("any" if quota is None or logit_left > 0 else "other")
                got = grow.add_node(out, max_cost, prefer_cheap=rows_short)
                if got:
                    taken += got
                    continue
                nodes_done = max_cost >= 2  # no source can join any more
        if logit_left:
            got = grow.add_edges(grow.candidates(logits=True), logit_left)
            taken += got
            if got < logit_left:
                return None
            continue
        bulk = nodes_done or (shape is not None and grow.n_active >= shape.n_nodes)
        got = grow.add_edges(grow.candidates(logits=None if quota is None else False), left if bulk else 1)
        taken += got
        if got == 0:
            got = 0 if nodes_done else grow.add_node("any" if quota is None else "other", left)
            if not got:
                return None
            taken += got
    return grow.edges


def random_circuits(graph: Graph, shape: CircuitShape, n_draws: int, seed: int, kind: str) -> list[Circuit]:
    """``n_draws`` random circuits of one kind, for the baselines every evaluated circuit is compared with.

    Args:
        graph: the model's :class:`~kcircuits.graph.Graph`.
        shape: the :class:`CircuitShape` of the circuit to match.
        n_draws: how many circuits to draw.
        seed: the first draw's seed; draw ``i`` uses ``seed + i``.
        kind: one of :data:`RANDOM_KINDS`: ``"same_size"`` or ``"same_logit_edges"``.

    Returns:
        The list of ``n_draws`` random circuits (see :func:`random_circuit`).
    """
    if kind not in RANDOM_KINDS:
        raise KcircuitsError(f"unknown random baseline {kind!r}: use one of {', '.join(RANDOM_KINDS)}")
    return [random_circuit(graph, shape, seed + i, match_logit_edges=kind == "same_logit_edges")
            for i in range(n_draws)]
