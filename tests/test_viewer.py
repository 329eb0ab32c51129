"""The circuit viewer's payload and HTML section (the browser side is in test_browser.py)."""

from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pytest
import torch

from kcircuits.errors import KcircuitsError
from kcircuits.graph import (
    Circuit,
    Graph,
    circuit_from_edges,
    prune,
    select_greedy,
    select_topn,
)
from kcircuits.report import render_report
from kcircuits.report.svg import SVG_NS
from kcircuits.report.viewer import (
    dst_node_name,
    payload_json,
    viewer_payload,
    viewer_section,
)
from kcircuits.report.data import build_report

_DTYPES = {"uint16": "<u2", "int32": "<i4", "float32": "<f4"}


def decode(spec: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(spec["data"]), dtype=_DTYPES[spec["dtype"]])


def random_scores(graph: Graph, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(graph.n_src, graph.n_dst, generator=gen) * graph.edge_exists()


def prefix_circuit(graph: Graph, payload: dict, n: int) -> torch.Tensor:
    """What the viewer's JS does: the first n stored edges, then prune."""
    src, dst = decode(payload["edges"]["src"]), decode(payload["edges"]["dst"])
    edges = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    edges[torch.as_tensor(src[:n].astype(np.int64)), torch.as_tensor(dst[:n].astype(np.int64))] = True
    return prune(Circuit(graph, edges)).edges


@pytest.mark.parametrize("shape", [(2, 4, 4, True, False), (3, 6, 2, True, False), (3, 6, 2, False, False),
                                   (3, 4, 4, True, True)])
def test_edges_decode_to_graph_edges_in_score_order(shape) -> None:
    graph = Graph(*shape)
    scores = random_scores(graph)
    circuit = prune(select_topn(graph, scores, 30))
    p = viewer_payload(graph, circuit, scores)
    src, dst, sc = decode(p["edges"]["src"]), decode(p["edges"]["dst"]), decode(p["edges"]["score"])
    assert p["edges"]["n"] == p["edges"]["n_total"] == p["edges"]["n_ordered"] == graph.n_edges == len(src)
    assert not p["edges"]["capped"]
    exists = graph.edge_exists()
    pairs = set(zip(src.tolist(), dst.tolist(), strict=True))
    assert len(pairs) == graph.n_edges and all(exists[s, d] for s, d in pairs)
    np.testing.assert_array_equal(
        sc, scores[torch.as_tensor(src.astype(np.int64)), torch.as_tensor(dst.astype(np.int64))].numpy())
    assert np.all(np.diff(np.abs(sc)) <= 0)  # by decreasing |score|
    assert p["edges"]["max_abs"] == pytest.approx(float(scores.abs().max()))
    # graph shape
    assert p["graph"] == graph.describe()
    assert p["src_names"] == graph.src_names and p["dst_names"] == graph.dst_names
    assert p["dst_feeds"] == [graph.dst_feeds(d) for d in range(graph.n_dst)]
    assert p["dst_kind"] == [graph.dst_kind(d) for d in range(graph.n_dst)]
    for d in range(len(graph.dst_names)):
        owners = p["dst_owners"][d]
        assert owners == ([graph.src_names[s] for s in graph.dst_feeds(d)] or ["logits"])
        node = p["dst_node"][d]
        assert node in owners or (".kv" in node and all(o.startswith(node.split(".")[0] + ".h") for o in owners))
    # every prefix + prune is Python's select_topn + prune
    for n in (0, 1, 3, 10, 30, 77, graph.n_edges):
        assert torch.equal(prefix_circuit(graph, p, n), prune(select_topn(graph, scores, n)).edges), n
    # the circuit: ranks point at its edges, and the initial n reproduces it
    ranks = decode(p["circuit"]["ranks"])
    assert p["circuit"]["n_edges"] == circuit.n_edges == len(ranks)
    assert {(int(src[r]), int(dst[r])) for r in ranks} == set(map(tuple, torch.nonzero(circuit.edges).tolist()))
    assert torch.equal(prefix_circuit(graph, p, p["circuit"]["n_init"]), circuit.edges)
    assert p["circuit"]["n_init"] <= 30
    json.loads(payload_json(p))


def test_dst_node_names() -> None:
    assert dst_node_name("a3.h2<q>") == "a3.h2" and dst_node_name("a1.kv0<v>") == "a1.kv0"
    assert dst_node_name("m4") == "m4" and dst_node_name("logits") == "logits"


def test_index_dtype_widens_for_big_graphs() -> None:
    small = viewer_payload(Graph(2, 2, 2, True, False), *_circ(Graph(2, 2, 2, True, False)))
    assert small["edges"]["src"]["dtype"] == "uint16"
    g = Graph(30, 9, 3, True, False)
    p = viewer_payload(g, prune(select_topn(g, random_scores(g), 500)), random_scores(g), max_edges=1000)
    assert p["edges"]["dst"]["dtype"] == "uint16"  # 481 destinations still fit


def _circ(graph: Graph):
    scores = random_scores(graph)
    return prune(select_topn(graph, scores, 10)), scores


def test_cap_keeps_strongest_prefix_and_the_circuit() -> None:
    graph = Graph(30, 9, 3, True, False)  # SmolLM2-135M's graph: 70,651 edges
    scores = random_scores(graph, 3)
    circuit = prune(select_topn(graph, scores, 4000))
    assert circuit.n_edges > 100
    p = viewer_payload(graph, circuit, scores)
    assert graph.n_edges == 70651
    assert p["edges"]["capped"] and p["edges"]["n_ordered"] == 50000 and p["edges"]["n_total"] == 70651
    assert any("50,000" in note and "70,651" in note for note in p["notes"])
    assert not any("max_edges" in note for note in p["notes"])  # no setting a reader cannot reach
    full = viewer_payload(graph, circuit, scores, max_edges=10**6)
    cap = int(decode(full["circuit"]["ranks"]).max()) // 2
    p = viewer_payload(graph, circuit, scores, max_edges=cap)  # the circuit reaches past the cap
    src, dst = decode(p["edges"]["src"]), decode(p["edges"]["dst"])
    assert p["edges"]["n_ordered"] == cap and p["edges"]["n"] > cap
    ranks = decode(p["circuit"]["ranks"])
    assert {(int(src[r]), int(dst[r])) for r in ranks} == set(map(tuple, torch.nonzero(circuit.edges).tolist()))
    assert p["circuit"]["n_init"] is None  # not reproducible within the stored prefix
    assert torch.equal(prefix_circuit(graph, p, cap), prune(select_topn(graph, scores, cap)).edges)


@pytest.mark.parametrize("selection", ["topn", "greedy"])
def test_big_circuit_opens_on_a_readable_part(selection) -> None:
    """A circuit of hundreds of edges opens on top-n + prune with the largest n that keeps at most
    open_edges edges (one more would exceed it); for a top-n circuit that part is inside the circuit.
    The slider (n_ordered) still reaches every stored edge, and a note says how to see the whole."""
    graph = Graph(12, 12, 12, True, False)
    scores = random_scores(graph, 2)
    select = select_topn if selection == "topn" else select_greedy
    circuit = prune(select(graph, scores, 1500))
    assert circuit.n_edges > 300
    p = viewer_payload(graph, circuit, scores)
    init = p["initial"]
    assert init["mode"] == "topn" and init["limit"] == 100
    shown = prefix_circuit(graph, p, init["n"])
    assert 0 < int(shown.sum()) == init["n_edges"] <= 100 < int(prefix_circuit(graph, p, init["n"] + 1).sum())
    if selection == "topn":
        assert init["n"] < p["circuit"]["n_init"] and not (shown & ~circuit.edges).any()
    assert p["edges"]["n_ordered"] == graph.n_edges
    assert any("strongest part" in n and f"{circuit.n_edges:,}" in n for n in p["notes"])
    small = viewer_payload(graph, circuit, scores, open_edges=10_000)
    assert small["initial"]["mode"] == "circuit" and small["initial"]["n_edges"] == circuit.n_edges
    assert not any("strongest part" in n for n in small["notes"])
    assert viewer_payload(graph, circuit, scores, open_edges=40)["initial"]["n_edges"] <= 40


def test_readable_n_never_opens_empty() -> None:
    """When the first path to the logits alone has more edges than the limit, the view opens on it
    rather than on nothing."""
    from kcircuits.report.viewer import edge_order, readable_n

    graph = Graph(3, 4, 4, True, False)
    scores = random_scores(graph, 1)
    src, dst = edge_order(graph, scores)
    n, kept = readable_n(graph, src, dst, graph.n_edges, scores, limit=0)
    assert kept > 0 and prune(select_topn(graph, scores, n - 1)).n_edges == 0
    assert prune(select_topn(graph, scores, n)).n_edges == kept


def test_gpt2_sized_payload_is_compact() -> None:
    graph = Graph(12, 12, 12, True, False)
    scores = random_scores(graph)
    assert graph.n_edges == 32491
    p = viewer_payload(graph, prune(select_topn(graph, scores, 500)), scores)
    assert not p["edges"]["capped"]
    assert len(payload_json(p)) < 32491 * 12


def test_circuit_not_from_topn_is_kept_as_is() -> None:
    graph = Graph(3, 4, 2, True, False)
    scores = random_scores(graph, 5)
    circuit = prune(select_greedy(graph, scores, 25))
    p = viewer_payload(graph, circuit, scores)
    src, dst = decode(p["edges"]["src"]), decode(p["edges"]["dst"])
    ranks = decode(p["circuit"]["ranks"])
    assert {(int(src[r]), int(dst[r])) for r in ranks} == set(map(tuple, torch.nonzero(circuit.edges).tolist()))
    n_init = p["circuit"]["n_init"]
    if n_init is None:
        assert any("not selected as top-n" in note for note in p["notes"])
    else:
        assert torch.equal(prefix_circuit(graph, p, n_init), circuit.edges)


def test_scores_default_to_circuit_scores_and_none_at_all() -> None:
    graph = Graph(2, 4, 2, True, False)
    scores = random_scores(graph)
    circuit = prune(select_topn(graph, scores, 12))
    assert payload_json(viewer_payload(graph, circuit, None)) == payload_json(viewer_payload(graph, circuit, scores))
    bare = circuit_from_edges(graph, ["input->a0.h1<q>", "a0.h1->logits"])
    p = viewer_payload(graph, bare, None)
    assert p["has_scores"] is False and p["edges"]["n"] == 2 and p["circuit"]["n_init"] is None
    assert np.isnan(decode(p["edges"]["score"])).all()
    assert any("no attribution scores" in n for n in p["notes"])
    json.loads(payload_json(p), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))


def test_nan_scores_rank_last_and_json_stays_valid() -> None:
    graph = Graph(2, 4, 4, True, False)
    scores = random_scores(graph)
    circuit = prune(select_topn(graph, scores, 12))
    scores[0, :3] = float("nan")
    p = viewer_payload(graph, circuit, scores)
    sc = decode(p["edges"]["score"])
    assert np.isnan(sc[-3:]).all() and not np.isnan(sc[:-3]).any()
    assert any("NaN" in n for n in p["notes"])
    json.loads(payload_json(p), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))


def test_empty_circuit() -> None:
    graph = Graph(2, 4, 4, True, False)
    scores = random_scores(graph)
    empty = Circuit(graph, torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool), scores)
    p = viewer_payload(graph, empty, scores)
    assert p["circuit"]["n_edges"] == 0 and p["circuit"]["n_init"] == 0
    assert len(decode(p["circuit"]["ranks"])) == 0


def test_errors() -> None:
    graph = Graph(2, 4, 4, True, False)
    circuit, scores = _circ(graph)
    with pytest.raises(KcircuitsError, match="shape"):
        viewer_payload(graph, circuit, scores[:, :-1])
    with pytest.raises(KcircuitsError, match="different graph"):
        viewer_payload(Graph(3, 4, 4, True, False), circuit, scores)


EVIL = "</script><b>x</b><!--"


def details() -> dict:
    return {"example": {"prompt": "The capital of France is", "tokens": ["The", " capital", EVIL], "answer": " Paris"},
            "nodes": {"a0.h1": {"lens": {"top": [[EVIL, 0.5], [" Paris", float("nan")]], "answer_rank": 3,
                                         "answer_prob": 0.1},
                                "attention": {"weights": torch.tensor([0.25, 0.25, 0.5])},
                                "role": {"role": "mover", "subject_mass": 0.5, "relation_mass": 0.25,
                                         "other_mass": 0.25, "direct_effect": float("inf")}},
                      "logits": {"lens": {"top": [[" Paris", 0.9]], "answer_rank": 1, "answer_prob": 0.9}}}}


def test_node_details_passthrough() -> None:
    graph = Graph(2, 4, 4, True, False)
    circuit, scores = _circ(graph)
    p = viewer_payload(graph, circuit, scores, details())
    d = p["details"]
    assert d["example"]["tokens"][2] == EVIL and d["example"]["answer"] == " Paris"
    node = d["nodes"]["a0.h1"]
    assert node["lens"]["top"] == [[EVIL, 0.5], [" Paris", None]]  # NaN -> null
    assert node["attention"]["weights"] == [0.25, 0.25, 0.5]  # tensors -> lists
    assert node["role"]["role"] == "mover" and node["role"]["direct_effect"] is None
    assert viewer_payload(graph, circuit, scores)["details"] is None


def _script_data(page: str) -> str:
    m = re.search(r'<script type="application/json" id="kcv-data">(.*?)</script>', page, flags=re.DOTALL)
    assert m
    return m.group(1)


def test_html_escaping_in_embedded_json() -> None:
    graph = Graph(2, 4, 4, True, False)
    circuit, scores = _circ(graph)
    html = viewer_section(viewer_payload(graph, circuit, scores, details()))
    data = _script_data(html)
    assert "<" not in data and ">" not in data and "&" not in data
    assert json.loads(data)["details"]["nodes"]["a0.h1"]["lens"]["top"][0][0] == EVIL
    # exactly two scripts, each closed once: nothing from the data broke out
    assert html.count("<script") == 2 and html.count("</script>") == 2
    assert "<b>" not in html


def test_report_page_with_viewer() -> None:
    graph = Graph(3, 6, 2, True, False)
    scores = random_scores(graph)
    circuit = prune(select_topn(graph, scores, 40))
    config = {"reproduce": {"command": "discover", "model": "tiny", "relation": "r"}}
    report = build_report(config, circuit, {}, {}, graph, scores=scores, node_details=details())
    assert report["viewer"]["format"] == "kcircuits-viewer/1"
    page = render_report(report)
    assert 'id="viewer"' in page and 'href="#viewer"' in page and "<canvas" in page
    assert page.count("<script") == 2
    assert "<svg" in page  # the static drawing stays for readers without JavaScript
    assert "<noscript>" in page and 'id="kc-static-circuit"' in page
    # still self-contained: no fetches, the only URL is the SVG namespace
    stripped = page.replace(SVG_NS, "")
    assert "http://" not in stripped and "https://" not in stripped
    assert not re.search(r"\bsrc=", page) and "url(" not in page and "@import" not in page
    assert "</script><b>" not in page
    # without scores (and without circuit scores) build_report leaves the viewer out
    bare = circuit_from_edges(graph, ["input->a0.h1<q>", "a0.h1->logits"])
    assert "viewer" not in build_report(config, bare, {}, {}, graph)
    assert "viewer" in build_report(config, bare, {}, {}, graph, scores=scores)


def test_payload_numbers_are_finite_json() -> None:
    graph = Graph(2, 4, 4, True, False)
    circuit, scores = _circ(graph)
    p = json.loads(payload_json(viewer_payload(graph, circuit, scores, details())))

    def walk(v):
        if isinstance(v, float):
            assert math.isfinite(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(p)


def test_highlighted_edges_are_stored_and_marked_exactly() -> None:
    """The highlight ranks decode to exactly the highlighted edges, even those past the stored cap."""
    graph = Graph(3, 6, 2, True, False)
    scores = random_scores(graph, 5)
    circuit = prune(select_topn(graph, scores, 60))
    other = prune(select_topn(graph, random_scores(graph, 6), 60))
    mark = circuit.edges & ~other.edges
    assert 0 < int(mark.sum()) < circuit.n_edges
    hl = mark.clone()
    weakest = torch.nonzero(graph.edge_exists() & ~circuit.edges)[-1].tolist()  # also one edge outside the circuit
    hl[weakest[0], weakest[1]] = True
    for cap in (10**6, 20):
        p = viewer_payload(graph, circuit, scores, max_edges=cap, highlight=hl, highlight_nodes=["a1.h2", "m0"],
                           highlight_label="only here")
        src, dst = decode(p["edges"]["src"]), decode(p["edges"]["dst"])
        got = {(int(src[r]), int(dst[r])) for r in decode(p["highlight"]["ranks"])}
        assert got == set(map(tuple, torch.nonzero(hl).tolist()))
        assert p["highlight"]["nodes"] == ["a1.h2", "m0"] and p["highlight"]["label"] == "only here"
        ranks = decode(p["circuit"]["ranks"])  # the circuit is still exactly the circuit
        assert {(int(src[r]), int(dst[r])) for r in ranks} == set(map(tuple, torch.nonzero(circuit.edges).tolist()))
    assert viewer_payload(graph, circuit, scores)["highlight"] is None
    with pytest.raises(KcircuitsError, match="highlight has shape"):
        viewer_payload(graph, circuit, scores, highlight=hl[:, :-1])


def test_viewer_html_ids_follow_the_key() -> None:
    from kcircuits.report.viewer import viewer_html

    graph = Graph(2, 4, 4, True, False)
    circuit, scores = _circ(graph)
    p = viewer_payload(graph, circuit, scores)
    html = viewer_html(p, "kcv-pair0-after")
    ids = re.findall(r'id="([^"]+)"', html)
    assert ids and all(i == "kcv-pair0-after" or i.startswith("kcv-pair0-after-") for i in ids)
    assert "<script>" not in html  # one script per page section, after the viewers it mounts
    assert set(re.findall(r'id="kcv[^"]*"', viewer_section(p))) == {i.replace("kcv-pair0-after", "kcv", 1)
                                                                    for i in re.findall(r'id="kcv[^"]*"', html)}
    for bad in ("pair", "kcv-Pair", "kcv-a b", 'kcv"><script>'):
        with pytest.raises(KcircuitsError, match="viewer key"):
            viewer_html(p, bad)
