"""``kcircuits trace RELATION`` and ``kcircuits.edit.api.trace`` on a tiny model (real SmolLM2 tokenizer,
bundled relations): the run folder and its report, reuse on a rerun, settings checked before the model
loads, the command line end to end, and the SVG heatmap the report draws the traces with."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from kcircuits.cli import main
from kcircuits.edit import api
from kcircuits.edit.settings import TRACE_KINDS, TraceSettings
from kcircuits.edit.trace import GROUPS, KINDS, TraceResult
from kcircuits.errors import KcircuitsError
from kcircuits.models import load_model
from kcircuits.report import render_report
from kcircuits.report.heatmap import SCALE_STEPS, cell_colour, heatmap_svg
from kcircuits.report.svg import NAN_COLOUR, NEG_COLOUR, POS_COLOUR, SVG_NS

#: a small trace: every fact (a random tiny model knows none), three prompts, two noise draws
SMALL = dict(known_only=False, max_prompts=3, samples=2, window=2, progress=False)


@pytest.fixture(scope="module")
def tiny(tiny_smol_dir):
    return load_model(tiny_smol_dir)


def _heatmaps(html: str) -> list[str]:
    return re.findall(r'<svg\b[^>]*class="kc-heat".*?</svg>', html, flags=re.DOTALL)


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- the API
def test_trace_writes_trace_json_and_a_report_with_three_heatmaps(tiny, tmp_path):
    res = api.trace("country_capital", tiny, out=tmp_path / "run", **SMALL)
    for name in ("config.json", "prompts.json", "trace.json", "report.html"):
        assert (res.folder / name).exists(), name
    data = json.loads((res.folder / "trace.json").read_text())
    stored = TraceResult.from_json(data)
    n_layers = tiny.hf_model.config.num_hidden_layers
    assert len(stored.prompts) == data["summary"]["n_prompts"] == 3
    assert data["relation"] == "country_capital" and data["kinds"] == list(KINDS)
    for kind in KINDS:  # layers x ROME's six position groups
        mean = data["mean_effect"][kind]
        assert len(mean) == n_layers and all(len(row) == len(GROUPS) for row in mean)
    # the critical layer: the output's, trace.json's and the summary's are TraceResult.critical_layer()
    assert res.critical_layer == res.result.critical_layer() == stored.critical_layer()
    assert data["critical_layer"] == data["summary"]["critical_layer"] == res.critical_layer
    assert data["summary"]["p_clean_mean"] == pytest.approx(sum(p.p_clean for p in stored.prompts) / 3)
    html = res.report.read_text()
    assert html.count('class="kc-heat"') == 4  # hidden, mlp, attn averaged, plus one prompt token by token
    assert '<section id="trace">' in html and f"<b>{res.critical_layer}</b>" in html
    for svg in _heatmaps(html):
        ET.fromstring(svg)  # each heatmap is well-formed SVG on its own
    reproduce = json.loads((res.folder / "config.json").read_text())["reproduce"]
    assert reproduce["weights"] == tiny.fingerprint and reproduce["trace"]["samples"] == 2
    assert "batch_size" not in reproduce["trace"] and "device" not in reproduce["trace"]  # how, not what


def test_a_rerun_reuses_trace_json(tiny, tmp_path, monkeypatch):
    first = api.trace("country_capital", tiny, out=tmp_path / "run", **SMALL)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed instead of reusing trace.json")

    monkeypatch.setattr(api, "causal_trace", fail)
    monkeypatch.setattr(api, "trace_prompts", fail)
    again = api.trace("country_capital", tiny, out=tmp_path / "run", **SMALL)
    assert again.critical_layer == first.critical_layer
    assert again.result.to_json() == first.result.to_json()
    assert (again.folder / "report.html").exists()
    with pytest.raises(KcircuitsError, match="different configuration"):  # other settings, same folder: refused
        api.trace("country_capital", tiny, out=tmp_path / "run", **{**SMALL, "samples": 3})


def test_only_the_hidden_trace_has_no_critical_layer(tiny, tmp_path, capsys):
    res = api.trace("antonym", tiny, out=tmp_path / "h", kinds=["hidden"], **SMALL)
    assert res.critical_layer is None and res.result.kinds == ("hidden",)
    assert "critical_layer" not in json.loads((res.folder / "trace.json").read_text())
    assert res.report.read_text().count('class="kc-heat"') == 2  # the mean, and one prompt


def test_known_only_keeps_the_known_facts(tiny, tmp_path):
    res = api.trace("country_capital", tiny, out=tmp_path / "k", **{**SMALL, "known_only": True, "known_k": 10**6})
    prompts = json.loads((res.folder / "prompts.json").read_text())["all"]
    assert prompts["skipped"]["not_known_top1000000"] == 0 and prompts["n_pairs"] == len(res.result.prompts) == 3
    # a random tiny model knows no capital within rank 1: a one-line error, and no folder left behind
    with pytest.raises(KcircuitsError, match="no usable prompt pairs") as err:
        api.trace("country_capital", tiny, out=tmp_path / "none", **{**SMALL, "known_only": True})
    assert "\n" not in str(err.value) and not (tmp_path / "none").exists()


@pytest.mark.parametrize("options,message", [
    ({"samples": 0}, "--samples must be >= 1"),
    ({"window": 0}, "--window must be >= 1"),
    ({"noise": -1.0}, "--noise must be >= 0"),
    ({"noise": math.nan}, "--noise must be a finite number"),
    ({"kinds": ["mlp", "resid"]}, "use one of hidden, mlp, attn"),
    ({"kinds": []}, "kinds is empty"),
    ({"max_prompts": 0}, "--max-prompts must be >= 1"),
    ({"known_k": 0}, "--known-k must be >= 1"),
    ({"template": 9}, "out of range"),
    ({"batch_size": 2.5}, "--batch-size must be a whole number"),
    ({"dtype": "int8"}, "use one of float32"),
    ({"no_such_option": 1}, "unknown option"),
    ({"relation": "no_such_relation"}, "unknown"),
])
def test_bad_settings_fail_before_the_model_loads(options, message, tmp_path, monkeypatch):
    from kcircuits import pipeline

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(pipeline, "load", no_load)
    relation = options.pop("relation", "country_capital")
    with pytest.raises(KcircuitsError, match=re.escape(message)) as err:
        api.trace(relation, "smollm2-135m", out=tmp_path / "x", **options)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()


def test_trace_kinds_are_the_tracers():
    """The settings spell the kinds out (no torch at parse time); they must be the tracer's."""
    assert TRACE_KINDS == KINDS == TraceSettings().kinds
    assert TraceSettings(kinds="mlp").kinds == ("mlp",) and TraceSettings(kinds=["mlp", "mlp"]).kinds == ("mlp",)


# --------------------------------------------------------------------------- the command line
def test_cli_trace_end_to_end(tiny_smol_dir, tmp_path, capsys):
    code, out, err = _run_cli(["trace", "country_capital", "--model", tiny_smol_dir, "--out", str(tmp_path / "c"),
                               "--all-facts", "--max-prompts", "2", "--samples", "2", "--window", "2", "--quiet"],
                              capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "c" / "trace.json").read_text())
    assert TraceResult.from_json(data).critical_layer() == data["critical_layer"]
    assert f"critical layer: {data['critical_layer']}" in out
    assert f"report: {tmp_path / 'c' / 'report.html'}" in out and "2 prompts" in out
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["reproduce"]["trace"]["known_only"] is False and config["reproduce"]["trace"]["window"] == 2


def test_cli_bad_value_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run_cli(["trace", "country_capital", "--samples", "0"], capsys)
    assert code == 2 and err.strip().splitlines() == ["kcircuits: error: --samples must be >= 1, got 0"]
    assert not (tmp_path / "runs").exists()


def test_cli_trace_help_imports_no_torch():
    probe = ("import sys\nfrom kcircuits.cli import main\ntry:\n    main(['trace', '--help'])\nexcept SystemExit:\n"
             "    pass\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--max-prompts" in out.stdout and "--all-facts" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


# --------------------------------------------------------------------------- the heatmap
def _cells(svg: str) -> list[ET.Element]:
    return [r for r in ET.fromstring(svg).iter(f"{{{SVG_NS}}}rect") if r.get("class") == "cell"]


def test_heatmap_has_one_cell_per_value_and_a_colour_scale():
    values = [[0.0, 0.5, 1.0, -0.25], [0.1, None, math.nan, 0.2], [0.3, 0.4, 0.5, 0.6]]
    svg = heatmap_svg(values, ["a", "<b>", "c"], ["0", "1", "2", "3"], title="t & u", x_label="layer",
                      value_label="effect", highlight=[(0, 2)])
    root = ET.fromstring(svg)  # well-formed: labels and title escaped
    cells = _cells(svg)
    assert len(cells) == 12
    by_title = {c.find(f"{{{SVG_NS}}}title").text: c.get("fill") for c in cells}
    assert by_title["a, 2: effect 1"] == POS_COLOUR  # the largest magnitude: the full colour
    assert by_title["a, 0: effect 0"] == "#ffffff"  # zero: white
    assert by_title["a, 3: effect -0.25"] == cell_colour(-0.25, 1.0) != cell_colour(0.25, 1.0)
    # missing values (None, NaN: an empty position group) are grey "n/a" cells, not zeros
    assert by_title["<b>, 1: effect n/a"] == by_title["<b>, 2: effect n/a"] == NAN_COLOUR
    scale = [r for r in root.iter(f"{{{SVG_NS}}}rect") if (r.get("class") or "").startswith("scale")]
    assert len(scale) == SCALE_STEPS + 1  # the bar, and the n/a swatch
    texts = [t.text for t in root.iter(f"{{{SVG_NS}}}text")]
    assert {"1", "-1", "0", "n/a"} <= set(texts)  # a scale centred on zero, labelled at its ends
    assert sum(r.get("class") == "hl" for r in root.iter(f"{{{SVG_NS}}}rect")) == 1


def test_heatmap_scale_of_positive_values_starts_at_zero_and_all_missing_still_draws():
    texts = [t.text for t in ET.fromstring(heatmap_svg([[0.2, 0.4]], ["r"], ["0", "1"])).iter(f"{{{SVG_NS}}}text")]
    assert "0.4" in texts and "0" in texts and "-0.4" not in texts
    svg = heatmap_svg([[None, math.nan]], ["r"], ["0", "1"])
    assert [c.get("fill") for c in _cells(svg)] == [NAN_COLOUR, NAN_COLOUR]
    assert cell_colour(-1.0, 1.0) == NEG_COLOUR
    with pytest.raises(ValueError, match="shapes differ"):
        heatmap_svg([[1.0, 2.0]], ["r"], ["0"])


def test_report_without_a_trace_has_no_trace_section():
    assert 'id="trace"' not in render_report({"title": "x", "summary": {"a": 1}})
