"""The step cache and ``select``: work is never recomputed when what it depends on did not change.

Every test runs with an empty step cache of its own (tests/conftest.py). "Not recomputed" is checked
by making the expensive functions raise: a step that ran anyway fails the test."""

from __future__ import annotations

import json
import time

import pytest

import kcircuits.api as api
import kcircuits.discover.eap as eap
import kcircuits.pipeline as pipeline
from kcircuits.cli import main
from kcircuits.errors import KcircuitsError
from kcircuits.evaluate import Evaluator
from kcircuits.models import load_model
from kcircuits.steps import StepCache, pairs_digest, step_key

OPTS = dict(split=0.5, known_only=True, known_k=10**6, max_pairs=8, batch_size=4, steps=2, n_random=1,
            curve_percents=(1, 10, 100), explain_prompts=4, progress=False)


@pytest.fixture(scope="module")
def tiny(tiny_smol_dir):
    return load_model(tiny_smol_dir)


def forbid(monkeypatch, module, name: str) -> None:
    """Make ``module.name`` fail the test if it is called."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"{module.__name__}.{name} was recomputed")

    monkeypatch.setattr(module, name, refuse)


def forbid_all_work(monkeypatch) -> None:
    forbid(monkeypatch, pipeline, "answer_ranks")  # the known-facts filter
    forbid(monkeypatch, eap, "attribute")  # attribution
    forbid(monkeypatch, api, "explain")  # logit lens, head roles
    monkeypatch.setattr(Evaluator, "__init__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("evaluated")))


def results(folder) -> dict:
    return {name: json.loads((folder / name).read_text())
            for name in ("circuit.json", "metrics.json", "lens.json", "roles.json", "composition.json")}


def test_a_rerun_with_nothing_changed_recomputes_nothing(tiny, tmp_path, monkeypatch):
    first = api.discover("country_capital", tiny, out=tmp_path / "a", percent=20, **OPTS)
    forbid_all_work(monkeypatch)
    again = api.discover("country_capital", tiny, out=tmp_path / "a", percent=20, **OPTS)
    assert results(again.folder) == results(first.folder)
    # a new folder with the same configuration is served by the step cache alone
    copy = api.discover("country_capital", tiny, out=tmp_path / "b", percent=20, **OPTS)
    assert results(copy.folder) == results(first.folder)
    timings = json.loads((copy.folder / "timings.json").read_text())["steps"]
    assert "attribution" not in timings and "evaluation: curve" not in timings


def test_a_new_size_reuses_prompts_scores_and_curve(tiny, tmp_path, monkeypatch):
    first = api.discover("country_capital", tiny, out=tmp_path / "a", percent=20, **OPTS)
    forbid(monkeypatch, pipeline, "answer_ranks")
    forbid(monkeypatch, eap, "attribute")
    monkeypatch.setattr(Evaluator, "curve", lambda *a, **k: (_ for _ in ()).throw(AssertionError("curve redone")))
    bigger = api.discover("country_capital", tiny, out=tmp_path / "b", percent=40, **OPTS)
    assert bigger.circuit.n_edges > first.circuit.n_edges
    assert (bigger.scores == first.scores).all()
    m1, m2 = (json.loads((r.folder / "metrics.json").read_text()) for r in (first, bigger))
    assert m1["curve"] == m2["curve"] and m1["sets"]["test"]["n_prompts"] == m2["sets"]["test"]["n_prompts"]


def test_what_a_step_depends_on_changes_its_key(tiny, tmp_path, monkeypatch):
    """Another metric means other scores; another known_k reuses the ranks but keeps other prompts."""
    api.discover("country_capital", tiny, out=tmp_path / "a", percent=20, **OPTS)
    calls = {"attribute": 0}
    real = eap.attribute

    def counting(*args, **kwargs):
        calls["attribute"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(eap, "attribute", counting)
    forbid(monkeypatch, pipeline, "answer_ranks")
    api.discover("country_capital", tiny, out=tmp_path / "b", percent=20, metric="logprob", **OPTS)
    assert calls["attribute"] == 1
    strict = api.discover("country_capital", tiny, out=tmp_path / "c", percent=20, **{**OPTS, "known_k": 20000})
    kept = json.loads((strict.folder / "prompts.json").read_text())["discover"]
    assert kept["skipped"]["not_known_top20000"] > 0  # the ranks were reused and the new threshold applied


def test_select_from_stored_scores_equals_a_fresh_discover(tiny, tmp_path, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path)
    run = api.discover("country_capital", tiny, percent=20, **OPTS)
    with monkeypatch.context() as m:
        forbid(m, pipeline, "answer_ranks")
        forbid(m, eap, "attribute")
        selected = api.select(run.folder, model=tiny, percent=45, progress=False)
    with monkeypatch.context() as m:  # with an empty step cache the run's own scores suffice
        forbid(m, eap, "attribute")
        m.setenv("KCIRCUITS_STEP_CACHE", str(tmp_path_factory.mktemp("empty")))
        again = api.select(run.folder, model=tiny, percent=30, progress=False)
    assert again.circuit.n_edges > run.circuit.n_edges
    fresh_dir = tmp_path_factory.mktemp("fresh")
    monkeypatch.chdir(fresh_dir)
    fresh = api.discover("country_capital", tiny, percent=45, cache=False, **OPTS)
    assert selected.folder.name == fresh.folder.name  # the folder discover uses at this size
    assert selected.circuit.n_edges > run.circuit.n_edges
    assert results(selected.folder) == results(fresh.folder)


def test_select_command_line_keeps_the_runs_selection_and_needs_a_size(tiny_smol_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = api.discover("country_capital", load_model(tiny_smol_dir), percent=20, absolute=False, **OPTS)
    assert main(["select", str(run.folder), "--edges", "30", "--quiet"]) == 0
    out = capsys.readouterr().out
    new = [p for p in (tmp_path / "runs").iterdir() if p.name != run.folder.name]
    assert len(new) == 1
    config = json.loads((new[0] / "config.json").read_text())["reproduce"]
    assert config["size"]["n_edges"] == 30 and config["size"]["absolute"] is False  # --signed kept
    saved = json.loads((new[0] / "circuit.json").read_text())
    assert f"circuit: {len(saved['edges'])} edges" in out  # the printed count is the saved circuit's
    assert main(["select", str(run.folder)]) == 2
    assert "give the new circuit size" in capsys.readouterr().err


def test_select_refuses_what_it_cannot_reuse(tiny, tmp_path):
    with pytest.raises(KcircuitsError, match="not a run folder"):
        api.select(tmp_path / "nothing", percent=1)
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "config.json").write_text(json.dumps({"reproduce": {"command": "evaluate"}}))
    with pytest.raises(KcircuitsError, match="needs a discover run"):
        api.select(ev, percent=1)


def test_damaged_cache_entries_are_misses(tmp_path):
    cache = StepCache(tmp_path)
    key = step_key("x", a=1)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / f"{key}.json").write_text("{not json")
    (tmp_path / "x" / f"{key}.safetensors").write_bytes(b"garbage")
    assert cache.read_json("x", key) is None and cache.read_tensors("x", key) is None
    assert StepCache(None).read_json("x", key) is None  # a cache that is off always misses
    assert step_key("x", a=1) != step_key("x", a=2) and step_key("x", a=1) != step_key("y", a=1)


def test_pairs_digest_follows_the_token_ids(tiny):
    sets = pipeline.prepare_prompts(tiny, None, "country_capital", max_pairs=4, split=None)
    pairs = sets["all"].pairs
    assert pairs_digest(pairs) == pairs_digest(list(pairs))
    assert pairs_digest(pairs) != pairs_digest(pairs[::-1]) != pairs_digest(pairs[1:])


BAD_VALUES = [
    (["--percent", "150"], "--percent must be in (0, 100]"),
    (["--percent", "0"], "--percent must be in (0, 100]"),
    (["--percent", "-1"], "--percent must be in (0, 100]"),
    (["--edges", "0"], "--edges must be >= 1"),
    (["--edges", "-5"], "--edges must be >= 1"),
    (["--known-only", "--known-k", "0"], "--known-k must be >= 1"),
    (["--split", "1.5"], "--split must be a fraction strictly between 0 and 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--max-pairs", "-1"], "--max-pairs must be >= 1"),
    (["--random-draws", "-1"], "--random-draws must be >= 0"),
    (["--explain-prompts", "-2"], "--explain-prompts must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--percent", "1", "--edges", "5"], "give one circuit size"),
    (["--answer-scoring", "full"], "with --answer-scoring full use --metric logprob"),
]


@pytest.mark.parametrize("argv,message", BAD_VALUES)
def test_every_bad_value_fails_at_once_with_no_folder(argv, message, tmp_path, monkeypatch, capsys):
    """Checked before the model loads: no model is loaded (loading would fail the test), nothing is written."""
    monkeypatch.chdir(tmp_path)
    forbid(monkeypatch, pipeline, "load_model")
    start = time.perf_counter()
    code = main(["discover", "country_capital", "--model", "smollm2-135m", "--out", str(tmp_path / "out"), *argv])
    elapsed = time.perf_counter() - start
    assert code == 2 and message in capsys.readouterr().err
    assert elapsed < 2.0 and not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_bad_select_size_fails_before_loading(tiny, tmp_path, monkeypatch, capsys):
    run = api.discover("country_capital", tiny, out=tmp_path / "run", percent=20, **OPTS)
    forbid(monkeypatch, pipeline, "load_model")
    assert main(["select", str(run.folder), "--percent", "150"]) == 2
    assert "--percent must be in (0, 100]" in capsys.readouterr().err


def test_a_failure_after_loading_leaves_no_folder(tiny, tmp_path):
    """Nothing usable after the known-facts filter: the error names the reason, and the folder is gone."""
    with pytest.raises(KcircuitsError, match="no usable prompt pairs"):
        api.discover("country_capital", tiny, out=tmp_path / "x", known_only=True, known_k=1, max_pairs=8,
                     batch_size=4, progress=False)
    assert not (tmp_path / "x").exists()


def test_a_circuit_from_another_model_is_refused_by_name_with_no_folder(tiny, tmp_path):
    from tests.model_helpers import tiny_hf

    run = api.discover("country_capital", tiny, out=tmp_path / "run", percent=20, **OPTS)
    other_dir = tmp_path / "other"
    tiny_hf("llama", vocab_size=49152, num_hidden_layers=3).save_pretrained(other_dir)
    tiny.tokenizer.save_pretrained(other_dir)
    with pytest.raises(KcircuitsError, match="made for a 2-layer model .* has 3 layers"):
        api.evaluate(run.folder, ["country_capital"], str(other_dir), out=tmp_path / "ev", progress=False)
    assert not (tmp_path / "ev").exists()


def test_a_failed_study_leaves_no_folder(tiny_smol_dir, tmp_path, monkeypatch, capsys):
    """The command line removes a folder its failed command created with no result in it (any command)."""
    monkeypatch.chdir(tmp_path)
    code = main(["compare", "country_capital", "country_language", "--model", tiny_smol_dir, "--known-only",
                 "--max-pairs", "4", "--quiet"])
    assert code == 2 and "no usable prompt pairs" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
