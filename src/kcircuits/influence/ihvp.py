"""Inverse-Hessian-vector products ``(G + λI)⁻¹ v`` for gradients in the ``[d_out, d_in(+1)]`` layout.

A :class:`Preconditioner` maps ``{module: Tensor[..., d_out, d_in]}`` to the same layout (leading
dimensions, e.g. queries, are batched). The damping actually used per module is in ``.damping``.

* ``identity``: ``v`` itself (influence = gradient dot product; no damping).
* ``diagonal``: ``v / (diag + λ)``.
* ``kfac`` / ``ekfac``: rotate into the Kronecker eigenbasis, ``Q_Sᵀ v Q_A``, divide elementwise by
  ``Λ + λ`` (KFAC: ``Λ = e_S e_Aᵀ``; EK-FAC: the refitted ``Λ``), rotate back.
* ``lissa``: the stochastic recursion of Agarwal et al. (2017), ``x_j = v + x_{j−1} − (G + λ)x_{j−1}/s``,
  ``(G + λ)⁻¹ v ≈ x_depth / s``, with exact Gauss-Newton-vector products on random training batches;
  no block structure assumed.
* ``exact``: dense Gauss-Newton matrix over all tracked parameters (no block structure), solved by
  Cholesky; for tiny models and tests only.

Damping ``"heuristic"`` is ``0.1 × mean eigenvalue`` of each module's curvature block (mean of Λ;
for ``exact`` the mean of the block's diagonal, which is the same quantity, trace / size).
"""

from __future__ import annotations

import math
import warnings

import torch

from kcircuits.errors import KcircuitsError
from kcircuits.influence.factors import Factors
from kcircuits.influence.gradients import (
    LMObjective,
    exact_gauss_newton,
    flatten,
    gn_vector_product,
    unflatten,
)
from kcircuits.influence.modules import matrix_shape, tracked_modules
from kcircuits.influence.sequences import Sequences

PRECONDITIONERS = ("identity", "diagonal", "kfac", "ekfac", "lissa", "exact")
HEURISTIC_FACTOR = 0.1
LISSA_DEFAULTS = {"scale": None, "depth": 500, "repeats": 1, "batch_size": 8, "damping": None, "seed": 0}


class Preconditioner:
    """Base: the identity (gradient dot product)."""

    strategy = "identity"

    def __init__(self) -> None:
        self.damping: dict[str, float] = {}

    def apply(self, grads: dict[str, torch.Tensor], tokens: tuple[dict, dict] | None = None) -> dict[str, torch.Tensor]:
        """``(G + λI)⁻¹ grads`` per module; ``tokens``: the per-token factors of ``grads``, which some
        preconditioners use to save work (others ignore them)."""
        return dict(grads)

    def self_scores(self, grads: dict[str, torch.Tensor], tokens: tuple[dict, dict] | None = None) -> torch.Tensor:
        """``∇L_bᵀ (G + λI)⁻¹ ∇L_b`` per sequence ``[B]`` from its gradients ``{name: [B, d_out, d_in]}``.

        ``tokens`` ``(ā, g)`` (per-token factors of the same gradients) lets a subclass avoid the
        full preconditioning of every sequence's gradient matrix."""
        P = self.apply(grads)
        return sum(torch.einsum("boi,boi->b", P[n].double(), grads[n].double()) for n in grads).float()


class EigenPreconditioner(Preconditioner):
    """``Q (Q^T v / (Λ + λ))`` with ``Q = Q_A ⊗ Q_S`` per module (KFAC / EK-FAC); ``Q = I`` for diagonal."""

    def __init__(self, strategy: str, bases: dict[str, tuple | None], eigenvalues: dict[str, torch.Tensor],
                 damping: dict[str, float]):
        self.strategy, self.bases, self.eigenvalues, self.damping = strategy, bases, eigenvalues, damping

    def apply(self, grads: dict[str, torch.Tensor], tokens: tuple[dict, dict] | None = None) -> dict[str, torch.Tensor]:
        """``tokens`` ``(ā, g)`` (``[B, T, d_in]``, ``[B, T, d_out]``, with ``grads = Σ_t g ā ᵀ``) make the
        rotation into the eigenbasis cheap (see :meth:`_rotated`). The rotation back runs in the
        gradients' dtype: for float32 gradients it is the costly step, and float64 there would only
        add digits that the float32 result drops."""
        out = {}
        for name, v in grads.items():
            if name not in self.eigenvalues:
                raise KcircuitsError(f"module {name} has no fitted factors; refit the factors with the same --include")
            basis = self.bases.get(name)
            x = self._rotated(name, v, tokens)
            x = x / (self.eigenvalues[name].to(x.device) + self.damping[name])
            if basis is not None:
                QS, QA = (q.to(x.device, v.dtype) for q in basis)
                x = torch.einsum("op,...pq,iq->...oi", QS, x.to(v.dtype), QA)
            out[name] = x.to(v.dtype)
        return out

    def _rotated(self, name: str, v: torch.Tensor, tokens: tuple[dict, dict] | None) -> torch.Tensor:
        """``Q_Sᵀ v Q_A`` in float64 ``[..., d_out, d_in]``. Why per-token factors when given:
        ``Q_Sᵀ (Σ_t g_t ā_tᵀ) Q_A = Σ_t (Q_Sᵀ g_t)(Q_Aᵀ ā_t)ᵀ`` rotates ``T`` token vectors
        (``T (d_out² + d_in²)`` multiply-adds) instead of the matrix (``d_out d_in (d_out + d_in)``)."""
        basis = self.bases.get(name)
        if basis is None:
            return v.double()
        QS, QA = (q.to(v.device) for q in basis)
        if tokens is not None:
            a, g = tokens
            return torch.einsum("btp,btq->bpq", g[name].double() @ QS, a[name].double() @ QA)
        return torch.einsum("op,...oi,iq->...pq", QS, v.double(), QA)

    def self_scores(self, grads: dict[str, torch.Tensor], tokens: tuple[dict, dict] | None = None) -> torch.Tensor:
        """``Σ (Q_Sᵀ G_b Q_A)² / (Λ + λ)``: no rotation back needed."""
        out = 0.0
        for name, v in grads.items():
            rot = self._rotated(name, v, tokens)  # [B, d_out, d_in] in the eigenbasis
            out = out + (rot ** 2 / (self.eigenvalues[name].to(rot.device) + self.damping[name])).sum((1, 2))
        return out.float()


class ExactPreconditioner(Preconditioner):
    """Dense ``(G + D)⁻¹ v`` with ``D`` the per-module damping on the diagonal (Cholesky, float64)."""

    strategy = "exact"

    def __init__(self, G: torch.Tensor, shapes: dict[str, tuple[int, int]], damping: dict[str, float]):
        self.shapes, self.damping = shapes, damping
        d = torch.cat([torch.full((o * i,), damping[n], dtype=G.dtype, device=G.device)
                       for n, (o, i) in shapes.items()])
        self.chol, info = torch.linalg.cholesky_ex(G + torch.diag(d))
        if int(info) != 0:
            raise KcircuitsError("the Gauss-Newton matrix is singular at this damping; use a damping > 0")

    def apply(self, grads: dict[str, torch.Tensor], tokens: tuple[dict, dict] | None = None) -> dict[str, torch.Tensor]:
        names = list(self.shapes)
        v = flatten(grads, names)
        lead = v.shape[:-1]
        x = torch.cholesky_solve(v.double().reshape(-1, v.shape[-1]).T, self.chol).T
        return {n: t.to(v.dtype) for n, t in unflatten(x.reshape(*lead, -1), self.shapes).items()}


class LissaDiverged(KcircuitsError):
    """The LiSSA recursion left its bound: the scale is below a mini-batch's top eigenvalue."""


class LissaPreconditioner(Preconditioner):
    """Stochastic IHVP; ``repeats`` independent recursions averaged.

    Divergence is always detected. With an explicit ``scale`` it raises. With the default (estimated)
    scale it retries the query with the scale ×4, up to ``AUTO_SCALE_RETRIES`` times, since one
    mini-batch's top eigenvalue can exceed the 20-step power-iteration estimate; the scale used and
    the number of retries are kept (``scale``, ``retries``) and recorded by the callers."""

    AUTO_SCALE_RETRIES = 3

    strategy = "lissa"

    def __init__(self, model, train: Sequences, modules, objective, damping: dict[str, float], params: dict):
        self.model, self.train, self.modules, self.objective = model, train, modules, objective
        self.damping, self.params = damping, params
        if min(damping.values()) <= 0:
            raise KcircuitsError("LiSSA needs a damping > 0 (it only converges for a positive-definite G + λI)")
        self.shapes = {n: matrix_shape(m) for n, m in modules.items()}
        self.gen = torch.Generator().manual_seed(int(params["seed"]))
        self.auto_scale = not params["scale"]
        self.scale = float(params["scale"]) if params["scale"] else self._default_scale()
        self.retries = 0

    def _batch(self) -> Sequences:
        n, b = len(self.train), min(int(self.params["batch_size"]), len(self.train))
        if b >= n:
            return self.train
        return self.train.subset(torch.randperm(n, generator=self.gen)[:b].sort().values)

    def _damped(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gx = gn_vector_product(self.model, self._batch(), self.modules, self.objective, x)
        return {n: gx[n] + self.damping[n] * x[n] for n in x}

    def _default_scale(self) -> float:
        """2 × (largest eigenvalue of G + λ), estimated by 20 power iterations on random batches."""
        x = {n: torch.randn(s, generator=self.gen) for n, s in self.shapes.items()}
        top = 0.0
        for _ in range(20):
            norm = math.sqrt(sum(float((t ** 2).sum()) for t in x.values()))
            x = {n: t / norm for n, t in x.items()}
            y = self._damped(x)
            top = math.sqrt(sum(float((t ** 2).sum()) for t in y.values()))
            x = y
        return 2.0 * top

    def _solve_one(self, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        depth, repeats = int(self.params["depth"]), int(self.params["repeats"])
        v_norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in v.values()))
        bound = 4.0 * v_norm * self.scale / min(self.damping.values()) + 1e-30
        total = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in v.items()}
        for _ in range(repeats):
            x = {n: t.float().clone() for n, t in v.items()}
            for step in range(depth):
                hx = self._damped(x)
                x = {n: v[n] + x[n] - hx[n] / self.scale for n in x}
                norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in x.values()))
                if not math.isfinite(norm) or norm > bound:
                    raise LissaDiverged(f"LiSSA diverged at step {step} (|x| = {norm:.3g}); increase lissa scale "
                                         f"(now {self.scale:.3g}) or the damping")
            for n in x:
                total[n] += x[n].double() / self.scale
        return {n: (t / repeats).to(v[n].dtype) for n, t in total.items()}

    def _solve_retrying(self, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        while True:
            try:
                return self._solve_one(v)
            except LissaDiverged as exc:
                if not self.auto_scale or self.retries >= self.AUTO_SCALE_RETRIES:
                    raise
                warnings.warn(f"{exc}: retrying with scale {4 * self.scale:.3g}", stacklevel=2)
                self.scale *= 4.0
                self.retries += 1

    def apply(self, grads: dict[str, torch.Tensor], tokens: tuple[dict, dict] | None = None) -> dict[str, torch.Tensor]:
        names = list(grads)
        lead = grads[names[0]].shape[:-2]
        flat = {n: g.reshape(-1, *g.shape[-2:]) for n, g in grads.items()}
        rows = [self._solve_retrying({n: flat[n][k] for n in names}) for k in range(flat[names[0]].shape[0])]
        return {n: torch.stack([r[n] for r in rows]).reshape(*lead, *grads[n].shape[-2:]) for n in names}


def resolve_damping(damping: float | str, means: dict[str, float]) -> dict[str, float]:
    """Per-module damping: ``"heuristic"`` = 0.1 × mean eigenvalue of the module's block, or one number."""
    if isinstance(damping, str):
        if damping != "heuristic":
            raise KcircuitsError(f"unknown damping {damping!r}; give a number >= 0 or 'heuristic'")
        return {n: HEURISTIC_FACTOR * m if m > 0 else 1e-8 for n, m in means.items()}
    if not math.isfinite(float(damping)) or float(damping) < 0:
        raise KcircuitsError(f"damping must be a finite number >= 0 or 'heuristic', not {damping!r}")
    return {n: float(damping) for n in means}


def make_preconditioner(strategy: str, factors: Factors | None, *, damping: float | str = "heuristic", model=None,
                        train: Sequences | None = None, lissa: dict | None = None, include: list[str] | None = None,
                        objective=None, max_params: int = 10000, progress: bool = False) -> Preconditioner:
    """Build the ``(G + λI)⁻¹`` operator for ``strategy`` (see module docstring).

    ``diagonal``/``kfac``/``ekfac`` need ``factors``; ``lissa``/``exact`` need ``model`` and ``train``
    (modules: ``factors.modules`` if given, else :func:`tracked_modules` with ``include``).
    ``lissa`` keys: scale (default 2 × estimated top eigenvalue), depth (500), repeats (1),
    batch_size (8), damping (overrides ``damping``), seed (0). ``exact`` refuses more than
    ``max_params`` tracked parameters.
    """
    if strategy not in PRECONDITIONERS:
        raise KcircuitsError(f"unknown influence strategy {strategy!r}; choose one of {', '.join(PRECONDITIONERS)}")
    if strategy == "identity":
        return Preconditioner()
    if strategy in ("diagonal", "kfac", "ekfac"):
        if factors is None:
            raise KcircuitsError(f"strategy {strategy!r} needs fitted factors; run fit_factors first")
        eig = {n: factors.eigenvalues(n, strategy) for n in factors.modules}
        bases = {n: (None if strategy == "diagonal" else (factors.tensors[n]["QS"], factors.tensors[n]["QA"]))
                 for n in factors.modules}
        return EigenPreconditioner(strategy, bases, eig,
                                   resolve_damping(damping, {n: float(e.mean()) for n, e in eig.items()}))
    if model is None or train is None:
        raise KcircuitsError(f"strategy {strategy!r} needs the model and the training sequences")
    modules = tracked_modules(model, factors.modules if factors is not None else include)
    if factors is not None:
        modules = {n: m for n, m in modules.items() if n in factors.modules}
    objective = objective or LMObjective()
    if strategy == "exact":
        return _exact(model, train, modules, objective, damping, max_params, progress)
    params = {**LISSA_DEFAULTS, **(lissa or {})}
    unknown = set(params) - set(LISSA_DEFAULTS)
    if unknown:
        raise KcircuitsError(f"unknown lissa options {sorted(unknown)}; known: {', '.join(LISSA_DEFAULTS)}")
    lissa_damping = params["damping"] if params["damping"] is not None else damping
    if lissa_damping == "heuristic":
        if factors is None:
            raise KcircuitsError("LiSSA with damping 'heuristic' needs fitted factors (for the mean eigenvalues); "
                                 "pass factors or a numeric damping")
        kind = "ekfac" if factors.strategy == "ekfac" else factors.strategy
        means = {n: float(factors.eigenvalues(n, kind).mean()) for n in modules}
    else:
        means = {n: 0.0 for n in modules}
    return LissaPreconditioner(model, train, modules, objective, resolve_damping(lissa_damping, means), params)


def _exact(model, train, modules, objective, damping, max_params: int, progress: bool) -> ExactPreconditioner:
    shapes = {n: matrix_shape(m) for n, m in modules.items()}
    total = sum(o * i for o, i in shapes.values())
    if total > max_params:
        raise KcircuitsError(f"exact Gauss-Newton over {total} parameters exceeds the cap of {max_params}; restrict "
                             "the modules with include=[...] or use kfac/ekfac/lissa")
    G = exact_gauss_newton(model, train, modules, objective, progress=progress)
    means, start = {}, 0
    for n, (o, i) in shapes.items():
        means[n] = float(G.diagonal()[start: start + o * i].mean())
        start += o * i
    return ExactPreconditioner(G, shapes, resolve_damping(damping, means))
