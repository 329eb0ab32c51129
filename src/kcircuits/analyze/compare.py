"""What a circuit is made of, and how much two circuits share.

Composition counts a circuit's nodes by component type (input, attention head, MLP, logits) and
by layer band, and its edges by the type of their source and the kind of their destination
(q/k/v input of a head, MLP input, logits). The graph has no norm nodes: norms sit inside the
destinations they feed (a head's q/k/v input is read through ``ln1``), so they are not counted
separately. Overlap is the Jaccard index ``|A ∩ B| / |A ∪ B|`` of node sets and of edge sets; the
behavioural overlap (circuit A's faithfulness on relation B's prompts) needs a model and lives in
:func:`kcircuits.analyze.explain.compare`.
"""

from __future__ import annotations

from kcircuits.errors import KcircuitsError
from kcircuits.graph import Circuit, Graph

NODE_TYPES = ("input", "attention", "mlp", "logits")


def node_type(name: str) -> str:
    if name in ("input", "logits"):
        return name
    return "mlp" if name.startswith("m") else "attention"


def layer_bands(n_layers: int, n_bands: int = 3) -> list[range]:
    """Split layers 0..L-1 into ``n_bands`` contiguous bands of (almost) equal size: early, middle, late."""
    if not 1 <= n_bands <= n_layers:
        raise KcircuitsError(f"the number of layer bands must be between 1 and {n_layers}, got {n_bands}")
    bounds = [round(i * n_layers / n_bands) for i in range(n_bands + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(n_bands)]


def _shares(counts: dict[str, int]) -> dict[str, dict]:
    total = sum(counts.values())
    return {k: {"count": v, "share": v / total if total else 0.0} for k, v in counts.items()}


def composition(circuit: Circuit, n_bands: int | None = None) -> dict:
    """Nodes and edges of a circuit by component type and by layer band (counts and shares).

    ``n_bands`` defaults to three (early, middle, late), or one per layer in a shallower model.
    """
    g = circuit.graph
    nodes = circuit.nodes()
    bands = layer_bands(g.n_layers, n_bands if n_bands is not None else min(3, g.n_layers))
    band_names = [f"layers {b.start}-{b.stop - 1}" for b in bands]

    def band_of(layer: int) -> str:
        return next(n for n, b in zip(band_names, bands, strict=True) if layer in b)

    by_type = {t: 0 for t in NODE_TYPES}
    by_band_type = {n: {"attention": 0, "mlp": 0} for n in band_names}
    for name in nodes:
        t = node_type(name)
        by_type[t] += 1
        if t in ("attention", "mlp"):
            by_band_type[band_of(g.src_layer(g.src_index(name)))][t] += 1
    edges_by_src = {t: 0 for t in ("input", "attention", "mlp")}
    edges_by_dst = {k: 0 for k in ("q", "k", "v", "mlp", "logits")}
    edges_by_band = {n: 0 for n in band_names}
    for src, dst, _ in circuit.edge_list():
        edges_by_src[node_type(src)] += 1
        kind = g.dst_kind(g.dst_index(dst))
        edges_by_dst[kind] += 1
        if src != "input":
            edges_by_band[band_of(g.src_layer(g.src_index(src)))] += 1
    return {
        "n_nodes": len(nodes), "n_edges": circuit.n_edges,
        "nodes_by_type": _shares(by_type),
        "nodes_by_band": {band: _shares(c) for band, c in by_band_type.items()},
        "edges_by_source_type": _shares(edges_by_src),
        "edges_by_destination_kind": _shares(edges_by_dst),
        "edges_by_source_band": _shares(edges_by_band),
        "heads_in_circuit_share": by_type["attention"] / (g.n_layers * g.n_heads),
        "mlps_in_circuit_share": by_type["mlp"] / g.n_layers,
    }


def _same_graph(a: Graph, b: Graph) -> None:
    if a.describe() != b.describe():
        raise KcircuitsError("the two circuits come from different graphs (model shape or k/v grouping differ); "
                             "compare circuits found on the same model with the same --grouped setting")


def jaccard(a: set, b: set) -> float:
    """|A ∩ B| / |A ∪ B|; 1.0 for two empty sets (they agree)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def overlap(a: Circuit, b: Circuit) -> dict:
    """Jaccard overlap of two circuits on nodes and on edges, with the shared and exclusive counts."""
    _same_graph(a.graph, b.graph)
    na, nb = set(a.nodes()), set(b.nodes())
    ea, eb = a.edges, b.edges
    shared = int((ea & eb).sum())
    union = int((ea | eb).sum())
    return {"node_jaccard": jaccard(na, nb), "edge_jaccard": shared / union if union else 1.0,
            "shared_nodes": len(na & nb), "shared_edges": shared,
            "only_a_nodes": sorted(na - nb), "only_b_nodes": sorted(nb - na),
            "n_nodes": [len(na), len(nb)], "n_edges": [a.n_edges, b.n_edges]}
