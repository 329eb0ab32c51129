"""The Python API behind ``kcircuits trace``: causal tracing of a relation's facts, end to end, into a run folder.

``trace`` = relation -> prompts (one template filled with each subject; optionally only the facts the
model knows; at most ``max_prompts``) -> :func:`kcircuits.edit.trace.causal_trace` -> ``trace.json``
(every prompt's trace, the mean indirect effects by ROME's position groups, the critical layer) and
``report.html`` (heatmaps). The run folder is keyed by the settings and the weights' fingerprint like
every other command's (DESIGN.md decision 12), so a rerun reuses ``trace.json`` and an edited model
gets a trace of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

from kcircuits.data import load_dataset
from kcircuits.data.prompts import select_templates
from kcircuits.edit.settings import TraceSettings
from kcircuits.edit.trace import TraceResult, causal_trace
from kcircuits.engine import Engine
from kcircuits.graph import Graph
from kcircuits.models import LoadedModel
from kcircuits.pipeline import PromptSplit, model_name, open_run, prepare_prompts
from kcircuits.report import write_report
from kcircuits.runs import RunFolder
from kcircuits.settings import PromptSettings, RunSettings, hashed_dict, reject_unknown, resolve, settings_doc
from kcircuits.steps import StepCache

__all__ = ["TRACE_FILE", "TraceOutput", "TraceSettings", "trace", "trace_prompts"]

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
