"""Compare the circuits of several relations: structural overlap and cross-relation faithfulness.

For relations R1..Rn: find each relation's circuit on its prompts, then write three matrices
``[n, n]``: node Jaccard, edge Jaccard, and faithfulness of circuit A (row) on relation B's
prompts (column); the diagonal of the last is each circuit on its own prompts. A circuit that
stays faithful on another relation's prompts points to shared machinery (e.g. a general
"attribute extraction" path) rather than relation-specific knowledge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from kcircuits.analyze.compare import composition, overlap
from kcircuits.pipeline import model_name, prepare_prompts
from kcircuits.data import load_dataset
from kcircuits.errors import KcircuitsError
from kcircuits.models import LoadedModel
from kcircuits.settings import settings_doc
from kcircuits.studies.common import (
    STUDY_SETTINGS,
    StudySettings,
    circuit_size,
    faithfulness_on,
    find_circuit,
    finish,
    open_run,
)


def compare(relations: Sequence[str], model: str | LoadedModel = "smollm2-135m", *, out: str | Path | None = None,
            progress: bool = True, **settings) -> dict:
    """Find one circuit per relation (same size) and write the overlap and cross-faithfulness matrices.

    Each relation's circuit is found on all its prompts (``split`` is ignored) with the same number of
    edges; the run folder holds ``compare.json``, each circuit and its scores, and ``report.html``.

    Args:
        relations: two or more bundled relation names or .json/.csv files (distinct names).
        model: ``"smollm2-135m"``, a local HF folder, a hub id or a :class:`~kcircuits.models.LoadedModel`.
        out: the run folder (default ``runs/compare_<first three relations>_<model>_<hash>``).
        progress: show progress bars.
        **settings: ``scoring=``, ``attribution=``, ``size=``, ``prompts=``, ``run=`` objects of
            :mod:`kcircuits.settings`, or any of their fields by name (``percent=1``,
            ``known_only=True``; listed below). The prompt cap (``max_pairs``) defaults to 32 pairs per
            relation; the size must be ``n_edges`` or ``percent`` (not ``threshold``) and
            ``answer_scoring`` must be ``"first_token"``.

    Returns:
        The contents of ``compare.json`` plus ``folder``: ``relations``, ``n_edges`` (selected per
        circuit), ``n_edges_kept`` (after pruning), ``n_prompts``, the ``[n, n]`` matrices
        ``node_jaccard``, ``edge_jaccard`` and ``faithfulness`` (row: circuit, column: prompts), and
        ``composition`` per relation.

    Settings (each also accepted by field name):

    """
    names = [Path(r).stem for r in relations]
    if len(relations) < 2:
        raise KcircuitsError("compare needs at least two relations")
    if len(set(names)) != len(names):
        raise KcircuitsError(f"relations repeat: {', '.join(names)}")
    st = StudySettings.from_options(settings, "compare", max_pairs=32)
    for rel in relations:
        load_dataset(rel)
    run, lm, engine = open_run("compare", names[:3], {"command": "compare", "relations": list(relations)}, out, model,
                               st)
    lm_name = model_name(model)
    size = circuit_size(engine.graph, st)
    pairs, circuits = {}, {}
    for rel, name in zip(relations, names, strict=True):
        pairs[name] = prepare_prompts(lm, engine, rel, settings=replace(st.prompts, split=None), seed=st.run.seed,
                                      batch_size=st.run.batch_size)["all"].pairs
        circuits[name], _ = find_circuit(run, name, engine, lm, pairs[name], st, n_edges=size, progress=progress)
    ov = {(a, b): overlap(circuits[a], circuits[b]) for a in names for b in names}
    node_j = [[ov[a, b]["node_jaccard"] for b in names] for a in names]
    edge_j = [[ov[a, b]["edge_jaccard"] for b in names] for a in names]
    faith_cols = {b: faithfulness_on(engine, lm, pairs[b], circuits, st, progress=progress) for b in names}
    faith = [[faith_cols[b][a] for b in names] for a in names]
    result = {"relations": names, "n_edges": size, "n_edges_kept": {n: c.n_edges for n, c in circuits.items()},
              "n_prompts": {n: len(p) for n, p in pairs.items()},
              "node_jaccard": node_j, "edge_jaccard": edge_j, "faithfulness": faith,
              "faithfulness_rows": "circuit of the row's relation",
              "faithfulness_cols": "prompts of the column's relation",
              "composition": {n: composition(c) for n, c in circuits.items()}}
    run.write_json("compare.json", result)
    finish(run, {"title": f"kcircuits compare: {', '.join(names)} on {lm_name}",
                 "summary": {"model": lm_name, "relations": ", ".join(names), "edges selected per circuit": size,
                             "edges kept after pruning": ", ".join(f"{n}: {c.n_edges}" for n, c in circuits.items()),
                             "method": st.attribution.method},
                 "narrative": _narrative(names, node_j, edge_j, faith),
                 "matrices": [
                     {"title": "Node overlap (Jaccard)", "rows": names, "cols": names, "values": node_j},
                     {"title": "Edge overlap (Jaccard)", "rows": names, "cols": names, "values": edge_j},
                     {"title": "Faithfulness of the row's circuit on the column's prompts", "rows": names,
                      "cols": names, "values": faith,
                      "caption": "1.0 = the circuit recovers the full model's metric on those prompts, 0 = no better "
                                 "than the fully ablated model."}],
                 "tables": [{"title": "Composition: nodes by type",
                             "rows": [{"relation": n, **{t: v["count"] for t, v in c["nodes_by_type"].items()}}
                                      for n, c in result["composition"].items()]}]})
    result["folder"] = str(run.path)
    return result


compare.__doc__ += settings_doc(*STUDY_SETTINGS)


def _narrative(names: list[str], node_j: list[list[float]], edge_j: list[list[float]],
               faith: list[list[float]]) -> list[str]:
    n = len(names)
    off = [(i, j) for i in range(n) for j in range(n) if i != j]
    best = max(off, key=lambda ij: edge_j[ij[0]][ij[1]])
    mean_edge = sum(edge_j[i][j] for i, j in off) / len(off)
    mean_node = sum(node_j[i][j] for i, j in off) / len(off)
    own = sum(faith[i][i] for i in range(n)) / n
    cross = sum(faith[i][j] for i, j in off) / len(off)
    return [
        f"Across {n} relations, circuits share on average {mean_node:.0%} of their nodes and {mean_edge:.0%} of "
        f"their edges (Jaccard); the most similar pair is {names[best[0]]} / {names[best[1]]} "
        f"(edge Jaccard {edge_j[best[0]][best[1]]:.2f}).",
        f"A circuit's faithfulness on its own relation's prompts averages {own:.2f}; on another relation's prompts "
        f"{cross:.2f}.",
    ]
