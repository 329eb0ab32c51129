"""In-context learning: what changes in the circuit when demonstrations make a failed fact work?

For one relation and template, the prompt gets k demonstrations ``fill(template, s_i) + " " + o_i
+ ". "`` (k = 0..4 by default; the same demonstrations, in the same order, for every query; their
subjects and answers are removed from the queries). For each k the study reports accuracy (the
answer's first token ranked first) on the same query subjects, and finds the circuit. Heads that
are in some circuit with demonstrations but not in the zero-shot circuit are the *new heads*; for
the largest k it measures their attention from the answer position to the demonstrations' answer
tokens, and the accuracy after mean-ablating all their outgoing edges vs after ablating as many
random heads (not new), averaged over several draws.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from kcircuits.ablation import mean_activations
from kcircuits.analyze.head_roles import attention_mass, token_offsets
from kcircuits.pipeline import answer_ranks, model_batches
from kcircuits.pipeline import model_name as pipeline_model_name
from kcircuits.data import build_prompts, load_dataset
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.models import LoadedModel
from kcircuits.settings import settings_doc
from kcircuits.studies.common import (
    STUDY_SETTINGS,
    StudySettings,
    circuit_size,
    find_circuit,
    finish,
    head_nodes,
    open_run,
)


def demonstrations(template: str, demos: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The demonstration prefix and the character span of every demonstration's answer in it."""
    text, spans = "", []
    for d in demos:
        text += template.replace("{}", d["subject"], 1) + " "
        spans.append((len(text), len(text) + len(d["object"])))
        text += d["object"] + ". "
    return text, spans


def _span_mask(tokenizer, pairs: list, spans: list[tuple[int, int]], width: int) -> torch.Tensor:
    """``[b, width]`` bool: tokens overlapping any of ``spans`` (characters of the shared prefix)."""
    out = torch.zeros(len(pairs), width, dtype=torch.bool)
    for i, p in enumerate(pairs):
        offsets = token_offsets(tokenizer, p.clean_text, p.clean_ids)
        if offsets is None:
            raise KcircuitsError("the ICL study needs a fast tokenizer (character offsets) "
                                 "to find the demonstrations' answers")
        for t, (a, b) in enumerate(offsets[:width]):
            out[i, t] = b > a and any(a < s1 and b > s0 for s0, s1 in spans)
    return out


def _accuracy_with_heads_ablated(engine: Engine, pairs: list, pad_id: int, batch_size: int, heads: Sequence[str],
                                 mean: torch.Tensor) -> float:
    """Share of prompts answered right when every edge out of ``heads`` carries the heads' dataset mean."""
    g = engine.graph
    mask = torch.ones(g.n_src, g.n_dst)
    for h in heads:
        mask[g.src_index(h)] = 0
    ranks, _ = answer_ranks(engine, pairs, pad_id, batch_size, mask=mask, ablated=mean)
    return float((ranks == 1).float().mean())


def icl(relation: str = "country_currency", model: str | LoadedModel = "smollm2-135m", *,
        out: str | Path | None = None, ks: Sequence[int] = (0, 1, 2, 3, 4), template: int = 0, n_random: int = 5,
        progress: bool = True, **settings) -> dict:
    """Accuracy and circuits with k = 0..4 demonstrations; new heads, their attention and ablation.

    Every k uses the same demonstrations (distinct answers, drawn with the seed) and the same query
    subjects; see the module docstring for what is measured. The run folder holds ``icl.json``, each
    k's circuit and scores, and ``report.html``.

    Args:
        relation: a bundled relation name or a .json/.csv file; best one the model fails zero-shot.
        model: ``"smollm2-135m"``, a local HF folder, a hub id or a :class:`~kcircuits.models.LoadedModel`.
        out: the run folder (default ``runs/icl_<relation>_<model>_<hash>``).
        ks: numbers of demonstrations; must include 0 (the zero-shot circuit the new heads are
            compared with) and at least one k >= 1.
        template: index of the relation's ``prompt_templates`` entry used for demonstrations and queries.
        n_random: random head sets (as many heads as the new ones) ablated for comparison, >= 1.
        progress: show progress bars.
        **settings: ``scoring=``, ``attribution=``, ``size=``, ``prompts=``, ``run=`` objects of
            :mod:`kcircuits.settings`, or any of their fields by name (listed below). The prompt cap
            (``max_pairs``, here the number of query subjects) defaults to 24 and is the only prompt
            setting used; the size must be ``n_edges`` or ``percent`` and ``answer_scoring``
            ``"first_token"``.

    Returns:
        The contents of ``icl.json`` plus ``folder``: ``accuracy`` per k (Hit@1), ``new_heads`` and
        ``new_heads_by_k``, ``attention_to_demo_answers`` of each new head, ``ablation`` (accuracy with
        the new heads vs random heads ablated, at the largest k; None without new heads),
        ``circuit_sizes``, the demonstrations and the query subjects.

    Settings (each also accepted by field name):

    """
    st = StudySettings.from_options(settings, "study icl", max_pairs=24)
    seed, batch_size, max_pairs = st.run.seed, st.run.batch_size, st.prompts.max_pairs
    # the new heads are those absent from the zero-shot circuit, so k = 0 is required
    given = list(ks)
    ks = sorted(set(int(k) for k in given))
    if ks and ks[0] < 0:
        raise KcircuitsError(f"--ks are numbers of demonstrations and must be >= 0, got {ks[0]}")
    if not ks or ks[0] != 0 or ks[-1] < 1:
        raise KcircuitsError(f"--ks must include 0 (zero-shot) and at least one k >= 1, e.g. 0 1 2 3 4; got "
                             f"{' '.join(str(k) for k in given) or 'none'}")
    if n_random < 1:
        raise KcircuitsError("--random-draws must be >= 1")
    ds = load_dataset(relation)
    if not 0 <= template < len(ds.prompt_templates):
        raise KcircuitsError(f"relation {ds.name!r} has templates 0..{len(ds.prompt_templates) - 1}, not {template}")
    tpl = ds.prompt_templates[template]
    K = ks[-1]
    rng = random.Random(seed)
    order = list(range(len(ds.samples)))
    rng.shuffle(order)
    demos, seen = [], set()
    for i in order:  # demonstrations with distinct answers
        if ds.samples[i]["object"] not in seen and len(demos) < K:
            demos.append(ds.samples[i])
            seen.add(ds.samples[i]["object"])
    demo_subjects = {d["subject"] for d in demos}
    queries = [s for s in ds.samples if s["subject"] not in demo_subjects and s["object"] not in seen]
    if len(demos) < K or len(queries) < 4:
        raise KcircuitsError(f"relation {ds.name!r} has too few samples for {K} demonstrations plus queries")
    model_name = pipeline_model_name(model)
    reproduce = {"command": "study icl", "relation": relation, "ks": ks, "template": template, "n_random": n_random}
    run, lm, engine = open_run("icl", [ds.name], reproduce, out, model, st)
    tok = lm.tokenizer

    # prompts for every k, on the same query subjects
    built, spans = {}, []
    for k in ks:
        prefix, spans = demonstrations(tpl, demos[:k])
        ds_k = replace(ds, prompt_templates=[prefix + tpl], samples=queries)
        built[k] = {p.subject: p for p in build_prompts(ds_k, tok, seed=seed).pairs}
    common = sorted(set.intersection(*(set(b) for b in built.values())))
    if len(common) < 4:
        raise KcircuitsError(f"only {len(common)} query subjects give usable prompts for every k; try another template")
    if max_pairs is not None and len(common) > max_pairs:
        common = sorted(random.Random(seed).sample(common, max_pairs))
    pairs = {k: [built[k][s] for s in common] for k in ks}

    # accuracy and circuit per k
    size = circuit_size(engine.graph, st)
    accuracy, circuits = {}, {}
    for k in ks:
        ranks, _ = answer_ranks(engine, pairs[k], lm.pad_token_id, batch_size)
        accuracy[k] = float((ranks == 1).float().mean())
        circuits[k], _ = find_circuit(run, f"k{k}", engine, lm, pairs[k], st, n_edges=size, progress=progress)
    base = head_nodes(circuits[0])
    new_by_k = {k: sorted(head_nodes(circuits[k]) - base) for k in ks if k > 0}
    new_heads = sorted(set().union(*new_by_k.values()), key=engine.graph.src_index)

    # the new heads at the largest k: attention to the demonstrations' answers, and ablation
    batches = model_batches(lm, pairs[K], batch_size, "first_token")
    attn = torch.cat([attention_mass(engine, b, _span_mask(tok, pairs[K][i * batch_size:(i + 1) * batch_size], spans,
                                                           b.clean.shape[1]))
                      for i, b in enumerate(batches)], 1).mean(1)  # [L*H]
    head_names = [f"a{layer}.h{h}" for layer in range(engine.graph.n_layers) for h in range(engine.graph.n_heads)]
    attn_of = dict(zip(head_names, attn.tolist(), strict=True))
    mean = mean_activations(engine, batches)
    ablation_res = None
    if new_heads:
        others = [h for h in head_names if h not in set(new_heads)]

        def accuracy_ablated(heads: Sequence[str]) -> float:
            return _accuracy_with_heads_ablated(engine, pairs[K], lm.pad_token_id, batch_size, heads, mean)

        draws = [accuracy_ablated(random.Random(seed + i).sample(others, min(len(new_heads), len(others))))
                 for i in range(n_random)]
        ablation_res = {"k": K, "n_heads": len(new_heads), "accuracy_intact": accuracy[K],
                        "accuracy_new_heads_ablated": accuracy_ablated(new_heads),
                        "accuracy_random_heads_ablated": draws,
                        "accuracy_random_heads_ablated_mean": sum(draws) / len(draws),
                        "accuracy_random_heads_ablated_std": float(torch.tensor(draws).std(unbiased=False))}
    result = {
        "relation": ds.name, "template": tpl, "demonstrations": demos, "ks": ks, "n_queries": len(common),
        "query_subjects": common,
        "n_edges": size, "accuracy": {str(k): v for k, v in accuracy.items()},
        "new_heads_by_k": {str(k): v for k, v in new_by_k.items()}, "new_heads": new_heads,
        "attention_to_demo_answers": {h: attn_of[h] for h in new_heads},
        "attention_to_demo_answers_all_heads_mean": float(attn.mean()),
        "ablation": ablation_res,
        "circuit_sizes": {str(k): {"n_edges": c.n_edges, "n_heads": len(head_nodes(c))} for k, c in circuits.items()},
    }
    run.write_json("icl.json", result)
    finish(run, _report(result, model_name))
    result["folder"] = str(run.path)
    return result


icl.__doc__ += settings_doc(*STUDY_SETTINGS)


def _report(res: dict, model_name: str) -> dict:
    ks, acc = res["ks"], res["accuracy"]
    text = [f"{model_name} answers {acc['0']:.0%} of {res['n_queries']} {res['relation']} queries zero-shot and "
            + ", ".join(f"{acc[str(k)]:.0%} with {k}" for k in ks[1:]) + " demonstration(s)."]
    if acc["0"] >= 0.5:
        text.append("Note: the model already answers most queries zero-shot; the study is most telling on a relation "
                    "it fails without demonstrations.")
    new = res["new_heads"]
    if new:
        attn = res["attention_to_demo_answers"]
        top = sorted(new, key=lambda h: -attn[h])[:3]
        text.append(f"{len(new)} heads enter the circuit only with demonstrations; those attending most to the "
                    "demonstrations' answers: " + ", ".join(f"{h} ({attn[h]:.2f})" for h in top)
                    + f" (mean over all heads {res['attention_to_demo_answers_all_heads_mean']:.2f}).")
        a = res["ablation"]
        text.append(f"With {a['k']} demonstrations, ablating these heads leaves {a['accuracy_new_heads_ablated']:.0%} "
                    f"accuracy (intact {a['accuracy_intact']:.0%}); ablating as many random heads leaves "
                    f"{a['accuracy_random_heads_ablated_mean']:.0%} ± {a['accuracy_random_heads_ablated_std']:.0%} "
                    f"({len(a['accuracy_random_heads_ablated'])} draws).")
    else:
        text.append("No head enters the circuit only with demonstrations at this circuit size.")
    tables = [{"title": "Heads that appear only with demonstrations",
               "rows": [{"head": h, "attention_to_demo_answers": res["attention_to_demo_answers"][h],
                         "first_k": next(int(k) for k, v in res["new_heads_by_k"].items() if h in v)}
                        for h in sorted(new, key=lambda h: -res["attention_to_demo_answers"][h])],
               "caption": "By attention from the answer position to the demonstrations' answer tokens."}]
    if res["ablation"]:
        a = res["ablation"]
        tables.append({"title": "Accuracy after ablation", "rows": [
            {"condition": "intact", "accuracy": a["accuracy_intact"]},
            {"condition": f"{a['n_heads']} new heads ablated", "accuracy": a["accuracy_new_heads_ablated"]},
            {"condition": f"{a['n_heads']} random heads ablated (mean of draws)",
             "accuracy": a["accuracy_random_heads_ablated_mean"]}]})
    return {"title": f"kcircuits study icl: {res['relation']} on {model_name}",
            "summary": {"model": model_name, "relation": res["relation"], "template": res["template"],
                        "queries": res["n_queries"], "edges per circuit": res["n_edges"]},
            "narrative": text,
            "charts": [{"title": "accuracy by number of demonstrations", "x": ks, "series":
                        {"accuracy (hit@1)": [acc[str(k)] for k in ks]}, "x_label": "demonstrations (k)",
                        "y_label": "accuracy"}],
            "tables": tables + [{"title": "Circuit size by k", "rows": [{"k": k, **v} for k, v in
                                                                         res["circuit_sizes"].items()]}]}
