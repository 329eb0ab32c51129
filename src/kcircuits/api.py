"""The Python API behind every CLI command: discover and evaluate knowledge circuits, end to end.

``discover`` = prompts -> attribution scores -> circuit -> evaluation -> run folder with report;
``evaluate`` = an existing circuit evaluated on any relations' prompts. Each step's result is
written to the run folder as soon as it exists and reused by a rerun with the same config.

Both take their options as settings objects (:mod:`kcircuits.settings`), or any of those objects'
fields by name (``percent=1``, ``known_only=True``, ...): the one place an option is defined.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kcircuits.ablation import mean_activations
from kcircuits.analyze.head_roles import RoleThresholds, answer_range_of
from kcircuits.data import load_dataset
from kcircuits.discover.registry import get_method
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.evaluate import Evaluator
from kcircuits.analyze.explain import Explanation, explain
from kcircuits.graph import Circuit, Graph
from kcircuits.io import read_json
from kcircuits.models import LoadedModel
from kcircuits.pipeline import (  # noqa: F401  (re-exported: the steps' public home is kcircuits.pipeline)
    PromptSplit,
    answer_ranks,
    attribute_resumable,
    known_filter,
    model_batches,
    model_name,
    open_run,
    prepare_prompts,
)
from kcircuits.report import write_report
from kcircuits.report.data import build_report
from kcircuits.runs import RunFolder
from kcircuits.selection import select, select_by_threshold
from kcircuits.settings import (
    AttributionSettings,
    CircuitSize,
    EvaluationSettings,
    PromptSettings,
    RunSettings,
    ScoringSettings,
    hashed_dict,
    resolve_all,
    settings_doc,
)


@dataclass
class RunOutput:
    """What a discover/evaluate run produced; everything is also in ``folder``.

    ``circuit``: the circuit found or evaluated; ``metrics``: the contents of ``metrics.json``
    (per prompt set: faithfulness, Hit@k of full model / circuit / random / chance, ...);
    ``scores``: the attribution scores ``[n_src, n_dst]`` (discover only); ``prompts``: the
    :class:`~kcircuits.pipeline.PromptSplit` of each prompt set.
    """

    folder: Path
    circuit: Circuit
    metrics: dict
    scores: torch.Tensor | None = None
    prompts: dict = field(default_factory=dict)

    @property
    def report(self) -> Path:
        return self.folder / "report.html"


def discover(relation: str = "country_capital", model: str | LoadedModel = "smollm2-135m", *,
             out: str | Path | None = None, scoring: ScoringSettings | None = None,
             attribution: AttributionSettings | None = None, size: CircuitSize | None = None,
             prompts: PromptSettings | None = None, evaluation: EvaluationSettings | None = None,
             run: RunSettings | None = None, thresholds: RoleThresholds | None = None, progress: bool = True,
             **options) -> RunOutput:
    """Find the circuit of one relation, evaluate it and explain it; write everything to a run folder.

    ``relation`` is a bundled relation name or a .json/.csv file; ``model`` a name ("smollm2-135m"),
    a local HF folder, a hub id or a :class:`~kcircuits.models.LoadedModel`. The circuit is found
    on the discovery prompts (with ``split``, that fraction of the subjects), then evaluated on the
    test prompts against random circuits of its exact size and the chance level, and the first
    ``explain_prompts`` test prompts are explained (logit lens, head roles, composition).
    The folder is ``out`` or ``runs/discover_<relation>_<model>_<method>_<hash>``, the hash covering the
    settings and the weights' fingerprint; a rerun reuses every finished step.

    Settings (each also accepted by field name, e.g. ``discover(..., percent=1, known_only=True)``):

    """
    classes = (ScoringSettings, AttributionSettings, CircuitSize, PromptSettings, EvaluationSettings, RunSettings)
    given = {ScoringSettings: scoring, AttributionSettings: attribution, CircuitSize: size, PromptSettings: prompts,
             EvaluationSettings: evaluation, RunSettings: run}
    st = resolve_all(options, given, classes, "discover")
    sc, at, sz, pr, ev, rs = (st[c] for c in classes)
    thresholds = thresholds or RoleThresholds()
    load_dataset(relation)  # fail on a bad relation before anything is loaded or written
    method = get_method(at.method)
    torch.manual_seed(rs.seed)
    lm_name = model_name(model)

    def reproduce(lm: LoadedModel) -> dict:
        return {"command": "discover", "relation": relation, "model": lm_name, "weights": lm.fingerprint,
                "scoring": hashed_dict(sc), "attribution": hashed_dict(at), "size": hashed_dict(sz),
                "prompts": hashed_dict(pr), "evaluation": hashed_dict(ev), "run": hashed_dict(rs),
                "thresholds": asdict(thresholds)}

    run_folder, lm = open_run("discover", [Path(relation).stem, Path(lm_name).name, at.method], reproduce, out, model,
                              rs)
    graph = Graph.from_model(lm.weights, grouped=at.grouped)
    engine = Engine(lm.weights, graph)

    # 1. prompts
    sets = prepare_prompts(lm, engine, relation, settings=pr, seed=rs.seed, batch_size=rs.batch_size,
                           answer_scoring=sc.answer_scoring)
    run_folder.write_json("prompts.json", {role: s.to_json() for role, s in sets.items()})
    found_on = sets.get("discover", sets.get("all"))
    tested_on = sets.get("test", found_on)
    disc_batches = model_batches(lm, found_on.pairs, rs.batch_size, sc.answer_scoring)

    # 2. the method: edge scores (reused when present), or a circuit it searched for itself
    scores = None
    if method.output == "scores":
        if run_folder.has("scores.safetensors"):
            scores = run_folder.read_tensors("scores.safetensors")["scores"].to(lm.device)
        else:
            mean = mean_activations(engine, disc_batches) if sc.ablation == "mean" else None
            scores = attribute_resumable(run_folder, engine, disc_batches, scoring=sc, attribution=at, mean=mean,
                                         progress=progress)
            run_folder.write_tensors("scores.safetensors", {"scores": scores},
                                     {"src_names": ",".join(graph.src_names), "dst_names": ",".join(graph.dst_names)})
        circuit = circuit_of_size(graph, scores.cpu(), sz)
    else:
        circuit = method.find(engine, disc_batches, scoring=sc, attribution=at, size=sz, progress=progress)
    if circuit.n_edges == 0:
        raise KcircuitsError("the selected circuit is empty after pruning; select more edges (--edges/--percent) "
                             "or lower --threshold")
    run_folder.write_json("circuit.json", circuit.to_json({"model": lm_name, "relation": found_on.relation,
                                                           "method": at.method, "metric": sc.metric}))
    if ev.export_mib:  # every edge with its score, in the EAP-IG / MIB graph format
        run_folder.write_json("circuit_mib.json", circuit.to_mib_json())

    # 3. evaluation (reused when present)
    if run_folder.has("metrics.json"):
        metrics = run_folder.read_json("metrics.json")
    else:
        roles = {"discover": found_on} if tested_on is found_on else {"discover": found_on, "test": tested_on}
        metrics = evaluate_circuit(engine, circuit, None if scores is None else scores.cpu(), roles, lm, scoring=sc,
                                   size=sz, evaluation=ev, run=rs, progress=progress)
        run_folder.write_json("metrics.json", metrics)

    # 4. explanation: logit lens (clean and circuit-only), head roles, composition, on the test prompts
    view = None
    if ev.explain_prompts:
        view = explain_circuit(run_folder, engine, lm, circuit, tested_on.pairs[:ev.explain_prompts],
                               answer_range_of([p for s in sets.values() for p in s.pairs]), ablation=sc.ablation,
                               batch_size=rs.batch_size, thresholds=thresholds)

    # 5. report
    write_report(run_folder.file("report.html"),
                 _report(run_folder.config, circuit, metrics, sets, graph, scores, view, lm.tokenizer))
    return RunOutput(run_folder.path, circuit, metrics, scores, sets)


discover.__doc__ += settings_doc(ScoringSettings, AttributionSettings, CircuitSize, PromptSettings,
                                 EvaluationSettings, RunSettings)


def circuit_of_size(graph: Graph, scores: torch.Tensor, size: CircuitSize) -> Circuit:
    """The pruned circuit that ``size`` selects from edge scores ``[n_src, n_dst]``."""
    n = size.edges_for(graph.n_edges)
    if n is None:
        return select_by_threshold(graph, scores, size.threshold, absolute=size.absolute)
    return select(graph, scores, n, selection=size.selection, absolute=size.absolute)


def explain_circuit(run: RunFolder, engine: Engine, lm: LoadedModel, circuit: Circuit, pairs: list,
                    answer_range: list[int], *, ablation: str, batch_size: int,
                    thresholds: RoleThresholds | None) -> Explanation:
    """:func:`kcircuits.analyze.explain.explain` with the model's tokenizer, padding and device; writes
    ``lens.json``, ``roles.json`` and ``composition.json`` into the run folder."""
    ex = explain(engine, lm.tokenizer, pairs, lm.pad_token_id, circuit=circuit, ablation=ablation,
                 batch_size=batch_size, thresholds=thresholds, answer_range=answer_range, device=lm.device)
    run.write_json("lens.json", ex.lens_json(lm.tokenizer))
    run.write_json("roles.json", ex.roles.to_json())
    run.write_json("composition.json", ex.composition)
    return ex


def _report(config: dict, circuit: Circuit, metrics: dict, sets: dict, graph: Graph, scores: torch.Tensor | None,
            ex: Explanation | None, tokenizer) -> dict:
    """The report dict of a discover/evaluate run, with the explanation's sections when there is one."""
    report = build_report(config, circuit, metrics, sets, graph, scores=scores,
                          node_details=ex.node_details(tokenizer) if ex is not None else None)
    if ex is not None:
        report.update(ex.report_view(circuit))
    return report


def evaluate_circuit(engine: Engine, circuit: Circuit, scores: torch.Tensor | None, sets: dict[str, PromptSplit],
                     lm: LoadedModel, *, scoring: ScoringSettings, size: CircuitSize, evaluation: EvaluationSettings,
                     run: RunSettings, progress: bool) -> dict:
    """Evaluate a circuit on each prompt set; random baselines and the curve (from ``scores``) on the last
    (test) set."""
    out: dict = {"sets": {}}
    last = list(sets)[-1]
    for role, ps in sets.items():
        batches = model_batches(lm, ps.pairs, run.batch_size, scoring.answer_scoring)
        mean = mean_activations(engine, batches) if scoring.ablation == "mean" else None
        ev = Evaluator(engine, batches, metric=scoring.metric, ablation=scoring.ablation, mean=mean, progress=progress)
        res = ev.evaluate(circuit)
        res.update(relation=ps.relation, role=role, skipped=ps.skipped)
        if role == last and evaluation.n_random > 0 and circuit.n_edges:
            res["random_baseline"] = ev.random_baselines(circuit, evaluation.n_random, run.seed)
        if role == last and evaluation.curve and scores is not None:
            out["curve"] = ev.curve(scores, evaluation.curve_percents, selection=size.selection,
                                    absolute=size.absolute, random_baseline=evaluation.n_random > 0, seed=run.seed)
            out["curve"]["set"] = role
        out["sets"][role] = res
    return out


def load_circuit(circuit: str | Path | Circuit) -> Circuit:
    """A circuit, from a ``circuit.json`` or a discover run folder."""
    if isinstance(circuit, Circuit):
        return circuit
    path = Path(circuit)
    path = path / "circuit.json" if path.is_dir() else path
    if not path.exists():
        raise KcircuitsError(f"no circuit at {path}; pass a circuit.json or a discover run folder")
    try:
        return Circuit.from_json(read_json(path))
    except json.JSONDecodeError as exc:
        raise KcircuitsError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None


def evaluate(circuit: str | Path | Circuit, relations: Sequence[str], model: str | LoadedModel = "smollm2-135m", *,
             out: str | Path | None = None, scoring: ScoringSettings | None = None,
             prompts: PromptSettings | None = None, evaluation: EvaluationSettings | None = None,
             run: RunSettings | None = None, thresholds: RoleThresholds | None = None, progress: bool = True,
             **options) -> RunOutput:
    """Evaluate an existing circuit (a ``circuit.json`` or a run folder) on the prompts of several relations,
    and explain it (logit lens, head roles, composition) on the first ``explain_prompts`` prompts of the first.

    With ``split`` the circuit is evaluated on the held-out part of each relation: the subjects that
    ``discover(..., split=split, seed=seed)`` did not find it on. ``known_only`` filters the evaluated
    prompts; leave it off to test on every held-out fact (the Knowledge Circuits paper's test set).
    ``templates`` and ``max_pairs`` choose and cap the prompts as in :func:`discover`. The curve is
    not drawn (there are no scores to select sizes from).

    Settings (each also accepted by field name):

    """
    classes = (ScoringSettings, PromptSettings, EvaluationSettings, RunSettings)
    given = {ScoringSettings: scoring, PromptSettings: prompts, EvaluationSettings: evaluation, RunSettings: run}
    st = resolve_all(options, given, classes, "evaluate")
    sc, pr, ev, rs = (st[c] for c in classes)
    thresholds = thresholds or RoleThresholds()
    if not relations:
        raise KcircuitsError("give at least one relation to evaluate on")
    circuit = load_circuit(circuit)
    for rel in relations:
        load_dataset(rel)  # fail on a bad relation before anything is loaded or written
    lm_name = model_name(model)
    edge_names = sorted(f"{s}->{d}" for s, d, _ in circuit.edge_list())

    def reproduce(lm: LoadedModel) -> dict:
        return {"command": "evaluate", "circuit_n_edges": len(edge_names),
                "circuit_sha256": hashlib.sha256("\n".join(edge_names).encode()).hexdigest(),
                "relations": list(relations), "model": lm_name, "weights": lm.fingerprint,
                "scoring": hashed_dict(sc), "prompts": hashed_dict(pr), "evaluation": hashed_dict(ev),
                "run": hashed_dict(rs), "thresholds": asdict(thresholds)}

    run_folder, lm = open_run("evaluate", [Path(lm_name).name] + [Path(r).stem for r in relations][:3], reproduce,
                              out, model, rs)
    g = circuit.graph
    if (g.n_layers, g.n_heads, g.n_kv_heads) != (lm.weights.n_layers, lm.weights.n_heads, lm.weights.n_kv_heads):
        raise KcircuitsError(f"this circuit was made for a {g.n_layers}-layer model with {g.n_heads} heads, "
                             f"{lm_name!r} has {lm.weights.n_layers} layers with {lm.weights.n_heads} heads; "
                             "evaluate it with the model it came from")
    engine = Engine(lm.weights, g)
    run_folder.write_json("circuit.json", circuit.to_json({"model": lm_name}))
    per_relation, all_sets = {}, {}

    def evaluation_prompts(rel: str) -> PromptSplit:
        """All of a relation's prompts, or with ``split`` its held-out ("test") part."""
        sets = prepare_prompts(lm, engine, rel, settings=pr, seed=rs.seed, batch_size=rs.batch_size,
                               answer_scoring=sc.answer_scoring, roles=("all", "test"))
        return sets["all" if pr.split is None else "test"]

    for rel in relations:
        name = Path(rel).stem
        if run_folder.has(f"metrics_{name}.json"):
            per_relation[name] = run_folder.read_json(f"metrics_{name}.json")
            continue
        ps = evaluation_prompts(rel)
        all_sets[name] = ps
        res = evaluate_circuit(engine, circuit, None, {name: ps}, lm, scoring=sc, size=CircuitSize(), evaluation=ev,
                               run=rs, progress=progress)
        per_relation[name] = res["sets"][name]
        run_folder.write_json(f"metrics_{name}.json", per_relation[name])
    metrics = {"sets": per_relation}
    run_folder.write_json("metrics.json", metrics)
    ex = None
    if ev.explain_prompts:  # the explanation on the first relation's prompts
        first = Path(relations[0]).stem
        ps = all_sets.get(first) or evaluation_prompts(relations[0])
        ex = explain_circuit(run_folder, engine, lm, circuit, ps.pairs[:ev.explain_prompts], answer_range_of(ps.pairs),
                             ablation=sc.ablation, batch_size=rs.batch_size, thresholds=thresholds)
    write_report(run_folder.file("report.html"),
                 _report(run_folder.config, circuit, metrics, all_sets, g, None, ex, lm.tokenizer))
    return RunOutput(run_folder.path, circuit, metrics, None, all_sets)


evaluate.__doc__ += settings_doc(ScoringSettings, PromptSettings, EvaluationSettings, RunSettings)
