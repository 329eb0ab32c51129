"""Influence settings objects, the CLI generated from them, run folders keyed by the weights, lazy imports."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmarks.facts_setup import WordTokenizer, tiny_llama
from tests.model_helpers import tiny_hf

from kcircuits.errors import KcircuitsError
from kcircuits.influence import api
from kcircuits.influence.cli import add_parser
from kcircuits.influence.facts import make_facts_corpus
from kcircuits.influence.settings import FitSettings, ScoreSettings, lissa_fields
from kcircuits.models import from_hf
from kcircuits.settings import from_args, hashed_dict

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- settings objects
def test_settings_normalise_and_validate():
    st = ScoreSettings(query_rank=0, normalize="none", include="*.mlp.*", components=[], damping="0.5",
                       rescore_top_k=4.0)
    assert st.query_rank is None and st.normalize is None and st.include == ("*.mlp.*",) and st.components is None
    assert st.damping == 0.5 and st.rescore_top_k == 4
    assert ScoreSettings(components=["m1", "a0.h1"]).components == ("m1", "a0.h1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.top_k = 3
    bad = [(FitSettings, {"strategy": "lissa"}, "unknown strategy 'lissa'"),
           (FitSettings, {"fisher": "fake"}, "unknown fisher"),
           (FitSettings, {"max_length": 1}, "max_length must be >= 2"),
           (FitSettings, {"batch_size": 0}, "batch_size must be >= 1"),
           (FitSettings, {"seed": 1.5}, "seed must be a whole number"),
           (FitSettings, {"dtype": "int8"}, "unknown dtype"),
           (FitSettings, {"checkpoint_seconds": -1}, "checkpoint_seconds must be >= 0"),
           (FitSettings, {"include": [""]}, "include must be a list of non-empty strings"),
           (ScoreSettings, {"strategy": "magic"}, "unknown strategy"),
           (ScoreSettings, {"damping": -1}, "damping must be >= 0"),
           (ScoreSettings, {"damping": "lots"}, "damping must be a number or 'heuristic'"),
           (ScoreSettings, {"damping": float("nan")}, "damping must be a finite number"),
           (ScoreSettings, {"top_k": 0}, "top_k must be >= 1"),
           (ScoreSettings, {"bm25_candidates": 0}, "bm25_candidates must be >= 1"),
           (ScoreSettings, {"query_rank": -2}, "query_rank must be >= 0"),
           (ScoreSettings, {"normalize": "absolute"}, "unknown normalize"),
           (ScoreSettings, {"measurement": "prob"}, "unknown measurement"),
           (ScoreSettings, {"per_layer": "yes"}, "per_layer must be True or False"),
           (ScoreSettings, {"power_law_bootstrap": -1}, "power_law_bootstrap must be >= 0"),
           (ScoreSettings, {"lissa_scale": 0}, "lissa_scale must be > 0"),
           (ScoreSettings, {"lissa_depth": 0}, "lissa_depth must be >= 1")]
    for cls, kwargs, message in bad:
        with pytest.raises(KcircuitsError, match=message):
            cls(**kwargs)


def test_hashed_fields_are_what_a_run_computes():
    fit = hashed_dict(FitSettings(include=("*.mlp.*",)))
    assert fit == {"strategy": "ekfac", "fisher": "true", "max_length": 256, "batch_size": 8, "include": ["*.mlp.*"],
                   "seed": 0, "dtype": "float32"}  # batch size seeds the true Fisher's label draws: hashed
    score = hashed_dict(ScoreSettings())
    assert not {"device", "checkpoint_seconds", "batch_size", "top_k", "highlight", "power_law_bootstrap"} & set(score)
    assert {"strategy", "damping", "normalize", "measurement", "query_rank", "components", "lissa_depth"} <= set(score)
    assert hashed_dict(ScoreSettings(top_k=3, batch_size=2, device=None)) == score


def test_lissa_options():
    assert ScoreSettings().lissa is None
    st = ScoreSettings(**lissa_fields({"depth": 10, "batch_size": 4}), lissa_scale=2)
    assert st.lissa == {"scale": 2.0, "depth": 10, "batch_size": 4}
    with pytest.raises(KcircuitsError, match="unknown lissa option"):
        lissa_fields({"deepness": 3})
    with pytest.raises(KcircuitsError, match="pass damping"):
        lissa_fields({"damping": 0.1})


# --------------------------------------------------------------------------- the command line
def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kcircuits")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_options_come_from_the_settings():
    fit = _parse(["influence", "fit", "c.jsonl"])
    assert from_args(FitSettings, fit) == FitSettings() and fit.model == "smollm2-135m" and not fit.quiet
    score = _parse(["influence", "score", "q.jsonl", "c.jsonl"])
    assert from_args(ScoreSettings, score) == ScoreSettings() and score.normalize == "none"
    args = _parse(["influence", "score", "q.jsonl", "c.jsonl", "--strategy", "lissa", "--damping", "0.01",
                   "--no-per-layer", "--per-token", "--components", "a0.h1", "m1", "--query-rank", "0",
                   "--rescore-top-k", "3", "--bm25-candidates", "5", "--normalize", "relative", "--measurement",
                   "margin", "--top-k", "4", "--no-highlight", "--bootstrap", "0", "--lissa-depth", "7",
                   "--lissa-scale", "2.5", "--max-length", "64", "--batch-size", "2", "--include", "*.mlp.*",
                   "--fisher", "empirical", "--seed", "3", "--dtype", "bfloat16", "--device", "auto",
                   "--checkpoint-seconds", "0", "--factors", "F", "--circuit", "C", "--checkpoints", "A", "B"])
    assert from_args(ScoreSettings, args) == ScoreSettings(
        strategy="lissa", damping=0.01, per_layer=False, per_token=True, components=("a0.h1", "m1"), query_rank=None,
        rescore_top_k=3, bm25_candidates=5, normalize="relative", measurement="margin", top_k=4, highlight=False,
        power_law_bootstrap=0, lissa_depth=7, lissa_scale=2.5, max_length=64, batch_size=2, include=("*.mlp.*",),
        fisher="empirical", seed=3, dtype="bfloat16", device="auto", checkpoint_seconds=0)
    assert (args.factors, args.circuit, args.checkpoints) == ("F", "C", ["A", "B"])
    fit = _parse(["influence", "fit", "c.jsonl", "--strategy", "kfac", "--max-length", "24", "--include", "a", "b"])
    assert from_args(FitSettings, fit) == FitSettings(strategy="kfac", max_length=24, include=("a", "b"))
    for argv in (["fit", "c", "--strategy", "lissa"], ["score", "q", "c", "--damping", "lots"],
                 ["score", "q", "c", "--normalize", "absolute"]):
        with pytest.raises(SystemExit):  # argparse usage errors (exit code 2)
            _parse(["influence", *argv])
    with pytest.raises(KcircuitsError, match="max_length must be >= 2"):  # values argparse cannot check
        from_args(FitSettings, _parse(["influence", "fit", "c", "--max-length", "1"]))


# --------------------------------------------------------------------------- the API takes settings
def facts_model(tmp_path, seed=0):
    fc = make_facts_corpus(n_docs=30, n_facts=4, seed=0)
    tok = WordTokenizer.for_corpus(fc)
    lm = from_hf(tiny_hf("llama", seed, vocab_size=len(tok.vocab), num_hidden_layers=2), tok, name="tiny-facts")
    return lm, fc.write(tmp_path)


def test_settings_object_and_keywords_are_one_configuration(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lm, (corpus, queries) = facts_model(tmp_path)
    st = FitSettings(strategy="diagonal", max_length=32)
    by_object = api.fit(lm, corpus, settings=st, progress=False)
    by_name = api.fit(lm, corpus, strategy="diagonal", max_length=32, progress=False)
    assert by_object.folder == by_name.folder
    reproduce = json.loads((by_object.folder / "config.json").read_text())["reproduce"]
    assert reproduce["fit"] == hashed_dict(st) and reproduce["weights"] == lm.fingerprint
    # keywords override the object's fields; the older lissa={...} form still works
    kw = {"strategy": "identity", "power_law_bootstrap": 0, "highlight": False, "progress": False}
    res = api.score(lm, queries, corpus, settings=ScoreSettings(max_length=16), max_length=32,
                    lissa={"depth": 3}, **kw)
    score_repr = json.loads((res.folder / "config.json").read_text())["reproduce"]["score"]
    assert score_repr["max_length"] == 32 and score_repr["lissa_depth"] == 3
    with pytest.raises(KcircuitsError, match="unknown option"):
        api.fit(lm, corpus, max_lenght=32)
    with pytest.raises(KcircuitsError, match="give each LiSSA option once"):
        api.score(lm, queries, corpus, lissa={"depth": 3}, lissa_depth=4)
    with pytest.raises(KcircuitsError, match="expected ScoreSettings"):
        api.score(lm, queries, corpus, settings=st)


# --------------------------------------------------------------------------- keyed by the weights
def test_run_folders_are_keyed_by_the_weights(tmp_path, monkeypatch):
    """Two models that differ in one weight get different fit and score folders; the same model
    reuses its folder; factors fitted on other weights are refused; a model that fails to load
    writes nothing."""
    monkeypatch.chdir(tmp_path)
    lm, (corpus, queries) = facts_model(tmp_path)
    twin, _ = facts_model(tmp_path)
    assert twin.fingerprint == lm.fingerprint
    with torch.no_grad():
        twin.hf_model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert twin.fingerprint != lm.fingerprint
    kw = {"strategy": "diagonal", "max_length": 32, "progress": False}
    first = api.fit(lm, corpus, **kw)
    other = api.fit(twin, corpus, **kw)
    assert first.folder != other.folder
    stamp = (first.folder / "factors" / "factors.safetensors").stat().st_mtime_ns
    again = api.fit(lm, corpus, **kw)
    assert again.folder == first.folder and again.info == first.info  # reused, not refitted
    assert (first.folder / "factors" / "factors.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((first.folder / "factors" / "factors.json").read_text())["config"]["weights"] == lm.fingerprint

    skw = {"strategy": "identity", "max_length": 32, "power_law_bootstrap": 0, "highlight": False, "progress": False}
    assert api.score(lm, queries, corpus, **skw).folder != api.score(twin, queries, corpus, **skw).folder
    with pytest.raises(KcircuitsError, match="fitted on other weights"):  # before any folder is written
        api.score(twin, queries, corpus, factors=first.folder, out=tmp_path / "mixed", **skw)
    assert not (tmp_path / "mixed").exists()
    with pytest.raises(KcircuitsError, match="fitted on other weights"):  # ... also through the checkpoint sum
        api.score(twin, queries, corpus, factors=first.folder, checkpoints=[lm], out=tmp_path / "mixed", **skw)
    factors_json = first.folder / "factors" / "factors.json"
    meta = json.loads(factors_json.read_text())
    del meta["config"]["weights"]  # as an older kcircuits wrote it
    factors_json.write_text(json.dumps(meta))
    with pytest.raises(KcircuitsError, match="do not record which weights"):
        api.score(lm, queries, corpus, factors=first.folder, out=tmp_path / "old", **skw)
    assert not (tmp_path / "old").exists()

    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(KcircuitsError, match="could not load"):
        api.fit(str(broken), corpus, **kw)
    with pytest.raises(KcircuitsError, match="could not load"):
        api.score(lm, queries, corpus, checkpoints=[str(broken)], **skw)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs


def test_checkpoint_weights_key_the_sum(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lm, (corpus, queries) = facts_model(tmp_path)
    ck, _ = facts_model(tmp_path, seed=1)
    kw = {"strategy": "identity", "max_length": 32, "power_law_bootstrap": 0, "highlight": False, "progress": False}
    res = api.score(lm, queries, corpus, checkpoints=[ck], **kw)
    reproduce = json.loads((res.folder / "config.json").read_text())["reproduce"]
    assert reproduce["checkpoint_weights"] == [ck.fingerprint]
    assert res.results["checkpoints"][0]["weights"] == ck.fingerprint
    with torch.no_grad():
        ck.hf_model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert api.score(lm, queries, corpus, checkpoints=[ck], **kw).folder != res.folder


# --------------------------------------------------------------------------- imports
def test_the_math_core_imports_no_report_or_api():
    code = ("import sys, kcircuits.influence.factors, kcircuits.influence.scores, kcircuits.influence.settings\n"
            "bad = sorted(m for m in sys.modules\n"
            "             if m.startswith('kcircuits.report') or m == 'kcircuits.influence.api')\n"
            "assert not bad, bad\n"
            "import kcircuits.influence as inf\n"
            "assert inf.FitSettings.__name__ == 'FitSettings' and callable(inf.api.score)\n"
            "assert 'kcircuits.influence.api' in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_benchmark_helpers_are_outside_the_package():
    import kcircuits.influence.facts as facts

    assert not {"finetune", "WordTokenizer", "tiny_llama", "completion_accuracy"} & set(vars(facts))
    assert tiny_llama(11, layers=1, hidden=8, heads=2, kv_heads=1).config.vocab_size == 11
