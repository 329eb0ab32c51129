"""The Python API behind ``kcircuits trace``: causal tracing of a relation's facts, end to end, into a run folder.

``trace`` = relation -> prompts (one template filled with each subject; optionally only the facts the
model knows; at most ``max_prompts``) -> :func:`kcircuits.edit.trace.causal_trace` -> ``trace.json``
(every prompt's trace, the mean indirect effects by ROME's position groups, the critical layer) and
``report.html`` (heatmaps). The run folder is keyed by the settings and the weights' fingerprint like
every other command's (DESIGN.md decision 12), so a rerun reuses ``trace.json`` and an edited model
gets a trace of its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import fmean
from typing import Any

from kcircuits.data import load_dataset
from kcircuits.data.prompts import select_templates
from kcircuits.edit.edit_circuits import edit_circuits
from kcircuits.edit.metrics import compare_metrics, edit_metrics
from kcircuits.edit.registry import EditInputs, get_edit_method
from kcircuits.edit.requests import load_requests, source_shape, validate_requests
from kcircuits.edit.settings import (
    MEASURED_LAYERS,
    EditSettings,
    FinetuneOptions,
    RequestSettings,
    TraceSettings,
    ValueSettings,
)
from kcircuits.edit.stats import generated_corpus, key_second_moment
from kcircuits.errors import KcircuitsError
from kcircuits.edit.trace import TraceResult, causal_trace
from kcircuits.engine import Engine
from kcircuits.graph import Graph
from kcircuits.models import LoadedModel
from kcircuits.models.edits import edited, load_delta, save_delta
from kcircuits.pipeline import PromptSplit, model_name, open_run, prepare_prompts
from kcircuits.report import write_report
from kcircuits.runs import RunFolder
from kcircuits.settings import (
    PromptSettings,
    RunSettings,
    hashed_dict,
    reject_unknown,
    resolve,
    resolve_all,
    settings_doc,
)
from kcircuits.io import json_default
from kcircuits.steps import StepCache, json_digest, step_key

__all__ = ["BENCH_METRICS", "SPREAD_METHODS", "TRACE_FILE", "EditOutput", "TraceOutput", "TraceSettings",
           "context_prefixes", "edit", "edit_bench", "edit_circuits", "read_timings", "trace", "trace_prompts",
           "with_layer"]

#: the run folder's trace: TraceResult.to_json() plus the relation and a summary of the probabilities
TRACE_FILE = "trace.json"


@dataclass
class TraceOutput:
    """What :func:`trace` produced; everything is also in ``folder``.

    Attributes:
        folder: the run folder (``config.json``, ``prompts.json``, ``trace.json``, ``report.html``).
        result: the :class:`~kcircuits.edit.trace.TraceResult` (per prompt and kind ``[L, P]`` restored
            probabilities; ``mean_effect(kind)`` ``[L, 6]``).
        critical_layer: the layer with the largest mean MLP indirect effect at the subject's last token
            (ROME's default edit layer); None when the MLP was not traced.
        report: (property) the path of ``report.html``.
    """

    folder: Path
    result: TraceResult
    critical_layer: int | None

    @property
    def report(self) -> Path:
        """The run's ``report.html``."""
        return self.folder / "report.html"


def trace(relation: str, model: str | LoadedModel = "smollm2-135m", *, out: str | Path | None = None,
          settings: TraceSettings | None = None, progress: bool = True, **options) -> TraceOutput:
    """Causal tracing (Meng et al. 2022) of a relation's facts: where does the model recall them?

    The relation's template ``template`` is filled with each subject and the subject's object is the
    answer; with ``known_only`` only the facts whose answer the model ranks within ``known_k`` are
    kept, then a seeded choice of at most ``max_prompts``. Each prompt is traced by
    :func:`kcircuits.edit.trace.causal_trace` (docs/editing.md, "Causal tracing"). The relation and
    the settings are checked before the model is loaded; a rerun with the same settings and weights
    reuses the folder's ``trace.json``.

    Args:
        relation: a bundled relation name (``kcircuits datasets`` lists them) or a .json/.csv file.
        model: ``"smollm2-135m"`` (bundled), a local Hugging Face folder, a hub id, or a
            :class:`~kcircuits.models.LoadedModel` (e.g. one you edited).
        out: the run folder; default ``runs/trace_<relation>_<model>_<hash>``, the hash covering the
            settings that change the trace and the weights' fingerprint.
        settings: a :class:`~kcircuits.edit.settings.TraceSettings` (fields listed below), or pass its
            fields by name, e.g. ``samples=4, known_only=False``.
        progress: show progress bars.

    Returns:
        :class:`TraceOutput`: the folder, the trace and the critical layer.

    Settings (each also accepted by field name):

    """
    st = resolve(TraceSettings, settings, options)
    reject_unknown(options, "trace")
    select_templates(load_dataset(relation), [st.template])  # a bad relation or template: nothing loaded or written
    name = model_name(model)

    def reproduce(lm: LoadedModel) -> dict:
        return {"command": "trace", "relation": relation, "model": name, "weights": lm.fingerprint,
                "trace": hashed_dict(st)}

    run_folder, lm = open_run("trace", [Path(relation).stem, Path(name).name], reproduce, out, model,
                              run_settings(st))
    with run_folder.removed_if_failed():
        result = _trace_result(run_folder, lm, relation, st, progress)
        with run_folder.timed("report"):
            write_report(run_folder.file("report.html"), _report(run_folder, relation, result))
    critical = result.critical_layer() if "mlp" in result.kinds else None
    return TraceOutput(run_folder.path, result, critical)


trace.__doc__ += settings_doc(TraceSettings, param="settings")


def run_settings(st: TraceSettings) -> RunSettings:
    """The :class:`~kcircuits.settings.RunSettings` the shared steps take (model loading, the run folder's
    machine settings, the known-facts filter's batches), from the trace's own device, dtype, batch and seed."""
    return RunSettings(device=st.device, dtype=st.dtype, batch_size=st.batch_size, seed=st.seed)


def trace_prompts(lm: LoadedModel, relation: str, st: TraceSettings, cache: StepCache | None = None) -> PromptSplit:
    """The prompts of ``relation`` to trace with model ``lm``: template ``st.template`` filled with each
    subject, the known-facts filter when ``st.known_only``, then at most ``st.max_prompts`` (seeded by
    ``st.seed``), built by :func:`kcircuits.pipeline.prepare_prompts` like every command's prompts (so a
    subject with no same-length partner for its corrupted twin is skipped too, and counted). The
    filter's ranks come from ``cache`` when it holds them."""
    prompts = PromptSettings(known_only=st.known_only, known_k=st.known_k, max_pairs=st.max_prompts,
                             templates=(st.template,))
    engine = Engine(lm.weights, Graph.from_model(lm.weights)) if st.known_only else None
    return prepare_prompts(lm, engine, relation, settings=prompts, seed=st.seed, batch_size=st.batch_size,
                           cache=cache)["all"]


def _trace_result(run: RunFolder, lm: LoadedModel, relation: str, st: TraceSettings, progress: bool) -> TraceResult:
    """The run folder's trace when an earlier run finished it, else the prompts and the trace, each written
    as soon as it exists."""
    if run.has(TRACE_FILE):
        return TraceResult.from_json(run.read_json(TRACE_FILE))
    with run.timed("prompts (known filter)"):
        split = trace_prompts(lm, relation, st, StepCache.default())
    run.write_json("prompts.json", {"all": split.to_json()})
    pairs = split.pairs
    with run.timed("causal trace"):
        result = causal_trace(lm, [p.clean_text for p in pairs], [p.subject for p in pairs], [p.object for p in pairs],
                              noise=st.noise, samples=st.samples, window=st.window, kinds=st.kinds, seed=st.seed,
                              batch_size=st.batch_size, progress=progress)
    run.write_json(TRACE_FILE, {"relation": relation, "summary": trace_summary(result), **result.to_json()})
    return result


def trace_summary(result: TraceResult) -> dict[str, Any]:
    """The trace's headline numbers (``trace.json``'s ``summary``): ``n_prompts`` traced, the mean
    p(answer) clean and with the subject corrupted, and the ``critical_layer`` when the MLP was traced."""
    out: dict[str, Any] = {"n_prompts": len(result.prompts), "p_clean_mean": fmean(p.p_clean for p in result.prompts),
                           "p_corrupt_mean": fmean(p.p_corrupt for p in result.prompts)}
    if "mlp" in result.kinds:
        out["critical_layer"] = result.critical_layer()
    return out


def _report(run: RunFolder, relation: str, result: TraceResult) -> dict:
    """The report dict: the summary, the trace (read by :mod:`kcircuits.report.heatmap`), the prompts skipped
    and the configuration."""
    reproduce = run.config["reproduce"]
    numbers = trace_summary(result)
    summary = {"model": reproduce["model"], "weights": reproduce["weights"], "relation": relation,
               "template": reproduce["trace"]["template"], "prompts traced": numbers["n_prompts"],
               "mean p(answer), clean": numbers["p_clean_mean"],
               "mean p(answer), subject corrupted": numbers["p_corrupt_mean"],
               "noise (× embedding std)": result.noise, "noise std": result.noise_std,
               "noise draws": result.samples, "window (layers)": result.window}
    if "critical_layer" in numbers:
        summary["critical layer (largest MLP effect at the subject's last token)"] = numbers["critical_layer"]
    report = {"title": f"Causal tracing: {relation} in {reproduce['model']}", "summary": summary,
              "trace": result.to_json(), "config": run.config}
    if run.has("prompts.json"):
        report["skipped"] = run.read_json("prompts.json")["all"]["skipped"]
    return report


# --------------------------------------------------------------------------- kcircuits edit
#: the metrics the edit's report table shows, before and after (kcircuits.edit.metrics.REQUEST_METRICS)
SHOWN_METRICS = ("efficacy_success", "efficacy_margin", "generalisation_success", "generalisation_margin",
                 "specificity_success", "specificity_margin", "other_specificity_success", "fluency")


@dataclass
class EditOutput:
    """What :func:`edit` produced; everything is also in ``folder``.

    Attributes:
        folder: the run folder (``edits.json``, ``delta.safetensors``, ``edit_metrics.json``, ``report.html``).
        deltas: the weight change ``{param_name: Δ}`` (apply it with :func:`kcircuits.models.edits.edited`).
        metrics: ``edit_metrics.json``: ``before`` and ``after`` (:func:`kcircuits.edit.metrics.edit_metrics`)
            and ``change`` (:func:`kcircuits.edit.metrics.compare_metrics`).
        report: (property) the path of ``report.html``.
    """

    folder: Path
    deltas: dict
    metrics: dict

    @property
    def report(self) -> Path:
        """The run's ``report.html``."""
        return self.folder / "report.html"


def edit(source: str, model: str | LoadedModel = "smollm2-135m", *, out: str | Path | None = None,
         settings: EditSettings | None = None, requests: RequestSettings | None = None,
         value: ValueSettings | None = None, finetune: FinetuneOptions | None = None, progress: bool = True,
         **options) -> EditOutput:
    """Write edit requests into a model with a registered edit method and measure what the edit did.

    The requests come from ``source`` (a bundled relation, a relation file, or a CounterFact / zsRE JSON
    file; :func:`kcircuits.edit.requests.load_requests`). The edit metrics (efficacy, generalisation,
    specificity, fluency, log-perplexity) are measured before and after; the weight change is saved as
    ``delta.safetensors`` and the model is left as it was. The run folder's hash covers the settings,
    the requests and the weights' fingerprint; a rerun reuses the saved delta and metrics.

    Args:
        source: a bundled relation name, a relation .json/.csv, or a CounterFact / zsRE .json file.
        model: ``"smollm2-135m"``, a local HF folder, a hub id or a :class:`~kcircuits.models.LoadedModel`.
        out: the run folder (default ``runs/edit_<source>_<model>_<method>_<hash>``).
        settings: :class:`~kcircuits.edit.settings.EditSettings` (method, layer, key statistics, ...).
        requests: :class:`~kcircuits.edit.settings.RequestSettings` (how many, neighbours, ...).
        value: :class:`~kcircuits.edit.settings.ValueSettings` (ROME/MEMIT's value optimisation).
        finetune: :class:`~kcircuits.edit.settings.FinetuneOptions` (FT-L/FT-M).
        progress: show progress bars.

    Returns:
        :class:`EditOutput`: the folder, the deltas and the metrics.

    Settings (each also accepted by field name):

    """
    given = {EditSettings: settings, RequestSettings: requests, ValueSettings: value, FinetuneOptions: finetune}
    st = resolve_all(options, given, (EditSettings, RequestSettings, ValueSettings, FinetuneOptions), "edit")
    es, rq, vs, fs = st[EditSettings], st[RequestSettings], st[ValueSettings], st[FinetuneOptions]
    method = get_edit_method(es.method)
    reqs = load_requests(source, rq.n, es.seed, **_relation_options(source, rq))  # bad source: nothing loaded
    name = model_name(model)

    def reproduce(lm: LoadedModel) -> dict:
        return {"command": "edit", "source": str(source), "model": name, "weights": lm.fingerprint,
                "edit": hashed_dict(es), "requests": hashed_dict(rq), "value": hashed_dict(vs),
                "finetune": hashed_dict(fs),
                "requests_sha256": json_digest([r.to_dict() for r in reqs], length=64)}

    def check(lm: LoadedModel) -> None:  # before reproduce(): the folder's hash covers the layer edited
        nonlocal es
        es = with_layer(es, lm)

    run_folder, lm = open_run("edit", [Path(str(source)).stem, Path(name).name, es.method], reproduce, out, model,
                              RunSettings(device=es.device, dtype=es.dtype, batch_size=es.batch_size, seed=es.seed),
                              check=check)
    with run_folder.removed_if_failed():
        reqs = validate_requests(reqs, lm.tokenizer, one_batch=method.batched)
        run_folder.write_json("edits.json", {"method": es.method, "requests": [r.to_dict() for r in reqs]})
        cache = StepCache.default()
        held_out = (generated_corpus(lm, n_texts=es.perplexity_texts, n_tokens=es.corpus_tokens, seed=es.seed + 1,
                                     cache=cache) if es.perplexity_texts else None)
        measure = dict(generation_tokens=es.generation_tokens, perplexity_texts=held_out, batch_size=es.batch_size)
        # the unedited model's metrics depend on the weights, the requests and the measurement only: every
        # method of an edit-bench shares them through the step cache
        before_key = step_key("edit_metrics", weights=lm.fingerprint, dtype=str(lm.dtype),
                              requests=json_digest([r.to_dict() for r in reqs]), generation_tokens=es.generation_tokens,
                              perplexity_texts=json_digest(held_out), seed=es.seed)
        before = _stored(run_folder, "metrics_before.json",
                         lambda: _cached(cache, "edit_metrics", before_key,
                                         lambda: edit_metrics(lm.hf_model, lm.tokenizer, reqs, **measure)),
                         "metrics before")
        deltas = _edit_deltas(run_folder, lm, method, reqs, es, vs, fs, cache)
        with edited(lm, deltas):
            after = _stored(run_folder, "metrics_after.json",
                            lambda: edit_metrics(lm.hf_model, lm.tokenizer, reqs, **measure), "metrics after")
        metrics = {"before": before, "after": after, "change": compare_metrics(before, after)}
        run_folder.write_json("edit_metrics.json", metrics)
        with run_folder.timed("report"):
            write_report(run_folder.file("report.html"), _edit_report(run_folder, es, reqs, metrics))
    return EditOutput(run_folder.path, deltas, metrics)


edit.__doc__ += settings_doc(EditSettings, param="settings") + "\n" + settings_doc(RequestSettings, param="requests") \
    + "\n" + settings_doc(ValueSettings, param="value") + "\n" + settings_doc(FinetuneOptions, param="finetune")


def _relation_options(source: str, rq: RequestSettings) -> dict:
    """The relation loader's options (files of requests take none)."""
    if source_shape(source) != "relation":
        return {}
    return {"n_paraphrases": rq.n_paraphrases, "n_neighbours": rq.n_neighbours,
            "other_relations": rq.other_relations, "n_other": rq.n_other}


def with_layer(es: EditSettings, lm: LoadedModel) -> EditSettings:
    """``es`` with its edited layer: the one given, else the measured default of the model
    (:data:`~kcircuits.edit.settings.MEASURED_LAYERS`, by model name); checked to exist before the run
    folder is made. A model without a measured layer needs ``--layer``."""
    n = lm.weights.n_layers
    if es.layer is None:
        if lm.name not in MEASURED_LAYERS:
            raise KcircuitsError(f"give the MLP layer to edit with --layer (0..{n - 1}); `kcircuits trace RELATION` "
                                 "prints the critical layer, ROME's choice (docs/editing.md: choosing the layer)")
        es = replace(es, layer=MEASURED_LAYERS[lm.name])
    if es.layer >= n:
        raise KcircuitsError(f"--layer {es.layer} is out of range: the model has layers 0..{n - 1}")
    if es.n_layers > es.layer + 1:
        raise KcircuitsError(f"--n-layers {es.n_layers} ending at --layer {es.layer} would start before layer 0")
    return es


def _cached(cache: StepCache, step: str, key: str, compute) -> dict:
    """``compute()``'s JSON result, read from the step cache when an earlier run stored it (NaN kept)."""
    found = cache.read_json(step, key)
    if isinstance(found, dict):
        return found
    result = json.loads(json.dumps(compute(), default=json_default))  # what the cache gives back
    cache.write_json(step, key, result)
    return result


def _stored(run: RunFolder, name: str, compute, step: str) -> dict:
    """The run folder's ``name`` when an earlier run wrote it, else ``compute()`` written there."""
    if run.has(name):
        return run.read_json(name)
    with run.timed(step):
        result = compute()
    run.write_json(name, result)
    return result


def _edit_deltas(run: RunFolder, lm: LoadedModel, method, reqs: list, es: EditSettings, vs: ValueSettings,
                 fs: FinetuneOptions, cache: StepCache) -> dict:
    """The run folder's saved delta, or the method's, saved with the weights' fingerprint it applies to."""
    if run.has("delta.safetensors"):
        return load_delta(run.file("delta.safetensors"))
    stats: dict[int, Any] = {}

    def key_stats(layer: int):  # the corpus is read or generated only for methods that need C
        if layer not in stats:
            with run.timed("key statistics"):
                texts = (_corpus_texts(es.corpus) if es.corpus else
                         generated_corpus(lm, n_texts=es.corpus_texts, n_tokens=es.corpus_tokens, seed=es.seed,
                                          cache=cache))
                stats[layer] = key_second_moment(lm, layer, texts, batch_size=es.batch_size, cache=cache)
        return stats[layer]

    prefixes = context_prefixes(lm, es.n_prefixes, es.seed, cache)
    with run.timed(f"edit ({method.name})"):
        deltas = method.apply(lm, reqs, EditInputs(es, vs, fs, key_stats, tuple(prefixes)))
    save_delta(run.file("delta.safetensors"), deltas, base_fingerprint=lm.fingerprint)
    return deltas


def _corpus_texts(path: str) -> list[str]:
    from kcircuits.influence.corpus import read_documents

    return [d.text for d in read_documents(path)]


def context_prefixes(lm: LoadedModel, n: int, seed: int, cache: StepCache | None = None) -> list[str]:
    """The bare prompt's empty prefix plus ``n`` short texts the model writes (seeded, cached), each
    ending in ". ": ROME averages the subject's key over such contexts."""
    if n == 0:
        return [""]
    texts = generated_corpus(lm, n_texts=n, n_tokens=8, seed=seed + 2, cache=cache)
    return [""] + [t.strip().replace("\n", " ") + ". " for t in texts]


def _edit_report(run: RunFolder, es: EditSettings, reqs: list, metrics: dict) -> dict:
    """The report: what was edited, the metrics' means before and after, and one row per request."""
    before, after = metrics["before"]["summary"], metrics["after"]["summary"]
    rows = [{"metric": k, "before": before.get(k, {}).get("mean"), "after": after.get(k, {}).get("mean"),
             "n": after.get(k, {}).get("n")} for k in SHOWN_METRICS]
    per_request = [{"subject": r.subject, "prompt": r.prompt_text, "true": r.target_true, "new": r.target_new,
                    **{f"{k} before": b.get(k) for k in ("efficacy_success", "specificity_success")},
                    **{f"{k} after": a.get(k) for k in ("efficacy_success", "specificity_success",
                                                        "generalisation_success")}}
                   for r, b, a in zip(reqs, metrics["before"]["per_request"], metrics["after"]["per_request"],
                                      strict=True)]
    change = metrics["change"]
    summary = {"method": es.method, "layer": es.layer, "requests": len(reqs),
               "key statistics from": es.corpus or f"{es.corpus_texts} texts the model generated (no --corpus)",
               "log-perplexity change": change.get("log_perplexity_change")}
    return {"title": f"kcircuits edit: {es.method} at layer {es.layer}",
            "summary": {k: v for k, v in summary.items() if v is not None},
            "tables": [{"title": "Edit metrics (means over requests)", "rows": rows},
                       {"title": "Per request", "rows": per_request}],
            "config": run.config}


# --------------------------------------------------------------------------- kcircuits edit-bench
#: the methods an edit-bench spreads over ``--n-layers`` layers ending at ``--layer``; the others edit ``--layer``
#: alone, as published (ROME, and FT-L / FT-M as in the ROME paper and EasyEdit)
SPREAD_METHODS = ("memit",)
#: the edit-bench table's columns: the mean after the edit of each metric
BENCH_METRICS = ("efficacy_success", "generalisation_success", "specificity_success", "fluency")


def edit_bench(sources: Sequence[str], model: str | LoadedModel = "smollm2-135m", *,
               methods: Sequence[str] = ("rome", "memit", "ft-l", "ft-m"), out: str | Path | None = None,
               settings: EditSettings | None = None, requests: RequestSettings | None = None,
               value: ValueSettings | None = None, finetune: FinetuneOptions | None = None, progress: bool = True,
               **options) -> dict:
    """The same edit requests through several edit methods: one table of efficacy, generalisation,
    specificity and fluency (means after the edit, with the unedited model's beside them) and the
    time per edit.

    Each (source, method) is one :func:`edit` run in a subfolder of the bench folder (so it is reused by
    a rerun, and its report, delta and metrics stay available); the time per edit is the method's own
    step from that run's ``timings.json``, without the key statistics (computed once per layer and cached).

    Args:
        sources: relations or request files, each edited separately with every method.
        model: ``"smollm2-135m"``, a local HF folder, a hub id or a :class:`~kcircuits.models.LoadedModel`.
        methods: registered edit methods (``kcircuits.edit.registry``).
        out: the bench folder (default ``runs/edit-bench_<sources>_<model>_<hash>``).
        settings, requests, value, finetune: as in :func:`edit` (``settings.method`` is replaced by each method;
            MEMIT spreads each edit over ``n_layers`` layers ending at ``settings.layer``, the others
            (:data:`SPREAD_METHODS`) edit that layer alone).
        progress: show progress bars.

    Returns:
        ``bench.json``: ``{"rows": [{source, method, n_requests, <metric> before/after, seconds_per_edit}], "folder"}``.

    Settings (each also accepted by field name):

    """
    given = {EditSettings: settings, RequestSettings: requests, ValueSettings: value, FinetuneOptions: finetune}
    st = resolve_all(options, given, (EditSettings, RequestSettings, ValueSettings, FinetuneOptions), "edit-bench")
    es, rq, vs, fs = st[EditSettings], st[RequestSettings], st[ValueSettings], st[FinetuneOptions]
    if not sources:
        raise KcircuitsError("give at least one relation or request file to benchmark the edit methods on")
    methods = [get_edit_method(m).name for m in methods]  # unknown methods fail before anything is loaded
    if not methods:
        raise KcircuitsError("give at least one edit method (--methods rome,memit,ft-l,ft-m)")
    for source in sources:
        load_requests(source, rq.n, es.seed, **_relation_options(source, rq))
    name = model_name(model)

    def reproduce(lm: LoadedModel) -> dict:
        return {"command": "edit-bench", "sources": [str(s) for s in sources], "methods": methods, "model": name,
                "weights": lm.fingerprint, "edit": hashed_dict(es), "requests": hashed_dict(rq),
                "value": hashed_dict(vs), "finetune": hashed_dict(fs)}

    def check(lm: LoadedModel) -> None:
        nonlocal es
        es = with_layer(es, lm)

    run_folder, lm = open_run("edit-bench", [Path(str(s)).stem for s in sources][:3] + [Path(name).name], reproduce,
                              out, model, RunSettings(device=es.device, dtype=es.dtype, batch_size=es.batch_size,
                                                      seed=es.seed), check=check)
    rows = []
    with run_folder.removed_if_failed():
        for source in sources:
            for method in methods:
                sub = run_folder.path / f"{Path(str(source)).stem}_{method}"
                one = replace(es, method=method, n_layers=es.n_layers if method in SPREAD_METHODS else 1)
                res = edit(source, lm, out=sub, settings=one, requests=rq, value=vs, finetune=fs, progress=progress)
                rows.append(_bench_row(str(source), method, res))
        result = {"rows": rows, "metrics": list(BENCH_METRICS)}
        run_folder.write_json("bench.json", result)
        write_report(run_folder.file("report.html"), {
            "title": f"kcircuits edit-bench: {', '.join(methods)} on {name}",
            "summary": {"model": name, "sources": ", ".join(str(s) for s in sources), "methods": ", ".join(methods),
                        "layer": es.layer, "requests per source": rq.n},
            "tables": [{"title": "Edit methods on the same requests (means over requests; before -> after)",
                        "rows": rows}],
            "config": run_folder.config})
    return {**result, "folder": str(run_folder.path)}


edit_bench.__doc__ += settings_doc(EditSettings, param="settings") + "\n" + settings_doc(
    RequestSettings, param="requests") + "\n" + settings_doc(ValueSettings, param="value") + "\n" + settings_doc(
    FinetuneOptions, param="finetune")


def _bench_row(source: str, method: str, res: EditOutput) -> dict:
    """One row of the bench table from an edit run: metric means before and after, seconds per edit."""
    before, after = res.metrics["before"]["summary"], res.metrics["after"]["summary"]
    row: dict[str, Any] = {"source": source, "method": method, "n_requests": res.metrics["after"]["n_requests"]}
    for key in BENCH_METRICS:
        row[f"{key} before"] = before.get(key, {}).get("mean")
        row[f"{key} after"] = after.get(key, {}).get("mean")
    steps = read_timings(res.folder)
    edit_s = steps.get(f"edit ({method})", {}).get("wall_s")
    stats_s = steps.get("key statistics", {}).get("wall_s", 0.0)
    row["seconds_per_edit"] = None if edit_s is None else (edit_s - stats_s) / max(row["n_requests"], 1)
    return row


def read_timings(folder: Path) -> dict:
    """The steps of a run folder's ``timings.json`` (empty when the run was reused and timed nothing)."""
    path = Path(folder) / "timings.json"
    if not path.exists():
        return {}

    return json.loads(path.read_text()).get("steps", {})
