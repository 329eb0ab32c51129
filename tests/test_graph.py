"""Graph structure (edge counts of real shapes), selection, pruning and JSON round trips."""

import pytest
import torch

from kcircuits.errors import KcircuitsError
from kcircuits.graph import (Circuit, Graph, circuit_from_edges, prune, select_greedy, select_threshold, select_topn)


def test_edge_counts_of_real_shapes():
    assert Graph(12, 12, 12, grouped=True, parallel=False).n_edges == 32491  # GPT-2 small
    assert Graph(30, 9, 3, grouped=True, parallel=False).n_edges == 70651  # SmolLM2-135M
    assert Graph(30, 9, 3, grouped=False, parallel=False).n_edges == 123211
    g = Graph(30, 9, 3, grouped=True, parallel=False)
    assert int(g.edge_exists().sum()) == g.n_edges
    assert len(g.src_names) == g.n_src and len(g.dst_names) == g.n_dst


def test_edges_respect_layer_order():
    g = Graph(2, 2, 1, grouped=True, parallel=False)
    ex = g.edge_exists()
    assert ex[g.src_index("a0.h1"), g.dst_index("m0")]  # sequential block: MLP reads its own layer's heads
    assert not ex[g.src_index("a0.h1"), g.dst_index("a0.h0<q>")]  # never its own layer's attention inputs
    assert ex[g.src_index("a0.h1"), g.dst_index("a1.kv0<k>")]
    assert not ex[g.src_index("m0"), g.dst_index("m0")]
    par = Graph(2, 2, 2, grouped=True, parallel=True)
    assert not par.edge_exists()[par.src_index("a0.h1"), par.dst_index("m0")]  # parallel: MLP reads the block input
    assert par.dst_feeds(par.dst_index("a1.h1<k>")) == [par.src_index("a1.h1")]
    assert g.dst_feeds(g.dst_index("a1.kv0<v>")) == [g.src_index("a1.h0"), g.src_index("a1.h1")]


def random_scores(g, seed=0):
    s = torch.randn(g.n_src, g.n_dst, generator=torch.Generator().manual_seed(seed))
    return s * g.edge_exists()


def test_topn_absolute_and_signed():
    g = Graph(3, 2, 2, grouped=True, parallel=False)
    s = random_scores(g)
    c = select_topn(g, s, 10, absolute=True)
    assert c.n_edges == 10
    kept = s[c.edges].abs()
    assert kept.min() >= s[g.edge_exists() & ~c.edges].abs().max()
    signed = select_topn(g, s, 10, absolute=False)
    assert s[signed.edges].min() >= s[g.edge_exists() & ~signed.edges].max()
    assert not (c.edges & ~g.edge_exists()).any()


def test_threshold():
    g = Graph(3, 2, 2, grouped=True, parallel=False)
    s = random_scores(g)
    c = select_threshold(g, s, 1.0)
    assert torch.equal(c.edges, (s.abs() >= 1.0) & g.edge_exists())


def test_greedy_is_connected_to_logits():
    g = Graph(4, 3, 3, grouped=True, parallel=False)
    s = random_scores(g, 1)
    c = select_greedy(g, s, 25)
    assert c.n_edges == 25
    sources = set(torch.nonzero(c.edges.any(1)).flatten().tolist())
    for _, d in torch.nonzero(c.edges).tolist():
        # every edge enters the logits or a node that is itself the source of a circuit edge
        assert d == g.dst_index_logits or any(f in sources for f in g.dst_feeds(d))
    # the first edge taken is the best edge into the logits
    col = s[:, g.dst_index_logits].abs()
    assert c.edges[int(col.argmax()), g.dst_index_logits]
    # greedy differs from plain top-n when the best edges are disconnected
    assert not torch.equal(c.edges, select_topn(g, s, 25).edges)


def test_prune_hand_made():
    g = Graph(2, 2, 2, grouped=True, parallel=False)
    c = circuit_from_edges(g, [
        "input->a0.h0<q>", "a0.h0->m0", "m0->logits",  # a full path
        "a0.h1->m1",  # a0.h1 is never reached from the input, m1 reaches nothing
        "input->a1.h1<v>",  # a1.h1 is reached but reaches nothing
    ])
    p = prune(c)
    assert sorted(f"{s}->{d}" for s, d, _ in p.edge_list()) == ["a0.h0->m0", "input->a0.h0<q>", "m0->logits"]
    assert p.nodes() == ["input", "a0.h0", "m0", "logits"]


def test_json_roundtrip_and_errors():
    g = Graph(3, 4, 2, grouped=True, parallel=False)
    s = random_scores(g, 2)
    c = select_topn(g, s, 12)
    back = Circuit.from_json(c.to_json())
    assert torch.equal(back.edges, c.edges)
    assert torch.allclose(back.scores[c.edges], s[c.edges])
    mib = c.to_mib_json()
    assert len(mib["edges"]) == g.n_edges and sum(e["in_graph"] for e in mib["edges"].values()) == 12
    with pytest.raises(KcircuitsError, match="malformed circuit JSON"):
        Circuit.from_json({"edges": []})
    with pytest.raises(KcircuitsError, match="not an edge"):
        circuit_from_edges(g, ["a1.h0->a0.h0<q>"])
    with pytest.raises(KcircuitsError, match="NaN"):
        select_topn(g, s.masked_fill(g.edge_exists(), float("nan")), 3)
