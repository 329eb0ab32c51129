"""Composition and overlap of circuits, on hand-made circuits with known answers."""

import pytest

from kcircuits.analyze.compare import composition, jaccard, layer_bands, overlap
from kcircuits.errors import KcircuitsError
from kcircuits.graph import Graph, circuit_from_edges


def _graph():
    return Graph(4, 2, 1, True, False)  # 4 layers, 2 heads, 1 kv head (grouped)


def test_composition_counts_by_type_band_and_kind():
    g = _graph()
    c = circuit_from_edges(g, ["input->a0.h0<q>", "a0.h0->m1", "m1->a3.kv0<v>", "a3.h1->logits", "input->logits"])
    comp = composition(c, n_bands=2)
    # nodes: input, a0.h0, m1, a3.h0 + a3.h1 (both read the grouped v input), logits
    assert comp["n_nodes"] == 6 and comp["n_edges"] == 5
    assert comp["nodes_by_type"]["attention"]["count"] == 3
    assert comp["nodes_by_type"]["mlp"]["count"] == 1
    assert comp["nodes_by_band"]["layers 0-1"] == {"attention": {"count": 1, "share": 0.5},
                                                   "mlp": {"count": 1, "share": 0.5}}
    assert comp["nodes_by_band"]["layers 2-3"]["attention"]["count"] == 2
    kinds = {k: v["count"] for k, v in comp["edges_by_destination_kind"].items()}
    assert kinds == {"q": 1, "k": 0, "v": 1, "mlp": 1, "logits": 2}
    src = {k: v["count"] for k, v in comp["edges_by_source_type"].items()}
    assert src == {"input": 2, "attention": 2, "mlp": 1}
    assert abs(sum(v["share"] for v in comp["nodes_by_type"].values()) - 1) < 1e-12
    assert comp["heads_in_circuit_share"] == 3 / 8


def test_layer_bands_cover_every_layer_once():
    for n_layers in (1, 4, 5, 30):
        for n in range(1, min(n_layers, 6) + 1):
            bands = layer_bands(n_layers, n)
            assert [layer for b in bands for layer in b] == list(range(n_layers))
    with pytest.raises(KcircuitsError):
        layer_bands(4, 5)


def test_overlap_jaccard():
    g = _graph()
    a = circuit_from_edges(g, ["input->m0", "m0->logits"])
    b = circuit_from_edges(g, ["input->m0", "m0->a1.h0<q>", "a1.h0->logits"])
    ov = overlap(a, b)
    assert ov["edge_jaccard"] == 1 / 4  # shared: input->m0; union: 4 edges
    assert ov["node_jaccard"] == 3 / 4  # {input, m0, logits} of {input, m0, a1.h0, logits}
    assert ov["only_b_nodes"] == ["a1.h0"]
    assert overlap(a, a)["edge_jaccard"] == 1.0 and jaccard(set(), set()) == 1.0
    with pytest.raises(KcircuitsError):
        overlap(a, circuit_from_edges(Graph(4, 2, 1, False, False), ["input->m0"]))
