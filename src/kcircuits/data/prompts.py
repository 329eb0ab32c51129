"""Clean/corrupt prompt pairs for activation patching.

Circuit discovery compares a *clean* prompt ("The capital of France is") with a *corrupt* one
that differs only in the subject ("The capital of Poland is"). Patching compares activations
position by position, so the two prompts must have exactly the same number of tokens, and the
metric (logit difference between the two answers) is only meaningful when the two answers start
with different tokens. This module builds such pairs and counts every candidate it had to drop,
with the reason, so users can see why a relation yields few pairs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kcircuits.data.datasets import RelationDataset
from kcircuits.errors import KcircuitsError

__all__ = [
    "SKIP_ANSWER_COLLISION",
    "TemplateSpec",
    "cap_pairs",
    "parse_template_specs",
    "select_templates",
    "SKIP_EMPTY_ANSWER",
    "SKIP_NO_SAME_LENGTH",
    "PromptPair",
    "PromptSet",
    "answer_token_ids",
    "build_prompts",
    "encode_text",
]

#: No other sample gives a corrupt prompt with the clean prompt's token length.
SKIP_NO_SAME_LENGTH = "no_same_length_corrupt"
#: Same-length corrupt prompts exist, but each has the same object or the same first answer token
#: (with whole-answer scoring: the same answer tokens).
SKIP_ANSWER_COLLISION = "answer_first_token_collision"
#: The tokenizer produced no tokens for " " + object (should not happen with real tokenizers).
SKIP_EMPTY_ANSWER = "empty_answer_tokens"

_MAX_SKIPPED_EXAMPLES = 20


@dataclass
class PromptPair:
    """One clean prompt and its corrupt twin, tokenised the way the model will see them."""

    template: str
    subject: str
    object: str
    corrupt_subject: str
    corrupt_object: str
    clean_text: str
    corrupt_text: str
    clean_ids: list[int]
    corrupt_ids: list[int]
    answer_ids: list[int]
    corrupt_answer_ids: list[int]


@dataclass
class PromptSet:
    """The pairs built for one relation, plus an account of every candidate that was skipped."""

    relation: str
    pairs: list[PromptPair]
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[dict] = field(default_factory=list)
    n_candidates: int = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def require_nonempty(self) -> PromptSet:
        """Return self, or raise KcircuitsError explaining why no pair survived filtering."""
        if self.pairs:
            return self
        if self.skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        else:
            reasons = "none recorded"
        raise KcircuitsError(
            f"relation {self.relation}: no usable prompt pairs after filtering "
            f"({self.n_candidates} candidates: reasons {reasons}); try adding samples whose "
            "subjects have the same token length but different answers, other templates, "
            "or another relation"
        )


# --------------------------------------------------------------------------- tokenisation


def _to_id_list(ids: Any, text: str) -> list[int]:
    """Normalise ``input_ids`` (list, nested single batch, tensor, array) to ``list[int]``."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = list(ids)
    if len(ids) == 1 and isinstance(ids[0], (list, tuple)):
        ids = list(ids[0])
    try:
        return [int(i) for i in ids]
    except (TypeError, ValueError):
        raise KcircuitsError(
            f"tokenizer returned non-integer input_ids for {text!r}; pass a Hugging Face "
            "tokenizer (or an object whose __call__ returns .input_ids as a list of ints)"
        ) from None


def encode_text(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Tokenise like the model does: ``tokenizer(text).input_ids`` (special tokens included), as ``list[int]``;
    a tokenizer whose output has no ``input_ids`` is a clear error.

    Args:
        tokenizer: a Hugging Face tokenizer (or any callable returning ``.input_ids``).
        text: the text tokenised.
        add_special_tokens: include the tokenizer's special tokens (BOS, ...), as the model sees a prompt.
    """
    if add_special_tokens:
        enc = tokenizer(text)
    else:
        enc = tokenizer(text, add_special_tokens=False)
    ids = getattr(enc, "input_ids", None)
    if ids is None and isinstance(enc, dict):
        ids = enc.get("input_ids")
    if ids is None:
        raise KcircuitsError(
            f"tokenizer output for {text!r} has no input_ids; pass a Hugging Face tokenizer"
        )
    return _to_id_list(ids, text)


def _answer_ids_given_prompt(
    tokenizer: Any, prompt_ids: list[int], prompt_text: str, answer: str
) -> list[int]:
    """answer_token_ids with the prompt already tokenised (saves one call per candidate)."""
    full = encode_text(tokenizer, prompt_text + " " + answer)
    n = len(prompt_ids)
    if len(full) > n and full[:n] == prompt_ids:
        return full[n:]
    # The prompt's tokens are not a prefix (e.g. the tokenizer appends EOS, or merges across the
    # boundary): fall back to the answer on its own, with its leading space.
    return encode_text(tokenizer, " " + answer, add_special_tokens=False)


def answer_token_ids(tokenizer: Any, prompt_text: str, answer: str) -> list[int]:
    """Token ids of ``" " + answer`` as they follow ``prompt_text``.

    Tokenising prompt and answer together and cutting off the prompt's own tokens gives
    exactly what the model would be scored on (e.g. the single token " Paris" for SmolLM2).
    If the prompt's tokens are not a prefix of the joint tokenisation, this falls back to
    ``tokenizer(" " + answer, add_special_tokens=False).input_ids``.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise KcircuitsError(f"answer must be a non-empty string, got {answer!r}")
    return _answer_ids_given_prompt(tokenizer, encode_text(tokenizer, prompt_text), prompt_text, answer)


# --------------------------------------------------------------------------- building pairs


def _lazy_answers(
    tokenizer: Any, ids: list[list[int]], texts: list[str], samples: Sequence[dict]
) -> Callable[[int], list[int]]:
    """``answer(j)``: the answer tokens after prompt ``j`` (this template's), computed on first use
    and kept, since only same-length partners need them."""
    answers: dict[int, list[int]] = {}

    def answer(j: int) -> list[int]:
        if j not in answers:
            answers[j] = _answer_ids_given_prompt(tokenizer, ids[j], texts[j], samples[j]["object"])
        return answers[j]

    return answer


def _fill(template: str, subject: str) -> str:
    """Put the subject in the template (``str.replace`` so other braces in a template are literal)."""
    return template.replace("{}", subject, 1)


#: A template selector: an index into ``prompt_templates``, or ``"zs<i>"`` for the i-th of the LRE files'
#: zero-shot templates (``prompt_templates_zs``), or ``"zs"`` for all of those.
TemplateSpec = int | str


def parse_template_specs(tokens: Sequence[str]) -> list[TemplateSpec]:
    """Command-line words -> template selectors: ``"0"`` -> 0, ``"zs0"`` and ``"zs"`` kept as they are."""
    out: list[TemplateSpec] = []
    for tok in tokens:
        tok = str(tok).strip()
        if tok.lstrip("-").isdigit():
            out.append(int(tok))
        elif tok == "zs" or (tok.startswith("zs") and tok[2:].isdigit()):
            out.append(tok)
        else:
            raise KcircuitsError(f"template {tok!r} not understood: give indices (0 1 ...), zs0 zs1 ... for the "
                                 "zero-shot templates of an LRE file, or zs for all of them")
    return out


def select_templates(ds: RelationDataset, templates: Sequence[TemplateSpec] | None) -> list[tuple[int | str, str]]:
    """(key, template) of the selected templates; default: every one of ``prompt_templates``.

    The key is the template's index (an int) or ``"zs<i>"``; it seeds the choice of corrupt partner,
    so selecting fewer templates does not change the partners chosen for the others.
    """
    n, n_zs = len(ds.prompt_templates), len(ds.zs_templates)
    if templates is None:
        return list(enumerate(ds.prompt_templates))
    if isinstance(templates, (str, bytes)) or not isinstance(templates, Sequence):
        raise KcircuitsError(
            f"templates must be a list of template indices (0..{n - 1}) or zs<i>, got {type(templates).__name__}"
        )
    if len(templates) == 0:
        raise KcircuitsError(f"templates is empty; give indices in 0..{n - 1} or leave it as None for all")
    out: list[tuple[int | str, str]] = []
    for t in templates:
        if isinstance(t, str):
            if not n_zs:
                raise KcircuitsError(f"template {t!r}: relation {ds.name} has no zero-shot templates "
                                     f"(prompt_templates_zs); give indices in 0..{n - 1}")
            if t == "zs":
                picked = [(f"zs{i}", tpl) for i, tpl in enumerate(ds.zs_templates)]
            else:
                i = int(t[2:]) if t.startswith("zs") and t[2:].isdigit() else -1
                if not 0 <= i < n_zs:
                    raise KcircuitsError(f"template {t!r} is out of range: relation {ds.name} has {n_zs} zero-shot "
                                         f"templates (zs0..zs{n_zs - 1})")
                picked = [(t, ds.zs_templates[i])]
        elif isinstance(t, bool) or not isinstance(t, int):
            raise KcircuitsError(f"template index {t!r} is not an integer; give indices in 0..{n - 1}")
        elif not 0 <= t < n:
            raise KcircuitsError(
                f"template index {t} is out of range: relation {ds.name} has {n} templates (0..{n - 1})"
            )
        else:
            picked = [(t, ds.prompt_templates[t])]
        for key, tpl in picked:
            if any(key == k for k, _ in out):
                raise KcircuitsError(f"template index {key} is given twice; list each template once")
            out.append((key, tpl))
    return out


def cap_pairs(pairs: list[PromptPair], max_pairs: int | None, seed: int) -> list[PromptPair]:
    """A seeded subset of at most ``max_pairs`` pairs, spread over subjects and templates, in input order.

    The one way pairs are capped, before or after any filtering (the known-facts filter), so a
    capped set is always drawn the same way from whatever it is drawn from.
    """
    if max_pairs is None or len(pairs) <= max_pairs:
        return list(pairs)
    keys = [(p.template, p.subject, i) for i, p in enumerate(pairs)]
    keep = _cap_with_spread(keys, max_pairs, seed)
    return [p for k, p in zip(keys, pairs, strict=True) if k in keep]


def _cap_with_spread(
    keys: list[tuple[int, int]], max_pairs: int, seed: int
) -> set[tuple[int, int]]:
    """Pick ``max_pairs`` of the (template, sample) keys, spread over subjects and templates.

    After a seeded shuffle, keys are ordered by how often their subject has already appeared
    (every subject once before any subject twice), ties broken by how often their template has
    appeared, so a small cap still covers many subjects and all templates.
    """
    order = list(keys)
    random.Random(seed).shuffle(order)
    subject_seen: dict[int, int] = {}
    ranked: list[tuple[int, int, int, tuple[int, int]]] = []
    for pos, key in enumerate(order):
        r = subject_seen.get(key[1], 0)
        subject_seen[key[1]] = r + 1
        ranked.append((r, 0, pos, key))
    # Within one subject-rank round, interleave templates: k-th use of a template in this round.
    template_seen: dict[tuple[int, int], int] = {}
    reranked = []
    for r, _, pos, key in sorted(ranked):
        tk = (r, key[0])
        u = template_seen.get(tk, 0)
        template_seen[tk] = u + 1
        reranked.append((r, u, pos, key))
    reranked.sort()
    return {key for *_, key in reranked[:max_pairs]}


def build_prompts(
    ds: RelationDataset,
    tokenizer: Any,
    *,
    templates: Sequence[TemplateSpec] | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
    answer_scoring: str = "first_token",
) -> PromptSet:
    """Build clean/corrupt prompt pairs for every (sample, template) candidate.

    For each candidate, the corrupt prompt uses the same template with another sample's subject
    such that: the objects differ (case-insensitive), the answers' first tokens differ, and the
    corrupt prompt has exactly as many tokens as the clean one. Among valid partners the choice
    is deterministic: partners are shuffled with a ``random.Random`` seeded from ``seed`` and the
    candidate's own (template, sample) position, so selecting fewer templates does not change the
    partner chosen for the others. With ``answer_scoring="full"`` (the whole answer is scored, e.g.
    years that the tokenizer splits into digits) the answers must differ as token sequences, not in
    their first token. Candidates with no valid partner are skipped and counted by
    reason in ``skipped``. ``max_pairs`` keeps a seeded, subject- and template-spread subset.
    Pairs are returned in (template, sample) order. An empty result is returned as is; call
    :meth:`PromptSet.require_nonempty` to turn it into an error.
    """
    if not isinstance(ds, RelationDataset):
        raise KcircuitsError(
            f"build_prompts needs a RelationDataset (from load_dataset), got {type(ds).__name__}"
        )
    if max_pairs is not None and (
        isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1
    ):
        raise KcircuitsError(f"max_pairs must be a positive integer or None, got {max_pairs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise KcircuitsError(f"seed must be an integer, got {seed!r}")
    if answer_scoring not in ("first_token", "full"):
        raise KcircuitsError(f"unknown answer scoring {answer_scoring!r}: use first_token or full")
    selected = select_templates(ds, templates)
    samples = ds.samples
    n = len(samples)

    skipped: dict[str, int] = {}
    skipped_examples: list[dict] = []
    built: dict[tuple[int | str, int], PromptPair] = {}

    def skip(reason: str, i: int, tpl: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        if len(skipped_examples) < _MAX_SKIPPED_EXAMPLES:
            skipped_examples.append({"subject": samples[i]["subject"], "template": tpl, "reason": reason})

    for t, tpl in selected:
        texts = [_fill(tpl, s["subject"]) for s in samples]
        ids = [encode_text(tokenizer, text) for text in texts]
        answer = _lazy_answers(tokenizer, ids, texts, samples)

        for i in range(n):
            clean_answer = answer(i)
            if not clean_answer:
                skip(SKIP_EMPTY_ANSWER, i, tpl)
                continue
            subject = samples[i]["subject"]
            obj = samples[i]["object"]
            same_len = [
                j
                for j in range(n)
                if j != i and samples[j]["subject"] != subject and len(ids[j]) == len(ids[i])
            ]
            if not same_len:
                skip(SKIP_NO_SAME_LENGTH, i, tpl)
                continue
            random.Random(f"{seed}:{t}:{i}").shuffle(same_len)
            chosen = None
            for j in same_len:
                if samples[j]["object"].casefold() == obj.casefold():
                    continue
                cand_answer = answer(j)
                if not cand_answer or (cand_answer == clean_answer if answer_scoring == "full"
                                       else cand_answer[0] == clean_answer[0]):
                    continue
                chosen = j
                break
            if chosen is None:
                skip(SKIP_ANSWER_COLLISION, i, tpl)
                continue
            built[(t, i)] = PromptPair(
                template=tpl,
                subject=subject,
                object=obj,
                corrupt_subject=samples[chosen]["subject"],
                corrupt_object=samples[chosen]["object"],
                clean_text=texts[i],
                corrupt_text=texts[chosen],
                clean_ids=list(ids[i]),
                corrupt_ids=list(ids[chosen]),
                answer_ids=list(clean_answer),
                corrupt_answer_ids=list(answer(chosen)),
            )

    return PromptSet(
        relation=ds.name,
        pairs=cap_pairs(list(built.values()), max_pairs, seed),  # (template, sample) order
        skipped=skipped,
        skipped_examples=skipped_examples,
        n_candidates=n * len(selected),
    )
