"""What every study does: open a run folder, find a circuit on a set of prompt pairs (scores kept
in the folder so a rerun reuses them), and score circuits on other prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from kcircuits.ablation import mean_activations
from kcircuits.pipeline import attribute_resumable, environment, load, model_batches
from kcircuits.settings import AttributionSettings, CircuitSize, RunSettings, ScoringSettings
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.evaluate import Evaluator
from kcircuits.selection import select
from kcircuits.graph import Circuit, Graph
from kcircuits.models import LoadedModel
from kcircuits.report import write_report
from kcircuits.runs import RunFolder, default_run_dir


def check_common(method: str, steps: int, metric: str, ablation: str, batch_size: int, percent: float | None,
                 n_edges: int | None) -> None:
    """Fail on bad settings before a model is loaded or a folder written: the settings objects
    validate themselves (the same checks as ``discover``)."""
    ScoringSettings(metric=metric, ablation=ablation)
    AttributionSettings(method=method, steps=steps)
    CircuitSize(n_edges=n_edges, percent=percent)
    RunSettings(batch_size=batch_size)


def open_run(kind: str, parts: list[str], reproduce: dict, out: str | Path | None, model: str | LoadedModel,
             device, dtype: str, batch_size: int) -> tuple[RunFolder, LoadedModel, Engine]:
    """Load the model first (a model that fails to load writes nothing), then bind the run folder."""
    model_name = model.name if isinstance(model, LoadedModel) else model
    lm = load(model, RunSettings(device=device, dtype=dtype, batch_size=batch_size))
    reproduce = {**reproduce, "weights": lm.fingerprint}
    folder = Path(out) if out else default_run_dir(kind, parts + [Path(model_name).name], reproduce)
    run = RunFolder(folder, {"reproduce": reproduce, "environment": environment(), "batch_size": batch_size,
                             "device": str(device)})
    return run, lm, Engine(lm.weights, Graph.from_model(lm.weights))


def n_edges_for(graph: Graph, n_edges: int | None, percent: float | None) -> int:
    if n_edges is not None:
        return n_edges
    return max(1, round(graph.n_edges * (percent if percent is not None else 1.0) / 100))


def find_circuit(run: RunFolder, name: str, engine: Engine, lm: LoadedModel, pairs: list, *, method: str, steps: int,
                 metric: str, ablation: str, n_edges: int, batch_size: int, progress: bool) -> tuple[Circuit, torch.Tensor]:
    """Attribution scores on ``pairs`` (saved as ``scores_<name>.safetensors``, reused on a rerun) and
    the top-``n_edges`` circuit, pruned; also written as ``circuit_<name>.json``."""
    if not pairs:
        raise KcircuitsError(f"no prompt pairs to find the {name!r} circuit on")
    file = f"scores_{name}.safetensors"
    if run.has(file):
        scores = run.read_tensors(file)["scores"]
    else:
        batches = model_batches(lm, pairs, batch_size, "first_token")
        mean = mean_activations(engine, batches) if ablation == "mean" else None
        scores = attribute_resumable(run, engine, batches, scoring=ScoringSettings(metric=metric, ablation=ablation),
                                     attribution=AttributionSettings(method=method, steps=steps), mean=mean,
                                     progress=progress).cpu()
        run.write_tensors(file, {"scores": scores})
    circuit = select(engine.graph, scores, n_edges)
    if circuit.n_edges == 0:
        raise KcircuitsError(f"the {name!r} circuit is empty after pruning; select more edges (--edges/--percent)")
    run.write_json(f"circuit_{name}.json", circuit.to_json({"name": name, "n_prompts": len(pairs)}))
    return circuit, scores


def faithfulness_on(engine: Engine, lm: LoadedModel, pairs: list, circuits: dict[str, Circuit], *, metric: str,
                    ablation: str, batch_size: int, progress: bool) -> dict[str, float]:
    """Faithfulness (ratio of means) of each circuit on ``pairs``; one evaluator shared by all circuits."""
    batches = model_batches(lm, pairs, batch_size, "first_token")
    mean = mean_activations(engine, batches) if ablation == "mean" else None
    ev = Evaluator(engine, batches, metric=metric, ablation=ablation, mean=mean, progress=progress)
    return {name: ev.evaluate(c)["faithfulness_of_means"] for name, c in circuits.items()}


def head_nodes(circuit: Circuit) -> set[str]:
    return {n for n in circuit.nodes() if n.startswith("a")}


def finish(run: RunFolder, report: dict) -> None:
    report.setdefault("config", run.config)
    write_report(run.file("report.html"), report)

