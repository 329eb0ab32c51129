"""The closed-form weight updates of ROME and MEMIT, on plain tensors.

An MLP's output matrix ``W [d_out, d_in]`` maps a key ``k`` (the MLP's hidden activation, the input
of its down/output projection) to a value ``W k``. Both methods change ``W`` so that chosen keys map
to new values while keys in general, whose uncentred second moment is ``C = E[k kᵀ] [d_in, d_in]``,
map as before.

* ROME (Meng et al. 2022, eq. 2): one key ``k*`` to ``v*``,
  ``ΔW = (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)``. Then ``(W + ΔW) k* = v*`` exactly, ``ΔW`` has rank
  one, and a key orthogonal to ``C⁻¹k*`` maps as before.
* MEMIT (Meng et al. 2023, eq. 14): keys ``K [d_in, n]`` to values ``V [d_out, n]``, minimising
  ``‖(W + ΔW) K − V‖² + λ tr(ΔW C ΔWᵀ)``: ``ΔW (λC + K Kᵀ) = R Kᵀ`` with ``R = V − W K``. Solved here
  in its ``n × n`` (dual) form ``ΔW = R (λI + KᵀC⁻¹K)⁻¹ (C⁻¹K)ᵀ``, which is the same matrix (push-through
  identity), costs an ``n × n`` solve instead of ``d_in × d_in``, and at ``λ = 0`` with one key is
  ROME's update.

Everything is computed in float64 and returned in ``W``'s dtype.
"""

from __future__ import annotations

import torch

from kcircuits.errors import KcircuitsError


def _solve_c(C: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """``C⁻¹ K`` for a symmetric positive (semi)definite ``C [d, d]`` and ``K [d, n]`` (float64).

    A singular ``C`` (fewer key samples than dimensions) is an error, not a silent pseudo-inverse:
    the update would then depend on which null-space direction the solver picked."""
    try:
        return torch.linalg.solve(C.double(), K.double())
    except RuntimeError as exc:  # torch raises on an exactly singular matrix
        raise KcircuitsError("the key second moment C is singular; compute it on more text (more tokens than "
                             f"the MLP has hidden units) or add damping ({exc})") from None


def rank_one_update(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """ROME's update ``ΔW [d_out, d_in]`` that maps ``k [d_in]`` to ``v [d_out]`` under ``W [d_out, d_in]``.

    ``v`` is the value the *matrix* must produce (subtract a bias first). ``C [d_in, d_in]``: the keys'
    second moment."""
    _check(W, k[:, None], v[:, None], C)
    c_inv_k = _solve_c(C, k[:, None])[:, 0]  # [d_in]
    residual = v.double() - W.double() @ k.double()  # [d_out]
    return (torch.outer(residual, c_inv_k) / (c_inv_k @ k.double())).to(W.dtype)


def least_squares_update(W: torch.Tensor, K: torch.Tensor, V: torch.Tensor, C: torch.Tensor,
                         weight: float) -> torch.Tensor:
    """MEMIT's update ``ΔW [d_out, d_in]``: keys ``K [d_in, n]`` towards values ``V [d_out, n]``, the keys
    in general (second moment ``C``) held in place with weight ``weight`` (λ ≥ 0; 0 = the new keys
    map exactly onto ``V`` when ``n ≤ d_in``)."""
    _check(W, K, V, C)
    if weight < 0:
        raise KcircuitsError(f"the covariance weight must be >= 0, got {weight}")
    c_inv_k = _solve_c(C, K)  # [d_in, n]
    gram = K.double().T @ c_inv_k + weight * torch.eye(K.shape[1], dtype=torch.float64, device=K.device)  # [n, n]
    residual = V.double() - W.double() @ K.double()  # [d_out, n]
    return (torch.linalg.solve(gram, residual.T).T @ c_inv_k.T).to(W.dtype)


def _check(W: torch.Tensor, K: torch.Tensor, V: torch.Tensor, C: torch.Tensor) -> None:
    d_out, d_in = W.shape
    if K.shape[0] != d_in or V.shape[0] != d_out or K.shape[1] != V.shape[1] or C.shape != (d_in, d_in):
        raise KcircuitsError(f"shapes do not fit: W {tuple(W.shape)}, keys {tuple(K.shape)}, values "
                             f"{tuple(V.shape)}, C {tuple(C.shape)} (expected [d_out, d_in], [d_in, n], "
                             "[d_out, n], [d_in, d_in])")
    for name, t in (("keys", K), ("values", V), ("C", C), ("W", W)):
        if not torch.isfinite(t).all():
            raise KcircuitsError(f"the {name} of the update contain NaN or inf")
