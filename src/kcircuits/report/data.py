"""Turn a run's results into the plain dict that :mod:`kcircuits.report` renders.

Kept apart from the renderer so the report code knows nothing about tensors or graphs, and so
the CLI's commands share one way of summarising a run.
"""

from __future__ import annotations

import torch

from kcircuits.graph import Circuit, Graph
from kcircuits.report.viewer import viewer_payload


def random_mean(res: dict, key: str, kind: str = "same_size") -> float | None:
    """The mean over random draws of ``key`` for one kind of random baseline, or None without draws."""
    entry = (res.get("random_baseline") or {}).get("kinds", {}).get(kind)
    return entry[f"{key}_summary"]["mean"] if entry else None


def hits_rows(metrics: dict) -> list[dict]:
    """One row per prompt set: Hit@k of the full model, the circuit, random circuits of its exact size
    (mean of draws) and chance (the fully ablated run on the same prompts), then faithfulness."""
    rows = []
    for role, res in metrics.get("sets", {}).items():
        row = {"relation": res.get("relation", role), "split": res.get("role", role), "n_prompts": res.get("n_prompts")}
        for k in (1, 10):
            row[f"full_hit{k}"] = res.get(f"full_hit{k}")
            row[f"circuit_hit{k}"] = res.get(f"circuit_hit{k}")
            row[f"random_hit{k}"] = random_mean(res, f"circuit_hit{k}")
            row[f"chance_hit{k}"] = res.get(f"chance_hit{k}")
        row.update({"faithfulness": res.get("faithfulness_of_means"),
                    "random_faithfulness": random_mean(res, "faithfulness_of_means"),
                    "random_faithfulness_same_logit_edges": random_mean(res, "faithfulness_of_means",
                                                                        "same_logit_edges"),
                    "faithfulness_per_prompt_mean": res.get("faithfulness", {}).get("mean"),
                    "faithfulness_per_prompt_std": res.get("faithfulness", {}).get("std"),
                    "unstable_prompts": res.get("unstable_prompts", {}).get("n")})
        rows.append({k: v for k, v in row.items() if v is not None})
    return rows


def curve_view(curve: dict | None) -> dict | None:
    if not curve:
        return None
    pts = curve["points"]
    view = {"x_percent": [p["percent"] for p in pts],
            "faithfulness_mean": [p["faithfulness_of_means"] for p in pts],
            "faithfulness_std": [p["faithfulness_std"] for p in pts],
            "circuit_hit10": [p.get("circuit_hit10") for p in pts],
            "chance_hit10": [p.get("chance_hit10") for p in pts],
            "cpr": curve["cpr"], "cmd": curve["cmd"]}
    if "random_faithfulness_of_means" in pts[0]:
        view["random_faithfulness_mean"] = [p["random_faithfulness_of_means"] for p in pts]
        view["random_circuit_hit10"] = [p.get("random_circuit_hit10") for p in pts]
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
               ", ".join(rep.get("relations", [])), "method": rep.get("attribution", {}).get("method"),
               "metric": rep.get("scoring", {}).get("metric"), "ablation": rep.get("scoring", {}).get("ablation"),
               "answer scoring": rep.get("scoring", {}).get("answer_scoring"), "weights": rep.get("weights"),
               "edges in graph": graph.n_edges, "edges in circuit": circuit.n_edges,
               "nodes in circuit": len(circuit.nodes())}
    if last:
        summary["faithfulness (ratio of means)"] = round(last.get("faithfulness_of_means", float("nan")), 4)
        for kind, label in (("same_size", "same size"), ("same_logit_edges", "same size and edges into the logits")):
            mean = random_mean(last, "faithfulness_of_means", kind)
            if mean is not None:
                summary[f"random circuit faithfulness ({label}, mean of draws)"] = round(mean, 4)
        for k in (1, 10):
            if last.get(f"chance_hit{k}") is not None:
                summary[f"Hit@{k}: full / circuit / random / chance"] = " / ".join(
                    "n/a" if v is None else f"{v:.2f}" for v in (last.get(f"full_hit{k}"), last.get(f"circuit_hit{k}"),
                                                              random_mean(last, f"circuit_hit{k}"),
                                                              last.get(f"chance_hit{k}")))
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
