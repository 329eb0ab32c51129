"""Honest evaluation: random circuits of the circuit's exact size, ties counted against the answer,
the chance level beside every Hit@k, unstable per-prompt faithfulness, and the paper's test protocol."""

import json

import pytest
import torch

from kcircuits import api, pipeline
from kcircuits.batching import make_batch
from kcircuits.cli import main
from kcircuits.data import build_prompts, cap_pairs, load_dataset, split_samples
from kcircuits.discover.eap import attribute
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.evaluate import Evaluator
from kcircuits.graph import Graph, prune
from kcircuits.metrics import answer_rank, stable_prompts
from kcircuits.models import load_model
from kcircuits.selection import RANDOM_KINDS, CircuitShape, random_circuit, random_circuits, select
from tests.helpers import Pair, random_batch
from tests.model_helpers import tiny_model

#: The tiny random model ranks answers about uniformly over its 49,152 tokens: this keeps about half.
KNOWN_K = 25000
SMALL = dict(max_pairs=8, batch_size=4, curve=False, n_random=2, progress=False, steps=2, explain_prompts=0)


@pytest.fixture(scope="module")
def tiny(tiny_smol_dir):
    return load_model(tiny_smol_dir)


# ----------------------------------------------------------------------------- random circuits of the same size
def test_every_random_draw_has_the_circuits_exact_pruned_size():
    eng = Engine(tiny_model("llama").weights)
    batches = [random_batch(3, seed=0), random_batch(3, seed=1)]
    scores = attribute(eng, batches, method="eap", progress=False)
    ev = Evaluator(eng, batches, progress=False)
    for n in (5, 20, 60):
        circuit = select(eng.graph, scores, n)
        shape = CircuitShape.of(circuit)
        base = ev.random_baselines(circuit, n_draws=4, seed=n)
        assert set(base["kinds"]) == set(RANDOM_KINDS)
        for kind, entry in base["kinds"].items():
            assert len(entry["shapes"]) == 4 and len(entry["faithfulness_of_means"]) == 4
            for s in entry["shapes"]:
                assert s["n_edges"] == circuit.n_edges, (kind, s)
            if kind == "same_logit_edges":
                assert all(s["n_logit_edges"] == shape.n_logit_edges for s in entry["shapes"])
        for kind in RANDOM_KINDS:
            for c in random_circuits(eng.graph, shape, 4, seed=n, kind=kind):
                assert prune(c).n_edges == c.n_edges == circuit.n_edges  # pruning removes nothing


@pytest.mark.parametrize("graph",
                         [Graph(30, 9, 3, True, False), Graph(3, 4, 4, True, True), Graph(2, 6, 2, False, False)],
                         ids=["smollm2-shape", "parallel", "ungrouped"])
def test_random_circuits_are_exact_valid_and_reproducible(graph):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(graph.n_src, graph.n_dst, generator=gen)
    for n in (1, 2, 3, 7, 40, graph.n_edges // 3, graph.n_edges):
        c = random_circuit(graph, n, seed=n)
        assert c.n_edges == n and prune(c).n_edges == n
    for frac in (0.01, 0.1, 0.5):
        found = select(graph, scores, max(1, round(graph.n_edges * frac)), selection="greedy")
        if not found.n_edges:
            continue
        shape = CircuitShape.of(found)
        r = random_circuit(graph, shape, seed=3, match_logit_edges=True)
        got = CircuitShape.of(r)
        assert got.n_edges == shape.n_edges and got.n_logit_edges == shape.n_logit_edges
        assert got.n_nodes <= shape.n_nodes and prune(r).n_edges == r.n_edges
        assert torch.equal(r.edges, random_circuit(graph, shape, seed=3, match_logit_edges=True).edges)
        assert not torch.equal(r.edges, random_circuit(graph, shape, seed=4, match_logit_edges=True).edges)
    with pytest.raises(KcircuitsError, match="between 1 and"):
        random_circuit(graph, 0, seed=0)
    with pytest.raises(KcircuitsError, match="between 1 and"):
        random_circuit(graph, graph.n_edges + 1, seed=0)


def test_random_circuits_match_the_node_count_when_the_edge_budget_allows():
    g = Graph(30, 9, 3, True, False)
    found = select(g, torch.randn(g.n_src, g.n_dst, generator=torch.Generator().manual_seed(1)), 700,
                   selection="greedy")
    shape = CircuitShape.of(found)
    assert shape.n_edges >= 2 * shape.n_nodes  # budget for two edges per node
    for kind in RANDOM_KINDS:
        for c in random_circuits(g, shape, 2, seed=0, kind=kind):
            assert CircuitShape.of(c).n_nodes == shape.n_nodes


# ----------------------------------------------------------------------------- ties count against the answer
def test_constant_logits_never_rank_the_answer_first():
    pairs = [Pair([1, 2, 3], [1, 4, 3], [a], [(a + 1) % 50]) for a in (0, 7, 49)]
    batch = make_batch(pairs, pad_id=0)
    logits = torch.zeros(3, 1, 50)
    assert answer_rank(logits, batch).tolist() == [50, 50, 50]  # every tie counted against the answer
    assert not (answer_rank(logits, batch) <= 10).any()
    logits[0, 0, 0] = 1.0  # a strict maximum is rank 1; one tie with it makes both rank 2
    logits[1, 0, 7], logits[1, 0, 8] = 2.0, 2.0
    assert answer_rank(logits, batch).tolist()[:2] == [1, 2]
    logits[2, 0, 49] = float("nan")
    assert answer_rank(logits, batch)[2] == 50  # a NaN answer logit is never a hit


def test_constant_logits_evaluate_to_zero_hits(tiny, monkeypatch):
    """An ablation that flattens every logit (the zero-ablation case the issue reports) has Hit@1 = Hit@10 = 0."""
    eng = Engine(tiny_model("llama").weights)
    batches = [random_batch(4, seed=0)]
    ev = Evaluator(eng, batches, progress=False)
    monkeypatch.setattr(ev, "circuit_logits", lambda c: [torch.zeros_like(x.full_logits) for x in ev.cache])
    res = ev.evaluate(select(eng.graph, torch.rand(eng.graph.n_src, eng.graph.n_dst), 10))
    assert res["circuit_hit1"] == 0 and res["circuit_hit10"] == 0


def test_whole_answer_rank_is_the_worst_token():
    pairs = [Pair([1, 2, 3], [1, 4, 3], [5, 6], [9])]
    batch = make_batch(pairs, pad_id=0, answer_scoring="full")
    logits = torch.zeros(1, 2, 20)
    logits[0, 0, 5] = 3.0  # first answer token on top
    logits[0, 1, 6], logits[0, 1, 11] = 1.0, 2.0  # second one ranks 2
    assert answer_rank(logits, batch).tolist() == [2]


# ----------------------------------------------------------------------------- chance level
def test_chance_line_is_one_when_the_corrupted_run_already_ranks_the_answer_in_the_top_10():
    """With a vocabulary of 10 tokens every answer is in every top 10: chance Hit@10 = 1."""
    eng = Engine(tiny_model("llama", vocab_size=10).weights)
    batches = [random_batch(4, vocab=10, seed=0), random_batch(3, vocab=10, seed=1)]
    ev = Evaluator(eng, batches, progress=False)
    res = ev.evaluate(select(eng.graph, torch.rand(eng.graph.n_src, eng.graph.n_dst), 8))
    assert res["chance_hit10"] == 1.0 and res["circuit_hit10"] == 1.0
    assert res["per_prompt"]["rank_chance"] == ev.rank_empty.tolist()
    # and the chance level is the empty circuit's Hit@1: the corrupted run's own rank of the clean answer
    corrupt_ranks = torch.cat([answer_rank(eng.run(eng.embed(b.corrupt), b.target_pos).logits, b) for b in batches])
    assert res["chance_hit1"] == pytest.approx(float((corrupt_ranks <= 1).float().mean()))


def test_report_and_cli_show_chance_and_same_size_random(tiny_smol_dir, tmp_path, capsys):
    code = main(["discover", "country_capital", "--model", str(tiny_smol_dir), "--out", str(tmp_path / "r"),
                 "--percent", "20", "--max-pairs", "8", "--batch-size", "4", "--random-draws", "2", "--steps", "2",
                 "--quiet", "--split", "0.5", "--explain-prompts", "4", "--no-curve"])
    assert code == 0
    out = capsys.readouterr().out
    assert "chance" in out and "random" in out
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())["sets"]["test"]
    circuit = json.loads((tmp_path / "r" / "circuit.json").read_text())
    for kind in RANDOM_KINDS:
        assert all(s["n_edges"] == circuit["n_edges"] for s in m["random_baseline"]["kinds"][kind]["shapes"])
    assert {"chance_hit1", "chance_hit10"} <= set(m)
    html = (tmp_path / "r" / "report.html").read_text()
    assert "chance_hit10" in html and "random_hit10" in html and "chance (fully ablated)" in html
    lens = json.loads((tmp_path / "r" / "lens.json").read_text())
    assert "chance" in lens["summary"]


# ----------------------------------------------------------------------------- unstable per-prompt faithfulness
def test_prompts_with_a_near_zero_gap_are_flagged_and_left_out():
    m_full = torch.tensor([2.0, 3.0, 1.0, 0.01, 2.5])
    m_empty = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0])
    stable, threshold = stable_prompts(m_full, m_empty)
    assert threshold == pytest.approx(0.2) and stable.tolist() == [True, True, True, False, True]
    eng = Engine(tiny_model("llama").weights)
    batches = [random_batch(4, seed=0), random_batch(4, seed=1)]
    ev = Evaluator(eng, batches, progress=False)
    ev.m_full[0] = ev.m_empty[0] + 1e-6  # one prompt whose full and ablated runs nearly agree
    ev.stable, ev.min_gap = stable_prompts(ev.m_full, ev.m_empty)
    res = ev.evaluate(select(eng.graph, torch.rand(eng.graph.n_src, eng.graph.n_dst), 20))
    assert res["unstable_prompts"]["n"] >= 1 and res["per_prompt"]["stable"][0] is False
    assert res["faithfulness"]["n"] == res["faithfulness_all_prompts"]["n"] - res["unstable_prompts"]["n"]


# ----------------------------------------------------------------------------- the paper's protocol
def test_known_only_on_discover_tests_on_every_held_out_fact(tiny, monkeypatch):
    eng = Engine(tiny.weights)
    seen = []
    real = pipeline.known_filter

    def spy(engine, pairs, *a, **kw):
        seen.append(len(pairs))
        return real(engine, pairs, *a, **kw)

    monkeypatch.setattr(pipeline, "known_filter", spy)
    both = api.prepare_prompts(tiny, eng, "country_capital", split=0.5, known_only=True, known_k=KNOWN_K,
                               max_pairs=None, seed=0, batch_size=8)
    assert len(seen) == 2
    seen.clear()
    disc = api.prepare_prompts(tiny, eng, "country_capital", split=0.5, known_only=True, known_k=KNOWN_K,
                               max_pairs=None, seed=0, batch_size=8, known_only_on="discover")
    assert len(seen) == 1  # only the discovery half is filtered
    plain = api.prepare_prompts(tiny, eng, "country_capital", split=0.5, known_only=False, known_k=KNOWN_K,
                                max_pairs=None, seed=0, batch_size=8)
    assert [p.clean_text for p in disc["test"].pairs] == [p.clean_text for p in plain["test"].pairs]
    assert [p.clean_text for p in disc["discover"].pairs] == [p.clean_text for p in both["discover"].pairs]


def test_the_pair_cap_is_drawn_the_same_way_with_and_without_filtering(tiny):
    """Capping after the known filter draws from the kept pairs exactly as capping draws from all pairs."""
    eng = Engine(tiny.weights)
    ds = load_dataset("country_capital")
    all_pairs = build_prompts(ds, tiny.tokenizer, seed=0).pairs
    plain = api.prepare_prompts(tiny, eng, "country_capital", split=None, known_only=False, known_k=1, max_pairs=10,
                                seed=0, batch_size=8)["all"]
    assert [p.clean_text for p in plain.pairs] == [p.clean_text for p in cap_pairs(all_pairs, 10, 0)]
    assert [p.clean_text for p in build_prompts(ds, tiny.tokenizer, max_pairs=10, seed=0).pairs] == \
        [p.clean_text for p in plain.pairs]
    known = api.prepare_prompts(tiny, eng, "country_capital", split=None, known_only=True, known_k=KNOWN_K,
                                max_pairs=10, seed=0, batch_size=8)["all"]
    kept, _ = api.known_filter(eng, all_pairs, tiny.pad_token_id, KNOWN_K, 8)
    assert [p.clean_text for p in known.pairs] == [p.clean_text for p in cap_pairs(kept, 10, 0)]
    assert known.skipped["over_max_pairs"] == len(kept) - 10


def test_evaluate_on_the_held_out_half_of_a_split(tiny, tmp_path):
    found = api.discover("country_capital", tiny, out=tmp_path / "d", split=0.5, percent=20, known_only=True,
                         known_k=KNOWN_K, known_only_on="discover", **SMALL)
    ev = api.evaluate(found.folder, ["country_capital"], tiny, out=tmp_path / "e", split=0.5, templates=[0],
                      max_pairs=8, batch_size=4, n_random=1, explain_prompts=0, progress=False)
    found_on_half, held_out_half = split_samples(load_dataset("country_capital"), 0.5, 0)
    held_out = {s["subject"] for s in held_out_half.samples}
    found_on = {s["subject"] for s in found_on_half.samples}
    used = ev.prompts["country_capital"].pairs
    assert used and {p.subject for p in used} <= held_out and not {p.subject for p in used} & found_on
    assert {p.template for p in used} == {load_dataset("country_capital").prompt_templates[0]}


# ----------------------------------------------------------------------------- LRE zero-shot templates
LRE = {"name": "capital city", "properties": {"relation_type": "factual"},
       "prompt_templates": ["The capital city of {} is", "{} has its capital at"],
       "prompt_templates_zs": ["Q: What is the capital of {}? A:", "The capital of {} is the city of"],
       "samples": [{"subject": s, "object": o} for s, o in
                   [("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Italy", "Rome"),
                    ("Poland", "Warsaw"), ("Japan", "Tokyo"), ("Russia", "Moscow"), ("China", "Beijing")]]}


def test_lre_zero_shot_templates_are_read_and_selectable(tiny, tiny_smol_dir, tmp_path):
    path = tmp_path / "capital_city.json"
    path.write_text(json.dumps(LRE))
    ds = load_dataset(str(path))
    assert ds.zs_templates == LRE["prompt_templates_zs"]
    zs = build_prompts(ds, tiny.tokenizer, templates=["zs0"])
    assert zs.pairs and {p.template for p in zs.pairs} == {LRE["prompt_templates_zs"][0]}
    default = build_prompts(ds, tiny.tokenizer)
    assert {p.template for p in default.pairs} <= set(LRE["prompt_templates"])  # the default: prompt_templates
    every_zs = build_prompts(ds, tiny.tokenizer, templates=["zs"])
    assert {p.template for p in every_zs.pairs} <= set(LRE["prompt_templates_zs"])
    with pytest.raises(KcircuitsError, match="zs0..zs1"):
        build_prompts(ds, tiny.tokenizer, templates=["zs2"])
    with pytest.raises(KcircuitsError, match="no zero-shot templates"):
        build_prompts(load_dataset("country_capital"), tiny.tokenizer, templates=["zs0"])
    code = main(["discover", str(path), "--model", str(tiny_smol_dir), "--out", str(tmp_path / "run"), "--templates",
                 "zs0", "--percent", "20", "--max-pairs", "6", "--batch-size", "4", "--random-draws", "1",
                 "--steps", "2", "--no-curve", "--explain-prompts", "0", "--quiet"])
    assert code == 0
    prompts = json.loads((tmp_path / "run" / "prompts.json").read_text())
    assert all(p["clean"].startswith("Q: What is the capital of") for p in prompts["all"]["pairs"])


# ----------------------------------------------------------------------------- numeric answers
YEARS = {"name": "birth_year", "category": "factual", "prompt_templates": ["{} was born in the year"],
         "samples": [{"subject": s, "object": o} for s, o in
                     [("Abraham Lincoln", "1809"), ("George Washington", "1732"), ("John Adams", "1735"),
                      ("Thomas Jefferson", "1743"), ("James Madison", "1751"), ("James Monroe", "1758"),
                      ("Andrew Jackson", "1767"), ("John Tyler", "1790"), ("James Polk", "1795"),
                      ("Calvin Coolidge", "1872"), ("Harry Truman", "1884"), ("Gerald Ford", "1913")]]}


def test_years_name_the_real_cause_and_whole_answer_scoring_makes_them_usable(tiny, tmp_path):
    path = tmp_path / "birth_year.json"
    path.write_text(json.dumps(YEARS))
    first = build_prompts(load_dataset(str(path)), tiny.tokenizer)
    assert not first.pairs  # digits: every answer shares its first token with every same-length partner
    assert max(first.skipped, key=first.skipped.get) == "answer_first_token_collision"
    with pytest.raises(KcircuitsError, match="answer-scoring full") as err:
        api.discover(str(path), tiny, out=tmp_path / "a", percent=20, **SMALL)
    assert "--known-only" not in str(err.value)  # the old, wrong hint
    assert not (tmp_path / "a" / "circuit.json").exists()
    res = api.discover(str(path), tiny, out=tmp_path / "b", percent=20, answer_scoring="full", metric="logprob",
                       **SMALL)
    pairs = res.prompts["all"].pairs
    assert pairs and all(len(p.answer_ids) > 1 and p.answer_ids != p.corrupt_answer_ids for p in pairs)
    m = res.metrics["sets"]["discover"]  # no split: found and evaluated on the same prompts
    assert m["n_prompts"] == len(pairs) and abs(m["faithfulness_of_means"]) < 50
    base = m["random_baseline"]["kinds"]["same_size"]
    assert all(s["n_edges"] == res.circuit.n_edges for s in base["shapes"])
