"""The Python API behind ``kcircuits edit-circuits RUN``: what an edit run did to its facts' circuits.

Reads an edit run folder (``kcircuits edit``: ``config.json``, ``edits.json``, ``delta.safetensors``),
loads its model (checking the delta was made for these weights), and compares, with
:mod:`kcircuits.edit.circuits`, the circuit of each of the first ``facts`` edited facts before the edit
(true target, original model) and after it (new target, edited model), and the neighbour prompts'
circuit before and after. Writes ``edit_circuits.json``, every circuit and its scores, and
``report.html`` with both circuits of each fact side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import fmean

from kcircuits.edit.circuits import compare_fact, compare_neighbours, neighbour_probes, probe_pool
from kcircuits.edit.requests import EditRequest
from kcircuits.edit.settings import EditCircuitSettings
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.graph import Graph
from kcircuits.models import LoadedModel
from kcircuits.models.edits import delta_metadata, load_delta
from kcircuits.models.fingerprint import tensor_digest
from kcircuits.pipeline import model_name, open_run
from kcircuits.report import write_report
from kcircuits.report.circuit_pairs import circuit_pair
from kcircuits.settings import (
    AttributionSettings,
    CircuitSize,
    PromptSettings,
    RoleThresholds,
    RunSettings,
    ScoringSettings,
    hashed_dict,
    param_name,
    resolve_all,
    settings_doc,
)
from kcircuits.steps import json_digest
from kcircuits.studies.common import StudySettings

__all__ = ["CIRCUIT_SETTINGS", "EDIT_CIRCUITS_FILE", "edit_circuits", "read_edit_run"]

#: what ``edit_circuits`` writes: the comparison of every fact and of the neighbours
EDIT_CIRCUITS_FILE = "edit_circuits.json"
#: the settings ``edit_circuits`` takes (objects by parameter name, or their fields by name)
CIRCUIT_SETTINGS = (EditCircuitSettings, ScoringSettings, AttributionSettings, CircuitSize, RunSettings)


def read_edit_run(folder: str | Path) -> tuple[dict, list[EditRequest], Path]:
    """An edit run's ``config.json`` ``reproduce`` entry, its requests and the path of its delta; a folder
    that is not a finished edit run is one clear error."""
    folder = Path(folder)
    needed = ("config.json", "edits.json", "delta.safetensors")
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise KcircuitsError(f"{folder} is not a finished edit run (no {', '.join(missing)}); `kcircuits edit` "
                             "writes one and prints its folder")
    try:
        config = json.loads((folder / "config.json").read_text())["reproduce"]
        requests = [EditRequest(**r) for r in json.loads((folder / "edits.json").read_text())["requests"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise KcircuitsError(f"{folder}: config.json or edits.json is damaged ({exc}); run `kcircuits edit` "
                             "again") from None
    if config.get("command") != "edit":
        raise KcircuitsError(f"{folder} was written by `kcircuits {config.get('command')}`, not `kcircuits edit`")
    return config, requests, folder / "delta.safetensors"


def edit_circuits(edit_run: str | Path, model: str | LoadedModel | None = None, *, out: str | Path | None = None,
                  thresholds: RoleThresholds | None = None, progress: bool = True, **settings) -> dict:
    """What an edit did to the circuit of each edited fact, and whether it leaked to the neighbours.

    For each of the first ``facts`` requests of the edit run (those with a true target): the circuit
    of the true target on the original model and of the new target on the edited model, on the same
    prompt pairs (the edit prompt and its paraphrases, each corrupted with another subject of the same
    token length) and with the same discovery settings and size; nodes and edges gained and lost; the
    logit lens of both targets at every layer before and after; the heads that move the subject's
    attribute, with their attention and direct effects before and after. Then the neighbour prompts'
    circuit before and after, with Hit@10. See :mod:`kcircuits.edit.circuits` and docs/editing.md.

    Args:
        edit_run: an edit run folder (what ``kcircuits edit`` / :func:`kcircuits.edit.api.edit` wrote).
        model: the model the edit was made on (default: the one its ``config.json`` names); a
            :class:`~kcircuits.models.LoadedModel` is used as is. Its weights must be those the delta
            was computed for.
        out: the run folder (default ``runs/edit-circuits_<source>_<model>_<method>_<hash>``, the hash
            covering the settings, the delta's digest and the weights' fingerprint).
        thresholds: head-role thresholds (default :class:`~kcircuits.settings.RoleThresholds`); the heads
            that move the subject's attribute attend to it with at least ``subject_mass_min``.
        progress: show progress bars.
        **settings: ``edit_circuits=``, ``scoring=``, ``attribution=``, ``size=``, ``run=`` objects, or
            their fields by name (listed below).

    Returns:
        The contents of ``edit_circuits.json`` plus ``folder``: ``facts`` (one comparison each),
        ``neighbours`` (or None), ``edited_layers``, ``method``.

    Settings (each also accepted by field name):

    """
    config, requests, delta_path = read_edit_run(edit_run)
    given = {c: settings.pop(param_name(c), None) for c in CIRCUIT_SETTINGS}
    built = resolve_all(settings, given, CIRCUIT_SETTINGS, "edit-circuits")
    cs = built[EditCircuitSettings]
    st = StudySettings(built[ScoringSettings], built[AttributionSettings], built[CircuitSize], PromptSettings(),
                       built[RunSettings]).checked("edit-circuits")
    thresholds = thresholds or RoleThresholds()
    facts = [r for r in requests if r.target_true][:cs.facts]
    if not facts:
        raise KcircuitsError(f"none of the {len(requests)} requests of {edit_run} has a true target: a fact's circuit "
                             "before the edit needs the answer the model gave")
    model = model if model is not None else config["model"]
    deltas = load_delta(delta_path)
    base = delta_metadata(delta_path).get("base_fingerprint")
    delta_digest = json_digest({k: tensor_digest(v).hex() for k, v in sorted(deltas.items())}, length=64)
    edit_cfg = config.get("edit", {})
    layers = list(range(edit_cfg["layer"] - edit_cfg.get("n_layers", 1) + 1, edit_cfg["layer"] + 1)) \
        if edit_cfg.get("layer") is not None else []

    def check(lm: LoadedModel) -> None:
        if base is not None and lm.fingerprint != base:
            raise KcircuitsError(f"the edit in {edit_run} was made on weights {base}; this model's are "
                                 f"{lm.fingerprint}. "
                                 f"Pass the model the edit run used ({config['model']})")

    def reproduce(lm: LoadedModel) -> dict:
        return {"command": "edit-circuits", "edit_run": str(edit_run), "model": model_name(model),
                "weights": lm.fingerprint, "delta_sha256": delta_digest, "method": config.get("edit", {}).get("method"),
                "requests_sha256": json_digest([r.to_dict() for r in facts], length=64),
                "edit_circuits": hashed_dict(cs), "thresholds": hashed_dict(thresholds),
                **{param_name(type(o)): hashed_dict(o) for o in (st.scoring, st.attribution, st.size, st.run)}}

    method = str(edit_cfg.get("method", "edit"))
    run_folder, lm = open_run("edit-circuits", [Path(str(config.get("source", "edit"))).stem,
                                                Path(model_name(model)).name, method],
                              reproduce, out, model, st.run, check=check)
    with run_folder.removed_if_failed():
        engine = Engine(lm.weights, Graph.from_model(lm.weights, grouped=st.attribution.grouped))
        n_edges = st.size.edges_for(engine.graph.n_edges)
        subjects = sorted({r.subject for r in requests})
        pool = probe_pool(requests)
        results, drawings = [], []
        for i, req in enumerate(facts):
            with run_folder.timed(f"fact {i}"):
                res, circuits = compare_fact(run_folder, i, req, deltas, engine, lm, pool, st, n_pairs=cs.pairs,
                                             n_edges=n_edges, exclude=[s for s in subjects if s != req.subject],
                                             top_heads=cs.top_heads, thresholds=thresholds, progress=progress)
            results.append(res)
            drawings.append(circuits)
        neighbours = None
        probes = neighbour_probes(facts, cs.neighbours, subjects)
        if probes:
            with run_folder.timed("neighbours"):
                neighbours, n_circuits = compare_neighbours(run_folder, probes, deltas, engine, lm, pool, st,
                                                            n_edges=n_edges, exclude=subjects, progress=progress)
            drawings.append(n_circuits)
        result = {"method": method, "edited_layers": layers, "n_edges": n_edges, "facts": results,
                  "neighbours": neighbours}
        run_folder.write_json(EDIT_CIRCUITS_FILE, result)
        write_report(run_folder.file("report.html"), _report(result, drawings, model_name(model), run_folder.config))
    return {**result, "folder": str(run_folder.path)}


edit_circuits.__doc__ += settings_doc(*CIRCUIT_SETTINGS)


def _fmt_layer(v: float | None) -> str:
    return "never (on most prompts)" if v is None else f"{v:g}"


def _findings(res: dict) -> list[dict]:
    """One finding per fact (circuit change, where the new target appears) and one for the neighbours."""
    out = []
    layers = res["edited_layers"]
    where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}\u2013{layers[-1]}" if layers else "?"
    for f in res["facts"]:
        ch = f["change"]
        out.append({"text": (
            f"{f['prompt']!r}: {f['target_true']} \u2192 {f['target_new']} ({res['method']} at {where}). The new "
            f"target's circuit on the edited model shares {ch['node_jaccard']:.0%} of its nodes and "
            f"{ch['edge_jaccard']:.0%} of its edges with the true target's circuit on the original model "
            f"({len(ch['nodes_gained'])} nodes gained, {len(ch['nodes_lost'])} lost). In the logit lens the new "
            f"target settles at rank 1 from layer {_fmt_layer(f['new_target_settles_at']['after'])} after the edit "
            f"(before: {_fmt_layer(f['new_target_settles_at']['before'])}); the true target from layer "
            f"{_fmt_layer(f['true_target_settles_at']['before'])} before, "
            f"{_fmt_layer(f['true_target_settles_at']['after'])} after."), "n_prompts": f["n_pairs"]})
    nb = res.get("neighbours")
    if nb:
        b, a = nb["before"], nb["after"]
        out.append({"text": (
            f"Neighbour prompts (answers the edit must not change): full-model Hit@10 {b['full_hit10']:.2f} before, "
            f"{a['full_hit10']:.2f} after; their circuit alone {b['circuit_hit10']:.2f} \u2192 "
            f"{a['circuit_hit10']:.2f} (chance {a['chance_hit10']:.2f}); the two circuits share "
            f"{nb['change']['edge_jaccard']:.0%} of their edges."), "n_prompts": nb["n_pairs"]})
    return out


def _lens_chart(f: dict, layers: list[int]) -> dict:
    """Median rank of both targets by layer, before and after the edit (log scale)."""
    lens = f["lens"]
    x = list(range(len(lens["new"]["before"]["median_rank"])))
    where = f"edited layer(s): {', '.join(map(str, layers))}; " if layers else ""
    return {"title": f"{f['prompt']}: rank of each target by layer", "x": x, "log_y": True,
            "x_label": "residual stream after layer (0 = embeddings)", "y_label": "median rank",
            "series": {f"new target ({f['target_new']}), after": lens["new"]["after"]["median_rank"],
                       f"new target ({f['target_new']}), before": lens["new"]["before"]["median_rank"],
                       f"true target ({f['target_true']}), before": lens["true"]["before"]["median_rank"],
                       f"true target ({f['target_true']}), after": lens["true"]["after"]["median_rank"]},
            "caption": f"{where}logit lens of the residual stream over the fact's {f['n_pairs']} prompts.",
            "n_prompts": f["n_pairs"]}


def _change_rows(res: dict) -> list[dict]:
    rows = []
    for f in res["facts"]:
        ch = f["change"]
        rows.append({"fact": f["prompt"], "true \u2192 new": f"{f['target_true']} \u2192 {f['target_new']}",
                     "edges": f["circuit_before"]["n_edges"], "node Jaccard": ch["node_jaccard"],
                     "edge Jaccard": ch["edge_jaccard"], "faithfulness before": f["circuit_before"]["faithfulness"],
                     "faithfulness after": f["circuit_after"]["faithfulness"],
                     "nodes gained": ", ".join(ch["nodes_gained"]) or "-",
                     "nodes lost": ", ".join(ch["nodes_lost"]) or "-"})
    return rows


def _report(res: dict, drawings: list[dict], name: str, config: dict) -> dict:
    """The report dict: findings, a change table, lens charts, mover tables and the circuit pairs (static
    drawings and interactive viewers; ``drawings``: ``{"before": Circuit, "after": Circuit}`` per fact, then
    the neighbours')."""
    facts = res["facts"]
    pairs = [circuit_pair(f"{f['prompt']} {f['target_true']} \u2192 {f['target_new']}", d["before"], d["after"],
                          (f"before: {f['target_true']} on the original model",
                           f"after: {f['target_new']} on the edited model"), n_prompts=f["n_pairs"])
             for f, d in zip(facts, drawings, strict=False)]
    if res.get("neighbours"):
        pairs.append(circuit_pair("neighbour prompts", drawings[-1]["before"], drawings[-1]["after"],
                                  ("before: original model", "after: edited model"),
                                  n_prompts=res["neighbours"]["n_pairs"]))
    tables = [{"title": "What changed in each fact's circuit", "rows": _change_rows(res)}]
    tables += [{"title": f"Heads that move the subject's attribute: {f['prompt']}", "rows": f["movers"],
                "caption": "Attention to the subject from the answer position and direct effect on each target's "
                           "logit, before (original model) and after (edited model).", "n_prompts": f["n_pairs"]}
               for f in facts]
    if res.get("neighbours"):
        nb = res["neighbours"]
        tables.append({"title": "Neighbour prompts before and after the edit", "n_prompts": nb["n_pairs"], "rows": [
            {"model": side, **{k: nb[side][k] for k in ("full_hit10", "circuit_hit10", "chance_hit10",
                                                         "faithfulness_of_means")}} for side in ("before", "after")]})
    return {"title": f"kcircuits edit-circuits: {res['method']} on {name}",
            "summary": {"model": name, "method": res["method"],
                        "edited layers": ", ".join(map(str, res["edited_layers"])),
                        "facts compared": len(facts), "edges selected per circuit (before pruning)": res["n_edges"],
                        "mean edge Jaccard (before vs after)": fmean(f["change"]["edge_jaccard"] for f in facts)},
            "narrative": _findings(res), "charts": [_lens_chart(f, res["edited_layers"]) for f in facts],
            "tables": tables, "circuit_pairs": pairs, "config": config}
