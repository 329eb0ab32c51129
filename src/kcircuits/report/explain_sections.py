"""Report sections of the analyses: findings text, rank-by-layer trace, head roles, composition,
and the generic matrices / charts / tables that the compare command and the studies fill.

Each renderer takes the report dict and returns "" when its key is absent, like the sections in
:mod:`kcircuits.report.html`, which lists them in its page order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from html import escape
from typing import Any

from kcircuits.report.charts import heat_table, line_svg


def _html():
    from kcircuits.report import (
        html,  # late: html imports this module to list the sections
    )

    return html


def _figure(body: str, caption: str = "") -> str:
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure><div class="scroll">{body}</div>{cap}</figure>'


def narrative(report: Mapping[str, Any]) -> str:
    lines = report.get("narrative")
    if not lines:
        return ""
    return _html()._section("findings", "Findings", "".join(f"<p>{escape(str(t))}</p>" for t in lines))


def lens(report: Mapping[str, Any]) -> str:
    trace = report.get("lens")
    if not isinstance(trace, Mapping):
        return ""
    series_rank = {name: trace[name]["median_rank"] for name in ("clean", "circuit") if name in trace}
    series_hit = {name: trace[name]["hit10"] for name in ("clean", "circuit") if name in trace}
    if "chance" in trace:  # the fully ablated run: what hit@10 is without the circuit
        series_hit["chance (fully ablated)"] = trace["chance"]["hit10"]
    x = trace.get("layers") or list(range(len(next(iter(series_rank.values())))))
    body = _figure(line_svg({"title": "answer rank by layer", "x": x, "series": series_rank, "x_label":
                             "residual stream after layer (0 = embeddings)", "y_label": "median answer rank",
                             "log_y": True}),
                   "Logit lens of the residual stream: the answer's median rank after each layer, for the full "
                   "model (clean) and for the circuit alone (edges outside it patched)"
                   + (f", over {trace['n_prompts']} prompts." if trace.get("n_prompts") else "."))
    body += _figure(line_svg({"title": "hit@10 by layer", "x": x, "series": series_hit, "x_label":
                              "residual stream after layer", "y_label": "share of prompts with the answer in the top 10"}))
    settled = {name: trace[name].get("share_settled") for name in ("clean", "circuit") if name in trace}
    body += _html().kv_table({f"share of prompts where the answer settles at rank 1 ({k})": v for k, v in settled.items()})
    return _html()._section("lens", "Logit lens", body)


def roles(report: Mapping[str, Any]) -> str:
    r = report.get("roles")
    if not isinstance(r, Mapping):
        return ""
    h = _html()
    cols = ("head", "role", "in_circuit", "subject_mass", "relation_mass", "other_mass", "direct_effect", "answer_z",
            "range_z", "specificity")
    rows = [{c: row.get(c) for c in cols} for row in r.get("rows", [])]
    body = h.kv_table(r.get("counts", {})) + "<p>Thresholds (docs/analysis.md gives the criteria):</p>"
    body += h.kv_table(r.get("thresholds", {}))
    body += (f"<p>Heads with a role or in the circuit, by |direct effect| ({len(rows)} of {r.get('n_heads')} heads; "
             "roles.json has all):</p>" + h.records_table(rows))
    return h._section("roles", "Head roles", body)


def composition(report: Mapping[str, Any]) -> str:
    c = report.get("composition")
    if not isinstance(c, Mapping):
        return ""
    h = _html()

    def flat(d: Mapping) -> list[dict]:
        return [{"part": k, "count": v["count"], "share": v["share"]} for k, v in d.items()]

    body = "<p>Nodes by component type</p>" + h.records_table(flat(c["nodes_by_type"]))
    body += "<p>Edges by the kind of their destination</p>" + h.records_table(flat(c["edges_by_destination_kind"]))
    bands = [{"band": b, "attention heads": v["attention"]["count"], "MLPs": v["mlp"]["count"]}
             for b, v in c["nodes_by_band"].items()]
    body += "<p>Nodes by layer band</p>" + h.records_table(bands)
    return h._section("composition", "Composition", body)


def matrices(report: Mapping[str, Any]) -> str:
    items = report.get("matrices")
    if not items:
        return ""
    body = "".join(f"<h3>{escape(m['title'])}</h3>" + heat_table(m["rows"], m["cols"], m["values"], m.get("lo", 0.0),
                                                                   m.get("hi", 1.0))
                   + (f"<p>{escape(m['caption'])}</p>" if m.get("caption") else "") for m in items)
    return _html()._section("matrices", "Comparison", body)


def charts(report: Mapping[str, Any]) -> str:
    items = report.get("charts")
    if not items:
        return ""
    return _html()._section("charts", "Figures", "".join(_figure(line_svg(c), c.get("caption", "")) for c in items))


def tables(report: Mapping[str, Any]) -> str:
    items = report.get("tables")
    if not items:
        return ""
    h = _html()
    body = "".join(f"<h3>{escape(t['title'])}</h3>" + (f"<p>{escape(t['caption'])}</p>" if t.get("caption") else "")
                   + h.records_table(t["rows"]) for t in items if t.get("rows"))
    return h._section("tables", "Tables", body) if body else ""


#: (anchor, navigation label, renderer), in page order
SECTIONS: list[tuple[str, str, Callable[[Mapping[str, Any]], str]]] = [
    ("findings", "Findings", narrative),
    ("lens", "Logit lens", lens),
    ("roles", "Head roles", roles),
    ("composition", "Composition", composition),
    ("matrices", "Comparison", matrices),
    ("charts", "Figures", charts),
    ("tables", "Tables", tables),
]
