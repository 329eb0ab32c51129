"""The report dicts of ``kcircuits weight-circuit`` and ``kcircuits edit-inside`` (rendered by
:func:`kcircuits.report.write_report`): findings, charts, tables and matrices built from the JSON results only,
so a report can be rebuilt from a run folder without the model."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["edit_inside_report", "weight_circuit_report"]

#: the evaluated models of a weight circuit, in the order the charts and tables show them
_SIDES = (("full", "full model"), ("circuit", "circuit alone"), ("complement", "complement alone"),
          ("random", "random mask, same size"))
#: the composition's module types, in model order
_TYPE_ORDER = ("embed", "q", "k", "v", "o", "attn_bias", "mlp_in", "mlp_gate", "mlp_out", "norm", "unembed")


def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _d(v: float | None) -> str:
    return "none of the densities" if v is None else f"{100 * v:g}%"


def _findings(result: dict) -> list[dict]:
    out = []
    share = result["keep_share"]
    for relation, rel in result["relations"].items():
        sweep = rel["sweep"]
        full10 = sweep[0]["evaluation"]["full"]["hit@10"] if sweep else float("nan")
        out.append({"text": (
            f"{relation}: the full model's held-out Hit@10 is {full10:.2f}. The circuit alone keeps at least "
            f"{share:.0%} of it from {_d(rel['circuit_keeps_from'])} of the weights; the complement alone falls "
            f"below {share:.0%} of it from {_d(rel['complement_loses_from'])}; both hold from "
            f"{_d(rel['both_from'])}."), "n_prompts": rel["n_test"]})
        if sweep:  # the smallest density; the tables have every density
            row = sweep[0]
            ml = row["composition"]["module_level"]["parameter"]
            rnd = ml.get("random") or {}
            out.append({"text": (
                f"{relation}, density {row['density']:g}: norms are {_pct(ml['norm_fraction'])} of the named "
                f"parameters the circuit keeps at least {row['composition']['settings']['module_threshold']:g} of "
                f"(random masks of the same density: {_pct(rnd.get('mean'))}); by weight, norms are "
                f"{_pct(_type_share(row, 'norm'))} of the circuit."), "n_prompts": rel["n_train"]})
    return out


def _type_share(row: dict, mtype: str) -> float | None:
    return next((r["share_of_circuit"] for r in row["composition"]["by_type"] if r["type"] == mtype), None)


def _sweep_charts(relation: str, rel: dict) -> list[dict]:
    xs = [r["density"] for r in rel["sweep"]]
    charts = []
    for metric, label, log_y in (("hit@10", "Hit@10", False), ("answer_prob", "answer probability", False),
                                 ("kl", "KL from the full model", True)):
        series = {name: [r["evaluation"][side][metric] for r in rel["sweep"]] for side, name in _SIDES
                  if not (metric == "kl" and side == "full")}
        chart = {"title": f"{relation}: {label} on held-out prompts vs circuit density", "x": xs, "series": series,
                 "x_label": "density (share of the masked weights kept)", "y_label": label, "log_x": True,
                 "log_y": log_y, "caption": f"{rel['n_test']} held-out prompts (subjects not used in training); "
                                            f"masks trained on {rel['n_train']}.", "n_prompts": rel["n_test"]}
        if metric == "hit@10" and rel["sweep"]:
            chart["hlines"] = [{"y": rel["sweep"][0]["evaluation"]["chance"]["hit@10"], "label": "chance"}]
        charts.append(chart)
    return charts


def _eval_rows(relation: str, rel: dict) -> list[dict]:
    rows = []
    for r in rel["sweep"]:
        ev = r["evaluation"]
        for side, name in _SIDES:
            rows.append({"density": r["density"], "model": name, "Hit@1": ev[side]["hit@1"],
                         "Hit@10": ev[side]["hit@10"], "chance Hit@10": ev["chance"]["hit@10"],
                         "answer prob": ev[side]["answer_prob"], "KL": ev[side]["kl"]})
    return rows


def _type_rows(rel: dict) -> list[dict]:
    rows = []
    for r in rel["sweep"]:
        by_type = {t["type"]: t for t in r["composition"]["by_type"]}
        for mtype in _TYPE_ORDER:
            if mtype in by_type:
                t = by_type[mtype]
                rows.append({"density": r["density"], "type": mtype, "weights": t["n"], "kept": t["kept"],
                             "share kept": t["share_kept"], "share of all weights": t["share_of_weights"],
                             "share of the circuit": t["share_of_circuit"]})
    return rows


def _module_rows(rel: dict) -> list[dict]:
    rows = []
    for r in rel["sweep"]:
        thr = r["composition"]["settings"]["module_threshold"]
        for definition, ml in r["composition"]["module_level"].items():
            rnd = ml.get("random") or {}
            rows.append({"density": r["density"], "module =": definition, "threshold": thr,
                         "modules": ml["n_modules"], "in circuit": ml["n_in"], "norms in": ml["n_norm_in"],
                         "norm fraction": ml["norm_fraction"], "norms' share of modules": ml["norm_share_of_modules"],
                         "random masks: norm fraction": rnd.get("mean")})
    return rows


def _layer_matrix(relation: str, rel: dict) -> dict | None:
    """Share kept by (layer, type) at the smallest density, as a heat table."""
    if not rel["sweep"]:
        return None
    row = rel["sweep"][0]
    mods = [m for m in row["composition"]["modules"] if m.get("layer") is not None]
    layers = sorted({m["layer"] for m in mods})
    types = [t for t in _TYPE_ORDER if any(m["type"] == t for m in mods)]
    cell: dict = {}
    for m in mods:
        n, k = cell.get((m["layer"], m["type"]), (0, 0))
        cell[(m["layer"], m["type"])] = (n + m["n"], k + m["kept"])
    values = [[(cell[(lay, t)][1] / cell[(lay, t)][0]) if (lay, t) in cell else None for t in types] for lay in layers]
    hi = max((v for line in values for v in line if v is not None), default=1.0) or 1.0
    return {"title": f"{relation}, density {row['density']:g}: share of each layer's module weights kept",
            "rows": [f"L{lay}" for lay in layers], "cols": types, "values": values, "lo": 0.0, "hi": hi}


def _edge_rows(relation: str, rel: dict) -> list[dict]:
    rows = []
    for r in rel["sweep"]:
        eo = r.get("edge_overlap")
        if eo:
            rows.append({"density": r["density"], **{k: v for k, v in eo.items() if not isinstance(v, (list, dict))}})
    return rows


def weight_circuit_report(result: dict, name: str, config: dict) -> dict:
    """The report dict of a ``weight-circuit`` run (``result``: the contents of ``weight_circuit.json``).

    Args:
        result: what :func:`kcircuits.weight_circuits.api.weight_circuit` wrote.
        name: the model's name.
        config: the run's ``config.json`` contents.
    """
    charts, tables, matrices = [], [], []
    for relation, rel in result["relations"].items():
        charts += _sweep_charts(relation, rel)
        tables.append({"title": f"{relation}: circuit, complement and a random mask of the same size on held-out "
                                "prompts", "rows": _eval_rows(relation, rel), "n_prompts": rel["n_test"]})
        tables.append({"title": f"{relation}: composition by module type", "rows": _type_rows(rel),
                       "caption": "share kept: of that type's weights; share of the circuit: of the kept weights."})
        tables.append({"title": f"{relation}: modules in the circuit", "rows": _module_rows(rel),
                       "caption": "A module is in the circuit when the circuit keeps at least the threshold share of "
                                  "its weights. 'component': a (layer, type) of the computation, each norm one "
                                  "module; 'parameter': one named parameter tensor, weight and bias separate. The "
                                  "random column is the same fraction for random masks of the circuit's density."})
        edge = _edge_rows(relation, rel)
        if edge:
            tables.append({"title": f"{relation}: weight circuit vs edge circuit", "rows": edge,
                           "caption": "Inside: the share of the weight circuit in the edge circuit's heads' and MLPs' "
                                      "parameter blocks; chance: those blocks' share of all masked weights."})
        matrix = _layer_matrix(relation, rel)
        if matrix:
            matrices.append(matrix)
    for density, ov in (result.get("overlap") or {}).items():
        matrices.append({"title": f"Jaccard of the relations' weight circuits, density {density}",
                         "rows": ov["names"], "cols": ov["names"], "values": ov["overall"]["jaccard"], "lo": 0.0,
                         "hi": 1.0})
        tables.append({"title": f"Overlap at density {density}: Jaccard and its chance level by module type",
                       "rows": _overlap_rows(ov)})
    return {"title": f"kcircuits weight-circuit on {name}",
            "summary": {"model": name, "relations": ", ".join(result["relations"]),
                        "densities": ", ".join(f"{d:g}" for d in result["densities"]),
                        "ablation": result["ablation"]},
            "narrative": _findings(result), "charts": charts, "tables": tables, "matrices": matrices,
            "config": config}


def _overlap_rows(ov: dict) -> list[dict]:
    names = ov["names"]
    rows = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            row = {"pair": f"{names[i]} / {names[j]}", "Jaccard": ov["overall"]["jaccard"][i][j],
                   "chance": ov["overall"]["chance"][i][j]}
            for mtype, m in (ov.get("by_type") or {}).items():
                row[f"{mtype}"] = m["jaccard"][i][j]
            rows.append(row)
    return rows


def _curve_charts(res: dict) -> list[dict]:
    from kcircuits.edit.masked_finetune import CURVE_METRICS

    charts = []
    variants = res["variants"]
    for metric in ("loss", *CURVE_METRICS):
        if metric.endswith("_margin"):
            continue
        series, xs = {}, None
        for name, v in variants.items():
            xs = [p["step"] for p in v["curve"]]
            series[f"{name} ({v['n_trainable']:,} weights)"] = [p[metric] for p in v["curve"]]
        charts.append({"title": f"{metric.replace('_', ' ')} during fine-tuning", "x": xs or [], "series": series,
                       "x_label": "fine-tuning step", "y_label": metric.replace("_", " "),
                       "log_y": metric == "loss", "n_prompts": res["n_requests"]})
    return charts


def _fact_cells(scores: dict) -> dict:
    """Mean Hit@1 and probability of the old target, for the (edited) model and the circuit alone."""
    return {f"{who}: {k}": scores[who]["summary"][k]["mean"]
            for who in ("model", "circuit") for k in ("hit_at_1", "prob")}


def _old_fact_rows(res: dict) -> list[dict]:
    rows = [{"after editing": "(before any edit)", **_fact_cells(res["old_fact_before"])}] \
        if res.get("old_fact_before") else []
    rows += [{"after editing": name, **_fact_cells(v["old_fact_after"])}
             for name, v in res["variants"].items() if v.get("old_fact_after")]
    return rows


def edit_inside_report(res: dict, name: str, config: dict) -> dict:
    """The report dict of an ``edit-inside`` run (``res``: the contents of ``edit_inside.json``).

    Args:
        res: what :func:`kcircuits.weight_circuits.api.edit_inside` wrote.
        name: the model's name.
        config: the run's ``config.json`` contents.
    """
    final = []
    for vname, v in res["variants"].items():
        last = v["curve"][-1]
        final.append({"edited weights": vname, "trainable": v["n_trainable"], "steps": last["step"],
                      **{k: last[k] for k in last if k != "step"}})
    findings = [{"text": (
        f"{res['relation']} ({res['n_requests']} requests, {res['settings']['steps']} steps at lr "
        f"{res['settings']['lr']:g}): after fine-tuning, efficacy " + ", ".join(
            f"{r['edited weights']} {r['efficacy_success']:.2f}" for r in final) + "; generalisation " + ", ".join(
            f"{r['edited weights']} {r['generalisation_success']:.2f}" for r in final) + "; specificity " + ", ".join(
            f"{r['edited weights']} {r['specificity_success']:.2f}" for r in final) + "."),
        "n_prompts": res["n_requests"]}]
    tables: list[dict[str, Any]] = [{"title": "After the last step", "rows": final, "n_prompts": res["n_requests"]}]
    old = _old_fact_rows(res)
    if old:
        tables.append({"title": "Is the old fact still held? (true target on the edit prompts)", "rows": old,
                       "caption": "model: the edited model; circuit: the weight circuit alone, run on the edited "
                                  f"model ({res['ablation']} ablation of every weight outside it).",
                       "n_prompts": res["n_requests"]})
    return {"title": f"kcircuits edit-inside: {res['relation']} on {name}",
            "summary": {"model": name, "relation": res["relation"], "circuit density": res["density"],
                        "requests": res["n_requests"], "variants": ", ".join(res["variants"])},
            "narrative": findings, "charts": _curve_charts(res), "tables": tables, "config": config}
