"""Report sections of the analyses: findings text, rank-by-layer trace, head roles, composition,
and the generic matrices / charts / tables that the compare command and the studies fill.

Each is a :class:`~kcircuits.report.base.Section` whose body returns "" when the report dict lacks
its key; :data:`kcircuits.report.html.PAGE` places them on the page.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kcircuits.report.base import (
    Section,
    escape,
    figure,
    is_num,
    kv_table,
    records_table,
    sample_note_html,
)
from kcircuits.report.charts import bar_svg, heat_table, line_svg


def _findings(report: Mapping[str, Any]) -> str:
    """One paragraph per finding. A finding is a string, or ``{"text": ..., "n_prompts": n}``, which
    adds a small-sample warning when n is below :data:`~kcircuits.report.base.SMALL_SAMPLE`."""
    lines = report.get("narrative")
    if not lines:
        return ""
    return "".join(f"<p>{_finding_html(t)}</p>" for t in lines)


def _finding_html(item: Any) -> str:
    if isinstance(item, Mapping):
        return escape(str(item.get("text", ""))) + sample_note_html(item.get("n_prompts"))
    return escape(str(item))


def _explained_on(report: Mapping[str, Any], n_prompts: Any) -> str:
    """Says how many prompts an analysis used: the explanation runs on the first few test prompts
    (``--explain-prompts``), usually far fewer than the Hit@k evaluation next to it."""
    if not is_num(n_prompts):
        return ""
    text = f"Measured on the first {int(n_prompts)} test prompts (--explain-prompts sets how many)"
    hits = report.get("hits_table")
    total = hits[-1].get("n_prompts") if isinstance(hits, list) and hits and isinstance(hits[-1], Mapping) else None
    if is_num(total) and total > n_prompts:
        text += f"; the Hits@k table uses all {int(total)} test prompts"
    return f'<p class="explained-on">{escape(text)}.{sample_note_html(n_prompts)}</p>'


def _lens(report: Mapping[str, Any]) -> str:
    trace = report.get("lens")
    if not isinstance(trace, Mapping):
        return ""
    series_rank = {name: trace[name]["median_rank"] for name in ("clean", "circuit") if name in trace}
    series_hit = {name: trace[name]["hit10"] for name in ("clean", "circuit") if name in trace}
    if "chance" in trace:  # the fully ablated run: what hit@10 is without the circuit
        series_hit["chance (fully ablated)"] = trace["chance"]["hit10"]
    x = trace.get("layers") or list(range(len(next(iter(series_rank.values())))))
    body = _explained_on(report, trace.get("n_prompts"))
    body += figure(line_svg({"title": "answer rank by layer", "x": x, "series": series_rank, "x_label":
                             "residual stream after layer (0 = embeddings)", "y_label": "median answer rank",
                             "log_y": True}),
                  escape("Logit lens of the residual stream: the answer's median rank after each layer, for the "
                         "full model (clean) and for the circuit alone (edges outside it patched)"
                         + (f", over {trace['n_prompts']} prompts." if trace.get("n_prompts") else ".")))
    body += figure(line_svg({"title": "hit@10 by layer", "x": x, "series": series_hit, "x_label":
                             "residual stream after layer",
                             "y_label": "share of prompts with the answer in the top 10"}))
    settled = {name: trace[name].get("share_settled") for name in ("clean", "circuit") if name in trace}
    body += kv_table({f"share of prompts where the answer settles at rank 1 ({k})": v for k, v in settled.items()})
    return body


def _roles(report: Mapping[str, Any]) -> str:
    r = report.get("roles")
    if not isinstance(r, Mapping):
        return ""
    cols = ("head", "role", "in_circuit", "subject_mass", "relation_mass", "other_mass", "direct_effect", "answer_z",
            "range_z", "specificity")
    rows = [{c: row.get(c) for c in cols} for row in r.get("rows", [])]
    body = _explained_on(report, r.get("n_prompts"))
    body += kv_table(r.get("counts", {})) + "<p>Thresholds (docs/analysis.md gives the criteria):</p>"
    body += kv_table(r.get("thresholds", {}))
    body += (f"<p>Heads with a role or in the circuit, by |direct effect| ({len(rows)} of {r.get('n_heads')} heads; "
             "roles.json has all):</p>" + records_table(rows))
    return body


def _composition(report: Mapping[str, Any]) -> str:
    c = report.get("composition")
    if not isinstance(c, Mapping):
        return ""

    def flat(d: Mapping) -> list[dict]:
        return [{"part": k, "count": v["count"], "share": v["share"]} for k, v in d.items()]

    body = "<p>Nodes by component type</p>" + records_table(flat(c["nodes_by_type"]))
    body += "<p>Edges by the kind of their destination</p>" + records_table(flat(c["edges_by_destination_kind"]))
    bands = [{"band": b, "attention heads": v["attention"]["count"], "MLPs": v["mlp"]["count"]}
             for b, v in c["nodes_by_band"].items()]
    body += "<p>Nodes by layer band</p>" + records_table(bands)
    return body


# The studies describe their matrices, charts and tables as dicts; each may carry "caption" and
# "n_prompts" (the prompts it rests on), which adds a small-sample warning to the caption; a table
# may name its "token_cols" (cells holding token labels, kept on one line).
def _caption_html(item: Mapping[str, Any]) -> str:
    return escape(str(item.get("caption") or "")) + sample_note_html(item.get("n_prompts"))


def _paragraph(html: str) -> str:
    return f"<p>{html}</p>" if html else ""


def _matrices(report: Mapping[str, Any]) -> str:
    items = report.get("matrices")
    if not items:
        return ""
    return "".join(f"<h3>{escape(m['title'])}</h3>" + heat_table(m["rows"], m["cols"], m["values"], m.get("lo", 0.0),
                                                                   m.get("hi", 1.0))
                   + _paragraph(_caption_html(m)) for m in items)


def _charts(report: Mapping[str, Any]) -> str:
    """Each chart dict drawn as a line chart, or as bars with ``"kind": "bar"`` (counts per category)."""
    items = report.get("charts")
    if not items:
        return ""
    return "".join(figure(bar_svg(c) if c.get("kind") == "bar" else line_svg(c), _caption_html(c)) for c in items)


def _tables(report: Mapping[str, Any]) -> str:
    items = report.get("tables")
    if not items:
        return ""
    return "".join(f"<h3>{escape(t['title'])}</h3>" + _paragraph(_caption_html(t))
                   + records_table(t["rows"], token_cols=set(t.get("token_cols") or ()))
                   for t in items if t.get("rows"))


FINDINGS = Section("findings", "Findings", _findings)
LENS = Section("lens", "Logit lens", _lens)
ROLES = Section("roles", "Head roles", _roles)
COMPOSITION = Section("composition", "Composition", _composition)
MATRICES = Section("matrices", "Comparison", _matrices)
CHARTS = Section("charts", "Figures", _charts)
TABLES = Section("tables", "Tables", _tables)

#: this module's sections, in the order it defines them (the page order is :data:`kcircuits.report.html.PAGE`)
SECTIONS: tuple[Section, ...] = (FINDINGS, LENS, ROLES, COMPOSITION, MATRICES, CHARTS, TABLES)
