"""Edit metrics: did the edit take, does it generalise, what else did it change, is the model still fluent.

Everything works on a plain Hugging Face causal LM (``torch.nn.Module`` such as ``LoadedModel.hf_model``)
and its tokenizer, with no kcircuits Engine: run :func:`edit_metrics` before and after an edit and
:func:`compare_metrics` on the two results. Per request (means over its prompts) and summarised over
requests (``kcircuits.metrics.summary``: mean, std, n, ...):

* **efficacy**: on the edit prompt, ``P(new) > P(true)`` (success, 0/1) and ``P(new) - P(true)``
  (margin), where P is the probability of the *whole* target, the product over its tokens under
  teacher forcing (compared through total log-probs); also the share of ``target_new``'s tokens that
  are the model's greedy choice (token accuracy, EasyEdit's zsRE accuracy);
* **generalisation**: the same on the paraphrase prompts;
* **specificity**: on neighbourhood prompts, ``P(expected) > P(new)`` (CounterFact's neighbourhood
  score) and its margin; the same on other relations' prompts; whether each neighbour's top-1 next
  token is unchanged needs the model before the edit, so :func:`compare_metrics` derives it;
* **fluency**: ROME's weighted bi/tri-gram entropy (:func:`ngram_entropy`) of greedy generations
  (:func:`generate_greedy`) from the generation prompts;
* **log-perplexity** (:func:`log_perplexity`) of a held text sample, and its change.

Nothing here changes the model: it runs under ``torch.no_grad()`` in eval mode (each submodule's own
mode restored afterwards, :func:`kcircuits.models.loader.eval_mode`), on the model's device.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kcircuits.edit.requests import EditRequest, target_ids, validate_requests
from kcircuits.errors import KcircuitsError
from kcircuits.metrics import summary
from kcircuits.models.loader import eval_mode

__all__ = [
    "COMPARED_METRICS",
    "REQUEST_METRICS",
    "TargetScores",
    "compare_metrics",
    "edit_metrics",
    "generate_greedy",
    "log_perplexity",
    "ngram_entropy",
    "score_targets",
    "target_logprob",
]

#: Per-request scalar metrics of :func:`edit_metrics` (summarised over requests; NaN = not defined here).
REQUEST_METRICS: tuple[str, ...] = (
    "logprob_new", "logprob_true",
    "efficacy_success", "efficacy_margin", "efficacy_token_accuracy",
    "generalisation_success", "generalisation_margin", "generalisation_token_accuracy",
    "specificity_success", "specificity_margin",
    "other_specificity_success", "other_specificity_margin",
    "fluency",
)

#: Per-request metrics that :func:`compare_metrics` derives from a before and an after result.
COMPARED_METRICS: tuple[str, ...] = tuple(f"{k}_change" for k in REQUEST_METRICS) + (
    "neighbourhood_top1_unchanged", "neighbourhood_logprob_change",
    "other_top1_unchanged", "other_logprob_change",
)

#: ROME's fluency: entropies of the bigram and trigram distributions, weighted 2/3 and 4/3, averaged.
NGRAM_ORDERS: tuple[int, ...] = (2, 3)
NGRAM_WEIGHTS: tuple[float, ...] = (2 / 3, 4 / 3)

#: Words and single punctuation marks: a dependency-free stand-in for ``nltk.word_tokenize``.
_WORD = re.compile(r"\w+|[^\w\s]")


# --------------------------------------------------------------------------- tokens and batches


def _device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (inputs go there)."""
    return next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    """Pad with the tokenizer's pad token, else EOS, else 0 (pads are masked, so the choice is free)."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer(text).input_ids`` (special tokens included, as the model reads a prompt) as ints."""
    ids = tokenizer(text).input_ids
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    return [int(i) for i in ids]


def _max_positions(model: torch.nn.Module) -> int | None:
    """The model's context length from its config (``max_position_embeddings`` or GPT-2's ``n_positions``)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive chunks of ``order`` of at most ``batch_size`` items."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KcircuitsError(f"batch_size must be a positive integer, got {batch_size!r}")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _teacher_forced(
    model: torch.nn.Module, sequences: list[list[int]], starts: list[int], *, pad_id: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence ``s`` with start ``k``: ``log p(s[t] | s[:t])`` for ``t = k .. len(s)-1`` and the argmax
    token at those positions, both ``[len(s) - k]`` on the CPU (log-probs in float32).

    Sequences are sorted by length, right-padded per batch (so real tokens keep positions ``0..len-1`` and
    never see a pad: the result does not depend on the batch or the tokenizer's padding side), and run
    with an attention mask. ``k >= 1`` (the first token has no prediction).
    """
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(sequences)
    device = _device(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for chunk in _batches(order, batch_size):
        width = max(len(sequences[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits  # [b, L, V]
        for row, i in enumerate(chunk):
            s, k = sequences[i], starts[i]
            lg = logits[row, k - 1 : len(s) - 1].float()  # [T, V]: position t-1 predicts token t
            tgt = torch.tensor(s[k:], device=lg.device)
            logp = torch.log_softmax(lg, dim=-1).gather(-1, tgt[:, None])[:, 0]
            out[i] = (logp.cpu(), lg.argmax(-1).cpu())
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- target scores


@dataclass
class TargetScores:
    """Teacher-forced scores of ``n`` (prompt, target) pairs.

    Fields:
        logprob: ``[n]`` float, ``log P(target | prompt)``: the sum of the log-probs of all target tokens.
        token_accuracy: ``[n]`` float, the share of target tokens that are the argmax given the tokens before.
        top1: ``[n]`` long, the model's top-1 next token right after the prompt (whatever the target).
        n_tokens: ``[n]`` long, how many tokens each target has after its prompt.
    """

    logprob: torch.Tensor
    token_accuracy: torch.Tensor
    top1: torch.Tensor
    n_tokens: torch.Tensor


def score_targets(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 16
) -> TargetScores:
    """Teacher-forced log-probability of each whole target after its prompt (multi-token targets included).

    Each pair is tokenised as ``tokenizer(prompt).input_ids + target_ids(tokenizer, target, prompt)``
    (``" " + target`` as it follows the prompt), so the score is
    ``sum_j log p(target_j | prompt, target_<j)``.

    Args:
        model: a Hugging Face causal LM (called as ``model(input_ids=, attention_mask=).logits``).
        tokenizer: its tokenizer.
        prompts: ``n`` filled prompts.
        targets: ``n`` targets (without leading space).
        batch_size: sequences per forward pass (does not change the result beyond float rounding).
    """
    prompts, targets = list(prompts), list(targets)
    if len(prompts) != len(targets):
        raise KcircuitsError(f"score_targets needs one target per prompt, got {len(prompts)} prompts and "
                             f"{len(targets)} targets")
    sequences, starts = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        prompt_ids, answer = _text_ids(tokenizer, prompt), target_ids(tokenizer, target, prompt)
        if not prompt_ids or not answer:
            raise KcircuitsError(f"prompt {prompt!r} / target {target!r} tokenises to nothing; give text the "
                                 "tokenizer can encode")
        sequences.append(prompt_ids + answer)
        starts.append(len(prompt_ids))
    if not sequences:
        empty = torch.zeros(0)
        return TargetScores(empty, empty, empty.long(), empty.long())
    with torch.no_grad(), eval_mode(model):
        scored = _teacher_forced(model, sequences, starts, pad_id=_pad_id(tokenizer), batch_size=batch_size)
    targets_t = [torch.tensor(s[k:]) for s, k in zip(sequences, starts, strict=True)]
    return TargetScores(
        logprob=torch.stack([lp.sum() for lp, _ in scored]),
        token_accuracy=torch.stack([(am == t).float().mean() for (_, am), t in zip(scored, targets_t, strict=True)]),
        top1=torch.stack([am[0] for _, am in scored]),
        n_tokens=torch.tensor([len(t) for t in targets_t]),
    )


def target_logprob(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 16
) -> torch.Tensor:
    """``[n]``: ``log P(target_i | prompt_i)``, the teacher-forced sum over all target tokens
    (:func:`score_targets`'s ``logprob``).

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer.
        prompts: ``n`` filled prompts.
        targets: ``n`` targets (without leading space).
        batch_size: sequences per forward pass.
    """
    return score_targets(model, tokenizer, prompts, targets, batch_size=batch_size).logprob


# --------------------------------------------------------------------------- generation and fluency


def generate_greedy(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 16
) -> list[str]:
    """Greedy continuations of exactly ``max_new_tokens`` tokens (EOS suppressed), decoded without the prompt.

    Deterministic (no sampling) and independent of batching: prompts are left-padded with an attention
    mask, from which ``generate`` derives each row's positions.

    Args:
        model: a Hugging Face causal LM with ``generate``.
        tokenizer: its tokenizer (decodes with ``skip_special_tokens=True``).
        prompts: the prompts.
        max_new_tokens: how many tokens to generate for each prompt (>= 1).
        batch_size: prompts per ``generate`` call.
    """
    from transformers import GenerationConfig

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise KcircuitsError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    encoded = [_text_ids(tokenizer, p) for p in prompts]
    limit = _max_positions(model)
    longest = max((len(e) for e in encoded), default=0)
    if limit is not None and longest + max_new_tokens > limit:
        raise KcircuitsError(f"a generation prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds "
                             f"the model's {limit} positions; generate fewer tokens")
    pad = _pad_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                              num_beams=1, pad_token_id=pad, eos_token_id=eos)
    texts: list[str] = [""] * len(encoded)
    device = _device(model)
    with torch.no_grad(), eval_mode(model):
        for chunk in _batches(list(range(len(encoded))), batch_size):
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for row, i in enumerate(chunk):
                texts[i] = tokenizer.decode(out[row, width:].tolist(), skip_special_tokens=True)
    return texts


def _text_entropy(text: str, orders: Sequence[int], weights: Sequence[float]) -> float:
    """ROME's ``compute_n_gram_entropy`` of one text: mean over n of ``w_n * H_n`` (bits), ``H_n`` the entropy
    of the text's n-gram frequency distribution; a text too short for any n-gram of order n has ``H_n = 0``."""
    words = _WORD.findall(text)
    weighted = []
    for n, w in zip(orders, weights, strict=True):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(w * h)
    return sum(weighted) / len(weighted)


def ngram_entropy(
    texts: str | Sequence[str], orders: Sequence[int] = NGRAM_ORDERS, weights: Sequence[float] = NGRAM_WEIGHTS
) -> float:
    """Fluency as in ROME (``n_gram_entropy``): the mean over texts of each text's weighted n-gram entropy.

    Per text, with words (``\\w+``) and punctuation marks as tokens (ROME uses ``nltk.word_tokenize``;
    this regex agrees on plain text): ``mean_n(w_n * H_n)`` with ``H_n = -sum_g p(g) log2 p(g)`` over
    the text's n-grams ``g``, orders (2, 3) and weights (2/3, 4/3). Repetitive text has few distinct
    n-grams and a low value; NaN for no texts.

    Args:
        texts: one text or a list of texts.
        orders: the n-gram orders.
        weights: one weight per order.
    """
    if isinstance(texts, str):
        texts = [texts]
    if len(orders) != len(weights) or not orders:
        raise KcircuitsError(f"ngram_entropy needs one weight per order, got orders {orders} and weights {weights}")
    values = [_text_entropy(t, orders, weights) for t in texts]
    return sum(values) / len(values) if values else math.nan


def log_perplexity(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 8, max_tokens: int | None = None
) -> float:
    """Mean next-token negative log-likelihood (nats) over every token of ``texts`` (pooled, not per text).

    Each text is tokenised on its own (special tokens included) and cut to ``max_tokens`` (default: the
    model's context length); token ``t >= 1`` is scored given tokens ``< t``. ``exp`` of it is the perplexity.

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer.
        texts: the held-out text sample.
        batch_size: texts per forward pass.
        max_tokens: longest tokenised text kept (longer texts are truncated).
    """
    limit = max_tokens if max_tokens is not None else (_max_positions(model) or 1024)
    encoded = [_text_ids(tokenizer, t)[:limit] for t in texts]
    encoded = [e for e in encoded if len(e) >= 2]
    if not encoded:
        raise KcircuitsError("log_perplexity needs at least one text of two or more tokens")
    with torch.no_grad(), eval_mode(model):
        scored = _teacher_forced(model, encoded, [1] * len(encoded), pad_id=_pad_id(tokenizer), batch_size=batch_size)
    logp = torch.cat([lp for lp, _ in scored])
    return float(-logp.double().mean())


# --------------------------------------------------------------------------- per-request metrics


def _mean(values: list[float]) -> float:
    """Mean of a list; NaN for an empty one (a metric this request cannot have)."""
    return sum(values) / len(values) if values else math.nan


class _Scores:
    """All (prompt, target) pairs the requests need, scored once (shared pairs are scored once)."""

    def __init__(self) -> None:
        self.index: dict[tuple[str, str], int] = {}
        self.result: TargetScores | None = None

    def need(self, prompt: str, target: str | None) -> None:
        """Ask for ``log P(target | prompt)`` (nothing for a missing target)."""
        if target is not None:
            self.index.setdefault((prompt, target), len(self.index))

    def run(self, model: torch.nn.Module, tokenizer: Any, batch_size: int) -> None:
        """Score every pair asked for, in one batched pass."""
        pairs = list(self.index)
        self.result = score_targets(model, tokenizer, [p for p, _ in pairs], [t for _, t in pairs],
                                    batch_size=batch_size)

    def logprob(self, prompt: str, target: str | None) -> float:
        """``log P(target | prompt)``; NaN for a missing target."""
        return math.nan if target is None else float(self.result.logprob[self.index[(prompt, target)]])

    def accuracy(self, prompt: str, target: str) -> float:
        """Share of the target's tokens that are the greedy choice under teacher forcing."""
        return float(self.result.token_accuracy[self.index[(prompt, target)]])

    def top1(self, prompt: str, target: str) -> int:
        """The top-1 next token right after ``prompt``."""
        return int(self.result.top1[self.index[(prompt, target)]])


def _needed(req: EditRequest, scores: _Scores) -> None:
    """Register every pair :func:`_request_metrics` will read."""
    for prompt in (req.prompt_text, *req.paraphrase_prompts):
        scores.need(prompt, req.target_new)
        scores.need(prompt, req.target_true)
    for prompt, expected in (*req.neighborhood_prompts, *req.other_prompts):
        scores.need(prompt, expected)
        scores.need(prompt, req.target_new)


def _versus(lp_a: float, lp_b: float) -> tuple[float, float]:
    """``(P(a) > P(b) as 1.0/0.0, P(a) - P(b))`` from total log-probs; NaNs where either is missing."""
    if math.isnan(lp_a) or math.isnan(lp_b):
        return math.nan, math.nan
    return float(lp_a > lp_b), math.exp(lp_a) - math.exp(lp_b)


def _probe_metrics(req: EditRequest, pairs: tuple[tuple[str, str], ...], scores: _Scores) -> dict:
    """Specificity on ``(prompt, expected)`` probes: expected still beats the new target, margins, raw values."""
    versus = [_versus(scores.logprob(p, a), scores.logprob(p, req.target_new)) for p, a in pairs]
    return {"success": _mean([s for s, _ in versus]), "margin": _mean([m for _, m in versus]),
            "logprob": [scores.logprob(p, a) for p, a in pairs], "top1": [scores.top1(p, a) for p, a in pairs]}


def _request_metrics(req: EditRequest, scores: _Scores, fluency: float, generations: list[str]) -> dict:
    """One request's metrics (:data:`REQUEST_METRICS` plus the raw values :func:`compare_metrics` needs)."""
    lp_new, lp_true = scores.logprob(req.prompt_text, req.target_new), scores.logprob(req.prompt_text, req.target_true)
    success, margin = _versus(lp_new, lp_true)
    para = [_versus(scores.logprob(p, req.target_new), scores.logprob(p, req.target_true))
            for p in req.paraphrase_prompts]
    neigh = _probe_metrics(req, req.neighborhood_prompts, scores)
    other = _probe_metrics(req, req.other_prompts, scores)
    return {
        "case_id": req.case_id, "subject": req.subject, "relation": req.relation,
        "target_new": req.target_new, "target_true": req.target_true,
        "logprob_new": lp_new, "logprob_true": lp_true,
        "efficacy_success": success, "efficacy_margin": margin,
        "efficacy_token_accuracy": scores.accuracy(req.prompt_text, req.target_new),
        "generalisation_success": _mean([s for s, _ in para]), "generalisation_margin": _mean([m for _, m in para]),
        "generalisation_token_accuracy": _mean([scores.accuracy(p, req.target_new) for p in req.paraphrase_prompts]),
        "specificity_success": neigh["success"], "specificity_margin": neigh["margin"],
        "other_specificity_success": other["success"], "other_specificity_margin": other["margin"],
        "fluency": fluency,
        "neighbourhood_logprob": neigh["logprob"], "neighbourhood_top1": neigh["top1"],
        "other_logprob": other["logprob"], "other_top1": other["top1"],
        "generations": generations,
    }


def _generations(
    model: torch.nn.Module, tokenizer: Any, reqs: list[EditRequest], n_tokens: int, batch_size: int
) -> list[list[str]]:
    """Per request, the greedy continuation of each of its generation prompts (each distinct prompt generated
    once); empty lists when ``n_tokens`` is 0 (generation off)."""
    if not n_tokens:
        return [[] for _ in reqs]
    prompts = list(dict.fromkeys(p for r in reqs for p in r.generation_prompts))
    texts = generate_greedy(model, tokenizer, prompts, max_new_tokens=n_tokens, batch_size=batch_size)
    generated = dict(zip(prompts, texts, strict=True))
    return [[generated[p] for p in r.generation_prompts] for r in reqs]


def _summaries(rows: list[dict], keys: Sequence[str]) -> dict:
    """``{key: summary over rows}`` (NaNs counted in ``n_nan`` and left out)."""
    return {k: summary(torch.tensor([float(r[k]) for r in rows], dtype=torch.float64)) for k in keys}


def edit_metrics(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    *,
    generation_tokens: int = 32,
    perplexity_texts: Sequence[str] | None = None,
    batch_size: int = 16,
) -> dict:
    """Every edit metric of ``requests`` on ``model`` as it is now (run it before and after an edit).

    Returns ``{"n_requests", "per_request": [...], "summary": {metric: summary}, "log_perplexity",
    "settings"}``. Each per-request dict has ``case_id``, ``subject``, ``relation``, the targets, every
    :data:`REQUEST_METRICS` value (NaN where the request has no such prompts, or no ``target_true``),
    the neighbourhood / other-relation log-probs and top-1 tokens (lists, for :func:`compare_metrics`)
    and the generated ``generations``. ``fluency`` is the n-gram entropy of prompt + generation (as ROME
    scores whole generated texts), averaged over the request's generation prompts. ``log_perplexity``
    is ``None`` without ``perplexity_texts``.

    Args:
        model: a Hugging Face causal LM (not modified).
        tokenizer: its tokenizer.
        requests: the edit requests (validated first, with the tokenizer; requests for one subject with
            different targets are allowed here, since measuring is not editing).
        generation_tokens: new tokens per generation prompt; 0 skips generation (fluency NaN).
        perplexity_texts: held-out texts for :func:`log_perplexity`; ``None`` skips it.
        batch_size: sequences per forward pass.
    """
    reqs = validate_requests(requests, tokenizer, one_batch=False)
    if isinstance(generation_tokens, bool) or not isinstance(generation_tokens, int) or generation_tokens < 0:
        raise KcircuitsError(f"generation_tokens must be an integer >= 0, got {generation_tokens!r}")
    scores = _Scores()
    for req in reqs:
        _needed(req, scores)
    scores.run(model, tokenizer, batch_size)
    rows = []
    for req, gens in zip(reqs, _generations(model, tokenizer, reqs, generation_tokens, batch_size), strict=True):
        fluency = ngram_entropy([p + g for p, g in zip(req.generation_prompts, gens, strict=False)])
        rows.append(_request_metrics(req, scores, fluency, gens))
    lpp = None if perplexity_texts is None else log_perplexity(model, tokenizer, perplexity_texts,
                                                               batch_size=batch_size)
    return {
        "n_requests": len(rows), "per_request": rows, "summary": _summaries(rows, REQUEST_METRICS),
        "log_perplexity": lpp,
        "settings": {"generation_tokens": generation_tokens,
                     "n_perplexity_texts": None if perplexity_texts is None else len(perplexity_texts)},
    }


# --------------------------------------------------------------------------- before vs after


def _same_requests(before: dict, after: dict) -> list[tuple[dict, dict]]:
    """Row pairs of two :func:`edit_metrics` results, which must be of the same requests in the same order."""
    for name, res in (("before", before), ("after", after)):
        if not isinstance(res, dict) or not isinstance(res.get("per_request"), list):
            raise KcircuitsError(f"compare_metrics: '{name}' is not a result of edit_metrics")
    rows_b, rows_a = before["per_request"], after["per_request"]
    if len(rows_b) != len(rows_a):
        raise KcircuitsError(f"compare_metrics: before has {len(rows_b)} requests, after {len(rows_a)}; measure the "
                             "same requests")
    for k, (b, a) in enumerate(zip(rows_b, rows_a, strict=True)):
        key_b, key_a = ((r.get("case_id"), r.get("subject"), r.get("target_new")) for r in (b, a))
        if key_b != key_a:
            raise KcircuitsError(f"compare_metrics: request #{k} differs (before {key_b}, after {key_a}); measure the "
                                 "same requests in the same order")
    return list(zip(rows_b, rows_a, strict=True))


def _probe_changes(b: list, a: list) -> tuple[float, float]:
    """Share of probes whose top-1 token is unchanged, or mean log-prob change: NaN without probes."""
    return _mean([float(x == y) for x, y in zip(b, a, strict=True)]), _mean([y - x for x, y in zip(b, a, strict=True)])


def compare_metrics(before: dict, after: dict) -> dict:
    """What an edit changed: per request and summarised, from two :func:`edit_metrics` results.

    Per request: ``<metric>_change = after - before`` for each of :data:`REQUEST_METRICS`;
    ``neighbourhood_top1_unchanged`` (share of neighbourhood prompts whose top-1 next token is the
    same after the edit: "neighbours keep their answer"), ``neighbourhood_logprob_change`` (mean change of
    log P(expected)), and the same two for other relations' prompts. Also
    ``log_perplexity_change`` (``None`` unless both results have a log-perplexity).

    Args:
        before: ``edit_metrics`` of the model before the edit.
        after: ``edit_metrics`` of the same requests after the edit.
    """
    rows = []
    for b, a in _same_requests(before, after):
        row = {"case_id": a["case_id"], "subject": a["subject"], "relation": a["relation"]}
        row.update({f"{k}_change": float(a[k]) - float(b[k]) for k in REQUEST_METRICS})
        row["neighbourhood_top1_unchanged"], _ = _probe_changes(b["neighbourhood_top1"], a["neighbourhood_top1"])
        _, row["neighbourhood_logprob_change"] = _probe_changes(b["neighbourhood_logprob"], a["neighbourhood_logprob"])
        row["other_top1_unchanged"], _ = _probe_changes(b["other_top1"], a["other_top1"])
        _, row["other_logprob_change"] = _probe_changes(b["other_logprob"], a["other_logprob"])
        rows.append(row)
    lpp_b, lpp_a = before.get("log_perplexity"), after.get("log_perplexity")
    return {
        "n_requests": len(rows), "per_request": rows, "summary": _summaries(rows, COMPARED_METRICS),
        "log_perplexity_change": None if lpp_b is None or lpp_a is None else lpp_a - lpp_b,
    }
