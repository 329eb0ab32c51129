"""``kcircuits weight-circuit`` and ``kcircuits edit-inside`` as Python functions (the CLI wraps these).

:func:`weight_circuit` trains one weight mask per relation and density on the relation's discovery half
(:func:`kcircuits.discover.weight_masks.train_weight_mask`), evaluates each on the held-out half against the
full model, its complement and a random mask of the same size
(:func:`~kcircuits.discover.weight_masks.evaluate_weight_circuit`), and reports what the circuits are made
of (:func:`kcircuits.analyze.weight_composition.composition`), how the relations' circuits overlap, and, for
discover runs given with ``edge_circuits``, how a weight circuit overlaps the edge circuit of its relation.

:func:`edit_inside` takes one circuit of such a run and fine-tunes counterfactual facts of the relation into
the circuit's weights only, the complement's only, and all of them, with the same optimiser, learning rate
and steps (:func:`kcircuits.edit.masked_finetune.inside_outside`), and, with an edge circuit, into its heads'
and MLPs' weights vs the rest.

Both write a run folder (``config.json``, the results as JSON, the masks as safetensors, ``report.html``) and
resume: a finished mask is read back, an unfinished one continues from its checkpoint, each fine-tuning is
cached by its inputs.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from kcircuits.errors import KcircuitsError
from kcircuits.io import read_json
from kcircuits.models import LoadedModel
from kcircuits.pipeline import model_batches, model_name, open_run, prepare_prompts
from kcircuits.report import write_report
from kcircuits.settings import (
    PromptSettings,
    RunSettings,
    hashed_dict,
    param_name,
    resolve_all,
    settings_doc,
)
from kcircuits.edit.settings import MaskedFinetuneSettings
from kcircuits.weight_circuits.report import edit_inside_report, weight_circuit_report
from kcircuits.weight_circuits.settings import (
    CompositionSettings,
    EditInsideSettings,
    WeightCircuitSettings,
    WeightMaskSettings,
)

__all__ = ["EDIT_INSIDE_FILE", "EDIT_INSIDE_SETTINGS", "RANDOM_VARIANT", "WEIGHT_CIRCUIT_FILE",
           "WEIGHT_CIRCUIT_SETTINGS", "edit_inside", "mask_file", "read_weight_circuit_run", "weight_circuit"]

#: what :func:`weight_circuit` writes: every relation's sweep, the overlaps
WEIGHT_CIRCUIT_FILE = "weight_circuit.json"
#: what :func:`edit_inside` writes: the curves and the old-fact checks
EDIT_INSIDE_FILE = "edit_inside.json"
#: the settings :func:`weight_circuit` takes (objects by parameter name, or their fields by name)
WEIGHT_CIRCUIT_SETTINGS = (WeightCircuitSettings, WeightMaskSettings, CompositionSettings, PromptSettings, RunSettings)
#: the settings :func:`edit_inside` takes
EDIT_INSIDE_SETTINGS = (EditInsideSettings, MaskedFinetuneSettings, RunSettings)
#: edit-inside's baseline: a seeded random set of exactly the circuit's size over the same parameters (a
#: circuit that "resists" new facts must resist more than this, not only more than its larger complement)
RANDOM_VARIANT = "random, circuit's size"
#: the held-out share when the prompt settings give no split: a weight circuit is always scored on prompts
#: of subjects it was not trained on
DEFAULT_SPLIT = 0.5


def _slug(relation: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(relation).stem)


def mask_file(relation: str, density: float) -> str:
    """The run folder's file of one relation's mask at one density (``mask_country_capital_d0.1.safetensors``).

    Args:
        relation: the relation's name or file.
        density: the mask's density.
    """
    return f"mask_{_slug(relation)}_d{density:g}.safetensors"


def _edge_runs(edge_circuits: Sequence[str | Path]) -> dict[str, list[str]]:
    """``{relation: nodes}`` of each discover run (or circuit.json) given, by the relation it names."""
    from kcircuits.api import load_circuit

    out: dict[str, list[str]] = {}
    for item in edge_circuits:
        path = Path(item)
        path = path / "circuit.json" if path.is_dir() else path
        circuit = load_circuit(path)
        relation = read_json(path).get("relation")
        if not relation:
            raise KcircuitsError(f"{path} does not say which relation its circuit is of; pass a discover run folder")
        if _slug(relation) in out:
            raise KcircuitsError(f"two edge circuits of {relation!r} were given ({path} and an earlier one): give one "
                                 "per relation")
        out[_slug(relation)] = circuit.nodes()
    return out


def _train_or_read(run_folder, lm: LoadedModel, relation: str, density: float, batches: list, wm: WeightMaskSettings,
                   progress: bool, init=None):
    """The mask of one relation and density: read back when the run folder has it, else trained (from
    ``init``'s logits when given; resuming from its checkpoint folder, removed once the mask is written)."""
    from kcircuits.discover.weight_masks import load_weight_mask, save_weight_mask, train_weight_mask

    name = mask_file(relation, density)
    if run_folder.has(name):
        return load_weight_mask(run_folder.file(name))
    ckpt = run_folder.file(f"checkpoint_{_slug(relation)}_d{density:g}")
    result = train_weight_mask(lm, batches, replace(wm, density=density), checkpoint_dir=ckpt, init=init,
                               progress=progress)
    save_weight_mask(run_folder.file(name), result)
    shutil.rmtree(ckpt, ignore_errors=True)
    return result


def _first_density(rows: list[dict], key: str) -> float | None:
    return next((r["density"] for r in rows if r[key]), None)


def weight_circuit(relations: str | Sequence[str], model: str | LoadedModel = "smollm2-135m", *,
                   out: str | Path | None = None, edge_circuits: Sequence[str | Path] = (), progress: bool = True,
                   **settings) -> dict:
    """Weight circuits of each relation at each density: trained, evaluated on held-out prompts, taken apart.

    For each relation: the prompts are split by subject (``split``, default 0.5 when the prompt settings give
    none); for each of ``densities`` a weight mask is trained on the discovery half and evaluated on the
    held-out half (full model, circuit alone, complement alone, a random mask of the same size; Hit@1,
    Hit@10, answer probability, KL), and its composition by module type, layer and module is computed.
    With several relations, the overlap (Jaccard) of their circuits at each density; with ``edge_circuits``,
    the overlap of each relation's weight circuit with its edge circuit. See docs/weight-circuits.md.

    Args:
        relations: one or more bundled relation names (or .json/.csv files).
        model: ``"smollm2-135m"`` (bundled), a local HF folder, a hub id, or a loaded model.
        out: the run folder (default ``runs/weight-circuit_<relations>_<model>_<hash>``).
        edge_circuits: discover run folders (or ``circuit.json`` files) of the same relations, matched by the
            relation their circuit names.
        progress: show progress bars.
        **settings: ``weight_circuit=``, ``mask=``, ``composition=``, ``prompts=``, ``run=`` objects, or their
            fields by name (listed below). The masks' ``seed`` and ``batch_size`` are the run settings'.

    Returns:
        The contents of ``weight_circuit.json`` plus ``folder``.

    Settings (each also accepted by field name):

    """
    from kcircuits.analyze.weight_composition import composition, edge_weight_overlap, overlap_matrix
    from kcircuits.discover.weight_masks import evaluate_weight_circuit
    from kcircuits.models.layout import parameter_layout

    relations = [relations] if isinstance(relations, str) else list(relations)
    if not relations:
        raise KcircuitsError("give at least one relation (see `kcircuits datasets`)")
    if len({_slug(r) for r in relations}) < len(relations):
        raise KcircuitsError(f"relations {relations} repeat a name: give each relation once")
    given = {c: settings.pop(param_name(c), None) for c in WEIGHT_CIRCUIT_SETTINGS}
    built = resolve_all(settings, given, WEIGHT_CIRCUIT_SETTINGS, "weight-circuit")
    ws, cs, rs = built[WeightCircuitSettings], built[CompositionSettings], built[RunSettings]
    ps = built[PromptSettings]
    ps = ps if ps.split is not None else replace(ps, split=DEFAULT_SPLIT)
    wm = replace(built[WeightMaskSettings], seed=rs.seed, batch_size=rs.batch_size)
    edges = _edge_runs(edge_circuits)
    unknown = sorted(set(edges) - {_slug(r) for r in relations})
    if unknown:
        raise KcircuitsError(f"edge circuit(s) of {', '.join(unknown)}: not among the relations {relations}")

    def reproduce(lm: LoadedModel) -> dict:
        return {"command": "weight-circuit", "relations": relations, "model": model_name(model),
                "weights": lm.fingerprint, "edge_circuits": [str(e) for e in edge_circuits],
                **{param_name(type(o)): hashed_dict(o) for o in (ws, wm, cs, ps, rs)}}

    run_folder, lm = open_run("weight-circuit", ["+".join(_slug(r) for r in relations), Path(model_name(model)).name],
                              reproduce, out, model, rs)
    with run_folder.removed_if_failed():
        layout = parameter_layout(lm.hf_model)
        engine = None
        if ps.known_only:
            from kcircuits.engine import Engine
            from kcircuits.graph import Graph

            engine = Engine(lm.weights, Graph.from_model(lm.weights))
        result: dict = {"relations": {}, "densities": list(ws.densities), "ablation": wm.ablation,
                        "schedule": ws.schedule, "steps": wm.steps, "keep_share": ws.keep_share}
        masks: dict[float, dict[str, dict]] = {d: {} for d in ws.densities}
        for relation in relations:
            split = prepare_prompts(lm, engine, relation, settings=ps, seed=rs.seed, batch_size=rs.batch_size)
            train = model_batches(lm, split["discover"].pairs, rs.batch_size, "first_token")
            test = model_batches(lm, split["test"].pairs, rs.batch_size, "first_token")
            rows, previous = [], None
            for density in sorted(ws.densities, reverse=True):  # nested: each from the next larger one
                with run_folder.timed(f"{_slug(relation)} d={density:g}"):
                    trained = _train_or_read(run_folder, lm, relation, density, train, wm, progress,
                                             init=previous if ws.schedule == "nested" else None)
                    previous = trained
                    if trained.fingerprint != lm.fingerprint:
                        raise KcircuitsError(f"{mask_file(relation, density)} in {run_folder.path} was trained on "
                                             "other weights; use a new --out folder")
                    ev = evaluate_weight_circuit(lm, test, trained.mask, wm.ablation, seed=rs.seed)
                    comp = composition(layout, trained.mask, cs.module_threshold, cs.random_draws, cs.seed)
                masks[density][relation] = trained.mask
                full10 = ev["full"]["hit@10"]
                row = {"density": density, "evaluation": ev, "composition": comp,
                       "expected_density": trained.expected_density, "relaxed_density": trained.relaxed_density,
                       "final_loss": trained.history[-1]["loss"] if trained.history else None,
                       "steps": len(trained.history),
                       "circuit_keeps": ev["circuit"]["hit@10"] >= ws.keep_share * full10,
                       "complement_loses": ev["complement"]["hit@10"] < ws.keep_share * full10}
                if _slug(relation) in edges:
                    row["edge_overlap"] = edge_weight_overlap(layout, trained.mask, edges[_slug(relation)])
                rows.append(row)
            rows.sort(key=lambda r: r["density"])
            result["relations"][relation] = {
                "n_train": len(split["discover"].pairs), "n_test": len(split["test"].pairs),
                "prompts_skipped": {k: v.skipped for k, v in split.items()}, "sweep": rows,
                "circuit_keeps_from": _first_density(rows, "circuit_keeps"),
                "complement_loses_from": _first_density(rows, "complement_loses"),
                "both_from": next((r["density"] for r in rows if r["circuit_keeps"] and r["complement_loses"]), None)}
        if len(relations) > 1:
            result["overlap"] = {f"{d:g}": overlap_matrix(layout, masks[d]) for d in ws.densities}
        run_folder.write_json(WEIGHT_CIRCUIT_FILE, result)
        report = weight_circuit_report(result, model_name(model), run_folder.config)
        write_report(run_folder.file("report.html"), report)
    return {**result, "folder": str(run_folder.path)}


weight_circuit.__doc__ += settings_doc(*WEIGHT_CIRCUIT_SETTINGS)


def read_weight_circuit_run(folder: str | Path) -> tuple[dict, dict]:
    """A finished weight-circuit run's ``config.json`` ``reproduce`` entry and ``weight_circuit.json``; a folder
    that is not one is one clear error.

    Args:
        folder: the run folder ``kcircuits weight-circuit`` wrote.
    """
    folder = Path(folder)
    missing = [n for n in ("config.json", WEIGHT_CIRCUIT_FILE) if not (folder / n).is_file()]
    if missing:
        raise KcircuitsError(f"{folder} is not a finished weight-circuit run (no {', '.join(missing)}); "
                             "`kcircuits weight-circuit RELATION` writes one and prints its folder")
    try:
        config = read_json(folder / "config.json")["reproduce"]
        result = read_json(folder / WEIGHT_CIRCUIT_FILE)
    except (ValueError, KeyError, TypeError) as exc:
        raise KcircuitsError(f"{folder}: config.json or {WEIGHT_CIRCUIT_FILE} is damaged ({exc}); run "
                             "`kcircuits weight-circuit` again") from None
    if config.get("command") != "weight-circuit":
        raise KcircuitsError(f"{folder} was written by `kcircuits {config.get('command')}`, not "
                             "`kcircuits weight-circuit`")
    return config, result


def _chosen_density(result: dict, relation: str, asked: float | None) -> float:
    """The density of the circuit to edit around: ``asked`` (it must be in the run), else the smallest that
    keeps the relation, else the largest."""
    sweep = result["relations"][relation]["sweep"]
    densities = [r["density"] for r in sweep]
    if asked is not None:
        match = [d for d in densities if abs(d - asked) < 1e-12]
        if not match:
            raise KcircuitsError(f"the weight-circuit run has no circuit of density {asked:g} for {relation} "
                                 f"(it has {', '.join(f'{d:g}' for d in densities)})")
        return match[0]
    kept = result["relations"][relation].get("circuit_keeps_from")
    return kept if kept is not None else max(densities)


def edit_inside(relation: str, circuit_run: str | Path, model: str | LoadedModel | None = None, *,
                out: str | Path | None = None, edge_circuit: str | Path | None = None, progress: bool = True,
                **settings) -> dict:
    """Write counterfactual facts of ``relation`` into a weight circuit only, its complement only, all of
    their weights, or a random set of the circuit's size (the same FT-M objective, optimiser, learning rate
    and steps), recording efficacy,
    generalisation and specificity after every step, and whether the circuit alone still holds the old fact
    after each edit. With ``edge_circuit``: the same for the edge circuit's heads and MLPs vs the rest.

    Args:
        relation: the relation (it must be one of the weight-circuit run's); the requests' new targets are
            other objects of it (:func:`kcircuits.edit.requests.load_requests`).
        circuit_run: a ``kcircuits weight-circuit`` run folder.
        model: the model (default: the run's); its weights must be those the circuit was trained on.
        out: the run folder (default ``runs/edit-inside_<relation>_<model>_<hash>``).
        edge_circuit: a discover run folder (or ``circuit.json``) of an edge circuit of the same model.
        progress: show progress bars.
        **settings: ``edit_inside=``, ``finetune=``, ``run=`` objects, or their fields by name (below). The
            fine-tuning's ``seed`` and ``batch_size`` are the run settings'.

    Returns:
        The contents of ``edit_inside.json`` plus ``folder``.

    Settings (each also accepted by field name):

    """
    import torch

    from kcircuits.api import load_circuit
    from kcircuits.discover.weight_masks import load_weight_mask, random_weight_mask
    from kcircuits.edit.masked_finetune import edge_component_masks, inside_outside
    from kcircuits.edit.requests import load_requests
    from kcircuits.models.layout import parameter_layout
    from kcircuits.models.masking import complement
    from kcircuits.steps import StepCache

    given = {c: settings.pop(param_name(c), None) for c in EDIT_INSIDE_SETTINGS}
    built = resolve_all(settings, given, EDIT_INSIDE_SETTINGS, "edit-inside")
    es, rs = built[EditInsideSettings], built[RunSettings]
    ft = replace(built[MaskedFinetuneSettings], seed=rs.seed, batch_size=rs.batch_size)
    config, wc = read_weight_circuit_run(circuit_run)
    names = {_slug(r): r for r in wc["relations"]}
    if _slug(relation) not in names:
        raise KcircuitsError(f"the weight-circuit run {circuit_run} has no circuit of {relation!r} (it has "
                             f"{', '.join(wc['relations'])})")
    run_relation = names[_slug(relation)]
    density = _chosen_density(wc, run_relation, es.density)
    path = Path(circuit_run) / mask_file(run_relation, density)
    if not path.is_file():
        raise KcircuitsError(f"{path} is missing: the weight-circuit run is incomplete; run it again")
    trained = load_weight_mask(path)
    ablation = es.ablation or trained.settings.ablation
    nodes = load_circuit(edge_circuit).nodes() if edge_circuit is not None else None
    model = model if model is not None else config["model"]

    def check(lm: LoadedModel) -> None:
        if lm.fingerprint != trained.fingerprint:
            raise KcircuitsError(f"the circuit in {circuit_run} was trained on weights {trained.fingerprint}; this "
                                 f"model's are {lm.fingerprint}. Pass the model the run used ({config['model']})")

    def reproduce(lm: LoadedModel) -> dict:
        return {"command": "edit-inside", "relation": relation, "circuit_run": str(circuit_run),
                "density": density, "model": model_name(model), "weights": lm.fingerprint,
                "edge_circuit": None if edge_circuit is None else str(edge_circuit),
                "check_ablation": ablation, **{param_name(type(o)): hashed_dict(o) for o in (es, ft, rs)}}

    run_folder, lm = open_run("edit-inside", [_slug(relation), Path(model_name(model)).name], reproduce, out,
                              model, rs, check=check)
    with run_folder.removed_if_failed():
        requests = load_requests(relation, es.n, rs.seed, tokenizer=lm.tokenizer)
        n_kept = sum(int(m.sum()) for m in trained.mask.values())
        shapes = {n: tuple(m.shape) for n, m in trained.mask.items()}
        allowed: dict[str, Mapping] = {"circuit": trained.mask, "complement": complement(trained.mask),
                                       "all": {n: torch.ones_like(m) for n, m in trained.mask.items()},
                                       RANDOM_VARIANT: random_weight_mask(shapes, n_kept, rs.seed)}
        if nodes is not None:
            layout = parameter_layout(lm.hf_model)
            allowed.update(edge_component_masks(layout, nodes, over=list(trained.mask)))
        with run_folder.timed("fine-tuning"):
            res = inside_outside(lm, requests, allowed, ft, circuit=trained.mask, ablation=ablation,
                                 cache=StepCache.default(rs.cache), progress=progress)
        res.update({"relation": relation, "density": density, "circuit_run": str(circuit_run),
                    "edge_circuit": None if edge_circuit is None else str(edge_circuit)})
        run_folder.write_json(EDIT_INSIDE_FILE, res)
        write_report(run_folder.file("report.html"), edit_inside_report(res, model_name(model), run_folder.config))
    return {**res, "folder": str(run_folder.path)}


edit_inside.__doc__ += settings_doc(*EDIT_INSIDE_SETTINGS)
