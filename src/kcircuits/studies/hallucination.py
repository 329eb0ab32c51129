"""When the model gets a fact wrong: where is the right answer lost, and who moves the wrong one?

Within one relation, prompts split into those the model answers right (the answer's first token
ranks 1) and wrong (anything else ranks first). The study then

1. finds a circuit on each group and compares them (Jaccard on nodes and edges, each circuit's
   faithfulness on both groups);
2. traces the correct answer's rank layer by layer (logit lens of the residual stream) on both
   groups, and on wrong prompts finds where it is *lost*: the last residual position where it has
   its best rank (``peak``); it is lost at the next layer (``peak + 1``, layers counted from 1),
   or never, when its best rank is at the output;
3. lists the heads that move the wrong attribute: head roles measured with the model's wrong
   prediction as "the answer" (direct effect on the wrong token, attention to the subject).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kcircuits.analyze.compare import overlap
from kcircuits.analyze.head_roles import RoleThresholds, answer_range_of
from kcircuits.pipeline import answer_ranks, prepare_prompts
from kcircuits.pipeline import model_name as pipeline_model_name
from kcircuits.data import load_dataset
from kcircuits.errors import KcircuitsError
from kcircuits.analyze.explain import Explanation, explain, layer_trace
from kcircuits.models import LoadedModel
from kcircuits.report.base import fmt_fixed, fmt_number, token_label
from kcircuits.settings import settings_doc
from kcircuits.studies.common import (
    STUDY_SETTINGS,
    StudySettings,
    circuit_size,
    faithfulness_on,
    find_circuit,
    finish,
    head_nodes,
    open_run,
)


def lost_layers(layer_rank: torch.Tensor) -> torch.Tensor:
    """Per prompt, the layer (1-based) after which the answer never again reaches its best rank, or
    -1 when its best rank is at the output. ``layer_rank`` is ``[n, L + 1]`` (index 0: embeddings)."""
    L = layer_rank.shape[1] - 1
    best = layer_rank.min(1, keepdim=True).values
    at_best = layer_rank == best
    peak = L - torch.flip(at_best, [1]).int().argmax(1)  # last residual index at the best rank
    return torch.where(peak == L, torch.full_like(peak, -1), peak + 1)


def _median(values: list[int]) -> float | None:
    return float(torch.tensor(values, dtype=torch.float).median()) if values else None


def hallucination(relation: str = "country_capital", model: str | LoadedModel = "smollm2-135m", *,
                  out: str | Path | None = None, max_per_group: int = 32, min_per_group: int = 4, top_heads: int = 10,
                  thresholds: RoleThresholds | None = None, progress: bool = True, **settings) -> dict:
    """Compare the model's right and wrong answers within one relation; write a run folder.

    See the module docstring for what is measured. The run folder holds ``hallucination.json``,
    ``roles_wrong_prediction.json``, each group's circuit and scores, and ``report.html``.

    Args:
        relation: a bundled relation name or a .json/.csv file.
        model: ``"smollm2-135m"``, a local HF folder, a hub id or a :class:`~kcircuits.models.LoadedModel`.
        out: the run folder (default ``runs/hallucination_<relation>_<model>_<hash>``).
        max_per_group: at most this many right and this many wrong prompts are analysed.
        min_per_group: fewer right or wrong prompts than this is an error that names the counts
            (findings resting on fewer than 5 prompts carry a small-sample warning in the report).
        top_heads: how many heads that move the wrong attribute are listed.
        thresholds: head-role thresholds (:class:`~kcircuits.analyze.head_roles.RoleThresholds`;
            default: its defaults); ``subject_mass_min`` selects the heads that move the wrong attribute.
        progress: show progress bars.
        **settings: ``scoring=``, ``attribution=``, ``size=``, ``prompts=``, ``run=`` objects of
            :mod:`kcircuits.settings`, or any of their fields by name (listed below); the prompt cap
            (``max_pairs``) defaults to 96 pairs.

    Returns:
        The contents of ``hallucination.json`` plus ``folder``: the counts (``n_right``, ``n_wrong``,
        ``n_used``), the circuits' ``overlap`` and cross ``faithfulness``, the rank-by-layer
        ``trace`` of each group, ``lost_at_layer`` and ``wrong_answer_settles_at`` per wrong prompt,
        ``wrong_prompts`` (with the answer's and the predicted token) and ``wrong_attribute_movers``.
    """
    st = StudySettings.from_options(settings, "study hallucination", max_pairs=96)
    if min_per_group < 1 or max_per_group < min_per_group:
        raise KcircuitsError("need 1 <= --min-per-group <= --max-per-group")
    load_dataset(relation)
    thresholds = thresholds or RoleThresholds()
    model_name = pipeline_model_name(model)
    batch_size = st.run.batch_size
    reproduce = {"command": "study hallucination", "relation": relation, "max_per_group": max_per_group,
                 "top_heads": top_heads, "thresholds": dataclasses.asdict(thresholds)}
    run, lm, engine = open_run("hallucination", [Path(relation).stem], reproduce, out, model, st)
    tok = lm.tokenizer
    pairs = prepare_prompts(lm, engine, relation, max_pairs=st.prompts.max_pairs, seed=st.run.seed,
                            batch_size=batch_size)["all"].pairs
    ranks, top = answer_ranks(engine, pairs, lm.pad_token_id, batch_size)
    right = [p for p, r in zip(pairs, ranks.tolist(), strict=True) if r == 1][:max_per_group]
    wrong_idx = [i for i, r in enumerate(ranks.tolist()) if r > 1][:max_per_group]
    if len(right) < min_per_group or len(wrong_idx) < min_per_group:
        raise KcircuitsError(
            f"relation {relation!r}: the model answers {int((ranks == 1).sum())} of {len(pairs)} prompts right and "
            f"{int((ranks > 1).sum())} wrong; the study needs at least {min_per_group} of each. Try another relation "
            "(`kcircuits datasets`), a larger --max-pairs, or a lower --min-per-group")
    wrong = [pairs[i] for i in wrong_idx]
    predicted = [dataclasses.replace(pairs[i], answer_ids=[int(top[i])], object=tok.decode([int(top[i])]).strip())
                 for i in wrong_idx]

    size = circuit_size(engine.graph, st)
    c_right, _ = find_circuit(run, "right", engine, lm, right, st, n_edges=size, progress=progress)
    c_wrong, _ = find_circuit(run, "wrong", engine, lm, wrong, st, n_edges=size, progress=progress)
    circuits = {"right": c_right, "wrong": c_wrong}
    faith = {group: faithfulness_on(engine, lm, ps, circuits, st, progress=progress)
             for group, ps in (("right", right), ("wrong", wrong))}
    ov = overlap(c_right, c_wrong)

    answer_range = answer_range_of(pairs) + [int(top[i]) for i in wrong_idx]
    ex: dict[str, Explanation] = {  # rank-by-layer traces; head roles where the study reads them
        name: explain(engine, tok, ps, lm.pad_token_id, thresholds=thresholds, answer_range=answer_range,
                      batch_size=batch_size, device=lm.device, node_lens=False, roles=name != "right")
        for name, ps in (("right", right), ("wrong", wrong), ("wrong_predicted", predicted))}
    lost = lost_layers(ex["wrong"].lens.layer_rank).tolist()
    wrong_emerges = ex["wrong_predicted"].lens.first_layer_at_rank(1).tolist()
    movers = _wrong_movers(ex, c_wrong, thresholds, top_heads)

    result = {
        "relation": Path(relation).stem, "n_prompts": len(pairs), "n_right": int((ranks == 1).sum()),
        "n_wrong": int((ranks > 1).sum()), "n_used": {"right": len(right), "wrong": len(wrong)}, "n_edges": size,
        "overlap": {k: ov[k] for k in ("node_jaccard", "edge_jaccard", "shared_nodes", "shared_edges")},
        "faithfulness": faith,
        "heads_only_in_wrong_circuit": sorted(head_nodes(c_wrong) - head_nodes(c_right)),
        "heads_only_in_right_circuit": sorted(head_nodes(c_right) - head_nodes(c_wrong)),
        "trace": {"right": layer_trace(ex["right"].lens), "wrong": layer_trace(ex["wrong"].lens),
                  "wrong_prediction_on_wrong_prompts": layer_trace(ex["wrong_predicted"].lens)},
        "lost_at_layer": lost, "wrong_answer_settles_at": wrong_emerges,
        "wrong_prompts": [{"prompt": p.clean_text, "answer": p.object, "predicted": q.object, "rank": int(ranks[i]),
                           "lost_at_layer": lo, "answer_token": tok.decode([int(p.answer_ids[0])]),
                           "predicted_token": tok.decode([int(top[i])])}
                          for p, q, i, lo in zip(wrong, predicted, wrong_idx, lost, strict=True)],
        "wrong_attribute_movers": movers,
    }
    run.write_json("hallucination.json", result)
    run.write_json("roles_wrong_prediction.json", ex["wrong_predicted"].roles.to_json())
    finish(run, study_report(result, model_name))
    result["folder"] = str(run.path)
    return result


hallucination.__doc__ += settings_doc(*STUDY_SETTINGS)


def _wrong_movers(ex: dict[str, Explanation], c_wrong, thresholds: RoleThresholds, top: int) -> list[dict]:
    """Heads that attend to the subject and raise the wrong prediction, by z-score on the wrong token."""
    on_correct = {r["head"]: r for r in ex["wrong"].roles.rows}
    in_circuit = head_nodes(c_wrong)
    rows = [r for r in ex["wrong_predicted"].roles.rows if r["subject_mass"] >= thresholds.subject_mass_min
            and r["answer_z"] > 0]
    rows.sort(key=lambda r: -r["answer_z"])
    return [{"head": r["head"], "role_for_wrong_token": r["role"], "subject_mass": r["subject_mass"],
             "wrong_token_z": r["answer_z"], "wrong_token_direct_effect": r["direct_effect"],
             "correct_token_z": on_correct[r["head"]]["answer_z"], "in_wrong_circuit": r["head"] in in_circuit}
            for r in rows[:top]]


def study_report(res: dict, model_name: str) -> dict:
    """The report dict of a :func:`hallucination` result. Every finding, chart and table says how
    many prompts it rests on (``n_prompts``), so the report flags those resting on too few; tokens
    are shown as :func:`~kcircuits.report.base.token_label` writes them, leading space kept."""
    trace = res["trace"]
    L = len(trace["right"]["median_rank"]) - 1
    n_right, n_wrong = res["n_used"]["right"], res["n_used"]["wrong"]
    both = min(n_right, n_wrong)
    x = list(range(L + 1))
    return {
        "title": f"kcircuits study hallucination: {res['relation']} on {model_name}",
        "summary": {"model": model_name, "relation": res["relation"], "right": res["n_right"], "wrong": res["n_wrong"],
                    "right prompts analysed": n_right, "wrong prompts analysed": n_wrong,
                    "node Jaccard (right vs wrong circuit)": res["overlap"]["node_jaccard"],
                    "edge Jaccard": res["overlap"]["edge_jaccard"]},
        "narrative": _findings(res, model_name),
        "charts": [
            {"title": "rank by layer", "x": x, "log_y": True, "x_label": "residual stream after layer (0 = embeddings)",
             "y_label": "median rank", "series": {
                 "correct answer, right prompts": trace["right"]["median_rank"],
                 "correct answer, wrong prompts": trace["wrong"]["median_rank"],
                 "wrong prediction, wrong prompts": trace["wrong_prediction_on_wrong_prompts"]["median_rank"]},
             "caption": "Logit lens of the residual stream: where each answer rises and where the correct one falls.",
             "n_prompts": both},
            _lost_histogram(res["lost_at_layer"], L),
        ],
        "matrices": [{"title": "Faithfulness of each circuit (row) on each group's prompts (column)",
                      "rows": ["right circuit", "wrong circuit"], "cols": ["right prompts", "wrong prompts"],
                      "values": [[res["faithfulness"][g]["right"] for g in ("right", "wrong")],
                                 [res["faithfulness"][g]["wrong"] for g in ("right", "wrong")]],
                      "n_prompts": both}],
        "tables": [{"title": "Heads that move the wrong attribute", "rows": res["wrong_attribute_movers"],
                    "caption": "Head roles measured with the model's wrong prediction as the answer.",
                    "n_prompts": n_wrong},
                   {"title": "Wrong prompts", "rows": [_wrong_prompt_row(r) for r in res["wrong_prompts"]],
                    "caption": "The answer's first token and the model's top token, as the tokenizer has them.",
                    "token_cols": ["answer token", "predicted token"]}],
    }


def _findings(res: dict, model_name: str) -> list[dict]:
    """The findings text, each with the number of prompts it rests on."""
    n_right, n_wrong = res["n_used"]["right"], res["n_used"]["wrong"]
    lost = [v for v in res["lost_at_layer"] if v >= 0]
    settle = [v for v in res["wrong_answer_settles_at"] if v >= 0]
    movers = res["wrong_attribute_movers"]
    ov = res["overlap"]
    return [
        {"text": f"Of {res['n_prompts']} prompts of {res['relation']}, {model_name} answers {res['n_right']} right "
                 f"and {res['n_wrong']} wrong (first answer token ranked first or not); {n_right} right and "
                 f"{n_wrong} wrong prompts were analysed.", "n_prompts": min(n_right, n_wrong)},
        {"text": (f"On wrong prompts the correct answer is lost at layer {fmt_number(_median(lost), '.0f')} (median "
                  f"over the {len(lost)} prompts where it peaks before the output; "
                  f"{len(res['lost_at_layer']) - len(lost)} never lose it, they simply never rank it higher)."
                  if lost else "On wrong prompts the correct answer has its best rank at the output: it is never "
                  "built up and then lost."), "n_prompts": len(lost) if lost else n_wrong},
        {"text": (f"The wrong prediction settles at rank 1 after layer {fmt_number(_median(settle), '.0f')} (median "
                  f"over the {len(settle)} wrong prompts where it does)." if settle else
                  "The wrong prediction does not settle at rank 1 before the output in the logit lens."),
         "n_prompts": len(settle) if settle else n_wrong},
        {"text": f"The circuits found on right and on wrong prompts share {fmt_number(ov['node_jaccard'], '.0%')} of "
                 f"their nodes and {fmt_number(ov['edge_jaccard'], '.0%')} of their edges (Jaccard, "
                 f"{res['n_edges']} edges each).", "n_prompts": min(n_right, n_wrong)},
        {"text": ("Heads that attend to the subject and push the wrong answer most: " + ", ".join(
            f"{m['head']} (z {fmt_fixed(m['wrong_token_z'], 'z')}, subject attention "
            f"{fmt_fixed(m['subject_mass'], 'share')})" for m in movers[:3]) + "." if movers else
                  "No head attends to the subject and raises the wrong answer (at the set thresholds)."),
         "n_prompts": n_wrong},
    ]


def _lost_histogram(lost_at_layer: list[int], n_layers: int) -> dict:
    """Bar chart of the layer where the correct answer is lost, one bar per layer and one for the
    prompts where it never is (its best rank is at the output): counts, so bars, not a line."""
    counts = [sum(1 for v in lost_at_layer if v == layer) for layer in range(1, n_layers + 1)]
    return {"kind": "bar", "title": "where the correct answer is lost", "x": [*range(1, n_layers + 1), "never"],
            "x_label": "layer after which the correct answer never regains its best rank (1-based)",
            "y_label": "wrong prompts", "series": {"wrong prompts": counts + [lost_at_layer.count(-1)]},
            "caption": "Per wrong prompt, the layer where the correct answer is lost; \u201cnever\u201d: its best "
                       "rank is at the output.", "n_prompts": len(lost_at_layer)}


def _wrong_prompt_row(r: dict) -> dict:
    """A row of the wrong-prompts table: the answer as the dataset writes it, then the tokens as
    token labels (leading space kept); "never" for a correct answer that is not lost."""
    return {"prompt": r["prompt"], "answer (dataset)": r["answer"], "answer token": token_label(r["answer_token"]),
            "predicted token": token_label(r["predicted_token"]), "rank of the answer token": r["rank"],
            "lost at layer": r["lost_at_layer"] if r["lost_at_layer"] >= 0 else "never"}
