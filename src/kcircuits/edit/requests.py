"""Edit requests: what to write into a model, and the prompts that check what the edit did.

An :class:`EditRequest` is ``(prompt with {} for the subject, subject, new target, true target)``
plus the prompts the edit metrics need: paraphrases of the edit prompt (generalisation), prompts
about other subjects whose answer must not change (specificity), prompts about other relations
(specificity beyond the relation) and free-generation prompts (fluency). Three sources:

* a bundled relation (or a relation ``.json`` file, :func:`kcircuits.data.load_dataset`):
  :func:`requests_from_relation`;
* a CounterFact-shaped JSON list (``requested_rewrite``, ``paraphrase_prompts``,
  ``neighborhood_prompts``, ``generation_prompts``): :func:`load_counterfact`;
* a zsRE / EasyEdit-shaped JSON list (``src``, ``alt``, ``rephrase``, ``loc``, ``loc_ans``,
  ``subject``): :func:`load_zsre`.

:func:`load_requests` picks the source from its argument. Every problem is one
:class:`~kcircuits.errors.KcircuitsError` line naming the record, raised before anything is edited
or written; :func:`validate_requests` checks requests however they were made (the loaders call it).
Targets are scored as ``" " + target`` after the prompt, token by token (multi-token targets are
teacher-forced), exactly as :func:`kcircuits.data.answer_token_ids` tokenises answers.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kcircuits.data import answer_token_ids, list_datasets, load_dataset
from kcircuits.data.datasets import parse_json, read_text
from kcircuits.errors import KcircuitsError

__all__ = [
    "EditRequest",
    "load_counterfact",
    "load_requests",
    "load_zsre",
    "requests_from_relation",
    "source_shape",
    "target_ids",
    "validate_requests",
]

PLACEHOLDER = "{}"


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.replace("{}", subject)`` should be answered with ``target_new``.

    Fields:
        prompt: the edit prompt as a template with exactly one ``{}`` where the subject goes, ending
            right before the answer (``"The capital of {} is"``).
        subject: the subject whose fact changes (``"France"``); ROME/MEMIT edit at its last token.
        target_new: the answer to write (``"Berlin"``); may span several tokens.
        target_true: the model's / the world's current answer (``"Paris"``), or ``None`` when the
            source does not give one (zsRE records without ``answers``): then the metrics that compare
            P(new) with P(true) are NaN for this request and are left out of the summaries.
        paraphrase_prompts: other wordings of the same question, subject filled in (generalisation).
        neighborhood_prompts: ``(prompt, expected answer)`` for other subjects whose answer must not
            change (specificity); the expected answer is what the model should still say.
        generation_prompts: prompts about the subject for free generation (fluency).
        relation: the relation's name or id (``"country_capital"``, CounterFact's ``"P17"``); ``""``
            when unknown (zsRE). Two requests for one subject and one relation must agree.
        case_id: an identifier kept from the source (record index when the source has none).
        other_prompts: ``(prompt, expected answer)`` of *other relations* (specificity beyond the
            edited relation); empty unless asked for.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[tuple[str, str], ...] = ()
    generation_prompts: tuple[str, ...] = ()
    relation: str = ""
    case_id: int | str = 0
    other_prompts: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        """Store the prompt lists as tuples (hashable, immutable) whatever sequence was passed."""
        object.__setattr__(self, "paraphrase_prompts", _as_tuple(self.paraphrase_prompts))
        object.__setattr__(self, "generation_prompts", _as_tuple(self.generation_prompts))
        object.__setattr__(self, "neighborhood_prompts", _pairs_tuple(self.neighborhood_prompts))
        object.__setattr__(self, "other_prompts", _pairs_tuple(self.other_prompts))

    @property
    def prompt_text(self) -> str:
        """The edit prompt with the subject filled in (``"The capital of France is"``)."""
        return self.prompt.replace(PLACEHOLDER, self.subject, 1)

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field (tuples become lists), for run folders and reports."""
        return json.loads(json.dumps(asdict(self)))


def _as_tuple(values: Any) -> tuple:
    """A tuple of ``values``; a single string stays one element (not split into characters)."""
    if isinstance(values, str):
        return (values,)
    return tuple(values)


def _pairs_tuple(values: Any) -> tuple:
    """``((prompt, answer), ...)``: each element made a tuple so the request stays hashable."""
    return tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in _as_tuple(values))


# --------------------------------------------------------------------------- tokenisation


def target_ids(tokenizer: Any, target: str, prompt: str = "") -> list[int]:
    """Token ids of ``target`` as the model reads it right after ``prompt``: ``" " + target``'s tokens.

    The same rule as :func:`kcircuits.data.answer_token_ids` (it is called): prompt and target are
    tokenised together and the prompt's own tokens cut off, so a tokenizer that merges across the
    boundary is scored on what it really produces. Without a prompt, the target's tokens after an
    empty prompt. May return ``[]`` for odd tokenizers; :func:`validate_requests` rejects that.

    Args:
        tokenizer: a Hugging Face tokenizer (or any callable returning ``.input_ids``).
        target: the answer, without its leading space (``"Paris"``).
        prompt: the filled prompt the target follows (``"The capital of France is"``).
    """
    return answer_token_ids(tokenizer, prompt, target)


# --------------------------------------------------------------------------- validation


def _short(value: object, limit: int = 60) -> str:
    """repr() of a user value, shortened so that messages stay on one line."""
    text = repr(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(i: int, req: EditRequest) -> str:
    """How an error names a request: its position, case id and subject."""
    return f"edit request #{i} (case_id {_short(req.case_id)}, subject {_short(req.subject)})"


def _check_text(value: object, what: str, where: str) -> None:
    """A non-empty string, or one clear error."""
    if not isinstance(value, str):
        raise KcircuitsError(f"{where}: {what} is {type(value).__name__}, not a string; quote it")
    if not value.strip():
        raise KcircuitsError(f"{where}: {what} is empty; give a non-empty {what}")


def _check_pairs(pairs: tuple, what: str, where: str) -> None:
    """Each element a ``(prompt, expected answer)`` pair of non-empty strings."""
    for k, pair in enumerate(pairs):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise KcircuitsError(f"{where}: {what} #{k} {_short(pair)} is not a (prompt, expected answer) pair")
        _check_text(pair[0], f"{what} #{k} prompt", where)
        _check_text(pair[1], f"{what} #{k} expected answer", where)


def _check_one(i: int, req: object) -> None:
    """Every check of one request that needs no tokenizer."""
    if not isinstance(req, EditRequest):
        raise KcircuitsError(f"edit request #{i} is {type(req).__name__}, not an EditRequest")
    where = _where(i, req)
    _check_text(req.prompt, "prompt", where)
    _check_text(req.subject, "subject", where)
    n = req.prompt.count(PLACEHOLDER)
    if n == 0:
        raise KcircuitsError(f"{where}: prompt {_short(req.prompt)} has no '{{}}': the subject is not in the "
                             "prompt; put {} where the subject goes")
    if n > 1:
        raise KcircuitsError(f"{where}: prompt {_short(req.prompt)} has {n} '{{}}' placeholders; use exactly one")
    if req.prompt != req.prompt.rstrip():
        raise KcircuitsError(f"{where}: prompt {_short(req.prompt)} ends with whitespace; end it right before the "
                             "answer (targets are scored as ' ' + target)")
    _check_text(req.target_new, "target_new", where)
    if req.target_true is not None:
        _check_text(req.target_true, "target_true", where)
        if req.target_new.strip().casefold() == req.target_true.strip().casefold():
            raise KcircuitsError(f"{where}: target_new {_short(req.target_new)} is the true target; "
                                 "give a different new target")
    for k, p in enumerate(req.paraphrase_prompts):
        _check_text(p, f"paraphrase prompt #{k}", where)
    for k, p in enumerate(req.generation_prompts):
        _check_text(p, f"generation prompt #{k}", where)
    _check_pairs(req.neighborhood_prompts, "neighborhood prompt", where)
    _check_pairs(req.other_prompts, "other-relation prompt", where)


def _check_tokens(i: int, req: EditRequest, tokenizer: Any) -> None:
    """Every target and expected answer must give at least one token after its prompt."""
    where = _where(i, req)
    checks = [(req.prompt_text, req.target_new, "target_new")]
    if req.target_true is not None:
        checks.append((req.prompt_text, req.target_true, "target_true"))
    checks += [(p, a, f"neighborhood answer #{k}") for k, (p, a) in enumerate(req.neighborhood_prompts)]
    checks += [(p, a, f"other-relation answer #{k}") for k, (p, a) in enumerate(req.other_prompts)]
    for prompt, answer, what in checks:
        if not target_ids(tokenizer, answer, prompt):
            raise KcircuitsError(f"{where}: {what} {_short(answer)} tokenises to nothing after its prompt; "
                                 "give a target the tokenizer can encode")


def _check_conflicts(requests: Sequence[EditRequest]) -> None:
    """Two requests for one subject in one batch must not ask for different answers to one question.

    "One question" = the same subject with the same prompt template, or with the same (known)
    relation: MEMIT would be asked to write both, and at most one can win. The same subject in
    different relations is fine (two different facts).
    """
    seen: dict[tuple[str, str, str], tuple[int, str]] = {}
    for i, req in enumerate(requests):
        keys = [("prompt", req.subject, req.prompt)]
        if req.relation:
            keys.append(("relation", req.subject, req.relation))
        for key in keys:
            if key in seen and seen[key][1].strip().casefold() != req.target_new.strip().casefold():
                j, other = seen[key]
                raise KcircuitsError(
                    f"conflicting requests for one subject: edit requests #{j} and #{i} ask "
                    f"{_short(req.subject)} ({key[0]} {_short(key[2])}) to answer {_short(other)} and "
                    f"{_short(req.target_new)}; keep one of them or edit them in separate batches"
                )
            seen.setdefault(key, (i, req.target_new))


def validate_requests(
    requests: Iterable[EditRequest], tokenizer: Any = None, *, one_batch: bool = True
) -> list[EditRequest]:
    """Check a batch of edit requests; return them as a list, or raise one one-line KcircuitsError.

    Rules: at least one request; each prompt a template with exactly one ``{}`` (the subject must
    be in the prompt) and no trailing whitespace; non-empty subject and ``target_new``;
    ``target_true`` either ``None`` or a non-empty string different from ``target_new``; every
    paraphrase, generation and neighbourhood prompt (and expected answer) a non-empty string; with
    ``one_batch``, no two requests for one subject asking different answers to one question (the same
    template, or the same non-empty relation): one MEMIT batch cannot write both. With a tokenizer,
    every target and expected answer must also give at least one token after its prompt.

    Args:
        requests: the :class:`EditRequest` objects (any iterable).
        tokenizer: the model's tokenizer, to check that targets tokenise to something; ``None`` skips
            that check.
        one_batch: the requests are edited together: reject conflicting requests for one subject. The
            loaders and the metrics pass ``False`` (a file may hold edits meant to be applied one by one).
    """
    if isinstance(requests, EditRequest):
        requests = [requests]
    reqs = list(requests)
    if not reqs:
        raise KcircuitsError("no edit requests; give at least one")
    for i, req in enumerate(reqs):
        _check_one(i, req)
    if one_batch:
        _check_conflicts(reqs)
    if tokenizer is not None:
        for i, req in enumerate(reqs):
            _check_tokens(i, req, tokenizer)
    return reqs


# --------------------------------------------------------------------------- bundled relations


def _positive(value: object, name: str, allow_zero: bool = False) -> int:
    """A (non-negative / positive) integer argument, or one clear error."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise KcircuitsError(f"{name} must be an integer >= {low}, got {_short(value)}")
    return value


def _objects_by_subject(samples: list[dict]) -> dict[str, list[str]]:
    """Each subject's objects, subjects and objects in file order (a subject may have several answers)."""
    facts: dict[str, list[str]] = {}
    for s in samples:
        facts.setdefault(s["subject"], []).append(s["object"])
    return facts


def _other_relation_probes(names: Sequence[str], exclude: str) -> list[tuple[str, str]]:
    """``(prompt, object)`` of every sample of the other relations, each with its first template."""
    probes: list[tuple[str, str]] = []
    for name in names:
        ds = load_dataset(name)
        if ds.name == exclude:
            raise KcircuitsError(f"other relation {_short(name)} is the edited relation; choose another one")
        tpl = ds.prompt_templates[0]
        probes += [(tpl.replace(PLACEHOLDER, s["subject"], 1), s["object"]) for s in ds.samples]
    return probes


def requests_from_relation(
    relation: str | os.PathLike[str],
    n: int | None = None,
    seed: int = 0,
    *,
    n_paraphrases: int = 2,
    n_neighbours: int = 5,
    n_generation: int = 2,
    template: int = 0,
    other_relations: Sequence[str] = (),
    n_other: int = 5,
) -> list[EditRequest]:
    """Counterfactual edits of a relation's own facts, drawn deterministically with ``seed``.

    For each of ``n`` subjects (a seeded sample, in the dataset's order): the edit prompt is template
    ``template``; ``target_true`` is the subject's object (its first, if the file gives several) and
    ``target_new`` a seeded choice among the relation's objects that are none of the subject's;
    paraphrases are the relation's other templates filled with the subject (the first
    ``n_paraphrases`` in file order); neighbours are ``n_neighbours`` seeded subjects with their own
    objects, asked with the edit template, among the subjects *not* edited by this list (a batch edit
    must not count its own edits against specificity; with ``n=None`` there are none) and leaving out
    subjects whose object is the new target (their answer *should* look like the edit); generation prompts are the first
    ``n_generation`` templates filled with the subject. With ``other_relations``, ``n_other`` seeded
    ``(prompt, object)`` probes of those relations (first template each) are added as ``other_prompts``.

    Args:
        relation: a bundled relation name or a relation ``.json``/``.csv`` file.
        n: how many requests (subjects); ``None`` for every subject.
        seed: seeds the choice of subjects, new targets, neighbours and other-relation probes.
        n_paraphrases: paraphrase prompts per request (at most the number of other templates).
        n_neighbours: neighbourhood prompts per request.
        n_generation: generation prompts per request.
        template: index of the template used as the edit prompt.
        other_relations: names of other relations to probe for specificity beyond this relation.
        n_other: other-relation probes per request (used only with ``other_relations``).
    """
    ds = load_dataset(relation)
    for name, value in (("n_paraphrases", n_paraphrases), ("n_neighbours", n_neighbours),
                        ("n_generation", n_generation), ("n_other", n_other)):
        _positive(value, name, allow_zero=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise KcircuitsError(f"seed must be an integer, got {_short(seed)}")
    if isinstance(template, bool) or not isinstance(template, int) or not 0 <= template < len(ds.prompt_templates):
        raise KcircuitsError(f"template index {_short(template)} is out of range: relation {ds.name} has "
                             f"{len(ds.prompt_templates)} templates (0..{len(ds.prompt_templates) - 1})")
    facts = _objects_by_subject(ds.samples)
    subjects = list(facts)
    if n is not None and _positive(n, "n") > len(subjects):
        raise KcircuitsError(f"relation {ds.name} has {len(subjects)} subjects, fewer than the {n} requests asked; "
                             "ask for fewer")
    objects = sorted({o for objs in facts.values() for o in objs}, key=lambda o: (o.casefold(), o))
    picked = sorted(random.Random(f"{seed}:subjects").sample(range(len(subjects)), len(subjects) if n is None else n))
    edited = {subjects[i] for i in picked}
    tpl = ds.prompt_templates[template]
    others = [t for k, t in enumerate(ds.prompt_templates) if k != template]
    probes = _other_relation_probes(other_relations, ds.name) if other_relations else []
    out = []
    for i in picked:
        subject = subjects[i]
        true = {o.casefold() for o in facts[subject]}
        candidates = [o for o in objects if o.casefold() not in true]
        if not candidates:
            raise KcircuitsError(f"relation {ds.name}: every object is an answer of {subject!r}, so there is no "
                                 "new target to write; add samples with other objects")
        rng = random.Random(f"{seed}:{i}")
        new = rng.choice(candidates)
        neighbours = [s for s in subjects if s not in edited and new.casefold() not in {o.casefold() for o in facts[s]}]
        neighbours = rng.sample(neighbours, min(n_neighbours, len(neighbours)))
        out.append(EditRequest(
            prompt=tpl, subject=subject, target_new=new, target_true=facts[subject][0],
            paraphrase_prompts=tuple(t.replace(PLACEHOLDER, subject, 1) for t in others[:n_paraphrases]),
            neighborhood_prompts=tuple((tpl.replace(PLACEHOLDER, s, 1), facts[s][0]) for s in neighbours),
            generation_prompts=tuple(t.replace(PLACEHOLDER, subject, 1) for t in ds.prompt_templates[:n_generation]),
            relation=ds.name, case_id=f"{ds.name}/{i}",
            other_prompts=tuple(rng.sample(probes, min(n_other, len(probes)))) if probes else (),
        ))
    return validate_requests(out)


# --------------------------------------------------------------------------- JSON files


def _read_json(path: str | os.PathLike[str]) -> tuple[object, str]:
    """The parsed JSON of a file and its name for messages; malformed JSON names line and column."""
    p = Path(path).expanduser()
    return parse_json(read_text(p, "edit requests file", "a .json file"), str(p)), str(p)


def _records(raw: object, where: str, shape: str) -> list[dict]:
    """The file's top level: a non-empty list of JSON objects."""
    if not isinstance(raw, list):
        raise KcircuitsError(f"{where}: top level must be a JSON list of {shape} records, got {type(raw).__name__}")
    if not raw:
        raise KcircuitsError(f"{where}: the list of edit requests is empty; add at least one record")
    for k, rec in enumerate(raw):
        if not isinstance(rec, dict):
            raise KcircuitsError(f"{where}: record #{k} is {type(rec).__name__}, not a JSON object")
    return raw


def _field(rec: dict, key: str, where: str, k: int, *, parent: str = "") -> str:
    """A required string field of record ``k`` (stripped), or an error naming the key and the record."""
    name = f"{parent}.{key}" if parent else key
    if key not in rec:
        raise KcircuitsError(f"{where}: record #{k} has no '{name}'; every record needs it")
    value = rec[key]
    if not isinstance(value, str):
        raise KcircuitsError(f"{where}: record #{k} '{name}' is {type(value).__name__} {_short(value)}, not a string")
    if not value.strip():
        raise KcircuitsError(f"{where}: record #{k} has an empty '{name}'; fill it in or remove the record")
    return value.strip()


def _strings(rec: dict, key: str, where: str, k: int) -> tuple[str, ...]:
    """An optional list of strings (missing = empty)."""
    value = rec.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise KcircuitsError(f"{where}: record #{k} '{key}' must be a list of strings, got {_short(value)}")
    return tuple(v.strip() for v in value if v.strip())


def _cf_target(rw: dict, key: str, where: str, k: int) -> str:
    """CounterFact's ``target_new``/``target_true``: ``{"str": ...}`` (a plain string is accepted too)."""
    if key not in rw:
        raise KcircuitsError(f"{where}: record #{k} has no 'requested_rewrite.{key}'; every record needs it")
    value = rw[key]
    if isinstance(value, dict):
        return _field(value, "str", where, k, parent=f"requested_rewrite.{key}")
    return _field(rw, key, where, k, parent="requested_rewrite")


def _case_id(rec: dict, k: int) -> int | str:
    """The record's ``case_id`` if it has a usable one, else its index."""
    cid = rec.get("case_id", k)
    return cid if isinstance(cid, (int, str)) and not isinstance(cid, bool) else k


def _counterfact_record(rec: dict, where: str, k: int) -> EditRequest:
    """One CounterFact record -> EditRequest (neighbours expect the request's true target)."""
    if "requested_rewrite" not in rec:
        raise KcircuitsError(f"{where}: record #{k} has no 'requested_rewrite'; every record needs it")
    rw = rec["requested_rewrite"]
    if not isinstance(rw, dict):
        raise KcircuitsError(f"{where}: record #{k} 'requested_rewrite' must be an object, got {type(rw).__name__}")
    prompt = _field(rw, "prompt", where, k, parent="requested_rewrite")
    subject = _field(rw, "subject", where, k, parent="requested_rewrite")
    new, true = _cf_target(rw, "target_new", where, k), _cf_target(rw, "target_true", where, k)
    relation = rw.get("relation_id", "")
    return EditRequest(
        prompt=prompt, subject=subject, target_new=new, target_true=true,
        paraphrase_prompts=_strings(rec, "paraphrase_prompts", where, k),
        neighborhood_prompts=tuple((p, true) for p in _strings(rec, "neighborhood_prompts", where, k)),
        generation_prompts=_strings(rec, "generation_prompts", where, k),
        relation=relation if isinstance(relation, str) else str(relation), case_id=_case_id(rec, k),
    )


def _first(records: list[dict], n: int | None) -> list[dict]:
    """The first ``n`` records (all with ``None``)."""
    return records if n is None else records[: _positive(n, "n")]


def _from_records(raw: object, where: str, shape: str, n: int | None, tokenizer: Any) -> list[EditRequest]:
    """Parsed records of one shape -> validated requests (the file's name in front of any message)."""
    convert = _counterfact_record if shape == "CounterFact" else _zsre_record
    reqs = [convert(rec, where, k) for k, rec in enumerate(_first(_records(raw, where, shape), n))]
    try:
        return validate_requests(reqs, tokenizer, one_batch=False)
    except KcircuitsError as e:
        raise KcircuitsError(f"{where}: {e}") from None


def load_counterfact(path: str | os.PathLike[str], n: int | None = None, *, tokenizer: Any = None) -> list[EditRequest]:
    """Edit requests from a CounterFact-shaped JSON list (ROME's ``counterfact.json``, MEMIT's multi-counterfact).

    Each record::

        {"case_id": 0,
         "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                               "target_new": {"str": "English"}, "target_true": {"str": "French"},
                               "relation_id": "P103"},
         "paraphrase_prompts": ["Danielle Darrieux spoke the language"],
         "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
         "generation_prompts": ["Danielle Darrieux's mother tongue is"]}

    ``requested_rewrite`` with ``prompt``, ``subject``, ``target_new`` and ``target_true`` is required;
    the three prompt lists may be missing (empty). As in CounterFact, every neighbourhood prompt expects
    the request's *true* target (its subjects share the original object). Extra keys are ignored.

    Args:
        path: the JSON file.
        n: keep only the first ``n`` records; ``None`` for all.
        tokenizer: if given, also check that every target tokenises to something.
    """
    return _from_records(*_read_json(path), "CounterFact", n, tokenizer)


def _zsre_record(rec: dict, where: str, k: int) -> EditRequest:
    """One zsRE record -> EditRequest; the prompt is ``src`` with the subject replaced by ``{}``."""
    src, subject, alt = (_field(rec, key, where, k) for key in ("src", "subject", "alt"))
    if subject not in src:
        raise KcircuitsError(f"{where}: record #{k}: subject {_short(subject)} is not in the prompt 'src' "
                             f"{_short(src)}; fix the subject or the prompt")
    if PLACEHOLDER in src:
        raise KcircuitsError(f"{where}: record #{k}: 'src' {_short(src)} already contains '{{}}'; remove it")
    answers = rec.get("answers", [])
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise KcircuitsError(f"{where}: record #{k} 'answers' must be a list of strings, got {_short(answers)}")
    answers = [a.strip() for a in answers if a.strip()]
    has_loc = ("loc" in rec, "loc_ans" in rec)
    if any(has_loc) and not all(has_loc):
        missing = "loc_ans" if has_loc[0] else "loc"
        raise KcircuitsError(f"{where}: record #{k} has no '{missing}'; 'loc' and 'loc_ans' go together")
    neighbours = ((_field(rec, "loc", where, k), _field(rec, "loc_ans", where, k)),) if all(has_loc) else ()
    return EditRequest(
        prompt=src.replace(subject, PLACEHOLDER, 1), subject=subject, target_new=alt,
        target_true=answers[0] if answers else None,
        paraphrase_prompts=(_field(rec, "rephrase", where, k),) if "rephrase" in rec else (),
        neighborhood_prompts=neighbours, relation="", case_id=_case_id(rec, k),
    )


def load_zsre(path: str | os.PathLike[str], n: int | None = None, *, tokenizer: Any = None) -> list[EditRequest]:
    """Edit requests from a zsRE JSON list in EasyEdit's shape (``zsre_mend_eval.json``).

    Each record::

        {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
         "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
         "rephrase": "What university did Watts Humphrey take part in?",
         "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving"}

    ``src``, ``subject`` and ``alt`` are required and the subject must occur in ``src``: the prompt
    is ``src`` with its first occurrence replaced by ``{}``. ``target_new = alt``; ``target_true`` is
    ``answers[0]`` when ``answers`` is given, else ``None`` (``pred`` is a model's prediction, not the
    truth, and is ignored). ``rephrase`` becomes the one paraphrase; ``loc``/``loc_ans`` (together) the
    one neighbourhood prompt and its expected answer. zsRE has no relation ids (``relation = ""``) and
    no generation prompts.

    Args:
        path: the JSON file.
        n: keep only the first ``n`` records; ``None`` for all.
        tokenizer: if given, also check that every target tokenises to something.
    """
    return _from_records(*_read_json(path), "zsRE", n, tokenizer)


#: Keywords of :func:`requests_from_relation` that :func:`load_requests` passes on.
RELATION_OPTIONS = frozenset({"n_paraphrases", "n_neighbours", "n_generation", "template", "other_relations",
                              "n_other"})


def _file_shape(raw: object) -> str:
    """``"CounterFact"``, ``"zsRE"`` or ``"relation"`` from a parsed file's content, else ``""``."""
    if isinstance(raw, dict) and "samples" in raw:
        return "relation"
    if isinstance(raw, list) and raw and isinstance(raw[0], dict):
        if "requested_rewrite" in raw[0]:
            return "CounterFact"
        if "src" in raw[0]:
            return "zsRE"
    return ""


def _read_source(source: str | os.PathLike[str]) -> tuple[str, object, str]:
    """``(shape, parsed JSON or None, name for messages)`` of a request source: "relation" for a bundled
    name or a .csv / relation .json, "CounterFact" or "zsRE" for those files; bad sources are one-line errors."""
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source).strip():
        raise KcircuitsError(f"edit requests source must be a relation name or a .json path, got {_short(source)}")
    name = os.fspath(source)
    is_file = isinstance(source, os.PathLike) or name.lower().endswith((".json", ".csv")) or os.path.isfile(name)
    if is_file and not name.lower().endswith(".csv"):
        raw, where = _read_json(name)
        shape = _file_shape(raw)
        if not shape:
            raise KcircuitsError(
                f"{where}: cannot tell the file's shape: give a list of CounterFact records (with "
                "'requested_rewrite'), a list of zsRE records (with 'src') or a relation (with 'samples')")
        return shape, raw, where
    if not is_file and name not in list_datasets():
        raise KcircuitsError(f"unknown relation {_short(name)}; available: {', '.join(list_datasets())} "
                             "(a CounterFact or zsRE .json file is also accepted)")
    return "relation", None, name


def source_shape(source: str | os.PathLike[str]) -> str:
    """What ``source`` holds: "relation" (a bundled name, a .csv or a relation .json: the relation options
    of :func:`load_requests` apply), "CounterFact" or "zsRE"; a bad source is a one-line error."""
    return _read_source(source)[0]


def load_requests(
    source: str | os.PathLike[str],
    n: int | None = None,
    seed: int = 0,
    *,
    tokenizer: Any = None,
    **relation_options: Any,
) -> list[EditRequest]:
    """Edit requests from a bundled relation name or a JSON file, whichever ``source`` is.

    A bundled name (``"country_capital"``) or a ``.csv`` goes to :func:`requests_from_relation`; a
    ``.json`` file is read and dispatched on its content: a list whose records have
    ``requested_rewrite`` -> :func:`load_counterfact`, ``src`` -> :func:`load_zsre`, an object with
    ``samples`` (a relation file) -> :func:`requests_from_relation`.

    Args:
        source: bundled relation name or path.
        n: number of requests (files: the first ``n`` records; relations: ``n`` seeded subjects).
        seed: seed for relation sources (files are read in order).
        tokenizer: if given, also check that every target tokenises to something.
        relation_options: keywords of :func:`requests_from_relation` (``n_paraphrases``, ...); only for
            relation sources.
    """
    shape, raw, where = _read_source(source)
    name = os.fspath(source)
    unknown = sorted(set(relation_options) - RELATION_OPTIONS)
    if unknown:
        raise KcircuitsError(f"unknown option(s) {', '.join(unknown)}; relation sources take "
                             f"{', '.join(sorted(RELATION_OPTIONS))}")
    if shape != "relation" and relation_options:
        raise KcircuitsError(f"options {', '.join(sorted(relation_options))} apply only to relation sources, "
                             f"not to a {shape} file")
    if shape in ("CounterFact", "zsRE"):
        return _from_records(raw, where, shape, n, tokenizer)
    return validate_requests(requests_from_relation(name, n, seed, **relation_options), tokenizer, one_batch=False)
