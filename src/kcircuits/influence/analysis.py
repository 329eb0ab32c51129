"""Read influence scores: top sequences, top tokens, the heavy tail, layers, and recall of known sources.

Shapes: ``scores`` ``[n_query, n_train]`` (positive = training on that sequence makes the completion
more likely); ``per_token`` ``[n_query, n_train, T]`` (sums over T to ``scores``); ``per_layer``
``{layer: [n_query, n_train]}``.

The power-law fit follows Clauset, Shalizi & Newman (2009), "Power-law distributions in empirical
data": Grosse et al. (2023) report that influence is heavy-tailed (a few sequences carry most of it),
and the exponent and its goodness of fit say whether that holds for a query.
"""

from __future__ import annotations

import math
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
    """p(x) ∝ x^−alpha for x ≥ x_min, fitted to ``n_tail`` of the ``n`` non-zero |values|.

    ``ks``: Kolmogorov-Smirnov distance of the tail to the fit. ``p_value``: fraction of the
    synthetic data sets drawn from the fit whose own KS distance (x_min refitted) is at least ``ks``
    (p < 0.1 rules the power law out, per Clauset et al.), over the ``n_bootstrap − n_bootstrap_failed``
    draws that could be fitted; None when there were none (``n_bootstrap`` 0, or every draw failed).
    ``lognormal_mu`` / ``lognormal_sigma``: maximum-likelihood lognormal on the same tail (truncated to
    [x_min, ∞)); ``lognormal_R``: Vuong's normalised log-likelihood ratio of the power law to it
    (positive favours the power law; standard normal when both fit equally well) and ``lognormal_p``
    its two-sided p-value (small: the sign of R is significant). When the best lognormal is the
    power law itself (its σ → ∞ limit, common for true power laws) ``lognormal_mu``/``sigma`` are
    None and R = 0, p = 1: no evidence either way. All four are None if that fit fails numerically."""

    alpha: float
    x_min: float
    ks: float
    n_tail: int
    n: int
    p_value: float | None
    n_bootstrap: int
    n_bootstrap_failed: int = 0
    lognormal_mu: float | None = None
    lognormal_sigma: float | None = None
    lognormal_R: float | None = None
    lognormal_p: float | None = None

    def to_json(self) -> dict:
        """Every field, as a plain dict (the ``power_law`` entry of ``influence.json``)."""
        return asdict(self)


#: candidate-by-data elements evaluated at once in the x_min search (bounds memory at ~16 MiB a matrix)
_KS_CHUNK = 1 << 21
#: candidates whose exact KS distance is computed per round of the pruned search
_KS_BLOCK = 64


def _ks(logx: torch.Tensor, start: torch.Tensor, log_xm: torch.Tensor, alpha: torch.Tensor,
        cols: torch.Tensor) -> torch.Tensor:
    """KS distance of each candidate tail x[start:] to its power law, taken over the data indices
    ``cols`` (ascending) only: the exact distance when ``cols`` holds every index, else a lower bound
    (a maximum over fewer points), with identical arithmetic per point so the bound never exceeds it.

    Per tail point at rank r of m, max(|r/m − P|, |(r+1)/m − P|) = 1/(2m) + |P − (r + ½)/m|: the
    distance to the empirical CDF just below and at the point. Tied values need no special case:
    the ranks of a tie run between the CDF below and at the tied value."""
    n = logx.numel()
    m = (n - start).double()
    out = torch.empty_like(alpha)
    rows = max(1, _KS_CHUNK // max(cols.numel(), 1))
    for c0 in range(0, start.numel(), rows):
        s, a, lx, mc = start[c0:c0 + rows], alpha[c0:c0 + rows], log_xm[c0:c0 + rows], m[c0:c0 + rows, None]
        c = cols[int(torch.searchsorted(cols, s.min())):]
        if c.numel() == 0:  # no sampled point in these tails: the only bound is 0
            out[c0:c0 + rows] = 0.0
            continue
        rank = (c[None, :] - s[:, None]).double()  # position inside each tail (< 0: below x_min)
        model = -torch.expm1((1.0 - a[:, None]) * (logx[None, c] - lx[:, None]).clamp_min(0.0))
        dist = ((model - (rank + 0.5) / mc).abs() + 0.5 / mc).masked_fill(rank < 0, 0.0)
        out[c0:c0 + rows] = dist.max(1).values
    return out


def _fit_sorted(x: torch.Tensor, x_min: float | None, min_tail: int,
                max_candidates: int | None = None) -> tuple[float, float, float, int]:
    """``(alpha, x_min, ks, n_tail)``: MLE alpha and KS distance for ascending positive ``x`` (float64)
    at the given x_min, or at the x_min minimising the KS distance.

    The candidates are every distinct observed value leaving at least ``min_tail`` points in the tail
    (Clauset et al. §3.3); ``max_candidates`` thins them to an even grid in rank, an approximation
    only for samples too large even for the search below. For a tail x[i:] above x_min (m points),
    alpha = 1 + m / Σ ln(x/x_min) and the fitted CDF is P(x) = 1 − (x/x_min)^(1−alpha).

    Why the search is pruned: exact KS distances for all n candidates cost O(n²) (about 2 s at
    n = 2·10⁴, and again for every bootstrap draw). A KS distance over every k-th point
    (k ≈ √n / 2) bounds each candidate's from below at O(n^1.5); exact distances are then computed in
    increasing order of that bound until the bound exceeds the best exact distance found, which
    leaves the minimiser unchanged (ties included: candidates whose bound equals the best are still
    evaluated)."""
    n = x.numel()
    if x_min is not None:
        if not x_min > 0:
            raise KcircuitsError(f"x_min must be positive, got {x_min}")
        start = torch.searchsorted(x, torch.tensor([x_min], dtype=x.dtype))  # first x ≥ x_min
        if n - int(start) < min_tail:
            raise KcircuitsError(f"too few values at or above x_min={x_min} ({n - int(start)}) for a power-law fit; "
                                 f"need at least {min_tail}")
        xm = torch.tensor([x_min], dtype=x.dtype)  # the given bound itself, not the next observed value
    else:
        counts = torch.unique_consecutive(x, return_counts=True)[1]
        start = counts.cumsum(0) - counts  # first index of every distinct value
        start = start[start <= n - min_tail]
        if max_candidates is not None and start.numel() > max_candidates:
            start = start[torch.linspace(0, start.numel() - 1, max_candidates).round().long().unique()]
        if start.numel() == 0:
            raise KcircuitsError(f"too few positive values ({n}) for a power-law fit; need at least {min_tail}")
        xm = x[start]
    logx, log_xm = x.log(), xm.log()
    suffix = torch.flip(torch.cumsum(torch.flip(logx, [0]), 0), [0])  # Σ_{j≥i} ln x_j
    m = (n - start).double()
    denom = suffix[start] - m * log_xm
    alpha = 1.0 + m / denom.clamp_min(1e-300)
    valid = torch.isfinite(alpha) & (denom > 0)  # a tail of one distinct value has no MLE
    if not bool(valid.any()):
        raise KcircuitsError("no power-law fit: every candidate tail holds a single distinct value")
    start, log_xm, alpha, m, xm = start[valid], log_xm[valid], alpha[valid], m[valid], xm[valid]
    every = torch.arange(n)
    stride = max(1, math.isqrt(n) // 2)
    if stride == 1 or start.numel() <= _KS_BLOCK:
        ks = _ks(logx, start, log_xm, alpha, every)
    else:
        bound = _ks(logx, start, log_xm, alpha, torch.arange(0, n, stride))
        order = torch.argsort(bound, stable=True)
        ks = torch.full_like(alpha, float("inf"))  # candidates never evaluated: KS ≥ bound > best
        best = float("inf")
        for b0 in range(0, order.numel(), _KS_BLOCK):
            idx = order[b0:b0 + _KS_BLOCK]
            if float(bound[idx[0]]) > best:
                break
            ks[idx] = _ks(logx, start[idx], log_xm[idx], alpha[idx], every)
            best = min(best, float(ks[idx].min()))
    best_i = int(torch.argmin(ks))  # first minimum: the smallest x_min among exact ties
    return float(alpha[best_i]), float(xm[best_i]), float(ks[best_i]), int(m[best_i])


def _power_law_loglik(tail: torch.Tensor, alpha: float, x_min: float) -> torch.Tensor:
    """Per-point log density of the continuous power law on [x_min, ∞): ln((α−1)/x_min) − α ln(x/x_min)."""
    return math.log((alpha - 1.0) / x_min) - alpha * (tail / x_min).log()


def _log_mills(z: torch.Tensor) -> torch.Tensor:
    """ln(Q(z) / φ(z)), the log Mills ratio of the standard normal, accurate for any z: through
    ``erfcx`` (Q(z)/φ(z) = √(π/2)·erfcx(z/√2)) for z > 0, where Q(z) and φ(z) both underflow, and
    through ``log_ndtr`` for z ≤ 0, where erfcx overflows. Each branch sees clamped inputs, so the
    branch not taken never produces the inf/NaN that would poison the gradient."""
    pos = torch.log(torch.special.erfcx(z.clamp_min(0.0) / math.sqrt(2.0))) + 0.5 * math.log(math.pi / 2.0)
    zn = z.clamp_max(0.0)
    neg = torch.special.log_ndtr(-zn) + 0.5 * zn ** 2 + 0.5 * math.log(2.0 * math.pi)
    return torch.where(z > 0, pos, neg)


def _lognormal_loglik(u: torch.Tensor, logx: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Per-point log density of the lognormal truncated to [x_min, ∞), in its natural parameters
    β = (ln x_min − μ)/σ² and γ = 1/(2σ²) > 0, from ``u = ln(x/x_min)`` and ``logx = ln x``.

    The density is exp(−βu − γu²) / (N x), N = ∫₀^∞ exp(−βu − γu²) du = Mills(β/κ)/κ with κ = √(2γ).
    Why these coordinates: an exponential family in (u, u²), so the log-likelihood is concave in
    (β, γ) and has one maximum; and as γ → 0 the lognormal tends to the power law with alpha = 1 + β,
    a limit the maximum likelihood often reaches (in (μ, σ) it lies at μ → −∞, σ → ∞)."""
    kappa = (2.0 * gamma).sqrt()
    return -beta * u - gamma * u ** 2 - (_log_mills(beta / kappa) - kappa.log()) - logx


def _fit_lognormal_tail(tail: torch.Tensor, x_min: float, power_law_ll: torch.Tensor,
                        max_steps: int = 100) -> tuple[float | None, float | None, torch.Tensor] | None:
    """``(mu, sigma, per-point log-likelihood)`` of the maximum-likelihood lognormal truncated to
    [x_min, ∞) on ``tail`` (all ≥ x_min, float64); None when the optimiser ends non-finite.

    The log-likelihood is concave in (β, γ) (see :func:`_lognormal_loglik`), so the maximum is at
    the boundary γ = 0 exactly when the KKT condition holds there: with β = 1/ū (the power-law MLE,
    alpha − 1 = 1/ū) the slope in γ is 2ū² − mean(u²), i.e. when var(u) ≥ ū² for u = ln(x/x_min).
    Then the best lognormal *is* the fitted power law: ``mu``/``sigma`` are None (μ = −∞, σ = ∞) and
    the log-likelihood is ``power_law_ll``. Otherwise the maximum is inside and damped Newton steps
    from the moments of ln x (as Clauset et al.'s code starts) reach it: on a concave function every
    step with backtracking gains, so there is no false convergence to the power-law limit (which an
    optimiser in (μ, ln σ) reaches whenever its path drifts there, its gradient vanishing)."""
    logx = tail.log()
    log_xmin = math.log(x_min)
    u = logx - log_xmin
    u1, u2 = float(u.mean()), float((u ** 2).mean())
    if u2 - u1 ** 2 >= u1 ** 2:
        return None, None, power_law_ll
    sd = max(math.sqrt(max(float(logx.var(unbiased=False)), 0.0)), 1e-6)
    theta = torch.tensor([(log_xmin - float(logx.mean())) / sd ** 2, 0.5 / sd ** 2], dtype=torch.float64)

    def mean_ll(th: torch.Tensor) -> torch.Tensor:
        return _lognormal_loglik(u, logx, th[0], th[1]).mean()

    value = float(mean_ll(theta))
    for _ in range(max_steps):
        grad = torch.autograd.functional.jacobian(mean_ll, theta)
        hess = torch.autograd.functional.hessian(mean_ll, theta)
        try:
            step = -torch.linalg.solve(hess, grad)  # Newton ascent step (the Hessian is negative definite)
            gain = float(grad @ step)
        except RuntimeError:  # numerically singular
            gain = math.nan
        if not math.isfinite(gain) or gain <= 0:  # numerically not negative definite: follow the gradient
            step, gain = grad, float(grad @ grad)
        if gain < 1e-18:  # Newton decrement²: what is left to gain is below float64 resolution
            break
        t = 1.0
        while t > 1e-12:  # backtrack until the step stays at γ > 0 and gains (Armijo)
            cand = theta + t * step
            if cand[1] > 0:
                cand_value = float(mean_ll(cand))
                if cand_value >= value + 1e-4 * t * gain:
                    break
            t /= 2
        else:
            break
        theta, value = cand, cand_value
    with torch.no_grad():
        ll = _lognormal_loglik(u, logx, theta[0], theta[1])
    if not bool(torch.isfinite(ll).all()):
        return None
    if float(ll.mean()) <= float(power_law_ll.mean()):  # not past the γ → 0 limit: that limit is the best
        return None, None, power_law_ll
    beta, gamma = theta.tolist()
    sigma = math.sqrt(0.5 / gamma)
    return log_xmin - beta * sigma ** 2, sigma, ll


def _vuong(ll_1: torch.Tensor, ll_2: torch.Tensor) -> tuple[float, float]:
    """Vuong's test of two non-nested models (Clauset et al. §5.1): ``R = Σd / (√m σ_d)`` for the
    per-point log-likelihood differences ``d = ll_1 − ll_2`` (σ_d their standard deviation), which is
    asymptotically standard normal when both fit equally well, and ``p = erfc(|R| / √2)``, the
    probability of an |R| this large by chance. Positive R favours model 1."""
    d = ll_1 - ll_2
    sd = float(d.std(unbiased=False))
    if not sd > 0:  # identical fits: no evidence either way
        return 0.0, 1.0
    r = float(d.sum()) / (math.sqrt(d.numel()) * sd)
    return r, math.erfc(abs(r) / math.sqrt(2.0))


def power_law_tail(values: torch.Tensor | Sequence[float], x_min: float | None = None, *, n_bootstrap: int = 100,
                   seed: int = 0, min_tail: int = 10, max_candidates: int | None = None) -> PowerLawFit:
    """Fit a continuous power law to the tail of ``|values|`` (zeros dropped), per Clauset et al.

    ``x_min`` is, unless given, the observed value minimising the KS distance among all distinct
    values leaving ≥ ``min_tail`` points in the tail (``max_candidates``: see :func:`_fit_sorted`).
    The goodness-of-fit p-value uses ``n_bootstrap`` semi-parametric draws (§4.1): each synthetic set
    keeps the sample size, draws from the fitted power law with probability n_tail/n and otherwise
    resamples the observed values below x_min, then is refitted with its own x_min (or the given one).
    A draw that cannot be fitted (too few distinct values) has no KS distance to compare, so it is
    left out of the p-value's numerator and denominator alike and counted in ``n_bootstrap_failed``:
    counting it as "not exceeding" would bias p low, towards rejecting the power law. The tail is
    also compared with a lognormal fitted to the same x ≥ x_min (§5, see :class:`PowerLawFit`): a
    good p-value says a power law is plausible, not that it beats the usual heavy-tailed alternative."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten().abs()
    x = torch.sort(x[torch.isfinite(x) & (x > 0)]).values
    if x.numel() < min_tail:
        raise KcircuitsError(f"too few non-zero values ({x.numel()}) for a power-law fit; need at least {min_tail}")
    alpha, xm, ks, n_tail = _fit_sorted(x, x_min, min_tail, max_candidates)
    tail = x[x.numel() - n_tail:]
    ln_mu = ln_sigma = ln_r = ln_p = None
    ll_power_law = _power_law_loglik(tail, alpha, xm)
    lognormal = _fit_lognormal_tail(tail, xm, ll_power_law)
    if lognormal is not None:
        ln_mu, ln_sigma, ll_lognormal = lognormal
        ln_r, ln_p = _vuong(ll_power_law, ll_lognormal)
    p_value, failed = None, 0
    if n_bootstrap > 0:
        gen = torch.Generator().manual_seed(seed)
        body = x[: x.numel() - n_tail]
        n = x.numel()
        exceed = 0
        for _ in range(n_bootstrap):
            from_tail = torch.rand(n, generator=gen, dtype=torch.float64) < n_tail / n
            k = int(from_tail.sum())
            u = torch.rand(k, generator=gen, dtype=torch.float64)
            synth_tail = xm * (1.0 - u) ** (-1.0 / (alpha - 1.0))  # inverse CDF of the fitted power law
            rest = body[torch.randint(0, body.numel(), (n - k,), generator=gen)] if body.numel() else x[:0]
            synth = torch.sort(torch.cat([synth_tail, rest])).values
            try:
                exceed += _fit_sorted(synth, x_min, min_tail, max_candidates)[2] >= ks
            except KcircuitsError:
                failed += 1
        fitted = n_bootstrap - failed
        p_value = exceed / fitted if fitted else None
    return PowerLawFit(alpha, xm, ks, n_tail, int(x.numel()), p_value, n_bootstrap, failed,
                       ln_mu, ln_sigma, ln_r, ln_p)


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
    for row, src in zip(top, sources, strict=True):
        src = {int(s) for s in src}
        out.append(len(src.intersection(row)) / len(src) if src else float("nan"))
    return torch.tensor(out)
