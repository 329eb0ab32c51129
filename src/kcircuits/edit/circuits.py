"""What an edit does to the circuit: each edited fact's circuit before and after the edit.

No editing toolkit shows this, and it is half of what knowledge circuits are for (Yao et al. 2024,
section on editing). For an edit run (``kcircuits edit``: ``edits.json`` + ``delta.safetensors``) and
each of its first ``facts`` requests:

1. **Prompt pairs of the fact.** The edit prompt and its paraphrases (the clean prompts, all about the
   edited subject) are each paired with a prompt of *another* subject that has the same number of tokens,
   the closest one token by token (so usually the same template), drawn from a pool of prompts with known
   answers: the relation's templates filled with its subjects when the request comes from a bundled
   relation, and every request's prompts and neighbour prompts. A partner whose answer starts like either
   target is never used, and neither is a prompt about any edited subject (the edit changes its answer).
   The same pairs serve both circuits; only the answer differs.
2. **Before**: the circuit of the *true* target on the original model; **after**: the circuit of the
   *new* target on the edited model; same discovery method, scoring and size (:class:`StudySettings`).
   Reported: nodes and edges gained and lost, their Jaccard overlap, each circuit's faithfulness.
3. **Logit lens** of the new and the true target at every layer, before and after: does the new target
   appear at the edited layer (as Yao et al. observe for FT-M) or only later?
4. **Heads that move the subject's attribute** (attention to the subject, direct effect on the answer;
   :mod:`kcircuits.analyze.head_roles`): their attention and their direct effect on each target before
   and after. Did they change what they copy (as Yao et al. observe for ROME)?
5. **Leak**: the circuit of the neighbour prompts (other subjects whose answer must not change) before
   and after, and their Hit@10, full model and circuit alone.

The edited model is the original with the delta applied in place (:func:`kcircuits.models.edits.edited`);
the run folder's hash covers the delta's digest and the weights' fingerprint, and every score file is
named for its side (``scores_fact0_before`` / ``scores_fact0_after``), so nothing computed on one model
is reused for the other.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import median

import torch

from kcircuits.analyze.compare import overlap
from kcircuits.analyze.explain import Explanation, explain, layer_trace
from kcircuits.data import PromptPair, answer_token_ids, encode_text, load_dataset
from kcircuits.edit.requests import EditRequest
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.graph import Circuit
from kcircuits.models import LoadedModel
from kcircuits.models.edits import edited
from kcircuits.runs import RunFolder
from kcircuits.settings import RoleThresholds
from kcircuits.studies.common import StudySettings, evaluate_on, find_circuit

__all__ = ["Probe", "circuit_change", "compare_fact", "compare_neighbours", "fact_probes", "match_probes",
           "neighbour_probes", "probe_pool", "prompt_pairs"]


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer expected after it; ``subject`` as it occurs in ``text`` ("" when unknown)."""

    text: str
    answer: str
    subject: str = ""


def fact_probes(request: EditRequest) -> list[Probe]:
    """The clean prompts of a fact's circuit: the edit prompt and every paraphrase that names the subject
    (answered with the true target; :func:`prompt_pairs` sets the answer each circuit scores)."""
    texts = [request.prompt_text] + [t for t in request.paraphrase_prompts if request.subject in t]
    return [Probe(t, request.target_true or "", request.subject) for t in dict.fromkeys(texts)]


def neighbour_probes(requests: Sequence[EditRequest], n: int, edited_subjects: Iterable[str]) -> list[Probe]:
    """The first ``n`` distinct neighbour prompts of ``requests`` (with their expected answers) that name
    none of ``edited_subjects``: prompts whose answer the edit must leave alone."""
    subjects = tuple(edited_subjects)
    out: dict[str, Probe] = {}
    for req in requests:
        for text, answer in req.neighborhood_prompts:
            if len(out) < n and text not in out and not any(s in text for s in subjects):
                out[text] = Probe(text, answer)
    return list(out.values())


def probe_pool(requests: Sequence[EditRequest]) -> list[Probe]:
    """Prompts with a known answer that corrupted prompts are drawn from: for a request from a bundled
    relation (or relation file), each of the relation's templates filled with each of its subjects; for
    every request, its edit prompt and paraphrases (true target) and its neighbour prompts."""
    pool: dict[str, Probe] = {}
    for relation in dict.fromkeys(r.relation for r in requests if r.relation):
        try:
            ds = load_dataset(relation)
        except KcircuitsError:  # a CounterFact relation id ("P17"), not a relation kcircuits has
            continue
        for template in ds.prompt_templates:
            for sample in ds.samples:
                text = template.replace("{}", sample["subject"], 1)
                pool.setdefault(text, Probe(text, sample["object"], sample["subject"]))
    for req in requests:
        if req.target_true:
            for probe in fact_probes(req):
                pool.setdefault(probe.text, probe)
        for text, answer in req.neighborhood_prompts:
            pool.setdefault(text, Probe(text, answer))
    return list(pool.values())


def _first_token(tokenizer, text: str, answer: str) -> int | None:
    ids = answer_token_ids(tokenizer, text, answer) if answer.strip() else []
    return ids[0] if ids else None


def match_probes(tokenizer, clean: Sequence[Probe], pool: Sequence[Probe], n_pairs: int, *,
                 avoid: Sequence[str] = (), exclude: Iterable[str] = (), seed: int = 0) -> list[tuple[Probe, Probe]]:
    """Up to ``n_pairs`` (clean, corrupt) probe pairs, taken round robin over ``clean``.

    A clean probe's partners are the pool's probes with exactly as many tokens, another text and another
    subject, whose answer's first token differs from the first token of each answer in ``avoid`` (and of
    the clean probe's own answer) after the clean text, and whose text names none of ``exclude``; they
    are ordered by how many token positions differ from the clean prompt (the closest first: usually
    the same template with another subject), ties in a seeded order.

    Args:
        tokenizer: the model's tokenizer (token counts and answers' first tokens).
        clean: the prompts to corrupt.
        pool: the prompts corrupt partners are drawn from (:func:`probe_pool`).
        n_pairs: at most this many pairs in all.
        avoid: answers no partner may start like (e.g. the edit's new target).
        exclude: subjects no partner's text may name (e.g. every edited subject).
        seed: the order among equally close partners.
    """
    excluded = tuple(exclude)
    pool_ids = [(p, encode_text(tokenizer, p.text)) for p in pool if not any(s in p.text for s in excluded)]
    ranked: list[list[Probe]] = []
    for i, probe in enumerate(clean):
        ids = encode_text(tokenizer, probe.text)
        banned = {t for a in (*avoid, probe.answer) if (t := _first_token(tokenizer, probe.text, a)) is not None}
        partners = [(q, q_ids) for q, q_ids in pool_ids if len(q_ids) == len(ids) and q.text != probe.text
                    and (not probe.subject or q.subject != probe.subject)]
        random.Random(f"{seed}:{i}").shuffle(partners)
        partners.sort(key=lambda item: sum(a != b for a, b in zip(item[1], ids, strict=True)))
        ranked.append([q for q, _ in partners if (t := _first_token(tokenizer, q.text, q.answer)) is not None
                       and t not in banned])
    out: list[tuple[Probe, Probe]] = []
    for k in range(max((len(r) for r in ranked), default=0)):
        for probe, partners in zip(clean, ranked, strict=True):
            if k < len(partners) and len(out) < n_pairs:
                out.append((probe, partners[k]))
    return out


def prompt_pairs(tokenizer, matches: Sequence[tuple[Probe, Probe]], answer: str | None = None) -> list[PromptPair]:
    """The matched probes as :class:`~kcircuits.data.PromptPair` s; token ids as the model sees them. The
    template is the clean text with ``{}`` for its subject (head roles find the subject's tokens through
    it; "" when the subject is unknown).

    Args:
        tokenizer: the model's tokenizer.
        matches: ``(clean, corrupt)`` probes (:func:`match_probes`).
        answer: the answer every pair scores against its corrupt probe's answer (default: each clean
            probe's own).
    """
    out = []
    for clean, corrupt in matches:
        target = answer if answer is not None else clean.answer
        out.append(PromptPair(
            template=clean.text.replace(clean.subject, "{}", 1) if clean.subject else "", subject=clean.subject,
            object=target, corrupt_subject=corrupt.subject,
            corrupt_object=corrupt.answer, clean_text=clean.text, corrupt_text=corrupt.text,
            clean_ids=encode_text(tokenizer, clean.text), corrupt_ids=encode_text(tokenizer, corrupt.text),
            answer_ids=answer_token_ids(tokenizer, clean.text, target),
            corrupt_answer_ids=answer_token_ids(tokenizer, corrupt.text, corrupt.answer)))
    return out


# --------------------------------------------------------------------------- comparing two circuits
def _edge_names(circuit: Circuit) -> set[str]:
    g = circuit.graph
    return {f"{g.src_names[s]}->{g.dst_names[d]}" for s, d in torch.nonzero(circuit.edges).tolist()}


def circuit_change(before: Circuit, after: Circuit) -> dict:
    """Nodes and edges gained and lost from ``before`` to ``after`` (edges as ``"src->dst"``, sorted) and
    the Jaccard overlaps of :func:`kcircuits.analyze.compare.overlap`."""
    ov = overlap(before, after)
    nodes_b, nodes_a = set(before.nodes()), set(after.nodes())
    edges_b, edges_a = _edge_names(before), _edge_names(after)
    return {"node_jaccard": ov["node_jaccard"], "edge_jaccard": ov["edge_jaccard"],
            "shared_nodes": ov["shared_nodes"], "shared_edges": ov["shared_edges"],
            "nodes_gained": sorted(nodes_a - nodes_b), "nodes_lost": sorted(nodes_b - nodes_a),
            "edges_gained": sorted(edges_a - edges_b), "edges_lost": sorted(edges_b - edges_a)}


@dataclass
class _Side:
    """One side (before or after) of a fact: its circuit, faithfulness and the lens/roles of both targets."""

    circuit: Circuit
    faithfulness: float
    explained: dict[str, Explanation]  # "true" / "new" -> lens and head roles with that target as the answer


def _explain(engine: Engine, lm: LoadedModel, pairs: list, st: StudySettings, thresholds: RoleThresholds,
             answer_range: list[int]) -> Explanation:
    return explain(engine, lm.tokenizer, pairs, lm.pad_token_id, thresholds=thresholds, answer_range=answer_range,
                   batch_size=st.run.batch_size, device=lm.device, node_lens=False)


def _side(run: RunFolder, name: str, engine: Engine, lm: LoadedModel, scored: str, pairs: dict[str, list],
          st: StudySettings, n_edges: int, thresholds: RoleThresholds, progress: bool) -> _Side:
    """The circuit of ``pairs[scored]`` on ``lm`` as it is now (edited or not), and both targets' lens/roles."""
    circuit, _ = find_circuit(run, name, engine, lm, pairs[scored], st, n_edges=n_edges, progress=progress)
    faith = evaluate_on(engine, lm, pairs[scored], {name: circuit}, st, progress=False)[name]
    answer_range = sorted({p.answer_ids[0] for ps in pairs.values() for p in ps}
                          | {p.corrupt_answer_ids[0] for ps in pairs.values() for p in ps})
    return _Side(circuit, faith["faithfulness_of_means"],
                 {k: _explain(engine, lm, ps, st, thresholds, answer_range) for k, ps in pairs.items()})


def _settles(ex: Explanation) -> float | None:
    """Median over prompts of the first layer from which the answer stays at rank 1 (None: it never does
    on most prompts)."""
    first = [v for v in ex.lens.first_layer_at_rank(1).tolist()]
    return None if sum(v >= 0 for v in first) * 2 < len(first) else float(median(v for v in first if v >= 0))


def _movers(before: _Side, after: _Side, thresholds: RoleThresholds, top: int) -> list[dict]:
    """The heads that move the subject's attribute (attention to the subject at least the mover threshold,
    positive answer z) most strongly before the edit (true target) or after it (new target), with their
    subject attention and direct effects on both targets on both sides."""
    def table(side: _Side, target: str) -> dict[str, dict]:
        return {r["head"]: r for r in side.explained[target].roles.rows}

    tb_true, tb_new, ta_true, ta_new = table(before, "true"), table(before, "new"), table(after, "true"), \
        table(after, "new")

    def strongest(rows: dict[str, dict]) -> list[str]:
        movers = [r for r in rows.values() if r["subject_mass"] >= thresholds.subject_mass_min and r["answer_z"] > 0]
        return [r["head"] for r in sorted(movers, key=lambda r: -r["answer_z"])[:top]]

    heads = list(dict.fromkeys(strongest(tb_true) + strongest(ta_new)))
    nodes_b, nodes_a = set(before.circuit.nodes()), set(after.circuit.nodes())
    return [{"head": h, "role before (true target)": tb_true[h]["role"], "role after (new target)": ta_new[h]["role"],
             "subject attention before": tb_true[h]["subject_mass"],
             "subject attention after": ta_new[h]["subject_mass"],
             "direct effect on true, before": tb_true[h]["direct_effect"],
             "direct effect on true, after": ta_true[h]["direct_effect"],
             "direct effect on new, before": tb_new[h]["direct_effect"],
             "direct effect on new, after": ta_new[h]["direct_effect"],
             "in circuit before": h in nodes_b, "in circuit after": h in nodes_a} for h in heads]


def compare_fact(run: RunFolder, index: int, request: EditRequest, deltas: dict, engine: Engine, lm: LoadedModel,
                 pool: Sequence[Probe], st: StudySettings, *, n_pairs: int, n_edges: int, exclude: Iterable[str],
                 top_heads: int, thresholds: RoleThresholds, progress: bool) -> tuple[dict, dict]:
    """One edited fact: the true target's circuit on the original model and the new target's on the
    model with ``deltas`` applied, on the same prompt pairs (see the module docstring).

    Args:
        run: the run folder the circuits and scores are written to (``circuit_fact<index>_before.json``, ...).
        index: the fact's number in the run's file names.
        request: the edited fact (it must have a true target).
        deltas: the edit, ``{param_name: Δ}`` (:func:`kcircuits.models.edits.edited` applies it).
        engine: the model's engine over the discovery graph (its weights are views: it sees the edit).
        lm: the original model (left as it was).
        pool: the prompts corrupt partners are drawn from (:func:`probe_pool`).
        st: scoring, attribution, size and run settings (``st.prompts`` is not used).
        n_pairs: prompt pairs of the fact.
        n_edges: every circuit's size.
        exclude: subjects no corrupt prompt may name (the other edited subjects).
        top_heads: mover heads listed from each side.
        thresholds: head-role thresholds (movers attend to the subject with ``subject_mass_min``).
        progress: show the attribution's progress bars.

    Returns:
        ``(result, circuits)``: the JSON-ready comparison, and ``{"before": Circuit, "after": Circuit}``
        (with each side's scores) for the report's drawings.
    """
    if not request.target_true:
        raise KcircuitsError(f"fact {index} ({request.prompt_text!r}) has no true target: its circuit before the "
                             "edit cannot be found; compare facts whose source gives the current answer")
    matches = match_probes(lm.tokenizer, fact_probes(request), pool, n_pairs, avoid=(request.target_new,),
                           exclude=exclude, seed=st.run.seed)
    if not matches:
        raise KcircuitsError(f"no prompt of another subject has as many tokens as {request.prompt_text!r} and "
                             "another answer: the fact's circuit needs one to corrupt with. Edit more requests of "
                             "the relation, or compare other facts (--facts)")
    pairs = {"true": prompt_pairs(lm.tokenizer, matches, request.target_true),
             "new": prompt_pairs(lm.tokenizer, matches, request.target_new)}
    before = _side(run, f"fact{index}_before", engine, lm, "true", pairs, st, n_edges, thresholds, progress)
    with edited(lm, deltas):
        after = _side(run, f"fact{index}_after", engine, lm, "new", pairs, st, n_edges, thresholds, progress)
    result = {
        "subject": request.subject, "prompt": request.prompt_text, "target_true": request.target_true,
        "target_new": request.target_new, "n_pairs": len(matches),
        "pairs": [{"clean": c.text, "corrupt": k.text, "corrupt_answer": k.answer} for c, k in matches],
        "circuit_before": {"n_edges": before.circuit.n_edges, "n_nodes": len(before.circuit.nodes()),
                           "faithfulness": before.faithfulness, "answer": "true target", "model": "original"},
        "circuit_after": {"n_edges": after.circuit.n_edges, "n_nodes": len(after.circuit.nodes()),
                          "faithfulness": after.faithfulness, "answer": "new target", "model": "edited"},
        "change": circuit_change(before.circuit, after.circuit),
        "lens": {target: {"before": layer_trace(before.explained[target].lens),
                          "after": layer_trace(after.explained[target].lens)} for target in ("true", "new")},
        "new_target_settles_at": {"before": _settles(before.explained["new"]),
                                  "after": _settles(after.explained["new"])},
        "true_target_settles_at": {"before": _settles(before.explained["true"]),
                                   "after": _settles(after.explained["true"])},
        "movers": _movers(before, after, thresholds, top_heads),
    }
    return result, {"before": before.circuit, "after": after.circuit}


def compare_neighbours(run: RunFolder, probes: Sequence[Probe], deltas: dict, engine: Engine, lm: LoadedModel,
                       pool: Sequence[Probe], st: StudySettings, *, n_edges: int, exclude: Iterable[str],
                       progress: bool) -> tuple[dict, dict]:
    """Does the edit leak? The circuit of the neighbour prompts (their expected answers) on the original
    and on the edited model, on the same pairs: what changed, and Hit@10 of the full model and of each
    circuit alone on both.

    Args:
        run: the run folder (``circuit_neighbours_before.json``, ``..._after.json`` and their scores).
        probes: the neighbour prompts (:func:`neighbour_probes`).
        deltas: the edit, ``{param_name: Δ}``.
        engine: the model's engine over the discovery graph.
        lm: the original model (left as it was).
        pool: the prompts corrupt partners are drawn from.
        st: scoring, attribution, size and run settings.
        n_edges: each circuit's size.
        exclude: subjects no corrupt prompt may name (every edited subject).
        progress: show the attribution's progress bars.

    Returns:
        ``(result, circuits)`` like :func:`compare_fact`.
    """
    exclude = tuple(exclude)
    matches = match_probes(lm.tokenizer, probes, pool, len(probes), exclude=exclude, seed=st.run.seed)
    if not matches:
        raise KcircuitsError("no neighbour prompt has a same-length prompt of another subject to corrupt with; "
                             "skip the leak check with --neighbours 0")
    pairs = prompt_pairs(lm.tokenizer, matches)
    before, _ = find_circuit(run, "neighbours_before", engine, lm, pairs, st, n_edges=n_edges, progress=progress)
    ev_before = evaluate_on(engine, lm, pairs, {"before": before}, st, progress=False)["before"]
    with edited(lm, deltas):
        after, _ = find_circuit(run, "neighbours_after", engine, lm, pairs, st, n_edges=n_edges, progress=progress)
        ev_after = evaluate_on(engine, lm, pairs, {"after": after}, st, progress=False)["after"]
    keys = ("full_hit10", "circuit_hit10", "chance_hit10", "faithfulness_of_means")
    result = {"n_pairs": len(pairs), "prompts": [{"prompt": c.text, "answer": c.answer, "corrupt": k.text}
                                                 for c, k in matches],
              "before": {k: ev_before.get(k) for k in keys}, "after": {k: ev_after.get(k) for k in keys},
              "change": circuit_change(before, after)}
    return result, {"before": before, "after": after}
