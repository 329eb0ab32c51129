"""Influence API and CLI end to end on tiny models: run folders, resume, pre-filter, report, ground truth."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from benchmarks.facts_setup import WordTokenizer, completion_accuracy, finetune
from tests.model_helpers import crash_on_call, tiny_hf

from kcircuits.errors import KcircuitsError
from kcircuits.influence import api
from kcircuits.influence.analysis import recall_at_k
from kcircuits.influence.bm25 import BM25
from kcircuits.influence.cli import add_parser, run
from kcircuits.influence.corpus import load_corpus, load_queries
from kcircuits.influence.factors import Factors, fit_factors
from kcircuits.influence.facts import make_facts_corpus
from kcircuits.influence.scores import pairwise_scores
from kcircuits.influence.sequences import Sequences
from kcircuits.io import load_tensors
from kcircuits.models import from_hf
from kcircuits.report.influence_section import highlight_tokens, render_influence


def facts_model(n_docs=30, n_facts=4, seed=0, tmp_path=None):
    """A tiny llama over the facts corpus' own word vocabulary, plus the corpus (written when tmp_path)."""
    fc = make_facts_corpus(n_docs=n_docs, n_facts=n_facts, seed=seed)
    tok = WordTokenizer.for_corpus(fc)
    lm = from_hf(tiny_hf("llama", vocab_size=len(tok.vocab), num_hidden_layers=2), tok, name="tiny-facts")
    paths = fc.write(tmp_path) if tmp_path is not None else None
    return lm, fc, paths


# --------------------------------------------------------------------------- fit + score
def test_fit_then_score_writes_a_complete_run_folder(tmp_path):
    lm, fc, (corpus, queries) = facts_model(tmp_path=tmp_path)
    fit = api.fit(lm, corpus, out=tmp_path / "fit", batch_size=8, max_length=32, progress=False)
    assert (fit.folder / "factors" / "factors.json").exists() and fit.report.exists()
    assert fit.info["n_sequences"] == 30 and json.loads((fit.folder / "fit.json").read_text())["strategy"] == "ekfac"

    res = api.score(lm, queries, corpus, factors=fit.folder, out=tmp_path / "score", top_k=5, max_length=32,
                    components=["a0.h1", "m1"], power_law_bootstrap=5, query_rank=None, progress=False)
    # the API's scores are exactly the core's, on the same data and factors
    train, q = load_corpus(corpus, lm.tokenizer, 32), load_queries(queries, lm.tokenizer, 32)
    ref = pairwise_scores(lm.hf_model, q, train, factors=Factors.load(fit.folder / "factors"), progress=False)
    assert torch.allclose(res.total, ref.total, rtol=1e-4, atol=1e-6)

    saved = res.parts
    assert set(saved) >= {"total", "train_index", "layer.0", "layer.1", "component.a0.h1", "component.m1"}
    assert torch.allclose(saved["layer.0"] + saved["layer.1"], saved["total"], rtol=1e-4, atol=1e-5)
    r = json.loads((res.folder / "influence.json").read_text())
    assert r["n_queries"] == 4 and r["n_train"] == r["n_scored"] == 30 and r["damping"]
    for qi, entry in enumerate(r["queries"]):
        f = fc.facts[qi]
        assert entry["prompt"] == f.prompt and entry["completion"] == f.completion
        assert entry["sources"] == f.sources
        scores = [row["score"] for row in entry["top"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 5
        best = entry["top"][0]
        assert best["score"] == pytest.approx(float(res.total[qi].max()), rel=1e-5)
        assert best["text"] == fc.documents[best["train_index"]] and best["id"] == f"doc{best['train_index']}"
        assert "".join(best["pieces"]) == best["text"] and max(best["weights"]) == pytest.approx(1.0)
        assert entry["recall@5"] == pytest.approx(
            len(set(f.sources) & {row["train_index"] for row in entry["top"]}) / len(f.sources))
    assert [row["layer"] for row in r["by_layer"]] == [0, 1]
    assert {row["component"] for row in r["by_component"]} == {"a0.h1", "m1"}
    page = (res.folder / "report.html").read_text()
    assert 'id="influence"' in page and "Influence by layer" in page and "<script" not in page
    assert fc.facts[0].object in page


def test_score_rerun_reuses_results_and_refuses_other_config(tmp_path):
    lm, _, (corpus, queries) = facts_model(tmp_path=tmp_path)
    kw = {"strategy": "identity", "out": tmp_path / "run", "max_length": 32, "power_law_bootstrap": 0,
          "progress": False}
    first = api.score(lm, queries, corpus, **kw)
    stamp = (first.folder / "scores.safetensors").stat().st_mtime_ns
    again = api.score(lm, queries, corpus, **kw)
    assert (first.folder / "scores.safetensors").stat().st_mtime_ns == stamp
    assert torch.equal(first.total, again.total)
    with pytest.raises(KcircuitsError, match="different configuration"):
        api.score(lm, queries, corpus, **{**kw, "strategy": "diagonal"})


def test_fit_resumes_after_a_crash(tmp_path, monkeypatch):
    lm, _, (corpus, _) = facts_model(tmp_path=tmp_path)
    import kcircuits.influence.factors as factors_mod

    calls = crash_on_call(monkeypatch, factors_mod, "token_grads", at=3, exc=KeyboardInterrupt)  # in the third batch
    with pytest.raises(KeyboardInterrupt):  # 30 documents = 4 batches; checkpoint after every batch
        api.fit(lm, corpus, out=tmp_path / "fit", batch_size=8, max_length=32, checkpoint_seconds=0, progress=False)
    assert (tmp_path / "fit" / "factors" / "fit_state.safetensors").exists()
    assert not (tmp_path / "fit" / "factors" / "factors.json").exists()
    calls.update(n=0, crash=False)
    resumed = api.fit(lm, corpus, out=tmp_path / "fit", batch_size=8, max_length=32, checkpoint_seconds=0,
                      progress=False)
    assert calls["n"] == 2 + 4  # the 2 covariance batches left, then the 4 eigen batches
    fresh = api.fit(lm, corpus, out=tmp_path / "fresh", batch_size=8, max_length=32, progress=False)
    for name in fresh.factors.modules:
        assert torch.allclose(resumed.factors.tensors[name]["lambda"], fresh.factors.tensors[name]["lambda"], rtol=1e-6)


def test_bm25_prefilter_scores_only_candidates(tmp_path):
    lm, fc, (corpus, queries) = facts_model(tmp_path=tmp_path)
    full = api.score(lm, queries, corpus, strategy="identity", out=tmp_path / "full", max_length=32,
                     power_law_bootstrap=0, highlight=False, progress=False)
    part = api.score(lm, queries, corpus, strategy="identity", out=tmp_path / "part", max_length=32,
                     bm25_candidates=3, power_law_bootstrap=0, highlight=False, progress=False)
    expected = BM25(fc.documents).candidates([p + c for p, c in zip(fc.prompts, fc.completions, strict=True)], 3)
    assert torch.equal(part.train_index, expected) and part.results["n_scored"] == len(expected) < 30
    assert torch.allclose(part.total, full.total[:, expected], rtol=1e-4, atol=1e-6)
    top_ids = {row["train_index"] for q in part.results["queries"] for row in q["top"]}
    assert top_ids <= set(expected.tolist())


def test_relative_scores_through_the_api(tmp_path):
    """normalize="relative" with the identity preconditioner is the cosine of query and training
    gradients up to a per-query constant; it is recorded and kept apart from the raw run."""
    lm, _, (corpus, queries) = facts_model(tmp_path=tmp_path)
    kw = {"strategy": "identity", "max_length": 32, "power_law_bootstrap": 0, "progress": False}
    raw = api.score(lm, queries, corpus, out=tmp_path / "raw", **kw)
    rel = api.score(lm, queries, corpus, out=tmp_path / "rel", normalize="relative", **kw)
    norms = rel.parts["train_self"].sqrt()
    assert torch.allclose(rel.total, raw.total / norms, rtol=1e-4, atol=1e-6)
    train = load_corpus(corpus, lm.tokenizer, 32)
    from kcircuits.influence.gradients import LMObjective, flatten, sequence_grads, token_grads
    from kcircuits.influence.modules import tracked_modules

    mods = tracked_modules(lm.hf_model)
    grads = flatten(sequence_grads(*token_grads(lm.hf_model, train, mods, LMObjective())), list(mods))
    assert torch.allclose(norms, grads.norm(dim=1), rtol=1e-4)
    assert json.loads((rel.folder / "config.json").read_text())["reproduce"]["score"]["normalize"] == "relative"
    margin = api.score(lm, queries, corpus, out=tmp_path / "margin", measurement="margin", **kw)
    q = load_queries(queries, lm.tokenizer, 32)
    want = pairwise_scores(lm.hf_model, q, train, strategy="identity", measurement="margin", progress=False).total
    assert torch.allclose(margin.total, want, rtol=1e-4, atol=1e-6) and not torch.allclose(margin.total, raw.total)
    with pytest.raises(KcircuitsError, match="different configuration"):
        api.score(lm, queries, corpus, out=tmp_path / "rel", **kw)


def test_lissa_score_records_the_scale_it_used(tmp_path):
    lm, _, (corpus, queries) = facts_model(tmp_path=tmp_path)
    res = api.score(lm, queries, corpus, strategy="lissa", damping=0.1, lissa={"depth": 10, "batch_size": 4},
                    out=tmp_path / "lissa", max_length=32, power_law_bootstrap=0, highlight=False, progress=False)
    solver = json.loads((res.folder / "influence.json").read_text())["solver"]
    assert solver["lissa_scale"] > 0 and solver["lissa_retries"] >= 0
    assert torch.isfinite(res.total).all() and res.total.shape == (4, 30)


def _checkpoint_of(lm, corpus_texts, name):
    """A copy of ``lm`` trained one epoch further: a stand-in for another training checkpoint."""
    import copy

    ck = from_hf(copy.deepcopy(lm.hf_model), lm.tokenizer, name=name)
    finetune(ck.hf_model, Sequences.from_texts(lm.tokenizer, corpus_texts, 32), epochs=1, lr=1e-2, progress=False)
    return ck


def test_checkpoint_scores_are_the_sum_of_each_models_scores(tmp_path, monkeypatch):
    """checkpoints=[...] adds each checkpoint's scores (own factors, own folder) to the model's:
    equal to scoring each model alone and adding; per-layer and highlighted per-token scores still
    add up to the total; a crash in a later checkpoint keeps the finished ones."""
    lm, fc, (corpus, queries) = facts_model(tmp_path=tmp_path)
    ck = _checkpoint_of(lm, fc.documents, "tiny-facts-epoch1")
    kw = {"max_length": 32, "query_rank": None, "power_law_bootstrap": 0, "progress": False, "top_k": 3}
    alone = [api.score(m, queries, corpus, out=tmp_path / name, highlight=False, **kw).total
             for name, m in (("final", lm), ("ck", ck))]
    assert not torch.allclose(alone[0], alone[1], rtol=0.1)  # the checkpoint really is another model

    calls = crash_on_call(monkeypatch, api, "_pairwise", at=2)  # the checkpoint's scoring crashes
    with pytest.raises(RuntimeError, match="simulated"):
        api.score(lm, queries, corpus, out=tmp_path / "sum", checkpoints=[ck], **kw)
    assert (tmp_path / "sum" / "model" / "scores.safetensors").exists()  # the model's finished scores are kept
    assert not (tmp_path / "sum" / "scores.safetensors").exists()  # ... and are not taken for the sum
    calls["crash"] = False
    res = api.score(lm, queries, corpus, out=tmp_path / "sum", checkpoints=[ck], **kw)
    assert torch.allclose(res.total, alone[0] + alone[1], rtol=1e-4, atol=1e-6)
    assert (tmp_path / "sum" / "model" / "factors").is_dir()
    assert (tmp_path / "sum" / "checkpoint-1" / "factors").is_dir()
    layers = [v for k, v in res.parts.items() if k.startswith("layer.")]
    assert torch.allclose(sum(layers), res.total, rtol=1e-4, atol=1e-5)
    r = json.loads((res.folder / "influence.json").read_text())
    assert r["checkpoints"][0]["model"] == "tiny-facts-epoch1" and r["checkpoints"][0]["damping"] and r["damping"]

    # highlighted tokens are summed over the models too: a top pair's tokens add up to its score
    q, train = api._tokenise(api._read(queries, True), lm, 32), api._tokenise(api._read(corpus, False), lm, 32)
    folders = [(tmp_path / "sum" / name, m) for name, m in (("model", lm), ("checkpoint-1", ck))]
    stages = [api.Stage(m, None, api.RunFolder(f, json.loads((f / "config.json").read_text()))) for f, m in folders]
    st = api.ScoreSettings(max_length=32, query_rank=None, top_k=3)
    tokens = api._token_scores(stages, lm, q, train, res.parts, res.train_index, st, False)
    for (qi, ci), t in tokens.items():
        assert t.sum() == pytest.approx(float(res.total[qi, ci]), rel=1e-3, abs=1e-5)

    # the same words numbered in another order: not a checkpoint of this model
    reordered = WordTokenizer(list(reversed(fc.documents)) + fc.prompts + fc.completions)
    other = from_hf(ck.hf_model, reordered, name="other")
    with pytest.raises(KcircuitsError, match="tokenises the data differently"):
        api.score(lm, queries, corpus, out=tmp_path / "bad", checkpoints=[other], **kw)


def test_circuit_components_and_bad_inputs(tmp_path):
    lm, _, (corpus, queries) = facts_model(tmp_path=tmp_path)
    (tmp_path / "circuit.json").write_text(json.dumps({"nodes": ["input", "a1.h0", "m0", "logits"]}))
    assert api.circuit_components(tmp_path / "circuit.json") == ["a1.h0", "m0"]
    res = api.score(lm, queries, corpus, strategy="identity", circuit=tmp_path, out=tmp_path / "c", max_length=32,
                    power_law_bootstrap=0, highlight=False, progress=False)
    assert {r["component"] for r in res.results["by_component"]} == {"a1.h0", "m0"}
    with pytest.raises(KcircuitsError, match="unknown strategy"):
        api.score(lm, queries, corpus, strategy="magic")
    with pytest.raises(KcircuitsError, match="no fitted factors"):
        api.score(lm, queries, corpus, factors=tmp_path)
    with pytest.raises(KcircuitsError, match="no such query file"):
        api.score(lm, tmp_path / "missing.jsonl", corpus)
    with pytest.raises(KcircuitsError, match="no training corpus"):
        api.fit(lm)
    assert not (tmp_path / "runs").exists()  # nothing written for bad input


def test_report_section_escapes_and_highlights():
    html = highlight_tokens(["<b>", " ok"], [1.0, 0.0])
    assert "&lt;b&gt;" in html and "<b>" not in html and "rgba(37,99,235,0.75)" in html
    report = {"influence": {"strategy": "ekfac", "n_train": 1, "n_scored": 1, "n_queries": 1, "top_k": 1,
                            "queries": [{"id": "q<1>", "prompt": "A <i>", "completion": " B", "top": [
                                {"rank": 1, "score": 0.5, "id": "d", "text": "x", "pieces": ["x"],
                                 "weights": [1.0]}]}]}}
    out = render_influence(report)
    assert out.startswith('<section id="influence">') and "q&lt;1&gt;" in out and "<i>" not in out
    assert render_influence({}) == ""


# --------------------------------------------------------------------------- CLI
def _cli(argv):
    parser = argparse.ArgumentParser(prog="kcircuits")
    add_parser(parser.add_subparsers(dest="command", required=True))
    run(parser.parse_args(argv))


def test_cli_fit_and_score(tmp_path, tiny_smol_dir, capsys):
    fc = make_facts_corpus(n_docs=12, n_facts=2, seed=1)
    corpus, queries = fc.write(tmp_path)
    _cli(["influence", "fit", str(corpus), "--model", tiny_smol_dir, "--out", str(tmp_path / "fit"),
          "--max-length", "24", "--strategy", "kfac", "--quiet"])
    _cli(["influence", "score", str(queries), str(corpus), "--model", tiny_smol_dir, "--factors", str(tmp_path / "fit"),
          "--strategy", "kfac", "--out", str(tmp_path / "score"), "--max-length", "24", "--top-k", "3",
          "--bootstrap", "0", "--damping", "0.01", "--quiet"])
    out = capsys.readouterr().out
    assert "report:" in out and "recall@3" in out
    r = json.loads((tmp_path / "score" / "influence.json").read_text())
    assert r["strategy"] == "kfac" and set(r["damping"].values()) == {0.01}
    # --checkpoints loads folders: the model given again as its own checkpoint doubles every score
    base = ["influence", "score", str(queries), str(corpus), "--model", tiny_smol_dir, "--strategy", "identity",
            "--max-length", "24", "--bootstrap", "0", "--no-highlight", "--query-rank", "0", "--quiet"]
    _cli(base + ["--out", str(tmp_path / "one")])
    _cli(base + ["--out", str(tmp_path / "two"), "--checkpoints", tiny_smol_dir])
    one, two = (load_tensors(tmp_path / n / "scores.safetensors")["total"] for n in ("one", "two"))
    assert torch.allclose(two, 2 * one, rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "two" / "influence.json").read_text())["checkpoints"][0]["model"] == tiny_smol_dir
    with pytest.raises(SystemExit):  # argparse rejects a bad damping value (exit code 2)
        _cli(["influence", "score", str(queries), str(corpus), "--damping", "lots"])
    with pytest.raises(KcircuitsError, match="no such file"):
        _cli(["influence", "fit", str(tmp_path / "nope.txt"), "--model", tiny_smol_dir])


def test_main_cli_wiring(tmp_path, capsys):
    from kcircuits.cli import build_parser, main

    args = build_parser().parse_args(["influence", "score", "q.jsonl", "c.jsonl", "--normalize", "relative",
                                      "--measurement", "margin"])
    assert args.normalize == "relative" and args.measurement == "margin"
    assert main(["influence", "fit", str(tmp_path / "missing.jsonl")]) == 2
    assert "kcircuits: error:" in capsys.readouterr().err


# --------------------------------------------------------------------------- ground truth
def test_ekfac_finds_the_sources_of_learned_facts():
    """Fine-tune a tiny model on 60 documents (6 invented facts x 3 sources + distractors); EK-FAC must
    rank each fact's source documents near the top of its query's influence."""
    lm, fc, _ = facts_model(n_docs=60, n_facts=6, seed=0)
    train = Sequences.from_texts(lm.tokenizer, fc.documents, 48)
    queries = Sequences.from_pairs(lm.tokenizer, fc.prompts, fc.completions)
    torch.manual_seed(0)
    finetune(lm.hf_model, train, epochs=40, lr=3e-3, batch_size=8, progress=False)
    assert completion_accuracy(lm.hf_model, queries).float().mean() >= 0.8  # the model learned the facts
    factors = fit_factors(lm.hf_model, train, strategy="ekfac", progress=False)
    scores = pairwise_scores(lm.hf_model, queries, train, strategy="ekfac", factors=factors, progress=False).total
    recall = recall_at_k(scores, fc.sources, 10).mean()
    random_recall = 10 / len(fc.documents)
    assert recall > 0.5 and recall > 2 * random_recall
