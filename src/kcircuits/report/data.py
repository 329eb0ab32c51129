"""Turn a run's results into the plain dict that :mod:`kcircuits.report` renders.

Kept apart from the renderer so the report code knows nothing about tensors or graphs, and so
the CLI's commands share one way of summarising a run.
"""

from __future__ import annotations

import math
import re

import torch

from kcircuits.graph import Circuit, Graph
from kcircuits.report.base import token_label
from kcircuits.report.viewer import viewer_payload

#: How many nodes the report's opening "Key components" table lists.
KEY_COMPONENTS = 12
_HEAD = re.compile(r"^a(\d+)\.h\d+$")
_MLP = re.compile(r"^m(\d+)$")


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


def node_kind(name: str) -> tuple[str, int | None]:
    """(kind, layer) of a source node name: ("head", 3) for ``a3.h2``, ("MLP", 5) for ``m5``,
    ("input", None) for the embeddings."""
    if m := _HEAD.match(name):
        return "head", int(m[1])
    if m := _MLP.match(name):
        return "MLP", int(m[1])
    return ("input", None) if name == "input" else ("other", None)


def node_weights(circuit: Circuit) -> dict[str, tuple[float, int]]:
    """Per source node of the circuit: (sum of |score| over its circuit edges in and out, their count).

    An edge counts for its source and for every node that reads its destination (a head for its
    q/k/v inputs; with grouped-query attention every head of the k/v group), as the viewer's side
    panel lists it under "edges in". Edges into the logits count for their source only. NaN scores
    (or a circuit without scores) add to the count but not to the sum.
    """
    g = circuit.graph
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    for s, d in torch.nonzero(circuit.edges).tolist():
        score = float(circuit.scores[s, d]) if circuit.scores is not None else math.nan
        weight = abs(score) if math.isfinite(score) else 0.0
        owners = [g.src_names[s]] + [g.src_names[f] for f in g.dst_feeds(d)]
        for name in owners:
            total[name] = total.get(name, 0.0) + weight
            count[name] = count.get(name, 0) + 1
    return {name: (total[name], count[name]) for name in total}


def key_components(circuit: Circuit, node_details: dict | None = None, top: int = KEY_COMPONENTS) -> dict | None:
    """The report's opening table: the ``top`` nodes of the circuit by total |edge score|, each with
    its kind and layer, its head role and what the logit lens reads at its output on the example
    prompt (top token with its probability, and the answer's rank), all taken from ``node_details``.

    A 600-edge circuit drawn in full is a hairball; this table says which components carry it
    before the reader meets the drawing. None for an empty circuit.
    """
    weights = node_weights(circuit)
    if not weights:
        return None
    nodes = (node_details or {}).get("nodes") or {}
    ranked = sorted(weights.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))
    rows = []
    for name, (total, n_edges) in ranked[:top]:
        kind, layer = node_kind(name)
        det = nodes.get(name) or {}
        row: dict = {"node": name, "kind": kind, "layer": layer, "edges": n_edges, "total |score|": total}
        if nodes:  # the role column sits next to the score whatever kind of node comes first
            row["role"] = (det.get("role") or {}).get("role") if kind == "head" else None
        lens = det.get("lens") or {}
        lens_top = lens.get("top") or []
        if lens_top:
            first = lens_top[0]
            token, prob = (first[0], first[1]) if isinstance(first, (list, tuple)) else (first, None)
            row["lens top token"] = token_label(token)
            row["lens prob"] = prob
        if lens.get("answer_rank") is not None:
            row["answer rank (lens)"] = lens["answer_rank"]
        rows.append(row)
    example = (node_details or {}).get("example") or {}
    return {"rows": rows, "n_nodes": len(weights), "n_edges": int(circuit.n_edges),
            "example_prompt": example.get("prompt"),
            "answer": token_label(example["answer"]) if example.get("answer") is not None else None,
            "lens_of": example.get("lens_of")}


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
    key = key_components(circuit, node_details)
    if key:
        report["key_components"] = key
    if scores is not None or circuit.scores is not None or node_details:
        report["viewer"] = viewer_payload(graph, circuit, scores, node_details)
    return report
