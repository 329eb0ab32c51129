"""The "Influence" section of ``report.html``: which training sequences taught each query's completion.

Reads ``report["influence"]`` (the ``influence.json`` written by :func:`kcircuits.influence.api.score`)
and renders, per query, its top-k training sequences with their most influential tokens highlighted
(background intensity = the token's share of the sequence's largest positive token score), the
power-law fit of its score tail, and, over all queries, influence by layer and by circuit component.
Everything from the run is HTML-escaped; inline styles only (the page has no scripts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kcircuits.report.base import Section, column_formatter, escape, fmt_value, kv_table, records_table

#: queries shown in full; the rest are in influence.json
MAX_QUERIES = 50
MAX_COMPONENTS = 30
_HIGHLIGHT = "37,99,235"  # the report's blue


def highlight_tokens(pieces: Sequence[str], weights: Sequence[float] | None) -> str:
    """Token pieces as spans whose background opacity is the weight in [0, 1] (escaped text)."""
    spans = []
    for i, piece in enumerate(pieces):
        w = float(weights[i]) if weights is not None and i < len(weights) else 0.0
        text = escape(piece)
        if w > 0.02:
            spans.append(f'<span style="background:rgba({_HIGHLIGHT},{min(w, 1.0) * 0.75:.2f})" '
                         f'title="{w:.2f}">{text}</span>')
        else:
            spans.append(text)
    return '<div style="white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.88em">' \
           + "".join(spans) + "</div>"


def _top_table(rows: Sequence[Mapping[str, Any]]) -> str:
    body = []
    score_text = column_formatter([r["score"] for r in rows])  # one format for the column, so the scores line up
    for r in rows:
        text = highlight_tokens(r["pieces"], r.get("weights")) if r.get("pieces") else escape(str(r.get("text", "")))
        tops = ", ".join(f"{escape(repr(t['token']))} ({fmt_value(t['score'])})" for t in r.get("top_tokens", []))
        body.append(f'<tr><td class="num">{r["rank"]}</td><td class="num">{escape(score_text(r["score"]))}</td>'
                    f'<td><code>{escape(str(r["id"]))}</code></td><td>{text}'
                    + (f'<div style="color:#4b5563;font-size:.85em">top tokens: {tops}</div>' if tops else "")
                    + "</td></tr>")
    head = "<tr><th>rank</th><th>influence</th><th>id</th><th>training sequence</th></tr>"
    return f'<div class="scroll"><table><thead>{head}</thead><tbody>{"".join(body)}</tbody></table></div>'


def _query(q: Mapping[str, Any], top_k: int) -> str:
    title = (f"<h3>{escape(str(q['prompt']))}<b style=\"color:#2563eb\">{escape(str(q['completion']))}</b>"
             f' <small style="color:#6b7280;font-weight:normal">({escape(str(q["id"]))})</small></h3>')
    facts: dict[str, Any] = {}
    if f"recall@{top_k}" in q:
        facts[f"recall@{top_k} of known sources"] = q[f"recall@{top_k}"]
    pl = q.get("power_law")
    if isinstance(pl, Mapping):
        facts.update({"tail exponent α": pl.get("alpha"), "tail x_min": pl.get("x_min"),
                      "tail size": pl.get("n_tail"), "KS distance": pl.get("ks"),
                      "power-law p-value": pl.get("p_value")})
    return title + (kv_table(facts) if facts else "") + _top_table(q.get("top", []))


def _body(report: Mapping[str, Any]) -> str:
    inf = report.get("influence")
    if not isinstance(inf, Mapping):
        return ""
    top_k = int(inf.get("top_k", 10))
    parts = [(f"<p>Strategy <b>{escape(str(inf.get('strategy')))}</b>: {inf.get('n_train')} training sequences "
             f"({inf.get('n_scored')} scored), {inf.get('n_queries')} queries. A positive score means that training "
             "on the sequence makes the completion more likely. Highlighted tokens carry the most positive "
             "influence within their sequence.</p>")]
    if inf.get("by_layer"):
        parts.append("<h3>Influence by layer</h3>" + records_table(inf["by_layer"]))
    if inf.get("by_component"):
        comps = sorted(inf["by_component"], key=lambda r: -float(r.get("share", 0.0)))[:MAX_COMPONENTS]
        parts.append("<h3>Influence by circuit component</h3>" + records_table(comps))
    queries = list(inf.get("queries") or [])
    for q in queries[:MAX_QUERIES]:
        parts.append(_query(q, top_k))
    if len(queries) > MAX_QUERIES:
        parts.append(f'<p class="note">{len(queries) - MAX_QUERIES} more queries in influence.json.</p>')
    if inf.get("damping"):
        vals = [float(v) for v in inf["damping"].values()]
        parts.append(f"<p>Damping λ per module: {len(vals)} modules, from {fmt_value(min(vals))} to "
                     f"{fmt_value(max(vals))} (all in influence.json).</p>")
    return "\n".join(parts)


INFLUENCE = Section("influence", "Influence", _body)

#: this module's sections (the page order is :data:`kcircuits.report.html.PAGE`)
SECTIONS: tuple[Section, ...] = (INFLUENCE,)


def render_influence(report: Mapping[str, Any]) -> str:
    """The section's HTML, or "" when the report has no ``influence`` key."""
    return INFLUENCE.render(report)
