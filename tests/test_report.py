"""Tests for the HTML report: structure, escaping, self-containment, NaN handling, atomic writes."""

from __future__ import annotations

import ast
import json
import math
import shutil
import os
import random
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kcircuits.report import render_report, write_report
from kcircuits.report.charts import curve_svg
from kcircuits.report.svg import SVG_NS, circuit_svg

N_LAYERS, N_HEADS = 4, 3
TITLE = "kcircuits: <script>alert('x')</script> & co"


def synthetic_circuit(n_layers: int = N_LAYERS, n_heads: int = N_HEADS, n_edges: int = 20, seed: int = 0) -> dict:
    """A random but valid circuit: sources come before destinations, scores of both signs."""
    rng = random.Random(seed)
    srcs = [("input", -1)] + [(f"a{lay}.h{h}", lay) for lay in range(n_layers) for h in range(n_heads)]
    srcs += [(f"m{lay}", lay) for lay in range(n_layers)]
    edges, seen = [], set()
    while len(edges) < n_edges:
        src, s_layer = rng.choice(srcs)
        d_layer = rng.randint(s_layer + 1, n_layers)
        if d_layer == n_layers:
            dst, kind = "logits", "logits"
        elif rng.random() < 0.3:
            dst, kind = f"m{d_layer}", "mlp"
        else:
            dst, kind = f"a{d_layer}.h{rng.randrange(n_heads)}", rng.choice("qkv")
        if (src, dst, kind) in seen:
            continue
        seen.add((src, dst, kind))
        edges.append({"src": src, "dst": dst, "kind": kind, "score": round(rng.uniform(-1, 1), 4)})
    nodes = [{"name": "input", "type": "input", "layer": -1}]
    for lay in range(n_layers):
        nodes += [{"name": f"a{lay}.h{h}", "type": "head", "layer": lay, "head": h} for h in range(n_heads)]
        nodes.append({"name": f"m{lay}", "type": "mlp", "layer": lay})
    nodes.append({"name": "logits", "type": "logits", "layer": n_layers})
    return {"n_layers": n_layers, "n_heads": n_heads, "nodes": nodes, "edges": edges}


def full_report() -> dict:
    nan = float("nan")
    return {
        "title": TITLE,
        "summary": {"model": "tiny<model>", "method": "EAP-IG (m=5)", "n_edges_total": 1234, "n_edges_circuit": 20,
                    "baseline": nan, "ok": True},
        "circuit": synthetic_circuit(),
        "curve": {"x_percent": [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100],
                  "faithfulness_mean": [0.05, 0.1, nan, 0.4, None, 0.7, 0.85, 0.95, 1.02, 1.0],
                  "faithfulness_std": [0.02, 0.05, 0.1, nan, 0.1, 0.1, 0.08, 0.05, 0.02, 0.0],
                  "random_faithfulness_mean": [0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.6, 1.0],
                  "cpr": 0.8123, "cmd": 0.2345},
        "hits_table": [{"relation": "country_capital", "split": "test", "n_prompts": 40, "full_hit1": 0.8,
                        "full_hit10": 0.95, "circuit_hit1": 0.6, "circuit_hit10": 0.9, "faithfulness_mean": 0.85,
                        "faithfulness_std": nan}],
        "skipped": {"no_same_length_corrupt": 3, "<weird> reason": 1},
        "top_edges": [{"edge": "a2.h1->m3", "score": 0.5}, {"edge": "input->a0.h0<q>", "score": -0.25}],
        "config": {"model": "tiny", "note": "</pre><script>bad()</script>", "nested": {"lr": 1e-3, "list": [1, 2]}},
    }


def _svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.DOTALL)


def test_full_report_structure_and_escaping() -> None:
    page = render_report(full_report())
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    assert "<script" not in page.lower()  # title, config and summary strings are all escaped
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in page
    assert f"<title>{'kcircuits: &lt;script&gt;'}" in page
    assert "tiny&lt;model&gt;" in page
    assert "&lt;/pre&gt;&lt;script&gt;bad()" in page
    assert "<details>" in page and "&lt;weird&gt; reason" in page
    for anchor in ("summary", "circuit", "curve", "hits", "top-edges", "skipped", "config"):
        assert f'id="{anchor}"' in page
    assert "<svg" in page


def test_self_contained() -> None:
    page = render_report(full_report())
    stripped = page.replace(SVG_NS, "")
    assert "http://" not in stripped and "https://" not in stripped
    assert "<link rel=\"stylesheet\"" not in page and "@import" not in page and "url(" not in page
    assert not re.search(r"\bsrc=", page)


def test_one_path_per_edge_and_svgs_parse() -> None:
    report = full_report()
    page = render_report(report)
    svgs = _svgs(page)
    assert len(svgs) == 2
    for svg in svgs:
        ET.fromstring(svg)  # well-formed XML
    circ = svgs[0]
    root = ET.fromstring(circ)
    paths = [p for p in root.iter(f"{{{SVG_NS}}}path") if "edge" in (p.get("class") or "").split()]
    assert len(paths) == len(report["circuit"]["edges"])
    titles = {p.find(f"{{{SVG_NS}}}title").text for p in paths}
    e0 = report["circuit"]["edges"][0]
    assert f"{e0['src']} -> {e0['dst']} ({e0['kind']}): {e0['score']:.4g}" in titles
    classes = " ".join(p.get("class") for p in paths)
    assert "pos" in classes and "neg" in classes
    widths = [float(p.get("stroke-width")) for p in paths]
    assert max(widths) == pytest.approx(4.0, abs=0.05)


def test_only_used_nodes_drawn() -> None:
    circuit = {"n_layers": 30, "n_heads": 9, "edges": [
        {"src": "a3.h2", "dst": "m7", "kind": "mlp", "score": 0.5},
        {"src": "m7", "dst": "logits", "kind": "logits", "score": -0.2}]}
    svg, note = circuit_svg(circuit)
    root = ET.fromstring(svg)
    assert note == ""
    assert len(list(root.iter(f"{{{SVG_NS}}}circle"))) - 1 == 1  # one head (+1 legend circle)
    text = " ".join(t.text or "" for t in root.iter(f"{{{SVG_NS}}}text"))
    assert "L3" in text and "L7" in text and "L12" not in text.split()
    assert "layers 8\u201329: no nodes" in text  # collapsed empty run is labelled


def test_kcircuits_json_names_accepted() -> None:
    """Circuit.to_json() style: string nodes, <q>/<k> suffixes, kv groups, graph sub-dict."""
    circuit = {"graph": {"n_layers": 4, "n_heads": 6, "n_kv_heads": 2}, "nodes": ["input", "a0.h1", "logits"],
               "edges": [{"src": "input", "dst": "a1.h3<q>", "score": 0.3},
                         {"src": "a0.h1", "dst": "a2.kv1<k>", "score": -0.1},
                         {"src": "a0.h1", "dst": "logits", "score": float("nan")},
                         {"src": "bogus", "dst": "m1", "score": 1.0}]}
    svg, note = circuit_svg(circuit)
    root = ET.fromstring(svg)
    paths = [p for p in root.iter(f"{{{SVG_NS}}}path") if "edge" in (p.get("class") or "").split()]
    assert len(paths) == 3
    assert "1 edge(s)" in note
    assert "a0.h1 -&gt; a2.kv1 (k): -0.1" in svg
    assert "nan" not in re.sub(r"<title>.*?</title>", "", svg).lower()


def test_curve_nan_handled_and_caption() -> None:
    page = render_report(full_report())
    assert "0.812" in page and "0.234" in page  # CPR / CMD in the caption
    curve = _svgs(page)[1]
    ET.fromstring(curve)
    assert "nan" not in curve.lower() and "inf" not in curve.lower()
    assert curve.count('fill="#2563eb"><title>') == 8  # markers only for the 8 finite means
    all_nan = curve_svg({"x_percent": [1, 10], "faithfulness_mean": [None, float("nan")], "cpr": None})
    ET.fromstring(all_nan)
    assert "nan" not in all_nan.lower()
    empty = curve_svg({"x_percent": [], "faithfulness_mean": []})
    ET.fromstring(empty)
    page2 = render_report({"title": "t", "curve": {"x_percent": [1], "faithfulness_mean": [0.5], "cpr": float("nan")}})
    assert "n/a" in page2


def test_title_only() -> None:
    page = render_report({"title": "just a title"})
    assert "<h1>just a title</h1>" in page
    assert "<svg" not in page and "<section" not in page
    assert "kcircuits report" in render_report({})


def test_large_circuit_stays_small() -> None:
    circuit = synthetic_circuit(30, 9, n_edges=3000, seed=1)
    svg, _ = circuit_svg(circuit)
    ET.fromstring(svg)
    assert svg.count('<path class="edge ') == 3000
    assert len(svg) < 3000 * 200
    for num in re.findall(r'd="([^"]+)"', svg)[:50]:
        assert all(len(tok.split(".")[-1]) <= 1 for tok in re.findall(r"\d+\.\d+", num))


def test_write_report_atomic(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "report.html"
    write_report(out, full_report())
    assert out.is_file()
    assert out.read_text(encoding="utf-8") == render_report(full_report())
    write_report(str(out), {"title": "second"})  # overwrite in place
    assert "second" in out.read_text(encoding="utf-8")
    assert sorted(os.listdir(out.parent)) == ["report.html"]


def test_write_report_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "report.html"
    out.write_text("old", encoding="utf-8")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_report(out, {"title": "new"})
    assert out.read_text(encoding="utf-8") == "old"
    assert os.listdir(tmp_path) == ["report.html"]


def test_fmt_helpers() -> None:
    from kcircuits.report.html import fmt_value
    from kcircuits.report.svg import as_float, fmt

    assert fmt(1.04) == "1" and fmt(-0.04) == "0" and fmt(2.25) in ("2.2", "2.3")
    assert as_float(float("nan")) is None and as_float("x") is None and as_float(True) is None
    assert fmt_value(float("nan")) == "NaN" and fmt_value(None) == "\u2014" and fmt_value(0.123456) == "0.1235"
    assert math.isclose(as_float("0.5") or 0, 0.5)


# --------------------------------------------------------------------------- module layout
REPORT_DIR = Path(__file__).resolve().parents[1] / "src" / "kcircuits" / "report"


def _report_modules() -> list[str]:
    """Every module of the package, the package itself first: new modules are covered automatically."""
    return ["kcircuits.report"] + sorted(f"kcircuits.report.{p.stem}" for p in REPORT_DIR.glob("*.py")
                                         if p.stem != "__init__")


def _report_imports(path: Path) -> set[str]:
    """The report modules ``path`` imports, at any depth (a lazy import inside a function counts:
    it is how a cycle hides). Package-level names (``from kcircuits.report import x``) resolve to
    the submodule ``x`` when there is one, else to ``kcircuits.report`` itself."""
    submodules = {p.stem for p in REPORT_DIR.glob("*.py")}
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("kcircuits.report")}
        elif isinstance(node, ast.ImportFrom):
            base = "kcircuits.report" if node.level == 1 else node.module or ""
            if node.level == 1 and node.module:
                base = f"kcircuits.report.{node.module}"
            if base == "kcircuits.report":
                out |= {f"kcircuits.report.{a.name}" if a.name in submodules else base for a in node.names}
            elif base.startswith("kcircuits.report."):
                out.add(base)
    return out


def test_report_modules_form_a_one_way_stack() -> None:
    """Only the package's __init__ imports html, and the import graph of the report modules has no
    cycle (with none, no import order can meet a half-initialised module)."""
    graph = {("kcircuits.report" if p.stem == "__init__" else f"kcircuits.report.{p.stem}"): _report_imports(p)
             for p in REPORT_DIR.glob("*.py")}
    assert {m for m, deps in graph.items() if "kcircuits.report.html" in deps} == {"kcircuits.report"}
    assert graph["kcircuits.report.base"] == set()  # the shared helpers build on nothing else in the package
    for section_module in ("core_sections", "explain_sections", "influence_section"):
        assert graph[f"kcircuits.report.{section_module}"] <= {
            f"kcircuits.report.{m}" for m in ("base", "svg", "charts", "viewer")}
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in graph.get(m, ()):
            assert state.get(d) != "open", f"import cycle: {' -> '.join(path + [m, d])}"
            if d not in state:
                visit(d, path + [m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])


def test_report_modules_import_in_any_order() -> None:
    """In a fresh interpreter, every report module can be the first one imported, followed by the
    others forwards or backwards. An import cycle only fails for some choices of which module of it
    comes first, so these orders cover every order that can differ. Heavy third-party modules load
    once; the report modules are dropped from sys.modules and run again for every order."""
    mods = _report_modules()
    script = textwrap.dedent(f"""
        import importlib, sys
        import kcircuits, torch  # shared dependencies, loaded once
        mods = {mods!r}
        for first in mods:
            rest = [m for m in mods if m != first]
            for order in ([first] + rest, [first] + rest[::-1]):
                for m in [m for m in sys.modules if m == "kcircuits.report" or m.startswith("kcircuits.report.")]:
                    del sys.modules[m]
                for m in order:
                    importlib.import_module(m)
                assert "<h1>t</h1>" in sys.modules["kcircuits.report"].render_report({{"title": "t"}}), order
        print("ok", len(mods))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["ok", str(len(mods))]


# --------------------------------------------------------------------------- the page's sections
ANCHORS_IN_PAGE_ORDER = ["summary", "key-components", "findings", "circuit", "viewer", "circuit-pairs", "curve",
                         "hits", "top-edges", "skipped", "lens", "roles", "composition", "matrices", "charts", "tables",
                         "trace", "influence", "config"]


def every_section_report() -> dict:
    """``full_report`` plus the data of every other section (analyses, viewer, influence)."""
    import torch

    from kcircuits.graph import Graph, prune, select_topn
    from kcircuits.report.viewer import viewer_payload

    graph = Graph(2, 4, 4, True, False)
    scores = torch.randn(graph.n_src, graph.n_dst, generator=torch.Generator().manual_seed(0)) * graph.edge_exists()
    report = full_report()
    report["curve"].update(circuit_hit10=[0.1, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95],
                           random_circuit_hit10=[0.0, 0.05, 0.05, 0.1, 0.1, 0.2, 0.3, 0.4, 0.7, 0.95],
                           chance_hit10=[0.04] * 10)
    trace = {"median_rank": [900, 120, 30, 5, 1], "hit10": [0.0, 0.1, 0.2, 0.6, 1.0], "share_settled": 0.8}
    report.update({
        "narrative": ["The circuit recovers most of the model."],
        "key_components": {"rows": [{"node": "a1.h2", "kind": "head", "layer": 1, "edges": 3, "total |score|": 1.5,
                                     "role": "mover", "lens top token": "' Paris'", "lens prob": 0.4}],
                           "n_nodes": 5, "n_edges": 20},
        "viewer": viewer_payload(graph, prune(select_topn(graph, scores, 20)), scores),
        "circuit_pairs": [{"title": "fact 0", "before": prune(select_topn(graph, scores, 20)).to_json(),
                           "after": prune(select_topn(graph, -scores, 20)).to_json(), "n_prompts": 3}],
        "lens": {"layers": [0, 1, 2, 3, 4], "n_prompts": 3, "clean": trace, "circuit": trace,
                 "chance": {"hit10": [0.0, 0.0, 0.0, 0.02, 0.02]}},
        "roles": {"n_heads": 8, "counts": {"mover": 1}, "thresholds": {"subject_mass": 0.3},
                  "rows": [{"head": "a1.h2", "role": "mover", "in_circuit": True, "subject_mass": 0.7}]},
        "composition": {"nodes_by_type": {"head": {"count": 3, "share": 0.75}},
                        "edges_by_destination_kind": {"q": {"count": 4, "share": 0.5}},
                        "nodes_by_band": {"early": {"attention": {"count": 1}, "mlp": {"count": 1}}}},
        "matrices": [{"title": "overlap", "rows": ["a", "b"], "cols": ["a", "b"], "values": [[1.0, 0.2], [0.2, 1.0]]}],
        "charts": [{"title": "accuracy", "x": [1, 2, 4], "series": {"acc": [0.2, 0.5, 0.7]}, "caption": "acc by k"}],
        "tables": [{"title": "by k", "rows": [{"k": 1, "edges": 10}]}],
        "trace": {"kinds": ["mlp"], "groups": ["first subject token", "last subject token"], "window": 1,
                  "noise": 3.0, "samples": 2, "critical_layer": 1, "mean_effect": {"mlp": [[0.1, 0.0], [0.0, 0.4]]},
                  "prompts": []},
        "influence": {"strategy": "ekfac", "n_train": 1, "n_scored": 1, "n_queries": 1, "top_k": 1,
                      "queries": [{"id": "q", "prompt": "A", "completion": " B", "top": [
                          {"rank": 1, "score": 0.5, "id": "d", "text": "x"}]}]},
    })
    return report


def test_sections_appear_in_page_order() -> None:
    """With every section present, the sections and the navigation links follow the one ordered
    registry, which keeps the page order the report has always had."""
    from kcircuits.report.html import PAGE

    page = render_report(every_section_report())
    assert re.findall(r'<section id="([^"]+)"', page) == ANCHORS_IN_PAGE_ORDER
    nav = re.search(r"<nav>(.*?)</nav>", page, flags=re.DOTALL)[1]
    assert re.findall(r'href="#([^"]+)"', nav) == ANCHORS_IN_PAGE_ORDER
    assert [s.anchor for s in PAGE] == ANCHORS_IN_PAGE_ORDER
    assert "Hits@k: full model vs circuit</h2>" in page and '<a href="#hits">Hits</a>' in page  # title vs label


def test_page_lists_every_defined_section_once() -> None:
    """A section a module defines but the page registry leaves out would never be shown."""
    from kcircuits.report import circuit_pairs, core_sections, explain_sections, heatmap, influence_section
    from kcircuits.report.html import PAGE

    defined = [*core_sections.SECTIONS, *explain_sections.SECTIONS, *heatmap.SECTIONS, *influence_section.SECTIONS,
               *circuit_pairs.SECTIONS]
    assert sorted(s.anchor for s in PAGE) == sorted(s.anchor for s in defined)
    assert len({s.anchor for s in PAGE}) == len(PAGE) and all(s in PAGE for s in defined)


# --------------------------------------------------------------------------- the one line chart
def _texts(svg: str) -> list[str]:
    return [t.text or "" for t in ET.fromstring(svg).iter(f"{{{SVG_NS}}}text")]


def _marker_x(svg: str, colour: str) -> list[float]:
    return [float(c.get("cx")) for c in ET.fromstring(svg).iter(f"{{{SVG_NS}}}circle") if c.get("fill") == colour]


def test_curve_is_a_log_percent_line_chart() -> None:
    """The faithfulness curve comes from line_svg: decade ticks in percent, markers log-spaced, the
    std band, the random baseline dashed, the 1.0 reference line and a legend naming all of them."""
    curve = full_report()["curve"]
    svg = curve_svg(curve)
    assert 'class="kc-line"' in svg
    texts = _texts(svg)
    assert [t for t in texts if t.endswith("%")] == ["0.1%", "1%", "10%", "100%"]
    assert "edges kept (% of all edges, log scale)" in texts
    for label in ("circuit (mean)", "\u00b1 std", "random edges", "full model (1.0)"):
        assert label in texts
    xs = dict(zip([0.1, 0.2, 1, 5, 10, 20, 50, 100], _marker_x(svg, "#2563eb"), strict=True))  # the 8 finite means
    assert xs[10] - xs[1] == pytest.approx(xs[100] - xs[10], abs=0.2)  # one decade, one distance
    assert xs[1] - xs[0.1] == pytest.approx(xs[10] - xs[1], abs=0.2)
    root = ET.fromstring(svg)
    paths = list(root.iter(f"{{{SVG_NS}}}path"))
    assert any(p.get("fill-opacity") and p.get("d", "").endswith("Z") for p in paths)  # the band
    assert any(p.get("stroke-dasharray") == "2 2" for p in paths)  # random edges
    assert any(ln.get("stroke-dasharray") == "5 4" and ln.get("y1") == ln.get("y2")
               for ln in root.iter(f"{{{SVG_NS}}}line"))  # the horizontal 1.0 line
    tips = [t.text for t in root.iter(f"{{{SVG_NS}}}title")]
    assert "circuit (mean): x=5%, y=0.7 \u00b1 0.1" in tips


def test_curve_without_band_or_baseline() -> None:
    svg = curve_svg({"x_percent": [1, 10, 100], "faithfulness_mean": [0.2, 0.5, 1.0]})
    texts = _texts(svg)
    assert "circuit (mean)" in texts and "random edges" not in texts and "\u00b1 std" not in texts
    root = ET.fromstring(svg)
    assert not [p for p in root.iter(f"{{{SVG_NS}}}path") if p.get("fill-opacity")]  # no band area
    assert not list(root.iter(f"{{{SVG_NS}}}rect"))  # and no band swatch in the legend


def test_hit10_chart_on_log_percent_axis() -> None:
    """The Hit@10-by-size chart shares the curve's log percent axis: percent tick labels, not log10
    numbers, and log-spaced points."""
    page = render_report(every_section_report())
    curve_section = re.search(r'<section id="curve">.*?</section>', page, flags=re.DOTALL)[0]
    hit_chart = _svgs(curve_section)[1]
    texts = _texts(hit_chart)
    assert [t for t in texts if t.endswith("%")] == ["0.1%", "1%", "10%", "100%"]
    assert not any("log10" in t for t in texts) and "circuit size (% of edges, log scale)" in texts
    xs = _marker_x(hit_chart, "#2563eb")
    pct = full_report()["curve"]["x_percent"]
    assert xs[pct.index(10)] - xs[pct.index(1)] == pytest.approx(xs[pct.index(100)] - xs[pct.index(10)], abs=0.2)


def test_line_chart_log_y_ticks_gaps_and_legend() -> None:
    from kcircuits.report.charts import line_svg

    svg = line_svg({"title": "rank", "x": [0, 1, 2, 3], "log_y": True, "y_label": "rank",
                    "series": {"a": [500, float("nan"), 20, 1], "empty": [None, None, None, None], "b": [0, 3, 2, 1]}})
    texts = _texts(svg)
    assert {"1", "10", "100", "1000"} <= set(texts) and "rank (log scale)" in texts
    assert "a" in texts and "b" in texts and "empty" not in texts  # a series with nothing to draw has no legend entry
    root = ET.fromstring(svg)
    lines = [p for p in root.iter(f"{{{SVG_NS}}}path") if p.get("stroke") in ("#2563eb", "#059669")]
    assert len([p for p in lines if p.get("stroke") == "#2563eb"]) == 2  # the NaN breaks series a in two
    assert len(_marker_x(svg, "#059669")) == 3  # b's 0 cannot sit on a log axis: skipped, not drawn at the bottom
    assert "nan" not in svg.lower()


# --------------------------------------------------------------------------- numbers
def test_no_negative_zero_anywhere() -> None:
    """Values that are or round to zero print unsigned in tables, captions, matrices, charts and
    circuit tooltips (a "-0.000" suggests a direction the data does not have)."""
    report = every_section_report()
    report["summary"]["delta"] = -0.0
    report["curve"].update(cpr=-1e-4, cmd=-0.0)
    report["hits_table"].append({"relation": "r2", "faithfulness_mean": -1e-9, "faithfulness_std": -0.0})
    report["top_edges"].append({"edge": "m0->logits", "score": -0.0})
    report["circuit"]["edges"][0]["score"] = -0.0
    report["matrices"][0]["values"][0][1] = -1e-4
    report["charts"].append({"title": "flat", "x": [0, 1, 2], "series": {"d": [-0.0, -1e-12, 0.0]}})
    page = render_report(report)
    visible = re.sub(r"<(script|style)\b.*?</\1>", "", page, flags=re.DOTALL)
    negative_zero = re.compile(r"(?<![\w.])-0(?:\.0+)?(?![\d.])")
    assert not negative_zero.findall(visible), negative_zero.findall(visible)
    assert "<b>CPR</b> = 0.000" in page and "<b>CMD</b> = 0.000" in page
    assert negative_zero.search("x -0.000 y") and negative_zero.search("(-0)")  # the check itself catches them
    assert not negative_zero.search("-0.5 1e-05 -0.001")


def test_table_columns_share_decimals() -> None:
    """A float column is printed with one number of decimals, so its values line up; counts stay
    whole, whole-valued floats get no decimals, tiny columns go scientific throughout."""
    from kcircuits.report.base import records_table

    rows = [{"n": 40, "f": 0.8, "big": 12.5, "whole": 3.0, "tiny": 1.5e-6},
            {"n": 7, "f": 0.95, "big": 3.25, "whole": 10.0, "tiny": -2e-7},
            {"n": 1, "f": 0.8123, "big": float("nan"), "whole": None, "tiny": 0.0}]
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", records_table(rows))
    by_col = [cells[i::5] for i in range(5)]
    assert by_col[0] == ["40", "7", "1"]
    assert by_col[1] == ["0.8000", "0.9500", "0.8123"]
    assert by_col[2] == ["12.50", "3.25", "NaN"]
    assert by_col[3] == ["3", "10", "\u2014"]
    assert by_col[4] == ["1.500e-06", "-2.000e-07", "0.000e+00"]


def test_kv_table_floats_share_decimals() -> None:
    """The summary's floats line up: a baseline rounded to 0 reads 0.0000 next to 0.8548, not "0"."""
    from kcircuits.report.base import kv_table

    cells = re.findall(r"<td[^>]*>([^<]*)</td>", kv_table({"faithfulness": 0.8548, "random": 0.0, "other": 1e-4,
                                                           "edges": 654, "model": "m", "delta": -0.0}))
    assert cells == ["0.8548", "0.0000", "0.0001", "654", "m", "0.0000"]


def test_fmt_number_drops_only_negative_zero() -> None:
    from kcircuits.report.base import fmt_number

    assert fmt_number(-0.0) == "0" and fmt_number(-1e-4, ".3f") == "0.000" and fmt_number(-0.0, ".2e") == "0.00e+00"
    assert fmt_number(-0.5, ".3f") == "-0.500" and fmt_number(-1e-7, ".2e") == "-1.00e-07"
    assert fmt_number(-0.0004, ".1%") == "0.0%" and fmt_number(-0.04, ".1%") == "-4.0%"


def test_fmt_fixed_and_token_label_and_sample_warning() -> None:
    """Running-text numbers have the fixed decimals of their kind and no negative zero; tokens are
    quoted with their leading space and visible newlines; a small sample is named, a big one not."""
    from kcircuits.report.base import SMALL_SAMPLE, fmt_fixed, sample_note_html, sample_warning, token_label

    assert fmt_fixed(0.1, "prob") == "0.100" and fmt_fixed(-0.0004, "prob") == "0.000"
    assert fmt_fixed(3.14159, "z") == "3.1" and fmt_fixed(-0.04, "z") == "0.0" and fmt_fixed(-0.06, "z") == "-0.1"
    assert fmt_fixed(2.5, 0) == "2" and fmt_fixed(None) == fmt_fixed(float("nan")) == fmt_fixed("x") == "n/a"
    assert token_label(" Lisbon") == "' Lisbon'" and token_label("Lisbon") == "'Lisbon'"
    assert token_label("\n") == "'\\n'" and token_label("a\tb") == "'a\\tb'"
    assert SMALL_SAMPLE == 5
    assert sample_warning(4).startswith("small sample: 4 prompts") and sample_warning(1).startswith("small sample: 1 ")
    assert sample_warning(5) == sample_warning(None) == sample_note_html(12) == ""
    assert 'class="note small-sample"' in sample_note_html(2)


def test_viewer_token_rule_matches_token_label() -> None:
    """viewer.js shows tokens by the same rule as token_label (quotes, leading space, visible \\n and \\t)."""
    from kcircuits.report.base import token_label

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    js = (REPORT_DIR / "viewer.js").read_text(encoding="utf-8")
    rule = re.search(r"function showTok\(t\) \{.*?\}\n", js)[0]
    tokens = [" Lisbon", "Lisbon", "a\nb", "\tx\r", "'"]
    out = subprocess.run([node, "-e", rule + f"console.log(JSON.stringify({json.dumps(tokens)}.map(showTok)))"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out) == [token_label(t) for t in tokens]


def _grouped_circuit():
    """3 layers, 6 heads in 2 k/v groups; hand-picked edges and scores."""
    import torch

    from kcircuits.graph import Graph, circuit_from_edges

    graph = Graph(3, 6, 2, True, False)
    edges = {"input->a0.h1<q>": 0.5, "input->a0.kv0<k>": -1.0, "a0.h1->m0": 2.0, "m0->a1.kv1<v>": 0.25,
             "a1.h4->logits": 3.0, "a0.h1->logits": -0.75, "m0->logits": float("nan")}
    scores = torch.zeros(graph.n_src, graph.n_dst)
    for name, v in edges.items():
        src, _, dst = name.partition("->")
        scores[graph.src_index(src), graph.dst_index(dst)] = v
    return graph, circuit_from_edges(graph, edges, scores), scores


def test_key_components_rank_nodes_by_total_score() -> None:
    """Totals sum |score| over a node's edges in and out; a k/v group's edge counts for each head of
    the group; logits are not a component; NaN adds to the edge count only. Role and lens come from
    the node details, tokens as token labels; the section comes right after the summary."""
    from kcircuits.report.data import build_report, key_components

    graph, circuit, scores = _grouped_circuit()
    details = {"example": {"prompt": "The capital of Portugal is", "answer": " Lisbon", "lens_of": "circuit"},
               "nodes": {"a0.h1": {"lens": {"top": [[" Lisbon", 0.4213], ["\n", 0.1]], "answer_rank": 1},
                                   "role": {"role": "mover", "subject_mass": 0.7}},
                         "m0": {"lens": {"top": [[" Madrid", 0.05]], "answer_rank": 7}}}}
    key = key_components(circuit, details)
    totals = {r["node"]: (r["total |score|"], r["edges"]) for r in key["rows"]}
    # a0.h1: q 0.5 + out 2.0 + 0.75 + k/v group 0 (heads 0-2) 1.0; m0: 2.0 + 0.25 + NaN;
    # a1.h4: 3.0 + its group's v 0.25 (heads 3-5 read kv1); input: 0.5 + 1.0
    assert totals["a0.h1"] == (4.25, 4) and totals["a1.h4"] == (3.25, 2) and totals["m0"] == (2.25, 3)
    assert totals["input"] == (1.5, 2) and totals["a0.h0"] == totals["a0.h2"] == (1.0, 1)
    assert totals["a1.h3"] == totals["a1.h5"] == (0.25, 1) and "logits" not in totals
    assert [r["node"] for r in key["rows"][:4]] == ["a0.h1", "a1.h4", "m0", "input"]
    first = key["rows"][0]
    assert (first["kind"], first["layer"], first["role"]) == ("head", 0, "mover")
    assert first["lens top token"] == "' Lisbon'" and first["lens prob"] == 0.4213 and first["answer rank (lens)"] == 1
    m0 = next(r for r in key["rows"] if r["node"] == "m0")
    assert m0["kind"] == "MLP" and m0["role"] is None and m0["lens top token"] == "' Madrid'"
    assert list(key["rows"][0]).index("role") == list(m0).index("role") == 5  # one column, next to the score
    assert key["answer"] == "' Lisbon'" and key["n_nodes"] == len(totals) and key["n_edges"] == circuit.n_edges
    assert len(key_components(circuit, details, top=3)["rows"]) == 3
    # in the page: right after the summary, before the circuit drawing and the viewer
    config = {"reproduce": {"command": "discover", "model": "tiny", "relation": "r"}}
    page = render_report(build_report(config, circuit, {}, {}, graph, scores=scores, node_details=details))
    sections = re.findall(r'<section id="([^"]+)"', page)
    assert sections[:2] == ["summary", "key-components"] and sections.index("viewer") > 1
    key_html = re.search(r'<section id="key-components">(.*?)</section>', page, flags=re.DOTALL)[1]
    assert '<td class="tok">&#x27; Lisbon&#x27;</td>' in key_html and "mover" in key_html
    assert ">0.421<" in key_html and "0.4213" not in key_html  # a probability: three decimals
    assert "The capital of Portugal is" in key_html
    # no scores at all: ranked by edge count, still listed
    circuit.scores = None
    assert key_components(circuit)["rows"][0]["node"] == "a0.h1"


def test_lens_and_roles_say_how_many_prompts() -> None:
    """The lens and head-role sections name the prompts they were measured on, next to the Hits
    table's count, and warn when that is a small sample."""
    report = every_section_report()
    report["lens"]["n_prompts"] = 16
    report["roles"]["n_prompts"] = 16
    report["hits_table"][0]["n_prompts"] = 64
    page = render_report(report)
    for anchor in ("lens", "roles"):
        section = re.search(rf'<section id="{anchor}">(.*?)</section>', page, flags=re.DOTALL)[1]
        assert "Measured on the first 16 test prompts" in section and "uses all 64 test prompts" in section
        assert "small sample" not in section
    report["lens"]["n_prompts"] = 3
    section = re.search(r'<section id="lens">(.*?)</section>', render_report(report), flags=re.DOTALL)[1]
    assert "first 3 test prompts" in section and "small sample: 3 prompts" in section


def test_findings_charts_tables_carry_small_sample_warnings() -> None:
    """A finding, chart, table or matrix that rests on fewer than 5 prompts says so; the others do not."""
    report = every_section_report()
    report["narrative"] = ["plain text", {"text": "on many", "n_prompts": 40}, {"text": "on few", "n_prompts": 2}]
    report["charts"][0]["n_prompts"] = 4
    report["tables"][0]["n_prompts"] = 30
    report["matrices"][0]["n_prompts"] = 1
    page = render_report(report)

    def section(anchor: str) -> str:
        return re.search(rf'<section id="{anchor}">(.*?)</section>', page, flags=re.DOTALL)[1]

    paras = re.findall(r"<p>(.*?)</p>", section("findings"))
    assert ["small sample" in p for p in paras] == [False, False, True] and "small sample: 2 prompts" in paras[2]
    assert "small sample: 4 prompts" in section("charts") and "small sample" not in section("tables")
    assert "small sample: 1 prompt," in section("matrices")


def test_bar_chart_draws_counts_as_bars() -> None:
    """Bars start at 0 with heights proportional to the values; category labels are printed; integer
    counts get whole-number ticks only; several series sit side by side with a legend."""
    from kcircuits.report.charts import bar_svg

    svg = bar_svg({"title": "lost", "x": [1, 2, 3, "never"], "series": {"n": [2, 0, 4, 1]}, "x_label": "layer",
                   "y_label": "prompts"})
    root = ET.fromstring(svg)
    bars = [r for r in root.iter(f"{{{SVG_NS}}}rect") if r.get("class") == "bar"]
    heights = [float(b.get("height")) for b in bars]
    bottoms = {round(float(b.get("y")) + float(b.get("height")), 1) for b in bars}
    assert len(bars) == 4 and len(bottoms) == 1  # one baseline: 0
    assert heights[1] == 0 and heights[2] == pytest.approx(2 * heights[0], abs=0.2) == pytest.approx(4 * heights[3],
                                                                                                     abs=0.2)
    texts = _texts(svg)
    assert {"1", "2", "3", "never", "layer", "prompts"} <= set(texts)
    assert all(float(t).is_integer() for t in texts if re.fullmatch(r"-?[\d.]+", t))  # no 0.5-prompt ticks
    two = bar_svg({"x": ["a", "b"], "series": {"s1": [1, 2], "s2": {"y": [3, None], "colour": "#111111"}}})
    root = ET.fromstring(two)
    assert len([r for r in root.iter(f"{{{SVG_NS}}}rect") if r.get("class") == "bar"]) == 3  # None draws no bar
    assert {"s1", "s2"} <= set(_texts(two))
    assert "no data" in bar_svg({"x": [], "series": {}})


def test_explanation_feeds_the_report_as_plain_json(tiny_smol_dir) -> None:
    """What the report takes from an explanation (node details, report view) is plain JSON: a report
    rebuilt from their cached JSON is the same page. The example answer is the answer's first token
    as decoded, leading space kept; lens and roles carry their prompt count."""
    import torch

    from kcircuits.analyze.explain import explain
    from kcircuits.engine import Engine
    from kcircuits.graph import prune, select_topn
    from kcircuits.models import load_model
    from kcircuits.pipeline import prepare_prompts
    from kcircuits.report.data import build_report

    lm = load_model(tiny_smol_dir)
    engine = Engine(lm.weights)
    pairs = prepare_prompts(lm, engine, "country_capital", max_pairs=5)["all"].pairs
    graph = engine.graph
    scores = torch.randn(graph.n_src, graph.n_dst, generator=torch.Generator().manual_seed(0)) * graph.edge_exists()
    circuit = prune(select_topn(graph, scores, 40))
    ex = explain(engine, lm.tokenizer, pairs, lm.pad_token_id, circuit=circuit, batch_size=4)
    details, view = ex.node_details(lm.tokenizer), ex.report_view(circuit)
    cached_details, cached_view = json.loads(json.dumps(details)), json.loads(json.dumps(view))  # no default=: plain
    assert details["example"]["answer"] == lm.tokenizer.decode([pairs[0].answer_ids[0]])
    assert details["example"]["answer"].startswith(" ") and details["example"]["answer_text"] == pairs[0].object
    assert view["lens"]["n_prompts"] == view["roles"]["n_prompts"] == details["n_prompts"] == len(pairs)
    config = {"reproduce": {"command": "discover", "model": "tiny", "relation": "country_capital"}}

    def page(d: dict, v: dict) -> str:
        report = build_report(config, circuit, {}, {}, graph, scores=scores, node_details=d)
        report.update(v)
        return render_report(report)

    fresh = page(details, view)
    assert fresh == page(cached_details, cached_view)
    assert "Measured on the first 5 test prompts" in fresh and 'id="key-components"' in fresh
    key = build_report(config, circuit, {}, {}, graph, scores=scores, node_details=details)["key_components"]
    heads = [r for r in key["rows"] if r["kind"] == "head"]
    assert heads and all(r["role"] == details["nodes"][r["node"]]["role"]["role"] for r in heads)
    assert all(r["lens top token"].startswith("'") for r in key["rows"] if "lens top token" in r)


# --------------------------------------------------------------------------- circuits side by side
def test_circuit_pair_highlights_exactly_what_one_side_lacks() -> None:
    """Left: the edges only the first circuit has; right: those only the second has; both on the same rows."""
    import torch

    from kcircuits.graph import Graph, prune, select_topn
    from kcircuits.report.circuit_pairs import circuit_pair_html, only_in

    graph = Graph(3, 4, 4, True, False)
    gen = torch.Generator().manual_seed(1)
    a = prune(select_topn(graph, torch.randn(graph.n_src, graph.n_dst, generator=gen) * graph.edge_exists(), 60))
    b = prune(select_topn(graph, torch.randn(graph.n_src, graph.n_dst, generator=gen) * graph.edge_exists(), 60))
    ja, jb = a.to_json(), b.to_json()
    html = circuit_pair_html(ja, jb, ("A", "B"))
    left, right = html.split("<figure")[1:3]
    edges_a = {f"{s}->{d}" for s, d, _ in a.edge_list()}
    edges_b = {f"{s}->{d}" for s, d, _ in b.edge_list()}
    assert left.count(" diff") == len(edges_a - edges_b) > 0
    assert right.count(" diff") == len(edges_b - edges_a) > 0
    assert left.count('class="ring"') == len(set(a.nodes()) - set(b.nodes()))
    assert only_in(ja, jb) == (edges_a - edges_b) | (set(a.nodes()) - set(b.nodes()))
    row_labels = lambda fig: re.findall(r">(L\d+|input|logits)</text>", fig)  # noqa: E731
    assert row_labels(left) == row_labels(right)  # the same rows: a node sits at the same height in both
    same = circuit_pair_html(ja, ja)
    assert " diff" not in same and 'class="ring"' not in same


def test_circuit_pair_viewers_highlight_each_sides_own_edges() -> None:
    """The interactive pair: two viewers with their own ids, each marking exactly what only its circuit
    has (lost on the left, gained on the right), one script for both, the static drawings kept."""
    import base64

    import numpy as np
    import torch

    from kcircuits.errors import KcircuitsError
    from kcircuits.graph import Graph, prune, select_topn
    from kcircuits.report import render_report
    from kcircuits.report.circuit_pairs import circuit_pair

    graph = Graph(3, 4, 4, True, False)
    gen = torch.Generator().manual_seed(2)
    sa, sb = (torch.randn(graph.n_src, graph.n_dst, generator=gen) * graph.edge_exists() for _ in range(2))
    a, b = prune(select_topn(graph, sa, 60)), prune(select_topn(graph, sb, 60))
    item = circuit_pair("fact 0", a, b, ("before: A", "after: B"), n_prompts=3)

    def marked(payload: dict) -> set[str]:
        dec = lambda spec, dt: np.frombuffer(base64.b64decode(spec["data"]), dtype=dt)  # noqa: E731
        src = dec(payload["edges"]["src"], "<u2" if payload["edges"]["src"]["dtype"] == "uint16" else "<i4")
        dst = dec(payload["edges"]["dst"], "<u2" if payload["edges"]["dst"]["dtype"] == "uint16" else "<i4")
        return {graph.edge_name(int(src[r]), int(dst[r])) for r in dec(payload["highlight"]["ranks"], "<i4")}

    names = lambda c: {graph.edge_name(s, d) for s, d in torch.nonzero(c.edges).tolist()}  # noqa: E731
    v = item["viewers"]
    assert marked(v["before"]) == names(a) - names(b) and marked(v["after"]) == names(b) - names(a)
    assert set(v["before"]["highlight"]["nodes"]) == set(a.nodes()) - set(b.nodes())
    assert "lost" in v["before"]["highlight"]["label"] and "gained" in v["after"]["highlight"]["label"]
    page = render_report({"title": "t", "circuit_pairs": [item, {**item, "title": "fact 1"}]})
    ids = re.findall(r'<div class="kcv" id="([^"]+)"', page)
    assert ids == ["kcv-pair0-before", "kcv-pair0-after", "kcv-pair1-before", "kcv-pair1-after"]
    all_ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(all_ids) == len(set(all_ids))  # no id twice on the page
    assert page.count("<script>") == 1 and page.count('type="application/json"') == 4
    assert page.count("<summary>static drawings") == 2 and page.count(" diff") > 0
    bare = circuit_pair("fact 0", a, b, viewers=False)
    assert "viewers" not in bare and "kcv-pair" not in render_report({"circuit_pairs": [bare]})
    small = Graph(2, 4, 4, True, False)
    with pytest.raises(KcircuitsError, match="different graphs"):
        circuit_pair("x", a, prune(select_topn(small, torch.ones(small.n_src, small.n_dst), 5)))
