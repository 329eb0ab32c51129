"""MEMIT (Meng et al. 2023): write many facts at once, spread over the MLPs of a range of layers.

For requests ``i = 1..n`` (prompt with ``{}``, subject, new target) and layers ``l_1 < ... < l_L``:

1. the residual target ``z_i [d_model]`` (:func:`residual_target`): ``h_i + δ_i``, where ``h_i`` is
   the residual stream at the output of decoder layer ``l_L`` at the subject's last token and
   ``δ_i`` is optimised there exactly as ROME optimises its value at the MLP output
   (:func:`kcircuits.edit.rome.optimised_value`: the new target's teacher-forced log-likelihood, the
   KL "essence" term, weight decay and a norm clamp, both relative to ``‖h_i‖``, and the early stop);
   :func:`residual_targets` optimises :data:`TARGET_BATCH` requests in one forward pass, each with
   its own δ (the costly part of MEMIT: benchmarks/edit_cost.py);
2. for each layer ``l_j`` in order (:func:`spread_deltas`), with the changes of ``l_1..l_{j-1}``
   already applied: the keys ``K [d_mlp, n]`` (:func:`kcircuits.edit.rome.subject_keys`), the
   residuals ``h_i`` now reached at ``l_L`` (:func:`subject_residuals`), and the share of what is
   still missing that this layer writes, ``R = (z − h) / (L − j + 1)`` (MEMIT's
   ``resid = targets / (len(layers) - i)``); the MLP's output matrix then moves keys ``K`` towards
   ``W K + R`` while keys in general (second moment ``C``) stay put with weight λ
   (:func:`layer_delta`, :func:`kcircuits.edit.updates.least_squares_update`).

The result is the summed delta ``{param_name: Δ}`` (:func:`kcircuits.models.edits.edited` applies and
restores it). With one request, one layer and λ = 0 it is ROME's update of that layer
(tests/test_memit.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from kcircuits.edit.registry import EditInputs, register
from kcircuits.edit.requests import EditRequest, validate_requests
from kcircuits.edit.rome import ValueSettings, optimised_values, read_at, split_template, subject_keys, subject_position
from kcircuits.edit.stats import mlp_output
from kcircuits.edit.trace import trace_modules
from kcircuits.edit.updates import least_squares_update
from kcircuits.errors import KcircuitsError
from kcircuits.models import LoadedModel
from kcircuits.models.edits import edited


def check_layers(lm: LoadedModel, layers: Sequence[int]) -> list[int]:
    """``layers`` as a list, or one KcircuitsError line: non-empty, integers within the model, strictly
    increasing (MEMIT spreads the change from the first to the last)."""
    layers = list(layers)
    n_layers = lm.weights.n_layers
    if not layers:
        raise KcircuitsError("MEMIT needs at least one layer to edit; give e.g. layers=[3, 4, 5]")
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
            raise KcircuitsError(f"layer {layer!r} is out of range: the model has layers 0..{n_layers - 1}")
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise KcircuitsError(f"MEMIT's layers must be strictly increasing, got {layers}")
    return layers


#: requests whose residual targets are optimised in one forward pass (each with its own δ; on a CPU the
#: rows of several requests together make larger matrix products: benchmarks/edit_cost.py)
TARGET_BATCH = 16


def subject_residuals(lm: LoadedModel, layer: int, requests: Sequence[EditRequest], *,
                      batch_size: int = 64) -> torch.Tensor:
    """``h [n, d_model]``: the residual stream at the output of decoder layer ``layer`` at each request's
    subject's last token, on its plain prompt (no context prefix: what MEMIT measures ``z`` against);
    ``batch_size`` prompts per forward pass, each pass ending at that layer
    (:func:`kcircuits.edit.rome.read_at`)."""
    rows, positions = [], []
    for req in requests:
        before, after = split_template(req.prompt, req.subject)
        rows.append(lm.tokenizer(before + req.subject + after, add_special_tokens=False).input_ids)
        positions.append(subject_position(lm.tokenizer, before, req.subject))
    return read_at(lm, trace_modules(lm.hf_model).layers[layer], rows, positions, batch_size=batch_size)


def residual_targets(lm: LoadedModel, layers: Sequence[int], requests: Sequence[EditRequest],
                     prefixes: Sequence[str] = ("",), settings: ValueSettings | None = None, *,
                     batch_size: int = TARGET_BATCH) -> torch.Tensor:
    """``z [n, d_model]``: :func:`residual_target` of each of ``requests``, ``batch_size`` of them optimised
    in one forward pass (each with its own δ, Adam state and early stop: the same targets as one by one,
    up to float rounding)."""
    last = check_layers(lm, layers)[-1]
    edits = [(r.prompt, r.subject, r.target_new) for r in requests]
    return optimised_values(lm, trace_modules(lm.hf_model).layers[last], subject_residuals(lm, last, requests), edits,
                            prefixes, settings, batch_size=batch_size)


def residual_target(lm: LoadedModel, layers: Sequence[int], request: EditRequest,
                    prefixes: Sequence[str] = ("",), settings: ValueSettings | None = None) -> torch.Tensor:
    """``z [d_model]``: the residual stream MEMIT wants at the output of the last of ``layers`` at the
    subject's last token, so that ``request.target_new`` follows ``request.prompt``.

    ``z = h + δ`` with ``h`` the clean residual there (:func:`subject_residuals`) and ``δ`` optimised
    on ``prefix + prompt`` for each of ``prefixes`` with ROME's losses and early stop (``settings``: steps,
    lr, ``kl_factor``, ``weight_decay`` × ‖δ‖/‖h‖², ‖δ‖ ≤ ``clamp_norm`` × ‖h‖;
    :func:`kcircuits.edit.rome.optimised_values`). ``lm`` is not changed."""
    return residual_targets(lm, layers, [request], prefixes, settings)[0]


def _summed(deltas: Mapping[str, torch.Tensor], more: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``deltas + more`` per parameter name (a name in only one of them is kept as is)."""
    out = dict(deltas)
    for name, delta in more.items():
        out[name] = out[name] + delta if name in out else delta
    return out


def layer_delta(lm: LoadedModel, layer: int, requests: Sequence[EditRequest], residual: torch.Tensor,
                C: torch.Tensor, covariance_weight: float, prefixes: Sequence[str] = ("",)) -> dict[str, torch.Tensor]:
    """The change of layer ``layer``'s MLP output matrix that adds ``residual [d_model, n]`` (column i for
    request i) to its output at each request's subject key ``k_i`` (averaged over ``prefixes``), keys in
    general (second moment ``C [d_mlp, d_mlp]``) held with weight ``covariance_weight``: ``{param_name: Δ}``.

    The model as it is now (earlier layers' changes applied by the caller) gives the keys."""
    target = mlp_output(lm, layer)
    K = subject_keys(lm, target, [(r.prompt, r.subject) for r in requests], prefixes).T  # [d_mlp, n]
    W = target.matrix(lm).detach()  # [d_model, d_mlp]
    V = W.double() @ K.double() + residual.double()  # [d_model, n], in float64 so that V − W K is R exactly
    return target.delta(least_squares_update(W, K, V, C.to(K.device), covariance_weight))


def memit_deltas(lm: LoadedModel, requests: Sequence[EditRequest], layers: Sequence[int],
                 C_of: Callable[[int], torch.Tensor], *, prefixes: Sequence[str] = ("",),
                 settings: ValueSettings | None = None, covariance_weight: float = 0.0,
                 batch_size: int = TARGET_BATCH) -> dict[str, torch.Tensor]:
    """MEMIT's edit of ``lm`` writing every request of ``requests`` at once into the MLPs of ``layers``
    (strictly increasing); returns the summed delta ``{param_name: Δ}`` of their output matrices.

    ``C_of(layer)``: that layer's key second moment ``[d_mlp, d_mlp]``
    (:func:`kcircuits.edit.stats.key_second_moment`), always called while ``lm`` is unedited;
    ``prefixes``: the contexts keys are averaged over and targets optimised on; ``settings``: the
    residual-target optimisation (:func:`residual_target`; ``batch_size`` requests per forward pass,
    :func:`residual_targets`); ``covariance_weight``: λ ≥ 0, how strongly
    keys in general keep their values (0: the requests' keys reach their targets exactly). The
    requests are validated as one batch (conflicting requests for one subject are refused) and the
    layers checked before anything is computed. ``lm`` is not changed; apply the result with
    :func:`kcircuits.models.edits.edited`."""
    requests = validate_requests(requests, lm.tokenizer)
    layers = check_layers(lm, layers)
    targets = residual_targets(lm, layers, requests, prefixes, settings, batch_size=batch_size)  # [n, d_model]
    return spread_deltas(lm, requests, layers, targets, C_of, prefixes=prefixes, covariance_weight=covariance_weight)


def spread_deltas(lm: LoadedModel, requests: Sequence[EditRequest], layers: Sequence[int], targets: torch.Tensor,
                  C_of: Callable[[int], torch.Tensor], *, prefixes: Sequence[str] = ("",),
                  covariance_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """MEMIT's second half: given the residual targets ``targets [n, d_model]`` (row i: ``z`` of request
    i at the output of the last of ``layers``, :func:`residual_target`), change the MLP output matrices
    of ``layers`` in order, each writing its share of what is still missing (``C_of``, ``prefixes``,
    ``covariance_weight`` as in :func:`memit_deltas`). Returns the summed ``{param_name: Δ}``.

    Separate from :func:`memit_deltas` because the targets are the expensive part: they can be kept
    and spread again with another ``covariance_weight`` or other layers ending at the same one."""
    requests = validate_requests(requests, lm.tokenizer)
    layers = check_layers(lm, layers)
    if targets.shape != (len(requests), lm.weights.d_model):
        raise KcircuitsError(f"the residual targets have shape {tuple(targets.shape)}; expected "
                             f"[{len(requests)}, {lm.weights.d_model}] (one row per request)")
    deltas: dict[str, torch.Tensor] = {}
    for j, layer in enumerate(layers):
        C = C_of(layer)  # outside the edit: the statistics are the unedited model's, as in MEMIT
        with edited(lm, deltas):
            missing = (targets.to(lm.device) - subject_residuals(lm, layers[-1], requests)).T  # [d_model, n]
            step = layer_delta(lm, layer, requests, missing / (len(layers) - j), C, covariance_weight, prefixes)
        deltas = _summed(deltas, step)
    return deltas


@register("memit", "all requests at once, each spread over --n-layers MLPs ending at --layer (least squares "
                   "weighted by --covariance-weight)", batched=True)
def apply_memit(lm: LoadedModel, requests: Sequence[EditRequest], inputs: EditInputs) -> dict[str, torch.Tensor]:
    """The edit registry's MEMIT: :func:`memit_deltas` of ``requests`` into ``lm`` over ``inputs.edit.layers()``
    with its covariance weight, ``inputs.value`` the target optimisation, ``inputs.key_stats`` the key
    statistics and ``inputs.prefixes`` the contexts (:class:`~kcircuits.edit.registry.EditInputs`)."""
    return memit_deltas(lm, requests, inputs.edit.layers(), inputs.key_stats, prefixes=inputs.prefixes,
                        settings=inputs.value, covariance_weight=inputs.edit.covariance_weight)
