"""ROME's and MEMIT's closed-form updates against their defining properties and a direct solve."""

from __future__ import annotations

import pytest
import torch

from kcircuits.edit.updates import least_squares_update, rank_one_update
from kcircuits.errors import KcircuitsError


def problem(d_out: int = 6, d_in: int = 10, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    samples = torch.randn(200, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d_in,
                                                                                        dtype=torch.float64)
    C = samples.T @ samples / len(samples)  # an anisotropic second moment
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    V = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    return W, K, V, C


def test_rome_maps_the_key_to_the_value_with_a_rank_one_change():
    W, K, V, C = problem()
    k, v = K[:, 0], V[:, 0]
    dW = rank_one_update(W, k, v, C)
    assert torch.allclose((W + dW) @ k, v, rtol=1e-10, atol=1e-10)
    assert torch.linalg.matrix_rank(dW).item() == 1
    # a key orthogonal to C⁻¹k* maps as before
    c_inv_k = torch.linalg.solve(C, k)
    other = torch.randn(len(k), dtype=torch.float64)
    other = other - (other @ c_inv_k) / (c_inv_k @ c_inv_k) * c_inv_k
    assert torch.allclose((W + dW) @ other, W @ other, atol=1e-10)


def test_rome_update_is_the_papers_closed_form():
    W, K, V, C = problem(seed=1)
    k, v = K[:, 0], V[:, 0]
    c_inv_k = torch.linalg.inv(C) @ k
    expected = torch.outer(v - W @ k, c_inv_k) / (c_inv_k @ k)
    assert torch.allclose(rank_one_update(W, k, v, C), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("weight", [0.3, 5.0])
def test_memit_update_solves_its_objective_directly(weight):
    """Normal equations of min ‖(W+Δ)K − V‖² + λ tr(Δ C Δᵀ): Δ (λC + K Kᵀ) = (V − W K) Kᵀ."""
    W, K, V, C = problem(n=4, seed=2)
    dW = least_squares_update(W, K, V, C, weight)
    direct = torch.linalg.solve(weight * C + K @ K.T, K @ (V - W @ K).T).T  # the d_in x d_in solve
    assert torch.allclose(dW, direct, rtol=1e-8, atol=1e-10)


def test_memit_without_covariance_weight_is_the_exact_fit_of_least_c_norm():
    """λ = 0 (n <= d_in): every new key lands on its value, and of all such updates this one has the
    smallest tr(Δ C Δᵀ): its rows lie in the span of C⁻¹K."""
    W, K, V, C = problem(n=4, seed=2)
    dW = least_squares_update(W, K, V, C, 0.0)
    assert torch.allclose((W + dW) @ K, V, atol=1e-9)
    span = torch.linalg.solve(C, K)  # [d_in, n]
    coeffs = torch.linalg.lstsq(span, dW.T).solution
    assert torch.allclose(span @ coeffs, dW.T, atol=1e-9)


def test_memit_with_one_key_and_no_covariance_weight_is_rome():
    W, K, V, C = problem(n=1, seed=3)
    assert torch.allclose(least_squares_update(W, K, V, C, 0.0), rank_one_update(W, K[:, 0], V[:, 0], C),
                          rtol=1e-9, atol=1e-12)


def test_a_larger_covariance_weight_changes_the_other_keys_less():
    W, K, V, C = problem(n=3, seed=4)
    g = torch.Generator().manual_seed(9)
    others = torch.randn(W.shape[1], 50, generator=g, dtype=torch.float64)
    drift = [float(((least_squares_update(W, K, V, C, w)) @ others).norm()) for w in (0.01, 1.0, 100.0)]
    assert drift[0] > drift[1] > drift[2]


def test_bad_inputs_are_refused():
    W, K, V, C = problem()
    with pytest.raises(KcircuitsError, match="shapes do not fit"):
        rank_one_update(W, K[:-1, 0], V[:, 0], C)
    with pytest.raises(KcircuitsError, match="NaN"):
        rank_one_update(W, K[:, 0] * float("nan"), V[:, 0], C)
    with pytest.raises(KcircuitsError, match="singular"):
        rank_one_update(W, K[:, 0], V[:, 0], torch.zeros_like(C))
    with pytest.raises(KcircuitsError, match=">= 0"):
        least_squares_update(W, K, V, C, -1.0)
