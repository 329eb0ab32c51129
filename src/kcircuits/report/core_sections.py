"""The sections every discovery/evaluation run has: summary, key components, circuit, viewer,
faithfulness curve, hits, top edges, skipped samples and configuration.

Each is a :class:`~kcircuits.report.base.Section` whose body returns "" when the report dict lacks
its key; :data:`kcircuits.report.html.PAGE` places them on the page.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kcircuits.report.base import (
    Section,
    as_float,
    cell,
    escape,
    figure,
    fmt_fixed,
    fmt_number,
    kv_table,
    records_table,
)
from kcircuits.report.charts import curve_svg, line_svg
from kcircuits.report.svg import circuit_svg
from kcircuits.report.viewer import viewer_section

HITS_INTRO = ("Hit@k of the full model, the circuit alone, random circuits of exactly the circuit's pruned size "
              "(mean of the draws) and chance: the fully ablated run (every edge patched) on the same prompts. Ties "
              "count against the answer. Faithfulness is the ratio of means; the per-prompt mean leaves out the "
              "unstable prompts counted in the last column (full-vs-ablated gap below 0.1 x its median).")


def _summary(report: Mapping[str, Any]) -> str:
    s = report.get("summary")
    return kv_table(s) if isinstance(s, Mapping) and s else ""


def _key_components(report: Mapping[str, Any]) -> str:
    """The circuit's strongest nodes, with what the analyses say about each: the page's first table
    after the summary, so a reader knows what to look for before meeting the drawing."""
    k = report.get("key_components")
    if not isinstance(k, Mapping) or not k.get("rows"):
        return ""
    rows = [r for r in k["rows"] if isinstance(r, Mapping)]
    intro = (f"The {len(rows)} of the circuit's {k.get('n_nodes', len(rows))} nodes (besides the logits) with the "
             f"largest total |score| over their edges in the circuit ({k.get('n_edges', 'n/a')} edges in all), in "
             "and out: an edge into a head's q, k or v input counts for the head. ")
    if any("role" in r for r in rows):
        intro += "Role: the head's role on the explained prompts (see Head roles). "
    html = escape(intro)
    if any("lens top token" in r for r in rows):
        where = f" on the example prompt “{k['example_prompt']}”" if k.get("example_prompt") else ""
        run = f" ({k['lens_of']} run)" if k.get("lens_of") else ""
        answer = f' <span class="tok">{escape(k["answer"])}</span>' if k.get("answer") else ""
        html += (escape(f"Logit lens{where}{run}: the top token read from the node's output, its probability, "
                        "and the rank of the answer") + answer + " there.")
    return f"<p>{html}</p>" + records_table(rows, formats={"lens prob": lambda v: fmt_fixed(v, "prob")},
                                            token_cols={"lens top token"})


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
    return figure(svg, cap, fig_id="kc-static-circuit")


def _viewer(report: Mapping[str, Any]) -> str:
    v = report.get("viewer")
    if not isinstance(v, Mapping):
        return ""
    intro = ("<p>The circuit, interactive: hover an edge or node for its score, click a node for its details; the "
             "slider re-selects the top n edges by |score| over the whole graph and prunes them exactly as "
             "<code>kcircuits.graph.select_topn</code> + <code>prune</code> do.</p>")
    return intro + viewer_section(dict(v))


def _metric_text(v: Any) -> str:
    """A headline metric (CPR, CMD) with three decimals, or n/a."""
    f = as_float(v)
    return fmt_number(f, ".3f") if f is not None else "n/a"


def _curve(report: Mapping[str, Any]) -> str:
    c = report.get("curve")
    if not isinstance(c, Mapping):
        return ""
    cap = (f"<b>CPR</b> = {_metric_text(c.get('cpr'))} (area under the faithfulness curve; higher is better) &middot; "
           f"<b>CMD</b> = {_metric_text(c.get('cmd'))} (area between the curve and 1; lower is better). "
           "Faithfulness 1.0 means the circuit recovers the full model's metric.")
    body = figure(curve_svg(c), cap)
    if c.get("circuit_hit10"):
        body += figure(_hit10_chart(c), "Hit@10 of the circuit alone at each size, next to a random circuit of "
                       "exactly the same pruned size and the chance level: the fully ablated run on the same prompts. "
                       "A relation with few possible answers has a high chance level.")
    return body


def _hit10_chart(c: Mapping[str, Any]) -> str:
    """Hit@10 against circuit size on the same log percent axis as the faithfulness curve above it."""
    series: dict[str, Any] = {"circuit": c["circuit_hit10"]}
    if c.get("random_circuit_hit10"):
        series["random circuit, same size"] = {"y": c["random_circuit_hit10"], "colour": "#6b7280", "dash": "2 2"}
    series["chance (fully ablated run)"] = {"y": c.get("chance_hit10"), "colour": "#dc2626", "dash": "5 4"}
    return line_svg({"title": "Hit@10 by circuit size", "x": c.get("x_percent") or [], "series": series,
                     "log_x": True, "x_unit": "%", "x_label": "circuit size (% of edges)", "y_include": [0.0, 1.0],
                     "y_label": "share of prompts, answer in top 10"})


def _rows(key: str, intro: str = "") -> Callable[[Mapping[str, Any]], str]:
    """Body of a section that is one table of the report's list of dicts under ``key``."""
    def body(report: Mapping[str, Any]) -> str:
        rows = report.get(key)
        if not isinstance(rows, Sequence) or isinstance(rows, str) or not rows:
            return ""
        rows = [r for r in rows if isinstance(r, Mapping)]
        return (f"<p>{escape(intro)}</p>" if intro else "") + records_table(rows)
    return body


def _skipped(report: Mapping[str, Any]) -> str:
    s = report.get("skipped")
    if not isinstance(s, Mapping) or not s:
        return ""
    rows = "".join(f"<tr><td><code>{escape(str(k))}</code></td>{cell(v)}</tr>" for k, v in s.items())
    return f"<table><thead><tr><th>reason</th><th>samples</th></tr></thead><tbody>{rows}</tbody></table>"


def _config(report: Mapping[str, Any]) -> str:
    if "config" not in report:
        return ""
    text = json.dumps(report["config"], indent=2, default=str, ensure_ascii=False)
    return f"<details><summary>show the full run configuration</summary><pre>{escape(text)}</pre></details>"


SUMMARY = Section("summary", "Summary", _summary)
KEY_COMPONENTS = Section("key-components", "Key components", _key_components,
                         title="Key components: the circuit's strongest nodes")
CIRCUIT = Section("circuit", "Circuit", _circuit)
VIEWER = Section("viewer", "Circuit viewer", _viewer)
CURVE = Section("curve", "Faithfulness curve", _curve)
HITS = Section("hits", "Hits", _rows("hits_table", HITS_INTRO), title="Hits@k: full model vs circuit")
TOP_EDGES = Section("top-edges", "Top edges", _rows("top_edges"))
SKIPPED = Section("skipped", "Skipped samples", _skipped, title="Samples skipped and why")
CONFIG = Section("config", "Configuration", _config)

#: this module's sections, in the order it defines them (the page order is :data:`kcircuits.report.html.PAGE`)
SECTIONS: tuple[Section, ...] = (SUMMARY, KEY_COMPONENTS, CIRCUIT, VIEWER, CURVE, HITS, TOP_EDGES, SKIPPED, CONFIG)
