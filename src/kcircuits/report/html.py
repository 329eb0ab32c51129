"""Assemble ``report.html``: one self-contained page for one discovery/evaluation run.

Everything is inline (CSS, SVG, and the circuit viewer's script and data), nothing is fetched, so
the page opens from a file:// URL, can be mailed or archived as one file, and shows the same thing
years later. Every string that comes from the run (titles, node names, config values) goes through
:func:`html.escape`. The only scripts are the interactive circuit viewer's (present when the report
dict has a ``"viewer"`` key, see :mod:`kcircuits.report.viewer`); its data is inline JSON with ``<``
escaped, and it writes run strings into the page with ``textContent`` only. Without JavaScript the
static SVG of the Circuit section still shows the circuit. Sections whose key is absent from the
report dict are left out.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from html import escape
from typing import Any

from kcircuits.io import atomic_write_text
from kcircuits.report import explain_sections
from kcircuits.report.charts import line_svg
from kcircuits.report.svg import as_float, circuit_svg, curve_svg
from kcircuits.report.viewer import viewer_section

_CSS = """
:root{color-scheme:light}
*{box-sizing:border-box}
body{margin:0;background:#f7f8fa;color:#1f2937;
 font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1100px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:1.55em;margin:.2em 0 .4em;word-break:break-word}
h2{font-size:1.2em;margin:1.8em 0 .5em;padding-bottom:.25em;border-bottom:1px solid #e5e7eb}
nav{font-size:.9em;color:#6b7280}
nav a{color:#2563eb;text-decoration:none;margin-right:1em}
nav a:hover{text-decoration:underline}
table{border-collapse:collapse;font-size:.9em;margin:.4em 0}
th,td{border:1px solid #e5e7eb;padding:4px 10px;text-align:left;vertical-align:top}
thead th{background:#f3f4f6;font-weight:600}
tbody tr:nth-child(even){background:#fafafa}
table.kv th{background:#f9fafb;font-weight:500;color:#4b5563}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto}
figure{margin:.6em 0}
figcaption{font-size:.88em;color:#4b5563;margin-top:.4em}
.note{color:#92400e}
details{margin-top:.5em}
summary{cursor:pointer;color:#2563eb}
pre{background:#f6f8fa;border:1px solid #e5e7eb;border-radius:4px;padding:12px;overflow:auto;font-size:.85em;
 font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.92em}
svg{display:block}
"""

DEFAULT_TITLE = "kcircuits report"


# --------------------------------------------------------------------------- value formatting
def fmt_value(v: Any) -> str:
    """Table cell text (unescaped): short floats, visible NaN, compact JSON for nested values."""
    if v is None:
        return "\u2014"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.6g}"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str, ensure_ascii=False)
    return str(v)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    cls = ' class="num"' if _is_num(v) else ""
    return f"<td{cls}>{escape(fmt_value(v))}</td>"


# --------------------------------------------------------------------------- generic tables
def kv_table(d: Mapping[str, Any]) -> str:
    """Two-column key/value table (the summary and the skip counts)."""
    rows = "".join(f"<tr><th>{escape(str(k))}</th>{_cell(v)}</tr>" for k, v in d.items())
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def records_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Table from a list of dicts; columns are the union of keys in first-seen order, so rows
    produced by different code paths (a missing metric, say) still line up."""
    cols: list[str] = []
    for r in rows:
        cols += [str(k) for k in r if str(k) not in cols]
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_cell(_get(r, c)) for c in cols) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _get(r: Mapping[str, Any], col: str) -> Any:
    if col in r:
        return r[col]
    return next((v for k, v in r.items() if str(k) == col), None)


# --------------------------------------------------------------------------- sections
def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>\n{body}\n</section>'


def _summary(report: Mapping[str, Any]) -> str:
    s = report.get("summary")
    return _section("summary", "Summary", kv_table(s)) if isinstance(s, Mapping) and s else ""


def _circuit(report: Mapping[str, Any]) -> str:
    c = report.get("circuit")
    if not isinstance(c, Mapping):
        return ""
    svg, note = circuit_svg(c)
    n = len(c.get("edges") or [])
    cap = (f"{n} edges. Layers run bottom (input) to top (logits); heads by column, MLP at the right. "
           "Blue: positive score, red: negative; width proportional to |score|. Hover a node or edge for details.")
    if note:
        cap += f' <span class="note">({escape(note)})</span>'
    # the id lets the circuit viewer (when present and running) fold this static copy away
    return _section("circuit", "Circuit",
                    f'<figure id="kc-static-circuit"><div class="scroll">{svg}</div><figcaption>{cap}</figcaption></figure>')


def _viewer(report: Mapping[str, Any]) -> str:
    v = report.get("viewer")
    if not isinstance(v, Mapping):
        return ""
    intro = ("<p>The circuit, interactive: hover an edge or node for its score, click a node for its details; the "
             "slider re-selects the top n edges by |score| over the whole graph and prunes them exactly as "
             "<code>kcircuits.graph.select_topn</code> + <code>prune</code> do.</p>")
    return _section("viewer", "Circuit viewer", intro + viewer_section(dict(v)))


def _num_text(v: Any) -> str:
    f = as_float(v)
    return f"{f:.3f}" if f is not None else "n/a"


def _curve(report: Mapping[str, Any]) -> str:
    c = report.get("curve")
    if not isinstance(c, Mapping):
        return ""
    cap = (f"<b>CPR</b> = {_num_text(c.get('cpr'))} (area under the faithfulness curve; higher is better) &middot; "
           f"<b>CMD</b> = {_num_text(c.get('cmd'))} (area between the curve and 1; lower is better). "
           "Faithfulness 1.0 means the circuit recovers the full model's metric.")
    body = f"<figure>{curve_svg(c)}<figcaption>{cap}</figcaption></figure>"
    pct = [as_float(x) for x in c.get("x_percent") or []]
    if c.get("circuit_hit10") and all(x is not None and x > 0 for x in pct):
        series = {"circuit": c["circuit_hit10"]}
        if c.get("random_circuit_hit10"):
            series["random circuit, same size"] = c["random_circuit_hit10"]
        series["chance (fully ablated run)"] = c.get("chance_hit10")
        chart = line_svg({"title": "Hit@10 by circuit size", "x": [math.log10(x) for x in pct], "series": series,
                          "x_label": "circuit size, log10(% of edges)", "y_label": "share of prompts, answer in top 10"})
        body += (f"<figure>{chart}<figcaption>Hit@10 of the circuit alone at each size, next to a random circuit of "
                 "exactly the same pruned size and the chance level: the fully ablated run on the same prompts. A "
                 "relation with few possible answers has a high chance level.</figcaption></figure>")
    return _section("curve", "Faithfulness curve", body)


def _list_section(key: str, anchor: str, title: str, intro: str = "") -> Callable[[Mapping[str, Any]], str]:
    def render(report: Mapping[str, Any]) -> str:
        rows = report.get(key)
        if not isinstance(rows, Sequence) or isinstance(rows, str) or not rows:
            return ""
        rows = [r for r in rows if isinstance(r, Mapping)]
        text = f"<p>{escape(intro)}</p>" if intro else ""
        return _section(anchor, title, text + records_table(rows))
    return render


def _skipped(report: Mapping[str, Any]) -> str:
    s = report.get("skipped")
    if not isinstance(s, Mapping) or not s:
        return ""
    rows = "".join(f"<tr><td><code>{escape(str(k))}</code></td>{_cell(v)}</tr>" for k, v in s.items())
    table = f"<table><thead><tr><th>reason</th><th>samples</th></tr></thead><tbody>{rows}</tbody></table>"
    return _section("skipped", "Samples skipped and why", table)


def _config(report: Mapping[str, Any]) -> str:
    if "config" not in report:
        return ""
    text = json.dumps(report["config"], indent=2, default=str, ensure_ascii=False)
    body = f"<details><summary>show the full run configuration</summary><pre>{escape(text)}</pre></details>"
    return _section("config", "Configuration", body)


def _influence(report: Mapping[str, Any]) -> str:
    from kcircuits.report.influence_section import render_influence  # late: that module builds on this one

    return render_influence(report)


HITS_INTRO = ("Hit@k of the full model, the circuit alone, random circuits of exactly the circuit's pruned size "
              "(mean of the draws) and chance: the fully ablated run (every edge patched) on the same prompts. Ties "
              "count against the answer. Faithfulness is the ratio of means; the per-prompt mean leaves out the "
              "unstable prompts counted in the last column (full-vs-ablated gap below 0.1 x its median).")

_SECTIONS: list[tuple[str, str, Callable[[Mapping[str, Any]], str]]] = [
    ("summary", "Summary", _summary),
    ("circuit", "Circuit", _circuit),
    ("viewer", "Circuit viewer", _viewer),
    ("curve", "Faithfulness curve", _curve),
    ("hits", "Hits", _list_section("hits_table", "hits", "Hits@k: full model vs circuit", HITS_INTRO)),
    ("top-edges", "Top edges", _list_section("top_edges", "top-edges", "Top edges")),
    ("skipped", "Skipped samples", _skipped),
    ("influence", "Influence", _influence),
    ("config", "Configuration", _config),
]
# the analyses' sections (findings, logit lens, head roles, composition, comparison, figures) after the summary
_SECTIONS[1:1] = explain_sections.SECTIONS[:1]
_SECTIONS[-2:-2] = explain_sections.SECTIONS[1:]


# --------------------------------------------------------------------------- public API
def render_report(report: Mapping[str, Any]) -> str:
    """Return the report page as HTML text. Only ``title`` is expected; absent sections are skipped."""
    title = escape(str(report.get("title") or DEFAULT_TITLE))
    sections = [(anchor, label, fn(report)) for anchor, label, fn in _SECTIONS]
    present = [(a, lab, body) for a, lab, body in sections if body]
    nav = " ".join(f'<a href="#{a}">{escape(lab)}</a>' for a, lab, _ in present)
    nav_html = f"<nav>{nav}</nav>" if len(present) > 1 else ""
    body = "\n".join(b for _, _, b in present)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n<h1>{title}</h1>\n{nav_html}\n{body}\n</main>\n</body>\n</html>\n"
    )


def write_report(path: str | os.PathLike[str], report: Mapping[str, Any]) -> None:
    """Render and write the page atomically, so a crash or a reader polling the run folder never
    sees a half-written report. Rendering happens first: a rendering error leaves no file behind."""
    atomic_write_text(path, render_report(report))
