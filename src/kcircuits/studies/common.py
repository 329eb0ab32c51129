"""What every study does: open a run folder, find a circuit on a set of prompt pairs (scores kept
in the folder so a rerun reuses them), and score circuits on other prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kcircuits.ablation import mean_activations
from kcircuits import pipeline
from kcircuits.pipeline import attribute_resumable, model_batches, model_name
from kcircuits.settings import (
    AttributionSettings,
    CircuitSize,
    PromptSettings,
    RunSettings,
    ScoringSettings,
    hashed_dict,
    param_name,
    resolve_all,
)
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.evaluate import Evaluator
from kcircuits.selection import select
from kcircuits.graph import Circuit, Graph
from kcircuits.models import LoadedModel
from kcircuits.report import write_report
from kcircuits.runs import RunFolder


#: The concerns every study takes settings for (their objects by parameter name, or their fields by name).
STUDY_SETTINGS = (ScoringSettings, AttributionSettings, CircuitSize, PromptSettings, RunSettings)


@dataclass(frozen=True)
class StudySettings:
    """The settings of one study run, one object per concern (see :mod:`kcircuits.settings`).

    Attributes:
        scoring: metric and ablation (:class:`~kcircuits.settings.ScoringSettings`; first-token scoring only).
        attribution: discovery method, steps, grouping (:class:`~kcircuits.settings.AttributionSettings`).
        size: every circuit's size, ``n_edges`` or ``percent`` (:class:`~kcircuits.settings.CircuitSize`).
        prompts: prompt pairs, cap and filter (:class:`~kcircuits.settings.PromptSettings`).
        run: device, dtype, batch size, seed (:class:`~kcircuits.settings.RunSettings`).
    """

    scoring: ScoringSettings
    attribution: AttributionSettings
    size: CircuitSize
    prompts: PromptSettings
    run: RunSettings

    @classmethod
    def from_options(cls, options: dict, command: str, *, max_pairs: int | None) -> StudySettings:
        """Build and validate the settings from a study's keyword arguments (before any model is loaded):
        ``scoring=``/``size=``/... objects, or their fields by name; ``max_pairs`` is the study's default cap."""
        given = {c: options.pop(param_name(c), None) for c in STUDY_SETTINGS}
        if given[PromptSettings] is None:
            options.setdefault("max_pairs", max_pairs)
        built = resolve_all(options, given, STUDY_SETTINGS, command)
        return cls(*(built[c] for c in STUDY_SETTINGS)).checked(command)

    def checked(self, command: str) -> StudySettings:
        """``self``, after checking what every study needs: circuits sized by edges or percent (comparable
        across prompt sets), first-token scoring."""
        if self.size.threshold is not None:
            raise KcircuitsError(f"{command} sizes every circuit by --edges or --percent, not by a threshold")
        if self.scoring.answer_scoring != "first_token":
            raise KcircuitsError(f"{command} scores the answer's first token; --answer-scoring full is not supported")
        return self

    def reproduce(self) -> dict:
        """The hashed fields of every settings object, by parameter name (recorded in ``config.json``)."""
        return {param_name(type(obj)): hashed_dict(obj) for obj in (self.scoring, self.attribution, self.size,
                                                                    self.prompts, self.run)}


def open_run(kind: str, parts: list[str], reproduce: dict, out: str | Path | None, model: str | LoadedModel,
             st: StudySettings) -> tuple[RunFolder, LoadedModel, Engine]:
    """Load the model first (a model that fails to load writes nothing), then bind the run folder,
    whose hash covers ``reproduce``, the settings and the weights' fingerprint."""
    run, lm = pipeline.open_run(kind, parts + [Path(model_name(model)).name],
                                lambda lm: {**reproduce, "model": model_name(model), "weights": lm.fingerprint,
                                            **st.reproduce()}, out, model, st.run)
    return run, lm, Engine(lm.weights, Graph.from_model(lm.weights, grouped=st.attribution.grouped))


def circuit_size(graph: Graph, st: StudySettings) -> int:
    """The number of edges every circuit of the study selects."""
    return st.size.edges_for(graph.n_edges)


def find_circuit(run: RunFolder, name: str, engine: Engine, lm: LoadedModel, pairs: list, st: StudySettings, *,
                 n_edges: int, progress: bool) -> tuple[Circuit, torch.Tensor]:
    """Attribution scores on ``pairs`` (saved as ``scores_<name>.safetensors``, reused on a rerun) and
    the ``n_edges`` circuit the size settings select, pruned; also written as ``circuit_<name>.json``."""
    if not pairs:
        raise KcircuitsError(f"no prompt pairs to find the {name!r} circuit on")
    file = f"scores_{name}.safetensors"
    if run.has(file):
        scores = run.read_tensors(file)["scores"]
    else:
        batches = model_batches(lm, pairs, st.run.batch_size, "first_token")
        mean = mean_activations(engine, batches) if st.scoring.ablation == "mean" else None
        scores = attribute_resumable(run, engine, batches, scoring=st.scoring, attribution=st.attribution, mean=mean,
                                     progress=progress).cpu()
        run.write_tensors(file, {"scores": scores})
    circuit = select(engine.graph, scores, n_edges, selection=st.size.selection, absolute=st.size.absolute)
    if circuit.n_edges == 0:
        raise KcircuitsError(f"the {name!r} circuit is empty after pruning; select more edges (--edges/--percent)")
    run.write_json(f"circuit_{name}.json", circuit.to_json({"name": name, "n_prompts": len(pairs)}))
    return circuit, scores


def evaluate_on(engine: Engine, lm: LoadedModel, pairs: list, circuits: dict[str, Circuit], st: StudySettings, *,
                progress: bool) -> dict[str, dict]:
    """:meth:`kcircuits.evaluate.Evaluator.evaluate` of each circuit on ``pairs`` (faithfulness, Hit@1/10 of
    the full model, the circuit and the chance level, ...); one evaluator shared by all circuits.

    Args:
        engine: the model's engine over the circuits' graph.
        lm: the model (its device and padding token).
        pairs: the prompt pairs evaluated on.
        circuits: name -> circuit.
        st: the study's settings (scoring metric and ablation, batch size).
        progress: show a progress bar.
    """
    batches = model_batches(lm, pairs, st.run.batch_size, "first_token")
    mean = mean_activations(engine, batches) if st.scoring.ablation == "mean" else None
    ev = Evaluator(engine, batches, metric=st.scoring.metric, ablation=st.scoring.ablation, mean=mean,
                   progress=progress)
    return {name: ev.evaluate(c) for name, c in circuits.items()}


def faithfulness_on(engine: Engine, lm: LoadedModel, pairs: list, circuits: dict[str, Circuit], st: StudySettings, *,
                    progress: bool) -> dict[str, float]:
    """Faithfulness (ratio of means) of each circuit on ``pairs`` (:func:`evaluate_on`)."""
    return {name: res["faithfulness_of_means"]
            for name, res in evaluate_on(engine, lm, pairs, circuits, st, progress=progress).items()}


def head_nodes(circuit: Circuit) -> set[str]:
    """The attention heads (``a{l}.h{h}``) among ``circuit``'s nodes."""
    return {n for n in circuit.nodes() if n.startswith("a")}


def finish(run: RunFolder, report: dict) -> None:
    """Write ``report.html`` into ``run`` from the ``report`` dict (the run's config added)."""
    report.setdefault("config", run.config)
    write_report(run.file("report.html"), report)

