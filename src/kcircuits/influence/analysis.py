"""Read influence scores: top sequences, top tokens, the heavy tail, layers, and recall of known sources.

Shapes: ``scores`` ``[n_query, n_train]`` (positive = training on that sequence makes the completion
more likely); ``per_token`` ``[n_query, n_train, T]`` (sums over T to ``scores``); ``per_layer``
``{layer: [n_query, n_train]}``.

The power-law fit follows Clauset, Shalizi & Newman (2009), "Power-law distributions in empirical
data": Grosse et al. (2023) report that influence is heavy-tailed (a few sequences carry most of it),
and the exponent and its goodness of fit say whether that holds for a query.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from kcircuits.errors import KcircuitsError


# --------------------------------------------------------------------------- top sequences and tokens
def top_influential(scores: torch.Tensor, k: int, absolute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's ``k`` most influential training sequences, best first.

    Returns ``(values [n_q, k'], indices [n_q, k'])`` with ``k' = min(k, n_train)``; ranked by signed
    score (most helpful first), or by |score| with ``absolute``. Values are the signed scores."""
    if scores.dim() != 2:
        raise KcircuitsError(f"scores must be [n_query, n_train], got shape {list(scores.shape)}")
    if k < 1:
        raise KcircuitsError("k must be >= 1")
    key = scores.abs() if absolute else scores
    idx = torch.sort(key, dim=1, descending=True, stable=True).indices[:, : min(k, scores.shape[1])]
    return scores.gather(1, idx), idx


def top_tokens(token_scores: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> list[int]:
    """Positions of the ``k`` tokens with the largest positive contribution in one sequence.

    ``token_scores`` ``[T]``; ``mask`` ``[T]`` (1 = a real, scored token). Tokens that lowered the
    completion's probability (negative) are never returned: the report highlights support."""
    s = token_scores.float().clone()
    if mask is not None:
        s[mask == 0] = float("-inf")
    order = torch.sort(s, descending=True, stable=True).indices[:k]
    return [int(i) for i in order if s[i] > 0]


def token_weights(token_scores: torch.Tensor, mask: torch.Tensor | None = None) -> list[float]:
    """Highlight intensity per token in [0, 1]: the positive part scaled by the sequence maximum ``[T]``."""
    s = token_scores.float().clamp(min=0)
    if mask is not None:
        s = s * (mask != 0)
    top = float(s.max()) if s.numel() else 0.0
    return (s / top).tolist() if top > 0 else [0.0] * s.numel()


# --------------------------------------------------------------------------- power-law tail
@dataclass
class PowerLawFit:
    """p(x) ∝ x^−alpha for x ≥ x_min. ``ks``: Kolmogorov-Smirnov distance of the tail to the fit;
    ``p_value``: fraction of synthetic data sets drawn from the fit whose own KS distance (x_min
    refitted) is at least ``ks`` (p < 0.1 rules the power law out, per Clauset et al.); None when
    ``n_bootstrap`` is 0."""

    alpha: float
    x_min: float
    ks: float
    n_tail: int
    n: int
    p_value: float | None
    n_bootstrap: int

    def to_json(self) -> dict:
        return asdict(self)


def _fit_sorted(x: torch.Tensor, x_min: float | None, min_tail: int, max_candidates: int) -> tuple[float, float, float, int]:
    """MLE alpha and KS distance for ascending positive ``x`` (float64) at the given or best x_min.

    For a candidate x_min = x[i] the tail is x[i:] (m = n − i points), alpha = 1 + m / Σ ln(x/x_min)
    and the fitted CDF is P(x) = 1 − (x/x_min)^(1−alpha); KS = max over tail points of the distance
    between P and the empirical CDF just below and at each point. All candidates at once: ``[c, n]``."""
    n = x.numel()
    if x_min is not None:
        cand = torch.tensor([int(torch.searchsorted(x, torch.tensor(x_min, dtype=x.dtype)))])
    else:
        counts = torch.unique_consecutive(x, return_counts=True)[1]
        first = counts.cumsum(0) - counts  # first index of every distinct value
        cand = first[first <= n - min_tail]
        if cand.numel() > max_candidates:  # evenly spaced in rank: the KS curve is smooth in x_min
            cand = cand[torch.linspace(0, cand.numel() - 1, max_candidates).round().long().unique()]
    if cand.numel() == 0 or int(cand[0]) >= n:
        raise KcircuitsError(f"too few positive values ({n}) for a power-law fit; need at least {min_tail}")
    logx = x.log()
    suffix = torch.flip(torch.cumsum(torch.flip(logx, [0]), 0), [0])  # Σ_{j≥i} ln x_j
    m = (n - cand).double()
    xm = x[cand]
    denom = suffix[cand] - m * xm.log()
    alpha = 1.0 + m / denom.clamp_min(1e-300)
    j = torch.arange(n, dtype=torch.long)
    rank = (j[None, :] - cand[:, None]).double()  # position inside each tail, [c, n]
    valid = rank >= 0
    model = 1.0 - (x[None, :] / xm[:, None]).clamp_min(1.0) ** (1.0 - alpha[:, None])
    emp_hi = (rank + 1) / m[:, None]
    emp_lo = rank / m[:, None]
    dist = torch.maximum((emp_hi - model).abs(), (emp_lo - model).abs()).masked_fill(~valid, 0.0)
    ks = dist.max(1).values
    ks = torch.where(torch.isfinite(alpha) & (denom > 0), ks, torch.full_like(ks, float("inf")))
    best = int(torch.argmin(ks))
    return float(alpha[best]), float(xm[best]), float(ks[best]), int(m[best])


def power_law_tail(values: torch.Tensor | Sequence[float], x_min: float | None = None, *, n_bootstrap: int = 100,
                   seed: int = 0, min_tail: int = 10, max_candidates: int = 200) -> PowerLawFit:
    """Fit a continuous power law to the tail of ``|values|`` (zeros dropped).

    ``x_min`` is chosen by minimising the KS distance (among at most ``max_candidates`` distinct
    values leaving ≥ ``min_tail`` points in the tail) unless given. The goodness-of-fit p-value uses
    ``n_bootstrap`` semi-parametric draws (Clauset et al. §4.1): each synthetic set keeps the sample
    size, draws from the fitted power law with probability n_tail/n and otherwise resamples the
    observed values below x_min, then is refitted with its own x_min."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten().abs()
    x = torch.sort(x[torch.isfinite(x) & (x > 0)]).values
    if x.numel() < min_tail:
        raise KcircuitsError(f"too few non-zero values ({x.numel()}) for a power-law fit; need at least {min_tail}")
    alpha, xm, ks, n_tail = _fit_sorted(x, x_min, min_tail, max_candidates)
    p_value = None
    if n_bootstrap > 0:
        gen = torch.Generator().manual_seed(seed)
        body = x[x < xm]
        n = x.numel()
        exceed = 0
        for _ in range(n_bootstrap):
            from_tail = torch.rand(n, generator=gen, dtype=torch.float64) < n_tail / n
            k = int(from_tail.sum())
            u = torch.rand(k, generator=gen, dtype=torch.float64)
            tail = xm * (1.0 - u) ** (-1.0 / (alpha - 1.0))  # inverse CDF of the fitted power law
            rest = body[torch.randint(0, body.numel(), (n - k,), generator=gen)] if body.numel() else x[:0]
            synth = torch.sort(torch.cat([tail, rest])).values
            try:
                exceed += _fit_sorted(synth, x_min, min_tail, max_candidates)[2] >= ks
            except KcircuitsError:
                continue
        p_value = exceed / n_bootstrap
    return PowerLawFit(alpha, xm, ks, n_tail, int(x.numel()), p_value, n_bootstrap)


# --------------------------------------------------------------------------- layers, components, recall
def influence_by_layer(per_layer: Mapping[int, torch.Tensor]) -> list[dict]:
    """How much of the influence each layer carries, over all queries and training sequences.

    ``per_layer[l]`` ``[n_q, n_train]``. Rows: ``layer``, ``sum`` (signed total), ``abs_sum`` and
    ``share`` (abs_sum over all layers' abs_sum), in layer order."""
    return _shares({int(k): v for k, v in per_layer.items()}, "layer")


def influence_by_component(per_component: Mapping[str, torch.Tensor]) -> list[dict]:
    """Same as :func:`influence_by_layer` for named components (``"a3.h2"``, ``"m5"``)."""
    return _shares(dict(per_component), "component")


def _shares(parts: Mapping, key: str) -> list[dict]:
    sums = {k: float(v.double().sum()) for k, v in parts.items()}
    abs_sums = {k: float(v.double().abs().sum()) for k, v in parts.items()}
    total = sum(abs_sums.values()) or 1.0
    return [{key: k, "sum": sums[k], "abs_sum": abs_sums[k], "share": abs_sums[k] / total} for k in sorted(parts)]


def recall_at_k(ranking: torch.Tensor, sources: Sequence[Sequence[int]], k: int) -> torch.Tensor:
    """Per-query recall@k ``[n_q]``: the fraction of a query's ground-truth source sequences found in
    its first ``k`` ranked sequences. ``ranking`` ``[n_q, ≥k]`` (indices, best first) or a score
    matrix ``[n_q, n_train]`` (float; ranked here). Queries without sources give NaN."""
    if ranking.dim() != 2 or ranking.shape[0] != len(sources):
        raise KcircuitsError(f"ranking must be [n_query={len(sources)}, ...], got {list(ranking.shape)}")
    if ranking.is_floating_point():
        ranking = top_influential(ranking, k)[1]
    top = ranking[:, :k].tolist()
    out = []
    for row, src in zip(top, sources):
        src = {int(s) for s in src}
        out.append(len(src.intersection(row)) / len(src) if src else float("nan"))
    return torch.tensor(out)
