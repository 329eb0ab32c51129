"""Turn a run's results into the plain dict that :mod:`kcircuits.report` renders.

Kept apart from the renderer so the report code knows nothing about tensors or graphs, and so
the CLI's commands share one way of summarising a run.
"""

from __future__ import annotations

import torch

from kcircuits.graph import Circuit, Graph
from kcircuits.report.viewer import viewer_payload


def hits_rows(metrics: dict) -> list[dict]:
    rows = []
    for role, res in metrics.get("sets", {}).items():
        rows.append({"relation": res.get("relation", role), "split": res.get("role", role),
                     "n_prompts": res.get("n_prompts"), "full_hit1": res.get("full_hit1"),
                     "full_hit10": res.get("full_hit10"), "circuit_hit1": res.get("circuit_hit1"),
                     "circuit_hit10": res.get("circuit_hit10"),
                     "faithfulness_mean": res.get("faithfulness", {}).get("mean"),
                     "faithfulness_std": res.get("faithfulness", {}).get("std")})
    return rows


def curve_view(curve: dict | None) -> dict | None:
    if not curve:
        return None
    pts = curve["points"]
    view = {"x_percent": [p["percent"] for p in pts],
            "faithfulness_mean": [p["faithfulness_of_means"] for p in pts],
            "faithfulness_std": [p["faithfulness_std"] for p in pts],
            "cpr": curve["cpr"], "cmd": curve["cmd"]}
    if "random_faithfulness_of_means" in pts[0]:
        view["random_faithfulness_mean"] = [p["random_faithfulness_of_means"] for p in pts]
    return view


def build_report(config: dict, circuit: Circuit, metrics: dict, prompt_sets: dict, graph: Graph, *,
                 scores: torch.Tensor | None = None, node_details: dict | None = None) -> dict:
    """The report dict. ``scores`` (the whole graph's ``[n_src, n_dst]`` attribution scores) and
    ``node_details`` (logit lens, attention, head roles per node; see :mod:`kcircuits.report.viewer`)
    feed the interactive circuit viewer, which is included whenever scores are given or the circuit
    carries its own."""
    rep = config.get("reproduce", {})
    sets = metrics.get("sets", {})
    last = sets[list(sets)[-1]] if sets else {}
    summary = {"model": rep.get("model"), "command": rep.get("command"), "relation(s)": rep.get("relation") or
               ", ".join(rep.get("relations", [])), "method": rep.get("method"), "metric": rep.get("metric"),
               "ablation": rep.get("ablation"), "answer scoring": rep.get("answer_scoring"),
               "edges in graph": graph.n_edges, "edges in circuit": circuit.n_edges,
               "nodes in circuit": len(circuit.nodes())}
    if last:
        summary["faithfulness (ratio of means)"] = round(last.get("faithfulness_of_means", float("nan")), 4)
        rnd = last.get("random_baseline")
        if rnd:
            vals = rnd["faithfulness_of_means"]
            summary["random circuit faithfulness (mean of draws)"] = round(sum(vals) / len(vals), 4)
    skipped: dict[str, int] = {}
    for ps in prompt_sets.values():
        for k, v in ps.skipped.items():
            skipped[f"{ps.role}: {k}" if len(prompt_sets) > 1 else k] = v
    title_rel = rep.get("relation") or ", ".join(rep.get("relations", []))
    report = {
        "title": f"kcircuits {rep.get('command', '')}: {title_rel} on {rep.get('model')}",
        "summary": {k: v for k, v in summary.items() if v is not None},
        "circuit": circuit.to_json(),
        "curve": curve_view(metrics.get("curve")),
        "hits_table": hits_rows(metrics),
        "skipped": skipped,
        "top_edges": [{"edge": f"{s}->{d}", "score": sc} for s, d, sc in circuit.edge_list()[:30]],
        "config": config,
    }
    if scores is not None or circuit.scores is not None or node_details:
        report["viewer"] = viewer_payload(graph, circuit, scores, node_details)
    return report
