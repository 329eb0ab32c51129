"""Tests for the HTML report: structure, escaping, self-containment, NaN handling, atomic writes."""

from __future__ import annotations

import math
import os
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kcircuits.report import render_report, write_report
from kcircuits.report.svg import SVG_NS, circuit_svg, curve_svg

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
