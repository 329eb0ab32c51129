"""Metrics: functions of (logits at target positions, batch) -> one value per prompt.

Every metric returns a ``[b]`` tensor so callers can report mean *and* spread. Logits are
``[b, T, V]`` at the batch's target positions (T = 1 unless the whole answer is scored).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kcircuits.batching import Batch
from kcircuits.errors import KcircuitsError

Metric = Callable[[torch.Tensor, Batch], torch.Tensor]


def answer_logprob(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """log p(answer | prompt): the first answer token, or the sum over the answer's tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, batch.target_ids[..., None])[..., 0]  # [b, T]
    return (picked * batch.target_mask).sum(-1)


def answer_prob(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """p(answer | prompt) (product over the answer's tokens when the whole answer is scored)."""
    return answer_logprob(logits, batch).exp()


def logit_diff(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """logit(clean answer) - logit(corrupt answer) at the first answer position."""
    first = logits[:, 0].float()
    return (first.gather(-1, batch.target_ids[:, :1])[:, 0] - first.gather(-1, batch.corrupt_target_ids[:, None])[:, 0])


METRICS: dict[str, Metric] = {"logit_diff": logit_diff, "logprob": answer_logprob, "prob": answer_prob}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise KcircuitsError(f"unknown metric {name!r}: use one of {', '.join(METRICS)}")
    return METRICS[name]


def rank_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based rank of ``target`` (``[..., 1]``) among ``logits`` (``[..., V]``), ties counted against it.

    The rank is the number of logits >= the target's own (so the target counts itself): a block of
    tied logits ranks every member last within the block. A model whose logits are all equal ranks
    every answer ``V``, never 1, so ties can never inflate Hit@k. A NaN target ranks ``V``.
    """
    rank = (logits >= target).sum(-1)
    return torch.where(torch.isnan(target[..., 0]), torch.full_like(rank, logits.shape[-1]), rank)


def answer_rank(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The answer's rank, ``[b]``: its first token's rank, or with whole-answer scoring (``T > 1``)
    the worst rank of any of its tokens under teacher forcing (so rank 1 = greedy decoding yields the
    whole answer). Ties are counted against the answer (:func:`rank_of`)."""
    lg = logits.float()
    ranks = rank_of(lg, lg.gather(-1, batch.target_ids[..., None]))  # [b, T]
    return ranks.masked_fill(~batch.target_mask, 0).max(-1).values


def hit_at_k(logits: torch.Tensor, batch: Batch, k: int) -> torch.Tensor:
    return (answer_rank(logits, batch) <= k).float()


def kl_div(logits_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) of the next-token distributions at the first target position, ``[b]``."""
    p = torch.log_softmax(logits_ref[:, 0].float(), -1)
    q = torch.log_softmax(logits[:, 0].float(), -1)
    return (p.exp() * (p - q)).sum(-1)


def check_finite(values: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(values).all():
        raise KcircuitsError(f"{what} is NaN or infinite; check the model dtype (use float32) and the answer tokens")
    return values


def summary(values: torch.Tensor) -> dict:
    """Mean, spread and quantiles of a per-prompt tensor (NaNs are counted and excluded)."""
    v = values.detach().double().flatten()
    finite = v[torch.isfinite(v)]
    n = finite.numel()
    if n == 0:
        return {"n": 0, "n_nan": int(v.numel()), "mean": math.nan, "std": math.nan, "sem": math.nan,
                "median": math.nan, "q25": math.nan, "q75": math.nan}
    std = float(finite.std()) if n > 1 else 0.0
    return {"n": n, "n_nan": int(v.numel() - n), "mean": float(finite.mean()), "std": std,
            "sem": std / math.sqrt(n), "median": float(finite.median()),
            "q25": float(finite.quantile(0.25)), "q75": float(finite.quantile(0.75))}


def faithfulness(m_circuit: torch.Tensor, m_full: torch.Tensor, m_empty: torch.Tensor) -> torch.Tensor:
    """Per prompt (m(C) - m(∅)) / (m(full) - m(∅)); NaN where the denominator is 0."""
    denom = m_full - m_empty
    return torch.where(denom.abs() > 0, (m_circuit - m_empty) / denom.where(denom.abs() > 0, torch.ones_like(denom)),
                       torch.full_like(denom, math.nan))


#: A prompt's faithfulness is unstable when its clean-minus-ablated gap |m(full) - m(empty)| is below
#: this fraction of the median gap over the prompt set: dividing by a near-zero gap turns noise into
#: huge positive or negative values. Such prompts are flagged, counted and left out of the
#: per-prompt faithfulness summary (the ratio of means is unaffected).
MIN_GAP_FRACTION = 0.1


def stable_prompts(m_full: torch.Tensor, m_empty: torch.Tensor,
                   fraction: float = MIN_GAP_FRACTION) -> tuple[torch.Tensor, float]:
    """``[b]`` True where |m_full - m_empty| >= ``fraction`` x its median over prompts; also the threshold."""
    gap = (m_full - m_empty).abs()
    threshold = float(fraction * gap.median()) if gap.numel() else 0.0
    return (gap >= threshold) & (gap > 0), threshold


def curve_areas(x_fraction: list[float], faith: list[float]) -> dict:
    """CPR (area under the faithfulness curve) and CMD (area under |1 - f|), x in [0, 1], trapezoid.

    As in the MIB benchmark: the curve starts at (0, 0) (the empty circuit has f = 0 by definition),
    so CPR near 1 and CMD near 0 are best. Points with NaN faithfulness are skipped.
    """
    pts = sorted({0.0: 0.0, **{x: f for x, f in zip(x_fraction, faith, strict=True) if not math.isnan(f)}}.items())
    cpr = cmd = 0.0
    for (x0, f0), (x1, f1) in zip(pts, pts[1:], strict=False):  # consecutive points
        cpr += (x1 - x0) * (f0 + f1) / 2
        cmd += (x1 - x0) * (abs(1 - f0) + abs(1 - f1)) / 2
    return {"cpr": cpr, "cmd": cmd}
