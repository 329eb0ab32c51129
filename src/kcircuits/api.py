"""The Python API behind every CLI command: discover, select and evaluate knowledge circuits, end to end.

``discover`` = prompts -> attribution scores -> circuit -> evaluation -> run folder with report;
``select`` = a circuit of another size from a discover run's stored scores (the run ``discover``
would write at that size, without recomputing prompts or scores); ``evaluate`` = an existing
circuit evaluated on any relations' prompts. Each step's result is written to the run folder as
soon as it exists and kept in the step cache (:mod:`kcircuits.steps`) under a key of what it
depends on, so reruns and new sizes recompute only what changed.

Both take their options as settings objects (:mod:`kcircuits.settings`), or any of those objects'
fields by name (``percent=1``, ``known_only=True``, ...): the one place an option is defined.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from kcircuits.ablation import mean_activations
from kcircuits.analyze.head_roles import answer_range_of
from kcircuits.data import load_dataset
from kcircuits.discover.registry import get_method
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.evaluate import Evaluator
from kcircuits.analyze.explain import explain
from kcircuits.graph import Circuit, Graph
from kcircuits.io import json_default, load_tensors, read_json
from kcircuits.models import LoadedModel
from kcircuits.pipeline import (  # noqa: F401  (re-exported: the steps' public home is kcircuits.pipeline)
    PromptSplit,
    answer_ranks,
    attribute_resumable,
    known_filter,
    model_batches,
    model_name,
    load,
    open_run,
    prepare_prompts,
)
from kcircuits.report import write_report
from kcircuits.report.data import build_report
from kcircuits.runs import RunFolder
from kcircuits import selection
from kcircuits.settings import (
    AttributionSettings,
    CircuitSize,
    EvaluationSettings,
    PromptSettings,
    RunSettings,
    ScoringSettings,
    RoleThresholds,
    hashed_dict,
    reject_unknown,
    resolve_all,
    settings_doc,
)
from kcircuits.steps import StepCache, circuit_digest, pairs_digest, step_key


@dataclass
class RunOutput:
    """What a discover/select/evaluate run produced; everything is also in ``folder``.

    Attributes:
        folder: the run folder (``config.json``, ``metrics.json``, ``report.html``, ...).
        circuit: the circuit found or evaluated (:class:`~kcircuits.graph.Circuit`).
        metrics: the contents of ``metrics.json``: per prompt set (``metrics["sets"]["test"]``)
            faithfulness, Hit@k of the full model, the circuit, random circuits of its exact size and
            chance; with a curve, ``metrics["curve"]`` (faithfulness over sizes, CPR, CMD).
        scores: the attribution scores ``[n_src, n_dst]`` (discover and select only).
        prompts: the :class:`~kcircuits.pipeline.PromptSplit` of each prompt set, by role.
        report: (property) the path of ``report.html``.
    """

    folder: Path
    circuit: Circuit
    metrics: dict
    scores: torch.Tensor | None = None
    prompts: dict = field(default_factory=dict)

    @property
    def report(self) -> Path:
        """The run's ``report.html``."""
        return self.folder / "report.html"


def discover(relation: str = "country_capital", model: str | LoadedModel = "smollm2-135m", *,
             out: str | Path | None = None, scoring: ScoringSettings | None = None,
             attribution: AttributionSettings | None = None, size: CircuitSize | None = None,
             prompts: PromptSettings | None = None, evaluation: EvaluationSettings | None = None,
             run: RunSettings | None = None, thresholds: RoleThresholds | None = None, progress: bool = True,
             scores_from: str | Path | None = None, **options) -> RunOutput:
    """Find the circuit of one relation, evaluate it and explain it; write everything to a run folder.

    The circuit is found on the discovery prompts (with ``split``, that fraction of the subjects),
    then evaluated on the test prompts against random circuits of its exact size and the chance
    level, and the first ``explain_prompts`` test prompts are explained (logit lens, head roles,
    composition). Every step is taken from the run folder or the step cache
    (:mod:`kcircuits.steps`) when it was computed before with what it depends on, so a rerun, or a
    new circuit size, recomputes only what changed.

    Args:
        relation: a bundled relation name (``kcircuits datasets`` lists them) or a .json/.csv file.
        model: ``"smollm2-135m"`` (bundled), a local Hugging Face folder, a hub id, or a
            :class:`~kcircuits.models.LoadedModel` (e.g. one you edited).
        out: the run folder; default ``runs/discover_<relation>_<model>_<method>_<hash>``, the hash
            covering every setting below that changes a result and the weights' fingerprint.
        scoring, attribution, size, prompts, evaluation, run: settings objects (fields listed
            below); each field may instead be passed by name, e.g. ``percent=1, known_only=True``.
        thresholds: head-role thresholds (:class:`~kcircuits.settings.RoleThresholds`).
        progress: show progress bars.
        scores_from: a discover run folder whose stored scores to reuse when they were computed on
            the same prompts with the same scoring and attribution settings (checked by key);
            :func:`select` passes its run.

    Returns:
        :class:`RunOutput`: the folder, the circuit, the metrics, the scores and the prompt sets.

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
    cache = StepCache.default(rs.cache)

    def reproduce(lm: LoadedModel) -> dict:
        return {"command": "discover", "relation": relation, "model": lm_name, "weights": lm.fingerprint,
                "scoring": hashed_dict(sc), "attribution": hashed_dict(at), "size": hashed_dict(sz),
                "prompts": hashed_dict(pr), "evaluation": hashed_dict(ev), "run": hashed_dict(rs),
                "thresholds": asdict(thresholds)}

    run_folder, lm = open_run("discover", [Path(relation).stem, Path(lm_name).name, at.method], reproduce, out, model,
                              rs)
    with run_folder.removed_if_failed():
        graph = Graph.from_model(lm.weights, grouped=at.grouped)
        engine = Engine(lm.weights, graph)

        # 1. prompts (the known-facts filter's ranks come from the step cache when there)
        with run_folder.timed("prompts (known filter)"):
            sets = prepare_prompts(lm, engine, relation, settings=pr, seed=rs.seed, batch_size=rs.batch_size,
                                   answer_scoring=sc.answer_scoring, cache=cache)
        run_folder.write_json("prompts.json", {role: s.to_json() for role, s in sets.items()})
        found_on = sets.get("discover", sets.get("all"))
        tested_on = sets.get("test", found_on)
        disc_batches = model_batches(lm, found_on.pairs, rs.batch_size, sc.answer_scoring)

        # 2. the method: edge scores (stored, cached or computed), or a circuit it searched for itself
        scores = scores_key = None
        if method.output == "scores":
            scores_key = step_key("scores", weights=lm.fingerprint, dtype=str(lm.dtype),
                                  pairs=pairs_digest(found_on.pairs), scoring=hashed_dict(sc),
                                  attribution=hashed_dict(at))
            scores = discovery_scores(run_folder, cache, scores_key, engine, disc_batches, scoring=sc, attribution=at,
                                      progress=progress, scores_from=scores_from)
            with run_folder.timed("circuit selection"):
                circuit = circuit_of_size(graph, scores.cpu(), sz)
        else:
            with run_folder.timed("discovery"):
                circuit = method.find(engine, disc_batches, scoring=sc, attribution=at, size=sz, progress=progress)
        if circuit.n_edges == 0:
            hint = (f"; `kcircuits select {run_folder.path} --edges N` reuses its scores" if scores is not None
                    else "")
            raise KcircuitsError("the selected circuit is empty after pruning; select more edges (--edges/--percent) "
                                 f"or lower --threshold{hint}")
        run_folder.write_json("circuit.json", circuit.to_json({"model": lm_name, "relation": found_on.relation,
                                                               "method": at.method, "metric": sc.metric}))
        if ev.export_mib:  # every edge with its score, in the EAP-IG / MIB graph format
            run_folder.write_json("circuit_mib.json", circuit.to_mib_json())

        # 3. evaluation (from the run folder, or per prompt set from the step cache)
        if run_folder.has("metrics.json"):
            metrics = run_folder.read_json("metrics.json")
        else:
            roles = {"discover": found_on} if tested_on is found_on else {"discover": found_on, "test": tested_on}
            metrics = evaluate_circuit(engine, circuit, None if scores is None else scores.cpu(), roles, lm,
                                       scoring=sc, size=sz, evaluation=ev, run=rs, progress=progress,
                                       timed=run_folder.timed, cache=cache, scores_key=scores_key)
            run_folder.write_json("metrics.json", metrics)

        # 4. explanation: logit lens (clean and circuit-only), head roles, composition, on the test prompts
        view = None
        if ev.explain_prompts:
            with run_folder.timed("explanation"):
                view = explain_circuit(run_folder, engine, lm, circuit, tested_on.pairs[:ev.explain_prompts],
                                       answer_range_of([p for s in sets.values() for p in s.pairs]),
                                       ablation=sc.ablation, batch_size=rs.batch_size, thresholds=thresholds,
                                       cache=cache)

        # 5. report
        with run_folder.timed("report"):
            write_report(run_folder.file("report.html"),
                         _report(run_folder.config, circuit, metrics, sets, graph, scores, view))
    return RunOutput(run_folder.path, circuit, metrics, scores, sets)


discover.__doc__ += settings_doc(ScoringSettings, AttributionSettings, CircuitSize, PromptSettings,
                                 EvaluationSettings, RunSettings)


def discovery_scores(run_folder: RunFolder, cache: StepCache, key: str, engine: Engine, batches: list, *,
                     scoring: ScoringSettings, attribution: AttributionSettings, progress: bool,
                     scores_from: str | Path | None = None) -> torch.Tensor:
    """The edge scores ``[n_src, n_dst]`` of the discovery prompts, from the first place that has them:
    this run folder, the step cache, the ``scores_from`` run (when its recorded key is ``key``), or a
    fresh (resumable) attribution. They end up in the run folder and the cache under ``key``."""
    device = engine.w.W_E.device
    names = {"src_names": ",".join(engine.graph.src_names), "dst_names": ",".join(engine.graph.dst_names)}
    recorded = RunFolder.recorded_step(run_folder.path, "scores")
    if run_folder.has("scores.safetensors") and recorded in (None, key):  # None: a folder from before steps.json
        source, scores = "folder", run_folder.read_tensors("scores.safetensors")["scores"]
    elif (hit := cache.read_tensors("scores", key)) is not None:
        source, scores = "cache", hit["scores"]
    elif scores_from is not None and RunFolder.recorded_step(Path(scores_from), "scores") == key and \
            Path(scores_from, "scores.safetensors").exists():
        source, scores = "scores_from", load_tensors(Path(scores_from, "scores.safetensors"))["scores"]
    else:
        with run_folder.timed("attribution"):
            mean = mean_activations(engine, batches) if scoring.ablation == "mean" else None
            source, scores = "computed", attribute_resumable(run_folder, engine, batches, scoring=scoring,
                                                             attribution=attribution, mean=mean, progress=progress)
    if source != "folder":
        run_folder.write_tensors("scores.safetensors", {"scores": scores}, names)
    run_folder.record_step("scores", key)
    if not cache.has("scores", key):
        cache.write_tensors("scores", key, {"scores": scores})
    return scores.to(device)


def select(run: str | Path, *, model: str | LoadedModel | None = None, size: CircuitSize | None = None,
           out: str | Path | None = None, progress: bool = True, **options) -> RunOutput:
    """A circuit of another size from a discover run's stored scores: evaluated, explained, in its own folder.

    The result is what :func:`discover` writes with the run's settings and the new size (the same
    folder name, the same files), but the prompts and the edge scores are taken from ``run`` and
    the step cache instead of being recomputed; the faithfulness curve is reused too. Only the new
    circuit's evaluation and explanation are computed.

    Args:
        run: a discover run folder that holds ``scores.safetensors``.
        model: the model to load; default the run's (its weights' fingerprint must match the run's).
        size: the new size (:class:`~kcircuits.settings.CircuitSize`), or its fields by name:
            ``n_edges``, ``percent`` or ``threshold`` (one of them), and optionally ``selection``
            and ``absolute`` (default: the run's).
        out: the new run folder (default: the folder :func:`discover` would use).
        progress: show progress bars.

    Returns:
        :class:`RunOutput` of the new run.
    """
    folder = Path(run)
    config = _discover_config(folder)
    rep = config["reproduce"]
    names = {f.name for f in fields(CircuitSize)}
    size_fields = {k: options.pop(k) for k in list(options) if k in names}
    reject_unknown(options, "select")
    if size is None:
        if not any(size_fields.get(k) is not None for k in ("n_edges", "percent", "threshold")):
            raise KcircuitsError("give the new circuit size: --percent P, --edges N or --threshold T")
        old = rep["size"]
        size = CircuitSize(**{"selection": old.get("selection", "topn"), "absolute": old.get("absolute", True),
                              **{k: v for k, v in size_fields.items() if v is not None}})
    try:
        settings = {"scoring": ScoringSettings(**rep["scoring"]),
                    "attribution": AttributionSettings(**rep["attribution"]),
                    "prompts": PromptSettings(**rep["prompts"]),
                    "evaluation": EvaluationSettings(**rep["evaluation"]),
                    "run": RunSettings(**rep["run"], batch_size=config.get("batch_size", 8),
                                       device=config.get("device", "cpu"))}
        thresholds = RoleThresholds(**rep["thresholds"])
    except (KeyError, TypeError) as exc:
        raise KcircuitsError(f"{folder}/config.json was written by another version of kcircuits ({exc}); "
                             "rerun discover with the new size instead") from None
    lm = load(model if model is not None else rep["model"], settings["run"])
    if lm.fingerprint != rep["weights"]:
        raise KcircuitsError(f"{folder} was computed with weights {rep['weights']}, the model {lm.name!r} has "
                             f"{lm.fingerprint}; select from a run of this model, or pass the run's model")
    return discover(rep["relation"], lm, out=out, size=size, thresholds=thresholds, progress=progress,
                    scores_from=folder, **settings)


def _discover_config(folder: Path) -> dict:
    """The ``config.json`` of a finished-enough discover run (one with stored scores), or a clear error."""
    path = folder / "config.json"
    if not folder.is_dir() or not path.exists():
        raise KcircuitsError(f"{folder} is not a run folder (no config.json); pass a folder written by "
                             "`kcircuits discover`")
    try:
        config = read_json(path)
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as exc:
        raise KcircuitsError(f"{path} cannot be read ({type(exc).__name__}); rerun discover") from None
    rep = config.get("reproduce", {}) if isinstance(config, dict) else {}
    if rep.get("command") != "discover":
        raise KcircuitsError(f"{folder} is a {rep.get('command', 'unknown')!r} run; select needs a discover run "
                             "(it reuses the run's edge scores)")
    if not (folder / "scores.safetensors").exists():
        raise KcircuitsError(f"{folder} has no stored scores (its attribution did not finish, or its method "
                             "searches for the circuit itself); rerun discover with the size you want")
    return config


def circuit_of_size(graph: Graph, scores: torch.Tensor, size: CircuitSize) -> Circuit:
    """The pruned circuit that ``size`` selects from edge scores ``[n_src, n_dst]``.

    Args:
        graph: the model's graph (the scores' rows are its sources, columns its destinations).
        scores: edge scores ``[n_src, n_dst]`` (any device; read on the CPU).
        size: how many edges (``n_edges``, ``percent`` or ``threshold``) and how they are chosen.
    """
    n = size.edges_for(graph.n_edges)
    if n is None:
        return selection.select_by_threshold(graph, scores, size.threshold, absolute=size.absolute)
    return selection.select(graph, scores, n, selection=size.selection, absolute=size.absolute)


def explain_circuit(run: RunFolder, engine: Engine, lm: LoadedModel, circuit: Circuit, pairs: list,
                    answer_range: list[int], *, ablation: str, batch_size: int,
                    thresholds: RoleThresholds | None, cache: StepCache | None = None) -> dict:
    """Explain ``circuit`` on ``pairs`` (:func:`kcircuits.analyze.explain.explain`), or take the explanation
    from the step cache; write ``lens.json``, ``roles.json`` and ``composition.json`` into ``run``.

    Args:
        run: the run folder written into.
        engine, lm: the engine and the loaded model (tokenizer, padding, device, fingerprint).
        circuit: the circuit explained (its circuit-only logit lens, which heads are in it).
        pairs: the prompt pairs explained (the first ``explain_prompts`` test prompts).
        answer_range: token ids of every answer of the relation (the relation-head criterion).
        ablation: what edges outside the circuit carry (corrupt, zero, mean).
        batch_size: prompt pairs per batch.
        thresholds: head-role thresholds (None: the defaults).
        cache: the step cache (None: always compute).

    Returns:
        The explanation as plain JSON: ``lens``, ``roles``, ``composition`` (the three files),
        ``node_details`` (the viewer's per-node panel) and ``view`` (the report's sections).
    """
    cache = cache or StepCache(None)
    thresholds = thresholds or RoleThresholds()
    key = step_key("explanation", weights=lm.fingerprint, dtype=str(lm.dtype), circuit=circuit_digest(circuit),
                   pairs=pairs_digest(pairs), answer_range=sorted(answer_range), ablation=ablation,
                   thresholds=asdict(thresholds))
    out = cache.read_json("explanation", key)
    if not isinstance(out, dict):
        ex = explain(engine, lm.tokenizer, pairs, lm.pad_token_id, circuit=circuit, ablation=ablation,
                     batch_size=batch_size, thresholds=thresholds, answer_range=answer_range, device=lm.device)
        out = {"lens": ex.lens_json(lm.tokenizer), "roles": ex.roles.to_json(), "composition": ex.composition,
               "node_details": ex.node_details(lm.tokenizer), "view": ex.report_view(circuit)}
        out = json.loads(json.dumps(out, default=json_default))  # what the cache would give back
        cache.write_json("explanation", key, out)
    run.write_json("lens.json", out["lens"])
    run.write_json("roles.json", out["roles"])
    run.write_json("composition.json", out["composition"])
    return out


def _report(config: dict, circuit: Circuit, metrics: dict, sets: dict, graph: Graph, scores: torch.Tensor | None,
            explanation: dict | None) -> dict:
    """The report dict of a discover/evaluate run, with the explanation's sections when there is one."""
    report = build_report(config, circuit, metrics, sets, graph, scores=scores,
                          node_details=explanation["node_details"] if explanation is not None else None)
    if explanation is not None:
        report.update(explanation["view"])
    return report


def evaluate_circuit(engine: Engine, circuit: Circuit, scores: torch.Tensor | None, sets: dict[str, PromptSplit],
                     lm: LoadedModel, *, scoring: ScoringSettings, size: CircuitSize, evaluation: EvaluationSettings,
                     run: RunSettings, progress: bool, timed=lambda step: nullcontext(),
                     cache: StepCache | None = None, scores_key: str | None = None) -> dict:
    """Evaluate a circuit on each prompt set; random baselines and the curve (from ``scores``) on the last
    (test) set. Each set's result and the curve come from the step cache when it holds them.

    Args:
        engine: the engine of the model, over the circuit's graph.
        circuit: the circuit evaluated.
        scores: the edge scores ``[n_src, n_dst]`` the curve selects its sizes from (None: no curve).
        sets: the prompt sets by role (``{"discover": ..., "test": ...}``); the last is the test set.
        lm: the loaded model (tokenizer padding, device, fingerprint for the cache keys).
        scoring: metric, ablation and answer scoring.
        size: the selection rule (``selection``, ``absolute``) the curve uses at each size.
        evaluation: random draws, curve sizes.
        run: batch size and seed (of the random circuits).
        progress: show progress bars.
        timed: a context manager factory ``timed(step)`` that records each step's time (see
            :meth:`kcircuits.runs.RunFolder.timed`).
        cache: the step cache (None: compute everything).
        scores_key: the step-cache key of ``scores`` (the curve's cache key; None: the curve is not cached).

    Returns:
        ``{"sets": {role: metrics}, "curve": {...}}`` (``curve`` only with ``scores`` and ``evaluation.curve``).
    """
    cache = cache or StepCache(None)
    out: dict = {"sets": {}}
    last = list(sets)[-1]
    model_key = {"weights": lm.fingerprint, "dtype": str(lm.dtype), "scoring": hashed_dict(scoring)}
    edges = circuit_digest(circuit)
    for role, ps in sets.items():
        n_random = evaluation.n_random if role == last and circuit.n_edges else 0
        want_curve = role == last and evaluation.curve and scores is not None
        pairs = pairs_digest(ps.pairs)
        set_key = step_key("evaluation", **model_key, circuit=edges, pairs=pairs,
                           n_random=n_random, seed=run.seed)
        curve_key = (step_key("curve", **model_key, scores=scores_key, pairs=pairs, percents=evaluation.curve_percents,
                              selection=size.selection, absolute=size.absolute, random=evaluation.n_random > 0,
                              seed=run.seed) if want_curve and scores_key is not None else None)
        res = cache.read_json("evaluation", set_key)
        curve = cache.read_json("curve", curve_key) if curve_key is not None else None
        if res is None or (want_curve and curve is None):
            ev = _evaluator(engine, lm, ps, scoring, run, progress, timed)
            if res is None:
                with timed("evaluation: circuit"):
                    res = ev.evaluate(circuit)
                if n_random:
                    with timed("evaluation: random circuits"):
                        res["random_baseline"] = ev.random_baselines(circuit, n_random, run.seed)
                cache.write_json("evaluation", set_key, res)
            if want_curve and curve is None:
                with timed("evaluation: curve"):
                    curve = ev.curve(scores, evaluation.curve_percents, selection=size.selection,
                                     absolute=size.absolute, random_baseline=evaluation.n_random > 0, seed=run.seed)
                if curve_key is not None:
                    cache.write_json("curve", curve_key, curve)
        if want_curve:
            out["curve"] = dict(curve, set=role)
        out["sets"][role] = dict(res, relation=ps.relation, role=role, skipped=ps.skipped)
    return out


def _evaluator(engine: Engine, lm: LoadedModel, ps: PromptSplit, scoring: ScoringSettings, run: RunSettings,
               progress: bool, timed) -> Evaluator:
    """An :class:`Evaluator` of one prompt set (its full and fully ablated runs are computed here)."""
    with timed("evaluation: full and empty runs"):
        batches = model_batches(lm, ps.pairs, run.batch_size, scoring.answer_scoring)
        mean = mean_activations(engine, batches) if scoring.ablation == "mean" else None
        return Evaluator(engine, batches, metric=scoring.metric, ablation=scoring.ablation, mean=mean,
                         progress=progress)


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
    """Evaluate an existing circuit on the prompts of several relations, and explain it (logit lens, head
    roles, composition) on the first ``explain_prompts`` prompts of the first relation.

    With ``split`` the circuit is evaluated on the held-out part of each relation: the subjects that
    ``discover(..., split=split, seed=seed)`` did not find it on. ``known_only`` filters the evaluated
    prompts; leave it off to test on every held-out fact (the Knowledge Circuits paper's test set).
    ``templates`` and ``max_pairs`` choose and cap the prompts as in :func:`discover`. The curve is
    not drawn (there are no scores to select sizes from).

    Args:
        circuit: a ``circuit.json``, a discover run folder, or a :class:`~kcircuits.graph.Circuit`; it
            must come from a model of the same shape (layers, heads, kv-heads) as ``model``.
        relations: bundled relation names or .json/.csv files, at least one.
        model: ``"smollm2-135m"``, a local HF folder, a hub id or a :class:`~kcircuits.models.LoadedModel`.
        out: the run folder (default ``runs/evaluate_<model>_<relations>_<hash>``).
        scoring, prompts, evaluation, run: settings objects (fields below), or their fields by name.
        thresholds: head-role thresholds (:class:`~kcircuits.settings.RoleThresholds`).
        progress: show progress bars.

    Returns:
        :class:`RunOutput` with one metrics entry per relation under ``metrics["sets"]``.

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
    cache = StepCache.default(rs.cache)

    def reproduce(lm: LoadedModel) -> dict:
        return {"command": "evaluate", "circuit_n_edges": len(edge_names),
                "circuit_sha256": hashlib.sha256("\n".join(edge_names).encode()).hexdigest(),
                "relations": list(relations), "model": lm_name, "weights": lm.fingerprint,
                "scoring": hashed_dict(sc), "prompts": hashed_dict(pr), "evaluation": hashed_dict(ev),
                "run": hashed_dict(rs), "thresholds": asdict(thresholds)}

    run_folder, lm = open_run("evaluate", [Path(lm_name).name] + [Path(r).stem for r in relations][:3], reproduce,
                              out, model, rs, check=lambda lm: check_circuit_fits(circuit, lm))
    with run_folder.removed_if_failed():
        g = circuit.graph
        engine = Engine(lm.weights, g)
        run_folder.write_json("circuit.json", circuit.to_json({"model": lm_name}))
        per_relation, all_sets = {}, {}

        def evaluation_prompts(rel: str) -> PromptSplit:
            """All of a relation's prompts, or with ``split`` its held-out ("test") part."""
            sets = prepare_prompts(lm, engine, rel, settings=pr, seed=rs.seed, batch_size=rs.batch_size,
                                   answer_scoring=sc.answer_scoring, roles=("all", "test"), cache=cache)
            return sets["all" if pr.split is None else "test"]

        for rel in relations:
            name = Path(rel).stem
            with run_folder.timed("prompts (known filter)"):
                ps = evaluation_prompts(rel)
            all_sets[name] = ps
            if run_folder.has(f"metrics_{name}.json"):
                per_relation[name] = run_folder.read_json(f"metrics_{name}.json")
                continue
            res = evaluate_circuit(engine, circuit, None, {name: ps}, lm, scoring=sc, size=CircuitSize(),
                                   evaluation=ev, run=rs, progress=progress, timed=run_folder.timed, cache=cache)
            per_relation[name] = res["sets"][name]
            run_folder.write_json(f"metrics_{name}.json", per_relation[name])
        metrics = {"sets": per_relation}
        run_folder.write_json("metrics.json", metrics)
        view = None
        if ev.explain_prompts:  # the explanation on the first relation's prompts
            ps = all_sets[Path(relations[0]).stem]
            with run_folder.timed("explanation"):
                view = explain_circuit(run_folder, engine, lm, circuit, ps.pairs[:ev.explain_prompts],
                                       answer_range_of(ps.pairs), ablation=sc.ablation, batch_size=rs.batch_size,
                                       thresholds=thresholds, cache=cache)
        with run_folder.timed("report"):
            write_report(run_folder.file("report.html"),
                         _report(run_folder.config, circuit, metrics, all_sets, g, None, view))
    return RunOutput(run_folder.path, circuit, metrics, None, all_sets)


def check_circuit_fits(circuit: Circuit, lm: LoadedModel) -> None:
    """Refuse a circuit made for a model of another shape, before any folder is written."""
    g, w = circuit.graph, lm.weights
    if (g.n_layers, g.n_heads, g.n_kv_heads) != (w.n_layers, w.n_heads, w.n_kv_heads):
        raise KcircuitsError(f"this circuit was made for a {g.n_layers}-layer model with {g.n_heads} heads "
                             f"({g.n_kv_heads} kv-heads), this model ({lm.name}) has {w.n_layers} layers with "
                             f"{w.n_heads} heads ({w.n_kv_heads} kv-heads); evaluate it with the model it came from")


evaluate.__doc__ += settings_doc(ScoringSettings, PromptSettings, EvaluationSettings, RunSettings)
