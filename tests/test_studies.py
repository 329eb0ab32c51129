"""Compare, hallucination and ICL studies end to end on a tiny model (real tokenizer, bundled relations)."""

import json
import re

import pytest
import torch

from kcircuits import studies
from kcircuits.analyze.compare import overlap
from kcircuits.cli import main
from kcircuits.data import load_dataset
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.graph import Circuit, circuit_from_edges
from kcircuits.models import load_model
from kcircuits.report import render_report
from kcircuits.report.base import escape, token_label
from kcircuits.studies.hallucination import lost_layers, study_report
from kcircuits.studies.icl import (
    _accuracy_with_heads_ablated,
    _span_mask,
    demonstrations,
)

FAST = dict(percent=20, batch_size=4, steps=2, progress=False)


@pytest.fixture(scope="module")
def tiny(tiny_smol_dir):
    return load_model(tiny_smol_dir)


def _circuit(folder, name):
    return Circuit.from_json(json.loads((folder / f"circuit_{name}.json").read_text()))


def test_compare_matrices_match_the_circuits(tiny, tmp_path):
    res = studies.compare(["country_capital", "antonym"], tiny, out=tmp_path / "cmp", max_pairs=6, **FAST)
    folder = tmp_path / "cmp"
    a, b = _circuit(folder, "country_capital"), _circuit(folder, "antonym")
    ov = overlap(a, b)
    assert res["edge_jaccard"][0][1] == pytest.approx(ov["edge_jaccard"]) == pytest.approx(res["edge_jaccard"][1][0])
    assert res["node_jaccard"][0][0] == 1.0 and res["edge_jaccard"][1][1] == 1.0
    assert all(torch.isfinite(torch.tensor(row)).all() for row in res["faithfulness"])
    saved = json.loads((folder / "compare.json").read_text())
    assert saved["faithfulness"] == res["faithfulness"]
    html = (folder / "report.html").read_text()
    assert "Faithfulness of the row" in html and "country_capital" in html
    with pytest.raises(KcircuitsError, match="at least two"):
        studies.compare(["antonym"], tiny, out=tmp_path / "x", **FAST)
    assert not (tmp_path / "x").exists()


def test_lost_layers():
    ranks = torch.tensor([[50, 9, 2, 7, 30],  # best (2) after layer 2, lost at layer 3
                          [50, 40, 30, 20, 5],  # best at the output: never lost
                          [3, 1, 1, 4, 8]])  # best reached last after layer 2
    assert lost_layers(ranks).tolist() == [3, -1, 3]


def test_hallucination_groups_and_report(tiny, tmp_path, monkeypatch):
    """A random tiny model gets nothing right, so the model's answers are set: every other prompt right,
    the rest 'predicting' token 42. The rest of the study runs for real."""
    import importlib

    hall = importlib.import_module("kcircuits.studies.hallucination")  # the module, not the function of that name

    def fake_ranks(engine, pairs, pad_id, batch_size):
        ranks = torch.tensor([1 if i % 2 == 0 else 5 for i in range(len(pairs))])
        top = torch.tensor([p.answer_ids[0] if i % 2 == 0 else 42 for i, p in enumerate(pairs)])
        return ranks, top

    monkeypatch.setattr(hall, "answer_ranks", fake_ranks)
    res = studies.hallucination("country_capital", tiny, out=tmp_path / "h", max_pairs=12, max_per_group=4,
                                min_per_group=2, **FAST)
    assert res["n_used"] == {"right": 4, "wrong": 4} and res["n_right"] == 6 and res["n_wrong"] == 6
    n_layers = tiny.weights.n_layers
    assert all(v == -1 or 1 <= v <= n_layers for v in res["lost_at_layer"]) and len(res["lost_at_layer"]) == 4
    assert all(p["predicted"] == tiny.tokenizer.decode([42]).strip() for p in res["wrong_prompts"])
    folder = tmp_path / "h"
    ov = overlap(_circuit(folder, "right"), _circuit(folder, "wrong"))
    assert res["overlap"]["edge_jaccard"] == pytest.approx(ov["edge_jaccard"])
    roles = json.loads((folder / "roles_wrong_prediction.json").read_text())["heads"]
    for m in res["wrong_attribute_movers"]:  # the listed heads are the wrong-token roles' top by z-score
        row = next(r for r in roles if r["head"] == m["head"])
        assert m["wrong_token_z"] == pytest.approx(row["answer_z"]) and row["subject_mass"] >= 0.3
    html = (folder / "report.html").read_text()
    assert "Findings" in html and "rank by layer" in html
    # 4 prompts per group: the findings resting on them say the sample is small
    assert "small sample: 4 prompts" in html
    # the lost-at-layer histogram is bars, one per layer and one for "never"
    lost_chart = re.search(r'<svg[^>]*class="kc-line kc-bar"[^>]*aria-label="where the correct answer is lost"'
                           r".*?</svg>", html, flags=re.DOTALL)
    assert lost_chart and lost_chart[0].count('<rect class="bar"') == n_layers + 1
    # tokens keep their leading space, in quotes
    assert all(p["predicted_token"] == tiny.tokenizer.decode([42]) for p in res["wrong_prompts"])
    assert escape(token_label(tiny.tokenizer.decode([42]))) in html


def _synthetic_hallucination(n_right: int, n_wrong: int, lost: list[int], settle: list[int]) -> dict:
    """A hallucination result as the study writes it, for a 4-layer model."""
    trace = {"median_rank": [100, 40, 9, 3, 1]}
    return {"relation": "country_capital", "n_prompts": n_right + n_wrong + 3, "n_right": n_right + 1,
            "n_wrong": n_wrong + 2, "n_used": {"right": n_right, "wrong": n_wrong}, "n_edges": 50,
            "overlap": {"node_jaccard": 0.5, "edge_jaccard": 0.25, "shared_nodes": 3, "shared_edges": 4},
            "faithfulness": {"right": {"right": 0.9, "wrong": 0.5}, "wrong": {"right": -0.0, "wrong": 0.8}},
            "trace": {"right": trace, "wrong": trace, "wrong_prediction_on_wrong_prompts": trace},
            "lost_at_layer": lost, "wrong_answer_settles_at": settle,
            "wrong_prompts": [{"prompt": "The capital of Portugal is", "answer": "Lisbon", "predicted": "Madrid",
                               "rank": 2, "lost_at_layer": lo, "answer_token": " Lisbon", "predicted_token": " Madrid"}
                              for lo in lost],
            "wrong_attribute_movers": [{"head": "a2.h1", "role_for_wrong_token": "mover", "subject_mass": 0.6,
                                        "wrong_token_z": 3.14, "wrong_token_direct_effect": -0.0001,
                                        "correct_token_z": -0.0, "in_wrong_circuit": True}]}


def _findings(page: str) -> list[str]:
    section = re.search(r'<section id="findings">(.*?)</section>', page, flags=re.DOTALL)[1]
    return re.findall(r"<p>(.*?)</p>", section, flags=re.DOTALL)


def test_hallucination_report_bars_and_small_samples():
    """Counts per layer are drawn as bars with the counts as heights; only the findings that rest on
    fewer than 5 prompts carry the small-sample warning; tokens keep their space; no negative zero."""
    lost = [2, 2, 3, -1, -1, -1, -1, -1]  # the answer is lost on 3 of 8 wrong prompts
    page = render_report(study_report(_synthetic_hallucination(8, 8, lost, [3] * 8), "tiny"))
    findings = _findings(page)
    warned = [f for f in findings if "small sample" in f]
    assert len(findings) == 5 and len(warned) == 1
    assert "lost at layer 2" in warned[0] and "small sample: 3 prompts" in warned[0]
    chart = re.search(r'<svg[^>]*class="kc-line kc-bar"[^>]*>.*?</svg>', page, flags=re.DOTALL)[0]
    tips = re.findall(r'<rect class="bar"[^>]*height="([\d.]+)"[^>]*><title>([^<]*)</title>', chart)
    assert [t for _, t in tips] == [f"wrong prompts: {x} \u2192 {n}"
                                    for x, n in ((1, 0), (2, 2), (3, 1), (4, 0), ("never", 5))]
    heights = [float(h) for h, _ in tips]
    assert heights[0] == heights[3] == 0 and heights[4] > heights[1] > heights[2] > 0
    assert heights[1] == pytest.approx(2 * heights[2], abs=0.2) and heights[4] == pytest.approx(5 * heights[2], abs=0.2)
    assert '<path d="M' not in chart  # no line series
    assert escape("' Lisbon'") in page and escape("' Madrid'") in page and escape("'Lisbon'") not in page
    visible = re.sub(r"<(script|style)\b.*?</\1>", "", page, flags=re.DOTALL)
    assert not re.findall(r"(?<![\w.])-0(?:\.0+)?(?![\d.])", visible)
    # every group small: every finding is flagged, and so are the charts and tables resting on them
    page = render_report(study_report(_synthetic_hallucination(4, 3, [1, -1, 2], [2, 2, 2]), "tiny"))
    assert all("small sample" in f for f in _findings(page))
    charts = re.search(r'<section id="charts">(.*?)</section>', page, flags=re.DOTALL)[1]
    assert charts.count("small sample: 3 prompts") == 2


def test_hallucination_needs_both_groups(tiny, tmp_path):
    with pytest.raises(KcircuitsError, match="right and"):
        studies.hallucination("country_capital", tiny, out=tmp_path / "h", max_pairs=6, **FAST)
    assert not (tmp_path / "h" / "hallucination.json").exists()


def test_demonstration_spans_and_mask(smollm2_tokenizer):
    from types import SimpleNamespace

    tpl = "The capital of {} is"
    prefix, spans = demonstrations(tpl, [{"subject": "Malta", "object": "Valletta"},
                                         {"subject": "Peru", "object": "Lima"}])
    assert prefix == "The capital of Malta is Valletta. The capital of Peru is Lima. "
    assert [prefix[a:b] for a, b in spans] == ["Valletta", "Lima"]
    text = prefix + tpl.replace("{}", "France")
    ids = smollm2_tokenizer(text)["input_ids"]
    mask = _span_mask(smollm2_tokenizer, [SimpleNamespace(clean_text=text, clean_ids=ids)], spans, len(ids) + 1)[0]
    marked = "".join(smollm2_tokenizer.decode([i]) for i, m in zip(ids, mask, strict=False) if m)  # mask: one pad more
    assert marked.replace(" ", "") == "VallettaLima" and not mask[-1]


def test_icl_study(tiny, tmp_path):
    res = studies.icl("country_capital", tiny, out=tmp_path / "icl", ks=(0, 1, 2), max_pairs=6, n_random=2, **FAST)
    folder = tmp_path / "icl"
    assert set(res["accuracy"]) == {"0", "1", "2"} and res["n_queries"] == 6
    demo_subjects = {d["subject"] for d in res["demonstrations"]}
    assert len(res["demonstrations"]) == 2 and len({d["object"] for d in res["demonstrations"]}) == 2
    heads0 = {n for n in _circuit(folder, "k0").nodes() if n.startswith("a")}
    for k in ("1", "2"):
        heads_k = {n for n in _circuit(folder, f"k{k}").nodes() if n.startswith("a")}
        assert res["new_heads_by_k"][k] == sorted(heads_k - heads0)
    assert set(res["attention_to_demo_answers"]) == set(res["new_heads"])
    assert all(0 <= v <= 1 for v in res["attention_to_demo_answers"].values())
    if res["new_heads"]:
        a = res["ablation"]
        assert len(a["accuracy_random_heads_ablated"]) == 2 and 0 <= a["accuracy_new_heads_ablated"] <= 1
    saved = json.loads((folder / "icl.json").read_text())
    assert saved["template"] == "The capital of {} is"
    # demonstrations never overlap the queries: neither their subjects nor their answers
    query_subjects = set(saved["query_subjects"])
    assert len(query_subjects) == res["n_queries"] == 6 and saved["query_subjects"] == res["query_subjects"]
    assert not demo_subjects & query_subjects
    answer_of = {s["subject"]: s["object"] for s in load_dataset("country_capital").samples}
    assert not {d["object"] for d in res["demonstrations"]} & {answer_of[s] for s in query_subjects}
    assert "accuracy by number of demonstrations" in (folder / "report.html").read_text()


def test_icl_ablation_of_new_heads(tiny, tmp_path, monkeypatch):
    """The ablation branch with new heads present (it once crashed with a TypeError there). The
    zero-shot circuit is replaced by the bare input -> logits edge, so every head of the k > 0
    circuits is new whatever the random model's scores; the rest runs for real."""
    import importlib

    icl_module = importlib.import_module("kcircuits.studies.icl")  # the module, not the function of that name
    real_find = icl_module.find_circuit

    def find(run, name, engine, *args, **kwargs):
        circuit, scores = real_find(run, name, engine, *args, **kwargs)
        if name == "k0":
            circuit = circuit_from_edges(engine.graph, ["input->logits"])
        return circuit, scores

    monkeypatch.setattr(icl_module, "find_circuit", find)
    res = studies.icl("country_capital", tiny, out=tmp_path / "icl", ks=(0, 2), max_pairs=6, n_random=3, **FAST)
    assert res["new_heads"] and res["new_heads"] == res["new_heads_by_k"]["2"]
    a = res["ablation"]
    assert a["k"] == 2 and a["n_heads"] == len(res["new_heads"])
    assert a["accuracy_intact"] == res["accuracy"]["2"]
    assert len(a["accuracy_random_heads_ablated"]) == 3
    assert all(0 <= v <= 1 for v in [a["accuracy_new_heads_ablated"], *a["accuracy_random_heads_ablated"]])
    assert a["accuracy_random_heads_ablated_mean"] == pytest.approx(sum(a["accuracy_random_heads_ablated"]) / 3)
    saved = json.loads((tmp_path / "icl" / "icl.json").read_text())
    assert saved["ablation"] == a
    assert "Accuracy after ablation" in (tmp_path / "icl" / "report.html").read_text()


@pytest.mark.parametrize("ks,match", [((1, 2), "must include 0"), ((0,), "at least one k >= 1"),
                                      ((), "must include 0"), ((-1, 0, 1), "must be >= 0")])
def test_icl_rejects_bad_ks_before_loading(ks, match, tmp_path, monkeypatch):
    """k = 0 is required (the new heads are those missing from the zero-shot circuit); bad ks fail
    before any model is loaded or folder written."""
    import importlib

    icl_module = importlib.import_module("kcircuits.studies.icl")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --ks was checked")

    monkeypatch.setattr(icl_module, "open_run", no_load)
    with pytest.raises(KcircuitsError, match=match):
        studies.icl("country_capital", "no-such-model", out=tmp_path / "i", ks=ks, **FAST)
    assert not (tmp_path / "i").exists()


def test_ablating_no_heads_is_the_intact_model(tiny):
    from kcircuits.ablation import mean_activations
    from kcircuits.api import model_batches, answer_ranks, prepare_prompts

    eng = Engine(tiny.weights)
    pairs = prepare_prompts(tiny, eng, "country_capital", split=None, known_only=False, known_k=1, max_pairs=6, seed=0,
                            batch_size=4)["all"].pairs
    batches = model_batches(tiny, pairs, 4, "first_token")
    ranks, _ = answer_ranks(eng, pairs, tiny.pad_token_id, 4)
    intact = float((ranks == 1).float().mean())
    mean = mean_activations(eng, batches)
    assert _accuracy_with_heads_ablated(eng, pairs, tiny.pad_token_id, 4, [], mean) == intact
    # ablating every head changes the ranks (the random model's answers move), so the mask is applied
    heads = [f"a{layer}.h{h}" for layer in range(eng.graph.n_layers) for h in range(eng.graph.n_heads)]
    g = eng.graph
    mask = torch.ones(g.n_src, g.n_dst)
    mask[[g.src_index(h) for h in heads]] = 0
    patched, _ = answer_ranks(eng, pairs, tiny.pad_token_id, 4, mask=mask, ablated=mean)
    assert not torch.equal(patched, ranks)


def test_cli_study_errors(tiny_smol_dir, tmp_path, capsys):
    code = main(["study", "icl", "country_capital", "--model", tiny_smol_dir, "--ks", "1", "2", "--out",
                 str(tmp_path / "i")])
    assert code == 2 and "must include 0" in capsys.readouterr().err
    code = main(["compare", "country_capital", "no_such_relation", "--model", tiny_smol_dir, "--out",
                 str(tmp_path / "c")])
    assert code == 2 and "no_such_relation" in capsys.readouterr().err
