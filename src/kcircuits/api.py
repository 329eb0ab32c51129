"""The Python API behind every CLI command: discover and evaluate knowledge circuits, end to end.

``discover`` = prompts -> attribution scores -> circuit -> evaluation -> run folder with report;
``evaluate`` = an existing circuit evaluated on any relations' prompts. Each step's result is
written to the run folder as soon as it exists and reused by a rerun with the same config.
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kcircuits import __version__
from kcircuits.ablation import check_ablation, mean_activations
from kcircuits.analyze.head_roles import RoleThresholds, answer_range_of
from kcircuits.batching import ANSWER_SCORING, Batch, make_batches
from kcircuits.data import build_prompts, cap_pairs, load_dataset, split_samples
from kcircuits.data.prompts import SKIP_ANSWER_COLLISION, SKIP_NO_SAME_LENGTH, TemplateSpec
from kcircuits.discover.eap import METHODS, attribute, integration_points
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.evaluate import CURVE_PERCENTS, Evaluator
from kcircuits.explain import Explanation, explain
from kcircuits.graph import Circuit, Graph
from kcircuits.metrics import METRICS, answer_rank
from kcircuits.models import LoadedModel, load_model
from kcircuits.report import write_report
from kcircuits.report_data import build_report
from kcircuits.runs import RunFolder, default_run_dir
from kcircuits.selection import select, select_by_threshold


@dataclass
class PromptSplit:
    """The prompt pairs of one relation for one role (discovery or test), with what was skipped."""

    relation: str
    role: str  # "discover" | "test" | "all"
    pairs: list
    skipped: dict[str, int]
    n_candidates: int

    def to_json(self) -> dict:
        return {"relation": self.relation, "role": self.role, "n_pairs": len(self.pairs), "skipped": self.skipped,
                "n_candidates": self.n_candidates,
                "pairs": [{"clean": p.clean_text, "corrupt": p.corrupt_text, "answer": p.object,
                           "corrupt_answer": p.corrupt_object, "n_tokens": len(p.clean_ids)} for p in self.pairs]}


@dataclass
class RunOutput:
    folder: Path
    circuit: Circuit
    metrics: dict
    scores: torch.Tensor | None = None
    prompts: dict = field(default_factory=dict)

    @property
    def report(self) -> Path:
        return self.folder / "report.html"


def _model(model: str | LoadedModel, device, dtype) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)


@torch.no_grad()
def answer_ranks(engine: Engine, pairs: list, pad_id: int, batch_size: int, *, mask: torch.Tensor | None = None,
                 ablated: torch.Tensor | None = None,
                 answer_scoring: str = "first_token") -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rank of each pair's answer (1 = top; ties count against it) and its own top token, ``[n]`` each.

    The rank is the first answer token's, or with ``answer_scoring="full"`` the worst of the answer's
    tokens under teacher forcing (see :func:`kcircuits.metrics.answer_rank`). With ``mask``
    (``[n_src, n_dst]``, 0 = patched) the patched model's, its patched edges carrying ``ablated``
    (batch-independent, e.g. dataset means ``[n_src, 1, 1, d]``, or None for zero).
    """
    ranks, top = [], []
    device = engine.w.W_E.device
    mask = None if mask is None else mask.to(device)
    for batch in make_batches(pairs, pad_id, batch_size, answer_scoring):
        batch = batch.to(device)
        logits = engine.run(engine.embed(batch.clean), batch.target_pos, mask=mask, ablated=ablated).logits
        ranks.append(answer_rank(logits, batch).cpu())
        top.append(logits[:, 0].argmax(-1).cpu())
    return torch.cat(ranks), torch.cat(top)


def known_filter(engine: Engine, pairs: list, pad_id: int, top_k: int, batch_size: int,
                 answer_scoring: str = "first_token") -> tuple[list, int]:
    """Keep the pairs whose answer the model ranks within ``top_k`` on the clean prompt (whole answers:
    every token within ``top_k`` under teacher forcing)."""
    ranks, _ = answer_ranks(engine, pairs, pad_id, batch_size, answer_scoring=answer_scoring)
    kept = [p for p, r in zip(pairs, ranks.tolist()) if r <= top_k]
    return kept, len(pairs) - len(kept)


#: Which prompt sets the known-facts filter applies to: both halves of a split, or only the half the
#: circuit is found on (the Knowledge Circuits paper's protocol: test on every held-out fact).
KNOWN_ONLY_ON = ("both", "discover")


def empty_prompts_hint(skipped: dict[str, int], n_candidates: int, answer_scoring: str) -> str:
    """What to do when filtering left no prompt pair, from the reason that removed the most candidates."""
    if not skipped or not any(skipped.values()):
        return "add samples to the relation"
    reason = max(skipped, key=lambda k: skipped[k])
    if reason == SKIP_ANSWER_COLLISION and answer_scoring == "first_token":
        return ("the answers share their first token with every same-length partner (a tokenizer that splits "
                "numbers such as years into digits does this): score whole answers with --answer-scoring full "
                "--metric logprob (answer_scoring='full', metric='logprob'), or use answers that differ in their "
                "first token")
    if reason == SKIP_ANSWER_COLLISION:
        return "the answers' tokens are the same for every same-length partner; add samples with other answers"
    if reason == SKIP_NO_SAME_LENGTH:
        return ("no other subject gives a prompt of the same token length; add subjects of similar length or "
                "other templates")
    if reason.startswith("not_known_top"):
        return "the model knows too few of these facts: try without --known-only, a larger --known-k, or more samples"
    return "add samples to the relation, or use other templates"


def prepare_prompts(model: LoadedModel, engine: Engine, relation: str, *, split: float | None, known_only: bool,
                    known_k: int, max_pairs: int | None, seed: int, batch_size: int,
                    templates: Sequence[TemplateSpec] | None = None, known_only_on: str = "both",
                    answer_scoring: str = "first_token", roles: Sequence[str] | None = None) -> dict[str, PromptSplit]:
    """Build the prompt pairs of a relation: one set ("all"), or disjoint "discover"/"test" halves by subject.

    Every set is built the same way: all pairs, then the known-facts filter where it applies
    (``known_only`` on the sets named by ``known_only_on``), then the cap of ``max_pairs``
    (:func:`kcircuits.data.cap_pairs`). ``roles`` limits which sets are built (e.g. only "test").
    """
    if known_only_on not in KNOWN_ONLY_ON:
        raise KcircuitsError(f"unknown --known-only-on {known_only_on!r}: use one of {', '.join(KNOWN_ONLY_ON)}")
    ds = load_dataset(relation)
    parts = {"all": ds} if split is None else dict(zip(("discover", "test"), split_samples(ds, split, seed)))
    out = {}
    for role, part in parts.items():
        if roles is not None and role not in roles:
            continue
        ps = build_prompts(part, model.tokenizer, templates=templates, seed=seed, answer_scoring=answer_scoring)
        skipped = dict(ps.skipped)
        pairs = list(ps.pairs)
        if known_only and pairs and (known_only_on == "both" or role != "test"):
            pairs, dropped = known_filter(engine, pairs, model.pad_token_id, known_k, batch_size, answer_scoring)
            skipped[f"not_known_top{known_k}"] = dropped
        capped = cap_pairs(pairs, max_pairs, seed)
        if len(capped) < len(pairs):  # a choice, not a failure, but still counted so nothing disappears silently
            skipped["over_max_pairs"] = len(pairs) - len(capped)
        pairs = capped
        if not pairs:
            reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items() if v) or "none"
            raise KcircuitsError(
                f"relation {ds.name!r} ({role}): no usable prompt pairs after filtering ({ps.n_candidates} candidates; "
                f"skipped {reasons}); {empty_prompts_hint(skipped, ps.n_candidates, answer_scoring)}"
            )
        out[role] = PromptSplit(ds.name, role, pairs, skipped, ps.n_candidates)
    return out


def model_batches(model: LoadedModel, pairs: list, batch_size: int, answer_scoring: str) -> list[Batch]:
    """Prompt pairs as batches on the model's device (one :class:`~kcircuits.batching.Batch` per ``batch_size``)."""
    return [b.to(model.device) for b in make_batches(pairs, model.pad_token_id, batch_size, answer_scoring)]


def _environment() -> dict:
    return {"kcircuits": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _validate(method: str, metric: str, ablation: str, answer_scoring: str, selection: str) -> None:
    if method not in METHODS:
        raise KcircuitsError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if metric not in METRICS:
        raise KcircuitsError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    check_ablation(ablation)
    if answer_scoring not in ANSWER_SCORING:
        raise KcircuitsError(f"unknown answer scoring {answer_scoring!r}: use one of {', '.join(ANSWER_SCORING)}")
    if answer_scoring == "full" and metric == "logit_diff":
        raise KcircuitsError("the logit difference compares single tokens; with --answer-scoring full use --metric logprob or prob")
    if selection not in ("topn", "greedy", "threshold"):
        raise KcircuitsError(f"unknown selection {selection!r}: use topn, greedy or threshold")


def check_settings(method: str, steps: int, metric: str, ablation: str, batch_size: int, *,
                   answer_scoring: str = "first_token", selection: str = "topn") -> None:
    """Fail on bad attribution settings before a model is loaded or a run folder written."""
    _validate(method, metric, ablation, answer_scoring, selection)
    integration_points(method, steps)
    if batch_size < 1:
        raise KcircuitsError("batch size must be >= 1")


def discover(
    relation: str = "country_capital",
    model: str | LoadedModel = "smollm2-135m",
    *,
    out: str | Path | None = None,
    method: str = "eap-ig",
    steps: int = 5,
    metric: str = "logit_diff",
    ablation: str = "corrupt",
    selection: str = "topn",
    n_edges: int | None = None,
    percent: float | None = None,
    threshold: float | None = None,
    absolute: bool = True,
    split: float | None = None,
    known_only: bool = False,
    known_k: int = 1,
    known_only_on: str = "both",
    answer_scoring: str = "first_token",
    max_pairs: int | None = 64,
    templates: Sequence[TemplateSpec] | None = None,
    batch_size: int = 8,
    curve: bool = True,
    curve_percents: Sequence[float] = CURVE_PERCENTS,
    n_random: int = 3,
    grouped: bool = True,
    export_mib: bool = False,
    explain_prompts: int = 16,
    thresholds: RoleThresholds | None = None,
    device: str | None = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    progress: bool = True,
) -> RunOutput:
    """Find the circuit of one relation and evaluate it; write everything to a run folder.

    The circuit size is ``n_edges``, or ``percent`` of all edges, or every edge scoring at least
    ``threshold`` (default: 1% of the edges). With ``split`` (e.g. 0.5) the circuit is found on
    that fraction of the relation's subjects and evaluated on the rest; ``known_only`` keeps the facts
    the model ranks within ``known_k``, on both halves or (``known_only_on="discover"``, the
    Knowledge Circuits paper's protocol) only on the half the circuit is found on. ``templates``
    selects prompt templates by index, or an LRE file's zero-shot ones by ``"zs0"``. The first
    ``explain_prompts`` test prompts (0: none) are explained: logit lens, head roles, composition.
    """
    check_settings(method, steps, metric, ablation, batch_size, answer_scoring=answer_scoring,
                   selection="threshold" if threshold is not None else selection)
    if split is not None and not 0 < split < 1:
        raise KcircuitsError(f"--split must be a fraction strictly between 0 and 1, got {split}")
    if known_only_on not in KNOWN_ONLY_ON:
        raise KcircuitsError(f"unknown --known-only-on {known_only_on!r}: use one of {', '.join(KNOWN_ONLY_ON)}")
    model_name = model.name if isinstance(model, LoadedModel) else model
    reproduce = dict(command="discover", relation=relation, model=model_name, method=method, steps=steps, metric=metric,
                     ablation=ablation, selection=selection, n_edges=n_edges, percent=percent, threshold=threshold,
                     absolute=absolute, split=split, known_only=known_only, known_k=known_k,
                     known_only_on=known_only_on, answer_scoring=answer_scoring, max_pairs=max_pairs,
                     templates=None if templates is None else list(templates), grouped=grouped,
                     dtype=dtype, seed=seed, curve=curve, curve_percents=list(curve_percents), n_random=n_random,
                     explain_prompts=explain_prompts, thresholds=asdict(thresholds or RoleThresholds()))
    load_dataset(relation)  # fail on a bad relation before anything is loaded or written
    folder = Path(out) if out else default_run_dir("discover", [Path(relation).stem, Path(model_name).name, method], reproduce)
    torch.manual_seed(seed)
    lm = _model(model, device, dtype)  # before the run folder: a model that fails to load writes nothing
    run = RunFolder(folder, {"reproduce": reproduce, "environment": _environment(),
                             "batch_size": batch_size, "device": str(device)})
    graph = Graph.from_model(lm.weights, grouped=grouped)
    engine = Engine(lm.weights, graph)

    # 1. prompts
    sets = prepare_prompts(lm, engine, relation, split=split, known_only=known_only, known_k=known_k,
                           max_pairs=max_pairs, seed=seed, batch_size=batch_size, templates=templates,
                           known_only_on=known_only_on, answer_scoring=answer_scoring)
    run.write_json("prompts.json", {role: s.to_json() for role, s in sets.items()})
    found_on = sets.get("discover", sets.get("all"))
    tested_on = sets.get("test", found_on)
    disc_batches = model_batches(lm, found_on.pairs, batch_size, answer_scoring)

    # 2. attribution scores (reused when present)
    if run.has("scores.safetensors"):
        scores = run.read_tensors("scores.safetensors")["scores"].to(lm.device)
    else:
        mean = mean_activations(engine, disc_batches) if ablation == "mean" else None
        scores = _attribute_resumable(run, engine, disc_batches, method=method, metric=metric, steps=steps,
                                      ablation=ablation, mean=mean, progress=progress)
        run.write_tensors("scores.safetensors", {"scores": scores},
                          {"src_names": ",".join(graph.src_names), "dst_names": ",".join(graph.dst_names)})
        run.file(PARTIAL_SCORES).unlink(missing_ok=True)

    # 3. circuit
    if threshold is not None:
        circuit = select_by_threshold(graph, scores.cpu(), threshold, absolute=absolute)
    else:
        if n_edges is None:
            n_edges = max(1, round(graph.n_edges * (percent if percent is not None else 1.0) / 100))
        circuit = select(graph, scores.cpu(), n_edges, selection=selection, absolute=absolute)
    if circuit.n_edges == 0:
        raise KcircuitsError("the selected circuit is empty after pruning; select more edges (--edges/--percent) or lower --threshold")
    run.write_json("circuit.json", circuit.to_json({"model": model_name, "relation": found_on.relation,
                                                    "method": method, "metric": metric}))
    if export_mib:  # every edge with its score, in the EAP-IG / MIB graph format
        run.write_json("circuit_mib.json", circuit.to_mib_json())

    # 4. evaluation (reused when present)
    if run.has("metrics.json"):
        metrics = run.read_json("metrics.json")
    else:
        metrics = evaluate_circuit(engine, circuit, scores.cpu(), {"discover": found_on} if tested_on is found_on else
                                   {"discover": found_on, "test": tested_on}, lm, metric=metric, ablation=ablation,
                                   answer_scoring=answer_scoring, batch_size=batch_size, curve=curve,
                                   curve_percents=curve_percents, selection=selection, absolute=absolute,
                                   n_random=n_random, seed=seed, progress=progress)
        run.write_json("metrics.json", metrics)

    # 5. explanation: logit lens (clean and circuit-only), head roles, composition, on the test prompts
    view = None
    if explain_prompts:
        view = explain_circuit(run, engine, lm, circuit, tested_on.pairs[:explain_prompts],
                               answer_range_of([p for s in sets.values() for p in s.pairs]), ablation=ablation,
                               batch_size=batch_size, thresholds=thresholds)

    # 6. report
    write_report(run.file("report.html"), _report(run.config, circuit, metrics, sets, graph, scores, view, lm.tokenizer))
    return RunOutput(run.path, circuit, metrics, scores, sets)


def explain_circuit(run: RunFolder, engine: Engine, lm: LoadedModel, circuit: Circuit, pairs: list,
                    answer_range: list[int], *, ablation: str, batch_size: int,
                    thresholds: RoleThresholds | None) -> Explanation:
    """:func:`kcircuits.explain.explain` with the model's tokenizer, padding and device; writes
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


PARTIAL_SCORES = "scores.partial.safetensors"


def _attribute_resumable(run: RunFolder, engine: Engine, batches: list[Batch], **kwargs) -> torch.Tensor:
    """Attribution that checkpoints its running sums after every batch and resumes from them."""
    resume = None
    if run.has(PARTIAL_SCORES):
        from safetensors import safe_open

        with safe_open(str(run.file(PARTIAL_SCORES)), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = run.read_tensors(PARTIAL_SCORES)
        resume = (int(meta.get("done", 0)), tensors["scores"].to(batches[0].clean.device), meta.get("layout", ""))

    def checkpoint(done: int, layout: str, partial: torch.Tensor) -> None:
        if done < len(layout.split(",")):
            run.write_tensors(PARTIAL_SCORES, {"scores": partial}, {"done": done, "layout": layout})

    return attribute(engine, batches, resume=resume, on_batch=checkpoint, **kwargs)


def evaluate_circuit(engine: Engine, circuit: Circuit, scores: torch.Tensor | None, sets: dict[str, PromptSplit],
                     lm: LoadedModel, *, metric: str, ablation: str, answer_scoring: str, batch_size: int,
                     curve: bool, curve_percents: Sequence[float], selection: str, absolute: bool, n_random: int,
                     seed: int, progress: bool) -> dict:
    """Evaluate a circuit on each prompt set; the curve and random baseline on the last (test) set."""
    out: dict = {"sets": {}}
    last = list(sets)[-1]
    for role, ps in sets.items():
        batches = model_batches(lm, ps.pairs, batch_size, answer_scoring)
        mean = mean_activations(engine, batches) if ablation == "mean" else None
        ev = Evaluator(engine, batches, metric=metric, ablation=ablation, mean=mean, progress=progress)
        res = ev.evaluate(circuit)
        res.update(relation=ps.relation, role=role, skipped=ps.skipped)
        if role == last and n_random > 0 and circuit.n_edges:
            res["random_baseline"] = ev.random_baselines(circuit, n_random, seed)
        if role == last and curve and scores is not None:
            out["curve"] = ev.curve(scores, curve_percents, selection=selection, absolute=absolute,
                                    random_baseline=n_random > 0, seed=seed)
            out["curve"]["set"] = role
        out["sets"][role] = res
    return out


def evaluate(
    circuit: str | Path | Circuit,
    relations: Sequence[str],
    model: str | LoadedModel = "smollm2-135m",
    *,
    out: str | Path | None = None,
    metric: str = "logit_diff",
    ablation: str = "corrupt",
    answer_scoring: str = "first_token",
    known_only: bool = False,
    known_k: int = 1,
    max_pairs: int | None = 64,
    split: float | None = None,
    templates: Sequence[TemplateSpec] | None = None,
    batch_size: int = 8,
    n_random: int = 3,
    explain_prompts: int = 16,
    thresholds: RoleThresholds | None = None,
    device: str | None = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    progress: bool = True,
) -> RunOutput:
    """Evaluate an existing circuit (a ``circuit.json`` or a run folder) on the prompts of several relations,
    and explain it (logit lens, head roles, composition) on the first ``explain_prompts`` prompts of the first.

    With ``split`` the circuit is evaluated on the held-out part of each relation: the subjects that
    ``discover(..., split=split, seed=seed)`` did not find it on. ``known_only`` filters the evaluated
    prompts; leave it off to test on every held-out fact (the Knowledge Circuits paper's test set).
    ``templates`` and ``max_pairs`` choose and cap the prompts as in :func:`discover`.
    """
    if split is not None and not 0 < split < 1:
        raise KcircuitsError(f"--split must be a fraction strictly between 0 and 1, got {split}")
    _validate("eap", metric, ablation, answer_scoring, "topn")
    if not relations:
        raise KcircuitsError("give at least one relation to evaluate on")
    if not isinstance(circuit, Circuit):
        path = Path(circuit)
        path = path / "circuit.json" if path.is_dir() else path
        if not path.exists():
            raise KcircuitsError(f"no circuit at {path}; pass a circuit.json or a discover run folder")
        import json

        from kcircuits.io import read_json

        try:
            circuit = Circuit.from_json(read_json(path))
        except json.JSONDecodeError as exc:
            raise KcircuitsError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    model_name = model.name if isinstance(model, LoadedModel) else model
    edge_names = sorted(f"{s}->{d}" for s, d, _ in circuit.edge_list())
    reproduce = dict(command="evaluate", circuit_n_edges=len(edge_names),
                     circuit_sha256=hashlib.sha256("\n".join(edge_names).encode()).hexdigest(),
                     relations=list(relations), model=model_name, metric=metric, ablation=ablation,
                     answer_scoring=answer_scoring, known_only=known_only, known_k=known_k, max_pairs=max_pairs,
                     split=split, templates=None if templates is None else list(templates), dtype=dtype, seed=seed, n_random=n_random, explain_prompts=explain_prompts,
                     thresholds=asdict(thresholds or RoleThresholds()))
    folder = Path(out) if out else default_run_dir("evaluate", [Path(model_name).name] + [Path(r).stem for r in relations][:3],
                                                   reproduce)
    for rel in relations:
        load_dataset(rel)  # fail on a bad relation before anything is loaded or written
    lm = _model(model, device, dtype)  # before the run folder: a model that fails to load writes nothing
    run = RunFolder(folder, {"reproduce": reproduce, "environment": _environment(), "batch_size": batch_size,
                             "device": str(device)})
    g = circuit.graph
    if (g.n_layers, g.n_heads, g.n_kv_heads) != (lm.weights.n_layers, lm.weights.n_heads, lm.weights.n_kv_heads):
        raise KcircuitsError(f"the circuit was found on a model with {g.n_layers} layers x {g.n_heads} heads, "
                             f"not on {model_name!r}; evaluate it with the model it came from")
    engine = Engine(lm.weights, g)
    run.write_json("circuit.json", circuit.to_json({"model": model_name}))
    per_relation, all_sets = {}, {}

    def evaluation_prompts(rel: str) -> PromptSplit:
        """All of a relation's prompts, or with ``split`` its held-out ("test") part."""
        sets = prepare_prompts(lm, engine, rel, split=split, known_only=known_only, known_k=known_k,
                               max_pairs=max_pairs, seed=seed, batch_size=batch_size, templates=templates,
                               answer_scoring=answer_scoring, roles=("all", "test"))
        return sets["all" if split is None else "test"]

    for rel in relations:
        name = Path(rel).stem
        if run.has(f"metrics_{name}.json"):
            per_relation[name] = run.read_json(f"metrics_{name}.json")
            continue
        ps = evaluation_prompts(rel)
        all_sets[name] = ps
        res = evaluate_circuit(engine, circuit, None, {name: ps}, lm, metric=metric, ablation=ablation,
                               answer_scoring=answer_scoring, batch_size=batch_size, curve=False, curve_percents=(),
                               selection="topn", absolute=True, n_random=n_random, seed=seed, progress=progress)
        per_relation[name] = res["sets"][name]
        run.write_json(f"metrics_{name}.json", per_relation[name])
    metrics = {"sets": per_relation}
    run.write_json("metrics.json", metrics)
    ex = None
    if explain_prompts:  # the explanation on the first relation's prompts
        first = Path(relations[0]).stem
        ps = all_sets.get(first) or evaluation_prompts(relations[0])
        ex = explain_circuit(run, engine, lm, circuit, ps.pairs[:explain_prompts], answer_range_of(ps.pairs),
                             ablation=ablation, batch_size=batch_size, thresholds=thresholds)
    write_report(run.file("report.html"), _report(run.config, circuit, metrics, all_sets, g, None, ex, lm.tokenizer))
    return RunOutput(run.path, circuit, metrics, None, all_sets)
