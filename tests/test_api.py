"""End to end on a tiny model (real tokenizer, bundled relations): run folders, resume, errors, CLI."""

import json
import math
import os

import pytest
import torch
from tests.model_helpers import crash_on_call

from kcircuits import api
from kcircuits.cli import main
from kcircuits.pipeline import PARTIAL_SCORES
from kcircuits.errors import KcircuitsError
from kcircuits.evaluate import Evaluator
from kcircuits.models import load_model

SMALL = dict(percent=30, max_pairs=8, batch_size=4, curve_percents=(1, 10, 100), n_random=1, progress=False, steps=2)


@pytest.fixture(scope="module")
def tiny(tiny_smol_dir):
    return load_model(tiny_smol_dir)


def test_discover_writes_complete_run_folder(tiny, tmp_path):
    res = api.discover("country_capital", tiny, out=tmp_path / "run", split=0.5, **SMALL)
    for name in ("config.json", "prompts.json", "scores.safetensors", "circuit.json", "metrics.json", "report.html"):
        assert (res.folder / name).exists(), name
    m = json.loads((res.folder / "metrics.json").read_text())
    assert set(m["sets"]) == {"discover", "test"}
    prompts = json.loads((res.folder / "prompts.json").read_text())
    disc = {p["clean"] for p in prompts["discover"]["pairs"]}
    test = {p["clean"] for p in prompts["test"]["pairs"]}
    assert disc and test and not disc & test  # found on one half, tested on the other
    points = m["curve"]["points"]
    assert [p["percent"] for p in points] == [1, 10, 100]
    assert abs(points[-1]["faithfulness_of_means"] - 1) < 1e-4  # the whole graph is the full model
    xs = [0.0] + [p["percent"] / 100 for p in points]
    fs = [0.0] + [p["faithfulness_of_means"] for p in points]
    # consecutive points: the shifted lists are one shorter by design
    cpr = sum((x1 - x0) * (f0 + f1) / 2 for x0, x1, f0, f1 in zip(xs, xs[1:], fs, fs[1:], strict=False))
    assert abs(m["curve"]["cpr"] - cpr) < 1e-9 and m["curve"]["cmd"] >= 0
    t = m["sets"]["test"]
    assert t["random_baseline"]["n_draws"] == 1
    assert {"full_hit1", "full_hit10", "circuit_hit1", "circuit_hit10"} <= set(t)
    cfg = json.loads((res.folder / "config.json").read_text())
    assert cfg["reproduce"]["scoring"]["ablation"] == "corrupt" and len(cfg["reproduce"]["weights"]) == 16
    html = (res.folder / "report.html").read_text()
    assert "<svg" in html and "country_capital" in html and "http://www.w3.org/2000/svg" in html
    # the explanation: logit lens on the test prompts (clean and circuit-only), head roles, composition
    lens = json.loads((res.folder / "lens.json").read_text())
    n_explained = min(len(test), SMALL.get("explain_prompts", 16))
    assert len(lens["prompts"]) == n_explained and set(lens["prompts"]) <= test
    assert len(lens["clean"]["layer_rank"][0]) == res.circuit.graph.n_layers + 1
    assert len(lens["circuit"]["node_rank"][0]) == res.circuit.graph.n_src
    roles = json.loads((res.folder / "roles.json").read_text())
    assert len(roles["heads"]) == res.circuit.graph.n_layers * res.circuit.graph.n_heads
    assert sum(roles["counts"].values()) == len(roles["heads"])
    comp = json.loads((res.folder / "composition.json").read_text())
    assert comp["n_edges"] == res.circuit.n_edges and comp["n_nodes"] == len(res.circuit.nodes())


def test_rerun_reuses_finished_steps_and_resumes_after_crash(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real_evaluate = Evaluator.evaluate

    def crash(self, circuit, ks=(1, 10)):
        calls.append(1)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(Evaluator, "evaluate", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        api.discover("country_capital", tiny, out=out, **SMALL)
    assert (out / "scores.safetensors").exists() and (out / "prompts.json").exists()
    assert not (out / "metrics.json").exists() and not list(out.glob("*.tmp"))
    scores_mtime = os.stat(out / "scores.safetensors").st_mtime_ns
    monkeypatch.setattr(Evaluator, "evaluate", real_evaluate)
    attributed = []
    monkeypatch.setattr(api, "attribute_resumable", lambda *a, **k: attributed.append(1))
    res = api.discover("country_capital", tiny, out=out, **SMALL)
    assert not attributed  # the scores were reused, not recomputed
    assert os.stat(out / "scores.safetensors").st_mtime_ns == scores_mtime
    assert (out / "metrics.json").exists() and res.circuit.n_edges > 0


def test_other_config_in_same_folder_is_refused(tiny, tmp_path):
    api.discover("country_capital", tiny, out=tmp_path / "r", curve=False, **{**SMALL, "n_random": 0})
    with pytest.raises(KcircuitsError, match="different configuration"):
        api.discover("country_capital", tiny, out=tmp_path / "r", metric="logprob", curve=False,
                     **{**SMALL, "n_random": 0})


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_other_ablations_are_recorded(tiny, tmp_path, ablation):
    res = api.discover("antonym", tiny, out=tmp_path / ablation, ablation=ablation, method="eap", curve=False,
                       **{**SMALL, "n_random": 0})
    assert json.loads((res.folder / "config.json").read_text())["reproduce"]["scoring"]["ablation"] == ablation
    assert math.isfinite(res.metrics["sets"]["discover"]["faithfulness_of_means"])


def test_full_answer_scoring_and_threshold(tiny, tmp_path):
    res = api.discover("country_capital", tiny, out=tmp_path / "f", metric="logprob", answer_scoring="full",
                       threshold=1e-9, curve=False, **{**SMALL, "n_random": 0, "percent": None})
    assert res.circuit.n_edges > 0
    with pytest.raises(KcircuitsError, match="logprob or prob"):
        api.discover("country_capital", tiny, out=tmp_path / "g", answer_scoring="full", **SMALL)


def test_evaluate_circuit_on_several_relations(tiny, tmp_path):
    found = api.discover("country_capital", tiny, out=tmp_path / "d", curve=False, **{**SMALL, "n_random": 0})
    res = api.evaluate(found.folder, ["country_capital", "city_in_country"], tiny, out=tmp_path / "e", max_pairs=6,
                       batch_size=4, n_random=1, progress=False)
    assert set(res.metrics["sets"]) == {"country_capital", "city_in_country"}
    assert (res.folder / "report.html").exists() and (res.folder / "metrics_city_in_country.json").exists()
    lens = json.loads((res.folder / "lens.json").read_text())  # explained on the first relation's prompts
    assert len(lens["prompts"]) == 6 and "The capital" in " ".join(lens["prompts"])
    comp = json.loads((res.folder / "composition.json").read_text())
    assert comp["n_edges"] == found.circuit.n_edges
    # the same circuit on the same prompts gives the same faithfulness as at discovery
    again = api.evaluate(found.folder, ["country_capital"], tiny, out=tmp_path / "e2", max_pairs=8, batch_size=4,
                         n_random=0, progress=False)
    assert abs(again.metrics["sets"]["country_capital"]["faithfulness_of_means"]
               - found.metrics["sets"]["discover"]["faithfulness_of_means"]) < 1e-5


def test_nan_metric_is_a_clear_error(tiny_smol_dir, tmp_path):
    model = load_model(tiny_smol_dir)
    with torch.no_grad():
        model.weights.blocks[0].mlp.W_out.fill_(float("nan"))
    with pytest.raises(KcircuitsError, match="NaN"):
        api.discover("country_capital", model, out=tmp_path / "n", **SMALL)


# ------------------------------------------------------------------ CLI
def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_discover_and_evaluate(tiny_smol_dir, tmp_path, capsys):
    code, out, err = run_cli(["discover", "country_capital", "--model", tiny_smol_dir, "--out", str(tmp_path / "c"),
                              "--max-pairs", "6", "--no-curve", "--random-draws", "1", "--quiet", "--method", "eap",
                              "--edges", "50", "--export-mib"], capsys)
    assert code == 0, err
    assert "report:" in out and (tmp_path / "c" / "report.html").exists()
    mib = json.loads((tmp_path / "c" / "circuit_mib.json").read_text())
    circuit = json.loads((tmp_path / "c" / "circuit.json").read_text())
    assert sum(e["in_graph"] for e in mib["edges"].values()) == circuit["n_edges"] > 0
    code, out, err = run_cli(["evaluate", str(tmp_path / "c"), "antonym", "--model", tiny_smol_dir, "--out",
                              str(tmp_path / "e"), "--max-pairs", "4", "--random-draws", "0", "--quiet"], capsys)
    assert code == 0, err and "antonym" in out


@pytest.mark.parametrize("args,pattern", [
    (["discover", "no_such_relation"], "unknown"),
    (["discover", "country_capital", "--model", "/nonexistent/model"], "not a model folder"),
    (["discover", "country_capital", "--model", "surely-not/a-real-model-kc"], "smollm2-135m"),
    (["evaluate", "/nonexistent/circuit.json", "antonym"], "no circuit"),
    (["datasets", "no_such_relation"], "unknown"),
])
def test_cli_bad_input_exit_code_2(args, pattern, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(args, capsys)
    assert not (tmp_path / "runs").exists()  # a failed command leaves no run folder behind
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kcircuits: error:") and pattern in lines[0]


def test_cli_malformed_dataset_and_empty_after_filter(tiny_smol_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "prompt_templates": ["{} is"], "samples": [')
    code, _, err = run_cli(["discover", str(bad), "--model", tiny_smol_dir, "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "JSON" in err
    # a random tiny model knows no capital: --known-only leaves nothing
    code, _, err = run_cli(["discover", "country_capital", "--model", tiny_smol_dir, "--known-only", "--out",
                            str(tmp_path / "k"), "--quiet"], capsys)
    assert code == 2 and "no usable prompt pairs" in err and "not_known_top1" in err


def test_cli_datasets_and_models(capsys):
    code, out, _ = run_cli(["datasets"], capsys)
    assert code == 0 and "country_capital" in out and "antonym" in out
    code, out, _ = run_cli(["datasets", "fruit_color"], capsys)
    assert code == 0 and "template:" in out
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0 and "smollm2-135m" in out and "gpt_neox" in out


def test_known_only_caps_after_filtering_and_counts_everything(tiny, tmp_path):
    res = api.discover("antonym", tiny, out=tmp_path / "k", known_only=True, known_k=10**6, curve=False,
                       **{**SMALL, "n_random": 0, "max_pairs": 5})
    prompts = json.loads((res.folder / "prompts.json").read_text())["all"]
    assert prompts["n_pairs"] == 5
    assert prompts["skipped"]["not_known_top1000000"] == 0  # every answer ranks within a million
    # every candidate is accounted for: used, skipped for a reason, or over the cap
    assert prompts["n_pairs"] + sum(prompts["skipped"].values()) == prompts["n_candidates"]


def test_attribution_resumes_after_a_crash_mid_run(tiny, tmp_path, monkeypatch):
    import kcircuits.discover.eap as eap

    opts = dict(curve=False, cache=False, **{**SMALL, "n_random": 0, "batch_size": 2})  # no step cache: recompute
    reference = api.discover("country_capital", tiny, out=tmp_path / "ref", **opts).scores
    calls = crash_on_call(monkeypatch, eap, "destination_grads", at=5)  # third batch, first step (2 per batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        api.discover("country_capital", tiny, out=tmp_path / "r", **opts)
    partial = tmp_path / "r" / PARTIAL_SCORES
    assert partial.exists() and not (tmp_path / "r" / "scores.safetensors").exists()
    calls.update(n=0, crash=False)
    resumed = api.discover("country_capital", tiny, out=tmp_path / "r", **opts).scores
    assert calls["n"] == 2 * (4 - 2)  # only the two unfinished batches (of 4) were recomputed
    assert torch.allclose(resumed, reference, atol=1e-6) and not partial.exists()


def test_checkpoint_from_another_batch_layout_is_not_reused(tiny, tmp_path, monkeypatch):
    """batch_size is not part of the result's identity, but a checkpoint is only valid for its own batches."""
    import kcircuits.discover.eap as eap

    opts = dict(curve=False, cache=False, **{**SMALL, "n_random": 0})
    reference = api.discover("antonym", tiny, out=tmp_path / "ref", **{**opts, "batch_size": 3}).scores
    calls = crash_on_call(monkeypatch, eap, "destination_grads", at=3)
    with pytest.raises(RuntimeError):
        api.discover("antonym", tiny, out=tmp_path / "r", **{**opts, "batch_size": 2})
    calls["crash"] = False
    resumed = api.discover("antonym", tiny, out=tmp_path / "r", **{**opts, "batch_size": 3}).scores
    assert torch.allclose(resumed, reference, atol=1e-6)


def test_bad_relation_writes_nothing(tmp_path, tiny):
    with pytest.raises(KcircuitsError):
        api.discover("no_such_relation", tiny, out=tmp_path / "x", **SMALL)
    assert not (tmp_path / "x").exists()


def test_an_edited_model_gets_its_own_run_folder_and_the_original_reuses_its_own(tiny, tmp_path, monkeypatch):
    """Run folders are keyed by the weights' fingerprint: an edit (applied and restored through
    ``edited``) recomputes in a new folder; the restored model reuses the original folder."""
    from kcircuits.models import edited

    monkeypatch.chdir(tmp_path)  # default run folders go to ./runs
    opts = dict(curve=False, **{**SMALL, "n_random": 0, "explain_prompts": 0})
    original = api.discover("country_capital", tiny, **opts)
    name, param = next((n, p) for n, p in tiny.hf_model.named_parameters() if "mlp" in n)
    attributed = []
    real = api.attribute_resumable
    monkeypatch.setattr(api, "attribute_resumable", lambda *a, **k: attributed.append(1) or real(*a, **k))
    with edited(tiny, {name: torch.full_like(param, 0.05)}):
        changed = api.discover("country_capital", tiny, **opts)
    assert changed.folder != original.folder and attributed == [1]  # recomputed, elsewhere
    assert not torch.equal(changed.scores, original.scores)
    again = api.discover("country_capital", tiny, **opts)
    assert again.folder == original.folder and attributed == [1]  # the original's scores reused
    cfgs = [json.loads((f / "config.json").read_text())["reproduce"]["weights"]
            for f in (original.folder, changed.folder)]
    assert cfgs[0] != cfgs[1]


def test_unreadable_config_is_refused_not_overwritten(tiny, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    with pytest.raises(KcircuitsError, match="cannot be read"):
        api.discover("country_capital", tiny, out=run, curve=False, **{**SMALL, "n_random": 0})
    assert (run / "config.json").read_text() == "{not json"


def test_a_read_only_out_folder_is_a_one_line_error(tiny, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: make writing fail another way
            (ro / "x").write_text("file")
            target = ro / "x" / "run"
        else:
            target = ro / "run"
        code = main(["discover", "country_capital", "--model", str(tiny.name), "--out", str(target), "--percent", "30",
                     "--max-pairs", "4", "--no-curve", "--random-draws", "0", "--explain-prompts", "0", "--quiet"])
    finally:
        ro.chmod(0o700)
    assert code == 2 and "cannot write the run folder" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [(["--percent", "0"], "--percent must be in"),
                                            (["--percent", "150"], "--percent must be in"),
                                            (["--edges", "-3"], "--edges must be >= 1"),
                                            (["--known-k", "0"], "--known-k must be >= 1"),
                                            (["--edges", "10", "--percent", "2"], "give one circuit size")])
def test_out_of_range_sizes_fail_before_any_work(tmp_path, capsys, args, message):
    code = main(["discover", "country_capital", "--model", "no-such-model-is-loaded", "--out", str(tmp_path / "r")]
                + args)
    assert code == 2 and message in capsys.readouterr().err and not (tmp_path / "r").exists()
