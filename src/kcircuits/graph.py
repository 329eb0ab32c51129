"""The computation graph: nodes, edges, dense score/membership tensors, selection, pruning, JSON.

Sources (things that write to the residual stream), in layer order:
``input``, then per layer ``a{l}.h{h}`` for each head and ``m{l}``.
Destinations (things that read it): per layer the q input of every head (``a{l}.h{h}<q>``), the k and
v inputs (per kv-head ``a{l}.kv{g}<k>`` when the model uses grouped-query attention and ``grouped``
is True, else per head ``a{l}.h{h}<k>``), the MLP input ``m{l}``, and finally ``logits``.
An edge u -> v exists when u comes before v: a head's output reaches later layers, never its own
layer's inputs; an MLP reads its own layer's heads unless the block is parallel (GPT-NeoX).

Everything is stored densely as ``[n_src, n_dst]`` tensors; the edges that exist are a prefix of
each column (``n_src_before[v]`` rows), which is what lets the engine patch a whole layer's
destinations with one matrix product.
"""

from __future__ import annotations

import heapq

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from kcircuits.errors import KcircuitsError


@dataclass
class Graph:
    """The sources and destinations of a model and the edges between them (see the module docstring).

    Build one with :meth:`from_model`; every score, mask and circuit of the model is a ``[n_src, n_dst]``
    tensor over it, rows in ``src_names`` order and columns in ``dst_names`` order.

    Attributes:
        n_layers: transformer blocks.
        n_heads: query heads per layer.
        n_kv_heads: key/value heads per layer (fewer than ``n_heads`` with grouped-query attention).
        grouped: k/v destinations per kv-head when the model has fewer kv-heads than heads (False:
            one per query head); see :attr:`grouped_kv`.
        parallel: attention and MLP read the same residual stream (GPT-NeoX), so an MLP does not
            read its own layer's heads.
        src_names: source names in order: ``input``, then per layer ``a{l}.h{h}`` and ``m{l}``.
        dst_names: destination names in order: per layer ``a{l}.h{h}<q>``, the k and v inputs, ``m{l}``;
            finally ``logits``.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    grouped: bool
    parallel: bool
    src_names: list[str] = field(init=False)
    dst_names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        L, H = self.n_layers, self.n_heads
        self.src_names = ["input"]
        for layer in range(L):
            self.src_names += [f"a{layer}.h{h}" for h in range(H)] + [f"m{layer}"]
        self.dst_names = []
        for layer in range(L):
            self.dst_names += [f"a{layer}.h{h}<q>" for h in range(H)]
            for kind in ("k", "v"):
                if self.grouped_kv:
                    self.dst_names += [f"a{layer}.kv{g}<{kind}>" for g in range(self.n_kv_heads)]
                else:
                    self.dst_names += [f"a{layer}.h{h}<{kind}>" for h in range(H)]
            self.dst_names.append(f"m{layer}")
        self.dst_names.append("logits")
        before = []
        for layer in range(L):
            first = self.src_index_head(layer, 0)
            before += [first] * self.n_attn_dst
            before.append(first + (0 if self.parallel else H))
        before.append(self.n_src)
        self.n_src_before = torch.tensor(before, dtype=torch.long)
        self._src_lookup = {n: i for i, n in enumerate(self.src_names)}
        self._dst_lookup = {n: i for i, n in enumerate(self.dst_names)}

    # ----------------------------------------------------------------- sizes and indices
    @classmethod
    def from_model(cls, weights, grouped: bool = True) -> Graph:
        """The graph of a model.

        Args:
            weights: the model's :class:`~kcircuits.models.weights.ModelWeights` (``LoadedModel.weights``).
            grouped: k/v destinations per kv-head on grouped-query attention models (False: per head).
        """
        return cls(weights.n_layers, weights.n_heads, weights.n_kv_heads, grouped, weights.parallel)

    @property
    def grouped_kv(self) -> bool:
        """True when k/v destinations are per kv-head (grouped-query attention, grouping on)."""
        return self.grouped and self.n_kv_heads < self.n_heads

    @property
    def n_kv_dst(self) -> int:
        """k (or v) destinations per layer."""
        return self.n_kv_heads if self.grouped_kv else self.n_heads

    @property
    def n_attn_dst(self) -> int:
        """Attention destinations per layer: q per head, then k and v."""
        return self.n_heads + 2 * self.n_kv_dst

    @property
    def dst_per_layer(self) -> int:
        """Destinations per layer: the attention's and the MLP input."""
        return self.n_attn_dst + 1

    @property
    def n_src(self) -> int:
        """Number of sources (rows of every ``[n_src, n_dst]`` tensor)."""
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_dst(self) -> int:
        """Number of destinations (columns of every ``[n_src, n_dst]`` tensor)."""
        return self.n_layers * self.dst_per_layer + 1

    @property
    def n_edges(self) -> int:
        """Number of edges that exist (the True entries of :meth:`edge_exists`)."""
        return int(self.n_src_before.sum())

    def src_index_head(self, layer: int, head: int) -> int:
        """Row of the source ``a{layer}.h{head}``."""
        return 1 + layer * (self.n_heads + 1) + head

    def src_index_mlp(self, layer: int) -> int:
        """Row of the source ``m{layer}``."""
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def dst_slice_attn(self, layer: int) -> slice:
        """Columns of ``layer``'s attention destinations, ordered q heads, k heads, v heads."""
        start = layer * self.dst_per_layer
        return slice(start, start + self.n_attn_dst)

    def dst_index_mlp(self, layer: int) -> int:
        """Column of the MLP input of ``layer`` (destination ``m{layer}``)."""
        return layer * self.dst_per_layer + self.n_attn_dst

    @property
    def dst_index_logits(self) -> int:
        """Column of the ``logits`` destination (the last)."""
        return self.n_dst - 1

    def src_index(self, name: str) -> int:
        """Row of the source called ``name`` (``"input"``, ``"a3.h2"``, ``"m5"``); unknown names are an error."""
        if name not in self._src_lookup:
            raise KcircuitsError(f"unknown source node {name!r} (examples: input, a0.h0, m0)")
        return self._src_lookup[name]

    def dst_index(self, name: str) -> int:
        """Column of the destination called ``name`` (``"a3.h2<q>"``, ``"m5"``, ``"logits"``); unknown names are
        an error."""
        if name not in self._dst_lookup:
            raise KcircuitsError(f"unknown destination {name!r} (examples: a0.h0<q>, m0, logits)")
        return self._dst_lookup[name]

    def edge_exists(self) -> torch.Tensor:
        """``[n_src, n_dst]`` bool: which (source, destination) pairs are edges."""
        return torch.arange(self.n_src)[:, None] < self.n_src_before[None, :]

    def dst_feeds(self, dst: int) -> list[int]:
        """Rows of the source nodes whose computation reads destination column ``dst`` (empty for logits)."""
        if dst == self.dst_index_logits:
            return []
        layer, offset = divmod(dst, self.dst_per_layer)
        H = self.n_heads
        if offset == self.n_attn_dst:
            return [self.src_index_mlp(layer)]
        if offset < H:
            return [self.src_index_head(layer, offset)]
        kv = (offset - H) % self.n_kv_dst
        if not self.grouped_kv:
            return [self.src_index_head(layer, kv)]
        per_group = H // self.n_kv_heads
        return [self.src_index_head(layer, kv * per_group + j) for j in range(per_group)]

    def dst_kind(self, dst: int) -> str:
        """What destination column ``dst`` is: ``"q"``, ``"k"``, ``"v"``, ``"mlp"`` or ``"logits"``."""
        if dst == self.dst_index_logits:
            return "logits"
        offset = dst % self.dst_per_layer
        if offset == self.n_attn_dst:
            return "mlp"
        if offset < self.n_heads:
            return "q"
        return "k" if offset < self.n_heads + self.n_kv_dst else "v"

    def src_layer(self, src: int) -> int:
        """Layer of source row ``src`` (-1 for the input)."""
        return -1 if src == 0 else (src - 1) // (self.n_heads + 1)

    def edge_name(self, src: int, dst: int) -> str:
        """``"source->destination"`` of the edge from row ``src`` to column ``dst``."""
        return f"{self.src_names[src]}->{self.dst_names[dst]}"

    def describe(self) -> dict:
        """The graph's shape as JSON (the ``graph`` entry of ``circuit.json``; :meth:`Circuit.from_json` reads it)."""
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                "grouped": self.grouped, "parallel": self.parallel, "n_src": self.n_src, "n_dst": self.n_dst,
                "n_edges": self.n_edges}


# --------------------------------------------------------------------------- circuits
@dataclass
class Circuit:
    """A set of edges of a graph, with the scores they were selected by.

    What :func:`kcircuits.discover` finds (``RunOutput.circuit``) and :func:`kcircuits.evaluate`
    takes; ``circuit.json`` is :meth:`to_json`, read back by :meth:`from_json`.

    Attributes:
        graph: the :class:`Graph` the edges belong to.
        edges: ``[n_src, n_dst]`` bool, True for edges in the circuit (subset of ``graph.edge_exists()``).
        scores: ``[n_src, n_dst]`` float, the scores the edges were selected by, or None.
    """

    graph: Graph
    edges: torch.Tensor
    scores: torch.Tensor | None = None

    @property
    def n_edges(self) -> int:
        """Number of edges in the circuit."""
        return int(self.edges.sum())

    def mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The patching mask ``[n_src, n_dst]`` in ``dtype``: 1 keeps the edge, 0 patches it."""
        return self.edges.to(dtype)

    def nodes(self) -> list[str]:
        """Source nodes touched by an edge (as source, or through a destination they read), plus logits."""
        g = self.graph
        used = set(torch.nonzero(self.edges.any(1)).flatten().tolist())
        for dst in torch.nonzero(self.edges.any(0)).flatten().tolist():
            used.update(g.dst_feeds(dst))
        names = [g.src_names[i] for i in sorted(used)]
        if self.edges[:, g.dst_index_logits].any():
            names.append("logits")
        return names

    def edge_list(self) -> list[tuple[str, str, float]]:
        """(source, destination, score) of every edge in the circuit, by decreasing |score|."""
        g = self.graph
        idx = torch.nonzero(self.edges)
        out = []
        for s, d in idx.tolist():
            score = float(self.scores[s, d]) if self.scores is not None else float("nan")
            out.append((g.src_names[s], g.dst_names[d], score))
        out.sort(key=lambda t: -abs(t[2]) if t[2] == t[2] else 0.0)
        return out

    # ------------------------------------------------------------- serialisation
    def to_json(self, extra: dict | None = None) -> dict:
        """The ``circuit.json`` form: the graph's shape, the nodes, and every edge with its score.

        Args:
            extra: more top-level entries to record (model, relation, method, ...).
        """
        edges = [{"src": s, "dst": d, "score": sc} for s, d, sc in self.edge_list()]
        return {"format": "kcircuits-circuit/1", "graph": self.graph.describe(), "n_edges": len(edges),
                "nodes": self.nodes(), "edges": edges, **(extra or {})}

    @classmethod
    def from_json(cls, data: dict) -> Circuit:
        """The circuit a :meth:`to_json` dict describes (e.g. a parsed ``circuit.json``); malformed data is a
        one-line error.

        Args:
            data: the dict (``graph``, ``edges`` with ``src``, ``dst`` and optionally ``score``).
        """
        try:
            g = data["graph"]
            graph = Graph(int(g["n_layers"]), int(g["n_heads"]), int(g["n_kv_heads"]), bool(g["grouped"]),
                          bool(g["parallel"]))
            edges = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
            scores = torch.zeros(graph.n_src, graph.n_dst)
            for e in data["edges"]:
                s, d = graph.src_index(e["src"]), graph.dst_index(e["dst"])
                if s >= graph.n_src_before[d]:
                    raise KcircuitsError(f"{e['src']}->{e['dst']} is not an edge of this graph")
                edges[s, d] = True
                scores[s, d] = float(e.get("score", float("nan")))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, KcircuitsError):
                raise
            raise KcircuitsError(f"malformed circuit JSON ({type(exc).__name__}: {exc}); "
                                 "expected a kcircuits circuit.json") from None
        return cls(graph, edges, scores)

    def to_mib_json(self) -> dict:
        """Export in the EAP-IG / MIB graph format: every node and edge with ``score`` and ``in_graph``."""
        g = self.graph
        exists = g.edge_exists()
        in_nodes = set(self.nodes())
        nodes = {n: {"in_graph": n in in_nodes} for n in g.src_names + ["logits"]}
        edges = {}
        scores = self.scores if self.scores is not None else torch.zeros(g.n_src, g.n_dst)
        for s, d in torch.nonzero(exists).tolist():
            edges[g.edge_name(s, d)] = {"score": float(scores[s, d]), "in_graph": bool(self.edges[s, d])}
        cfg = {"n_layers": g.n_layers, "n_heads": g.n_heads, "n_key_value_heads": g.n_kv_heads,
               "parallel_attn_mlp": g.parallel}
        return {"cfg": cfg, "nodes": nodes, "edges": edges}


def _masked_scores(graph: Graph, scores: torch.Tensor, absolute: bool) -> torch.Tensor:
    if scores.shape != (graph.n_src, graph.n_dst):
        raise KcircuitsError(f"scores have shape {tuple(scores.shape)}, expected {(graph.n_src, graph.n_dst)}")
    if torch.isnan(scores[graph.edge_exists()]).any():
        raise KcircuitsError("edge scores contain NaN; check the metric (answer token ids, logits) before selecting")
    key = scores.abs() if absolute else scores.clone()
    key[~graph.edge_exists()] = -float("inf")
    return key


def select_topn(graph: Graph, scores: torch.Tensor, n: int, absolute: bool = True) -> Circuit:
    """The n edges with the highest score (|score| when ``absolute``)."""
    if n < 0:
        raise KcircuitsError("the number of edges must be >= 0")
    key = _masked_scores(graph, scores, absolute).flatten()
    n = min(n, graph.n_edges)
    edges = torch.zeros(key.numel(), dtype=torch.bool)
    if n:
        edges[torch.topk(key, n).indices] = True
    return Circuit(graph, edges.view(graph.n_src, graph.n_dst), scores)


def select_threshold(graph: Graph, scores: torch.Tensor, threshold: float, absolute: bool = True) -> Circuit:
    """Every edge whose score (|score| when ``absolute``) is at least ``threshold``."""
    key = _masked_scores(graph, scores, absolute)
    return Circuit(graph, key >= threshold, scores)


def select_greedy(graph: Graph, scores: torch.Tensor, n: int, absolute: bool = True) -> Circuit:
    """Grow a connected circuit backwards from the logits, always adding the best edge that enters it.

    An edge is a candidate once its destination is read by a node already in the circuit (the logits
    to start with); adding it brings its source node in, whose q/k/v or MLP inputs become candidates.
    The result is connected to the logits by construction (it may still need :func:`prune` to drop
    branches that never reach the input). A heap of candidates makes this O(E log E).
    """
    key = _masked_scores(graph, scores, absolute)
    n = min(n, graph.n_edges)
    edges = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    reads = dsts_read_by(graph)
    key_rows = key.T.tolist()  # per destination, the scores of its possible sources
    heap: list[tuple[float, int, int]] = []
    opened = [False] * graph.n_dst
    node_in = [False] * graph.n_src

    def open_dst(d: int) -> None:
        if not opened[d]:
            opened[d] = True
            row = key_rows[d]
            for s in range(int(graph.n_src_before[d])):
                heapq.heappush(heap, (-row[s], s, d))

    open_dst(graph.dst_index_logits)
    taken = 0
    while taken < n and heap:
        _, s, d = heapq.heappop(heap)
        edges[s, d] = True
        taken += 1
        if not node_in[s]:
            node_in[s] = True
            for d2 in reads[s]:
                open_dst(d2)
    return Circuit(graph, edges, scores)


def dsts_read_by(graph: Graph) -> list[list[int]]:
    """For each source node, the destinations its computation reads (inverse of ``dst_feeds``)."""
    reads: list[list[int]] = [[] for _ in range(graph.n_src)]
    for d in range(graph.n_dst):
        for s in graph.dst_feeds(d):
            reads[s].append(d)
    return reads


def prune(circuit: Circuit) -> Circuit:
    """``circuit`` without the edges that are not on a path from the input to the logits (a new Circuit).

    Forward pass: a node is reached when one of its destinations has an edge from a reached node
    (the input is always reached). Backward pass: a destination is useful when it is the logits or
    is read by a node with an edge into a useful destination. An edge u -> v is kept when u is
    reached and v is useful. Edges come only from earlier sources, so one ordered sweep each way
    suffices.
    """
    g, edges = circuit.graph, circuit.edges
    reached = torch.zeros(g.n_src, dtype=torch.bool)
    reached[0] = True
    feeds_of = [g.dst_feeds(d) for d in range(g.n_dst)]
    for d in range(g.n_dst - 1):  # destinations are in layer order
        if (edges[:, d] & reached).any():
            reached[feeds_of[d]] = True
    useful = torch.zeros(g.n_dst, dtype=torch.bool)
    useful[g.dst_index_logits] = True
    src_useful = torch.zeros(g.n_src, dtype=torch.bool)
    for d in range(g.n_dst - 1, -1, -1):
        if d != g.dst_index_logits:
            useful[d] = bool(src_useful[feeds_of[d]].any())
        if useful[d]:
            src_useful |= edges[:, d]
    kept = edges & reached[:, None] & useful[None, :]
    return Circuit(g, kept, circuit.scores)


def circuit_from_edges(graph: Graph, names: Iterable[str], scores: torch.Tensor | None = None) -> Circuit:
    """Build a circuit from edge names (for hand-made circuits and tests).

    Args:
        graph: the :class:`Graph` the edges belong to.
        names: edge names ``"src->dst"``, e.g. ``"a0.h1->m2"``, ``"m5->logits"``; an edge that does not
            exist is an error.
        scores: ``[n_src, n_dst]`` scores to attach, or None.
    """
    edges = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    for name in names:
        src, _, dst = name.partition("->")
        s, d = graph.src_index(src), graph.dst_index(dst)
        if s >= graph.n_src_before[d]:
            raise KcircuitsError(f"{name} is not an edge: {src} does not come before {dst}")
        edges[s, d] = True
    return Circuit(graph, edges, scores)
