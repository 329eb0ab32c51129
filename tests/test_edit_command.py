"""``kcircuits edit`` / ``kcircuits.edit.api.edit`` end to end on a tiny model: the run folder, the model
left as it was, the metrics before and after, reuse on a rerun, and bad input refused before any folder."""

from __future__ import annotations

import json
import math

import pytest

import kcircuits.edit.rome as rome
from kcircuits.cli import main
from kcircuits.edit import api
from kcircuits.errors import KcircuitsError
from kcircuits.models import load_model
from kcircuits.models.edits import load_delta

FAST = dict(n=2, n_paraphrases=1, n_neighbours=2, other_relations=("country_language",), n_other=2,
            corpus_texts=4, corpus_tokens=24, perplexity_texts=1,
            n_prefixes=1, generation_tokens=2, steps=4, lr=0.1, kl_factor=0.0, weight_decay=0.0, progress=False)


@pytest.fixture(scope="module")
def tiny(tiny_smol_dir):
    return load_model(tiny_smol_dir)


def test_edit_writes_its_folder_and_leaves_the_model_as_it_was(tiny, tmp_path, monkeypatch):
    before = tiny.fingerprint
    res = api.edit("country_capital", tiny, out=tmp_path / "e", layer=0, **FAST)
    for name in ("config.json", "edits.json", "delta.safetensors", "edit_metrics.json", "report.html"):
        assert (res.folder / name).exists(), name
    assert tiny.fingerprint == before  # the edit was applied only while measuring
    m = json.loads((res.folder / "edit_metrics.json").read_text())
    b, a = m["before"]["summary"], m["after"]["summary"]
    assert a["logprob_new"]["mean"] > b["logprob_new"]["mean"]  # the new targets became more likely
    assert m["change"]["n_requests"] == 2
    edits = json.loads((res.folder / "edits.json").read_text())
    assert edits["method"] == "rome" and len(edits["requests"]) == 2
    out_matrix = next(b for b in tiny.layout.blocks("m0") if b.role == "W_out")
    assert set(res.deltas) == {out_matrix.param_name}  # only layer 0's MLP output matrix changes
    probes = [r["other_prompts"] for r in edits["requests"]]
    assert all(len(p) == 2 for p in probes)  # --other-relations country_language, 2 prompts each
    assert not any(math.isnan(x) for x in (b["other_specificity_success"]["mean"],
                                           a["other_specificity_success"]["mean"]))
    # a rerun reuses the delta and the metrics
    monkeypatch.setattr(rome, "rome_edit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = api.edit("country_capital", tiny, out=tmp_path / "e", layer=0, **FAST)
    stored = json.loads((res.folder / "edit_metrics.json").read_text())
    assert json.dumps(again.metrics, sort_keys=True) == json.dumps(stored, sort_keys=True)  # NaN-safe equality


@pytest.mark.parametrize("options,message", [({}, "give the MLP layer"), ({"layer": 7}, "out of range"),
                                              ({"layer": 0, "n": 0}, "--n must be >= 1"),
                                              ({"layer": 0, "method": "nope"}, "unknown edit method")])
def test_bad_edit_input_fails_with_no_folder(tiny, tmp_path, options, message):
    with pytest.raises(KcircuitsError, match=message):
        api.edit("country_capital", tiny, out=tmp_path / "x", **{**FAST, **options})
    assert not (tmp_path / "x").exists()


def test_edit_command_line(tiny_smol_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["edit", "country_capital", "--model", tiny_smol_dir, "--layer", "0", "--n", "1", "--n-neighbours", "1",
            "--n-paraphrases", "1", "--corpus-texts", "4", "--corpus-tokens", "24", "--perplexity-texts", "0",
            "--n-prefixes", "0", "--generation-tokens", "0", "--v-steps", "2", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "efficacy_success" in out and "report:" in out
    assert main(["edit", "country_capital", "--model", tiny_smol_dir, "--layer", "-1"]) == 2
    assert "--layer must be >= 0" in capsys.readouterr().err


def test_memit_through_the_edit_command_writes_all_requests_at_once(tiny, tmp_path):
    """The registered MEMIT (its spread over several layers is tested in tests/test_memit.py; this 2-layer
    model has one layer before the last): only that layer's output matrix changes and the new targets
    become more likely."""
    res = api.edit("country_capital", tiny, out=tmp_path / "m", method="memit", layer=0, n_layers=1,
                   covariance_weight=0.0, **FAST)
    expected = {next(b for b in tiny.layout.blocks("m0") if b.role == "W_out").param_name}
    assert set(res.deltas) == expected
    b, a = res.metrics["before"]["summary"], res.metrics["after"]["summary"]
    assert a["logprob_new"]["mean"] > b["logprob_new"]["mean"]


@pytest.mark.parametrize("method", ["ft-l", "ft-m"])
def test_fine_tuning_edits_through_the_edit_command(tiny, tmp_path, method):
    """FT-L keeps every weight within --ft-bound; both raise the new targets' likelihood, touching only the
    edited layer's output matrix."""
    res = api.edit("country_capital", tiny, out=tmp_path / method, method=method, layer=1, ft_steps=10, ft_lr=1e-2,
                   **FAST)
    (name, delta), = res.deltas.items()
    assert name == next(b for b in tiny.layout.blocks("m1") if b.role == "W_out").param_name
    if method == "ft-l":
        assert float(delta.abs().max()) <= 5e-4 + 1e-7  # the default --ft-bound
    b, a = res.metrics["before"]["summary"], res.metrics["after"]["summary"]
    assert a["logprob_new"]["mean"] > b["logprob_new"]["mean"]


def test_the_edit_settings_name_each_option_once():
    """``edit(..., name=value)`` finds a field by name in one settings class: a name in two would reach only one."""
    from dataclasses import fields

    from kcircuits.edit.settings import EditSettings, FinetuneOptions, RequestSettings, ValueSettings

    names = [f.name for cls in (EditSettings, RequestSettings, ValueSettings, FinetuneOptions) for f in fields(cls)]
    assert len(names) == len(set(names))


def test_the_generated_corpus_is_seeded_cached_and_starts_from_the_neutral_prefixes(tiny, tmp_path):
    from kcircuits.edit.stats import NEUTRAL_PREFIXES, generated_corpus
    from kcircuits.steps import StepCache

    cache = StepCache(tmp_path)
    texts = generated_corpus(tiny, n_texts=20, n_tokens=6, seed=0, cache=cache)
    assert len(texts) == 20 and all(any(t.startswith(p) for p in NEUTRAL_PREFIXES) for t in texts)
    assert generated_corpus(tiny, n_texts=20, n_tokens=6, seed=0) == texts  # seeded: the same without the cache
    assert generated_corpus(tiny, n_texts=20, n_tokens=6, seed=1) != texts
    assert len(list((tmp_path / "generated_corpus").iterdir())) == 1


def test_edit_bench_runs_every_method_on_the_same_requests(tiny_smol_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    measured = []
    real_metrics = api.edit_metrics
    monkeypatch.setattr(api, "edit_metrics", lambda *a, **k: measured.append(1) or real_metrics(*a, **k))
    argv = ["edit-bench", "country_capital", "--methods", "rome,ft-m,memit", "--model", tiny_smol_dir, "--layer", "1",
            "--n-layers", "2", "--n", "2", "--n-neighbours", "1", "--n-paraphrases", "1", "--corpus-texts", "4",
            "--corpus-tokens", "24",
            "--perplexity-texts", "0", "--n-prefixes", "0", "--generation-tokens", "0", "--v-steps", "2",
            "--ft-steps", "2", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    bench = next((tmp_path / "runs").glob("edit-bench_*")) / "bench.json"
    rows = json.loads(bench.read_text())["rows"]
    assert [(r["method"], r["n_requests"]) for r in rows] == [("rome", 2), ("ft-m", 2), ("memit", 2)]
    assert all(r["seconds_per_edit"] is not None and r["seconds_per_edit"] >= 0 for r in rows)
    edits = [json.loads(p.read_text())["requests"] for p in sorted(bench.parent.glob("*/edits.json"))]
    assert len(edits) == 3 and edits[0] == edits[1] == edits[2]  # the same requests through every method
    # MEMIT spreads over --n-layers; ROME and FT-M edit --layer alone (what each delta touches shows it)
    touched = {p.parent.name.rsplit("_", 1)[1]: sorted(load_delta(p)) for p in bench.parent.glob("*/delta.safetensors")}
    assert len(touched["memit"]) == 2 and len(touched["rome"]) == len(touched["ft-m"]) == 1
    assert touched["rome"] == touched["ft-m"] and "layers.1." in touched["rome"][0]
    # the unedited model's metrics were measured once and shared: 1 "before" + 3 "after" measurements
    assert len(measured) == 4
    before = {json.dumps(json.loads(p.read_text()), sort_keys=True) for p in bench.parent.glob("*/metrics_before.json")}
    assert len(before) == 1
    assert "rome" in out and "ft-m" in out
    assert main(["edit-bench", "country_capital", "--methods", "rome,nope", "--layer", "0"]) == 2
    assert "unknown edit method 'nope'" in capsys.readouterr().err


def test_the_bundled_model_edits_at_its_measured_layer_unless_told_otherwise():
    """SmolLM2 without --layer: the layer docs/editing.md chose by measurement; any other model must be told."""
    from types import SimpleNamespace

    from kcircuits.edit.settings import MEASURED_LAYERS, EditSettings

    smol = SimpleNamespace(name="smollm2-135m", weights=SimpleNamespace(n_layers=30))
    assert api.with_layer(EditSettings(), smol).layer == MEASURED_LAYERS["smollm2-135m"] == 2
    assert api.with_layer(EditSettings(layer=7), smol).layer == 7
    other = SimpleNamespace(name="/models/gpt2", weights=SimpleNamespace(n_layers=12))
    with pytest.raises(KcircuitsError, match="give the MLP layer"):
        api.with_layer(EditSettings(), other)
    with pytest.raises(KcircuitsError, match="would start before layer 0"):
        api.with_layer(EditSettings(n_layers=4), smol)
