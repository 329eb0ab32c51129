"""Weight circuits (Ge et al. 2024): learn which weight entries alone reproduce the model on a task.

A *weight circuit* is a :data:`~kcircuits.models.masking.WeightMask`: one bool per entry of every
masked parameter, True where the circuit keeps the weight. The circuit alone is the model with every
other entry ablated (zeroed by default, see :data:`kcircuits.models.masking.ABLATIONS`); the
complement is the model with the circuit's own entries ablated. DESIGN decision 13: weight circuits
are a different kind of result from edge circuits, so this module registers no discovery method.

Training (:func:`train_weight_mask`): one float32 logit ``log α`` per masked entry, relaxed with the
hard-concrete distribution of Louizos et al. (2018): with ``u ~ U(0, 1)``,

    s = sigmoid((log u − log(1 − u) + log α) / β),   z = clamp(s · (r − l) + l, 0, 1)

(temperature ``β`` = 2/3, stretch ``l`` = −0.1, ``r`` = 1.1), so a gate is exactly 0 or exactly 1 with
positive probability and the probability that it is non-zero, ``sigmoid(log α − β log(−l / r))``, is
differentiable: its mean over all masked entries is the circuit's *expected density* ``E``. Each
step runs ``torch.func.functional_call(hf_model, {name: W·z + a·(1 − z)})`` (``a`` the ablation value)
on one batch with one gate sample, and minimises

    objective + λ₁ · (E − d) + λ₂ · (E − d)²

where the objective is the KL divergence from the full model's next-token distribution at the
scored positions to the circuit's (``"kl"``), or the answer's cross-entropy (``"ce"``), and the
multipliers λ₁, λ₂ rise by gradient ascent on the same expression (the Lagrangian relaxation of
Wang et al. 2023 and Bhaskar et al. 2024's edge pruning), λ₂ from a large initial value (see
:data:`QUADRATIC_INIT` for why). The target ``d`` falls linearly from the initial expected density to
``settings.density`` over the first ``warmup`` share of the steps, so the circuit shrinks while the
objective can still follow. The logits start high (every gate is 1 with probability ``init_keep``:
training starts from the full model). The model's weights are never written and get no gradient; the
gate and the penalty have hand-written gradients (:func:`gated_weight`, :func:`add_density_penalty`) so
one step holds about five float32 copies of the masked entries.

The settings are :class:`WeightMaskSettings`, defined without torch in
:mod:`kcircuits.weight_circuits.settings` (for the command line) and re-exported here.

Thresholding (:func:`threshold_logits`): the circuit keeps *exactly* ``round(density · n)`` entries,
those with the highest logits (ties go to the entry that comes first: parameters in the model's
order, entries row-major), so circuits of different methods and densities are compared at their
exact size. The relaxation's own density (the share of entries whose deterministic gate
``clamp(sigmoid(log α) · (r − l) + l, 0, 1)`` exceeds 0.5) is reported beside it: far from the target,
training has not converged.

Training checkpoints every ``checkpoint_every`` steps (logits, Adam state, multipliers, step, RNG
state, history), keyed by a digest of the settings and prompts and by the weights' fingerprint; a
rerun continues from the checkpoint and ends with exactly the mask of an uninterrupted run.

Evaluation (:func:`evaluate_weight_circuit`): Hit@1, Hit@10, answer probability and KL to the full
model for the full model, the circuit alone, the complement alone and a random mask of exactly the
circuit's size over the same parameters (the honest baseline), each with its spread.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kcircuits.batching import Batch
from kcircuits.errors import KcircuitsError
from kcircuits.io import atomic_save_tensors, atomic_torch_save, load_tensors
from kcircuits.metrics import answer_logprob, answer_prob, check_finite, hit_at_k, kl_div, summary
from kcircuits.models.fingerprint import hf_module, tensor_digest, weights_fingerprint
from kcircuits.models.layout import KINDS, parameter_layout
from kcircuits.models.loader import eval_mode
from kcircuits.models.masking import ABLATIONS, ablation_value, WeightMask, check_mask, complement, masked
from kcircuits.runtime import tune_allocator
from kcircuits.settings import finite_number, hashed_dict, one_of, require, whole_number
from kcircuits.weight_circuits.settings import OBJECTIVES, WeightMaskSettings

__all__ = ["ADAM_BETAS", "CHECKPOINT", "OBJECTIVES", "QUADRATIC_INIT", "WeightMaskResult", "WeightMaskSettings",
           "add_density_penalty", "deterministic_gates", "evaluate_weight_circuit", "expected_density", "gated_logits",
           "gated_weight", "keep_probability", "load_weight_mask", "logistic_noise", "maskable_parameters",
           "n_keep_for", "random_weight_mask", "sample_gates", "save_weight_mask", "threshold_logits",
           "train_weight_mask"]

#: the checkpoint's file name inside ``checkpoint_dir``
CHECKPOINT = "weight_mask.ckpt"
#: marks a safetensors file as a saved weight-mask result
FORMAT = "kcircuits-weight-mask/1"
#: node kinds a weight circuit masks only with ``embeddings=True``
EMBEDDING_KINDS = ("input", "unembed")
#: keeps ``log u`` and ``log(1 - u)`` finite
_EPS = 1e-6
#: Adam's betas on the mask logits: little momentum (0.5, not 0.9), because the logits the objective does not
#: hold move in lockstep under the density penalty and momentum carries them all past the target together
ADAM_BETAS = (0.5, 0.999)
#: λ₂'s initial value. Adam moves every logit by about ``lr`` per step whatever the size of its gradient, so
#: the logits that only the penalty drives all move together at full speed until the penalty's sign flips.
#: With the linear term alone (λ₁, which integrates the gap) the sign flips long after the density crossed
#: the target and the density oscillates; the quadratic term's gradient ``2 λ₂ (E − d)`` flips sign where the
#: density meets the target. λ₁ supplies the rest of the pull the objective resists with near the target (on
#: SmolLM2-135M, hundreds to thousands per unit of density).
QUADRATIC_INIT = 1000.0


# ----------------------------------------------------------------------------- what is masked
def maskable_parameters(lm, embeddings: bool = False) -> dict[str, tuple[int, ...]]:
    """The parameters a weight circuit masks, ``{param_name: stored shape}`` in the model's order.

    Every parameter of every attention head, attention output bias, MLP and norm (from the parameter
    layout, DESIGN decision 11), and with ``embeddings`` also the token embedding, learned positions
    and the unembedding. Tied embeddings appear once, under their first name.

    Args:
        lm: a :class:`~kcircuits.models.LoadedModel` (or an HF module of a supported family).
        embeddings: also include the ``input`` and ``unembed`` nodes' parameters.
    """
    layout = getattr(lm, "layout", None) or parameter_layout(hf_module(lm))
    kinds = [k for k in KINDS if embeddings or k not in EMBEDDING_KINDS]
    names = {b.param_name for node in layout.nodes(kinds) for b in layout.blocks(node)}
    return {name: tuple(shape) for name, shape in layout.param_shapes.items() if name in names}


def n_keep_for(density: float, n: int) -> int:
    """How many of ``n`` entries a circuit of ``density`` keeps: ``round(density · n)``, at least 1, at most ``n``.

    Args:
        density: the share kept, in (0, 1].
        n: the number of masked entries.
    """
    return min(n, max(1, round(density * n)))


# ----------------------------------------------------------------------------- hard concrete
def _log_ratio(settings: WeightMaskSettings) -> float:
    """``β · log(−l / r)``: the shift between a logit and its probability of a non-zero gate."""
    return settings.temperature * math.log(-settings.stretch_low / settings.stretch_high)


def _initial_logit(settings: WeightMaskSettings) -> float:
    """The logit whose gate is exactly 1 with probability ``settings.init_keep``:
    ``P(z = 1) = sigmoid(log α − β · log((1 − l) / (r − 1)))``."""
    p = settings.init_keep
    low, high = settings.stretch_low, settings.stretch_high
    return math.log(p / (1 - p)) + settings.temperature * math.log((1 - low) / (high - 1))


def keep_probability(logits: torch.Tensor, settings: WeightMaskSettings) -> torch.Tensor:
    """Each entry's probability that its hard-concrete gate is non-zero (its L0 expectation), same shape.

    Args:
        logits: mask logits ``log α`` (any shape).
        settings: temperature and stretch.
    """
    return torch.sigmoid(logits - _log_ratio(settings))


def expected_density(logits: Mapping[str, torch.Tensor], settings: WeightMaskSettings) -> torch.Tensor:
    """The expected share of non-zero gates over every masked entry (a differentiable scalar, summed in float64).

    Args:
        logits: ``{param_name: logits}``.
        settings: temperature and stretch.
    """
    total = sum(keep_probability(x, settings).sum(dtype=torch.float64) for x in logits.values())
    return total / sum(x.numel() for x in logits.values())


def logistic_noise(shape: Sequence[int], generator: torch.Generator, device: torch.device | str = "cpu"
                   ) -> torch.Tensor:
    """Logistic samples ``log u − log(1 − u)``, ``u ~ U(0, 1)`` (clamped away from 0 and 1), float32.

    Args:
        shape: the samples' shape.
        generator: the random generator (on ``device``).
        device: where the samples live.
    """
    u = torch.rand(tuple(shape), generator=generator, device=device)
    return u.clamp_(_EPS, 1 - _EPS).logit_()


def sample_gates(logits: torch.Tensor, noise: torch.Tensor, settings: WeightMaskSettings) -> torch.Tensor:
    """Hard-concrete gates in [0, 1] (exactly 0 or 1 with positive probability), differentiable in ``logits``.

    Args:
        logits: mask logits ``log α`` (any shape, float32).
        noise: logistic samples of the same shape (:func:`logistic_noise`).
        settings: temperature and stretch.
    """
    return _stretch(torch.sigmoid((noise + logits) / settings.temperature), settings)


def deterministic_gates(logits: torch.Tensor, settings: WeightMaskSettings) -> torch.Tensor:
    """The noise-free gates ``clamp(sigmoid(log α) · (r − l) + l, 0, 1)`` (the relaxation at evaluation).

    Args:
        logits: mask logits ``log α`` (any shape).
        settings: stretch.
    """
    return _stretch(torch.sigmoid(logits), settings)


def _stretch(s: torch.Tensor, settings: WeightMaskSettings) -> torch.Tensor:
    """``clamp(s · (r − l) + l, 0, 1)``: the stretch that lets a gate be exactly 0 or 1."""
    return (s * (settings.stretch_high - settings.stretch_low) + settings.stretch_low).clamp(0, 1)


# ----------------------------------------------------------------------------- thresholding
def threshold_logits(scores: Mapping[str, torch.Tensor], n_keep: int) -> WeightMask:
    """Keep exactly ``n_keep`` entries: those with the highest scores, over all parameters together.

    Ties are broken by a fixed order, in favour of the entry that comes first (parameters in the order
    of ``scores``, entries row-major), so the mask is a deterministic function of the scores.

    Args:
        scores: ``{param_name: scores}`` (any float dtype and device); NaN is refused.
        n_keep: how many entries to keep, between 0 and the number of entries.

    Returns:
        ``{param_name: bool tensor}`` on the CPU, each of its scores' shape.
    """
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    n = flat.numel()
    n_keep = whole_number(n_keep, "n_keep", 0)
    require(n_keep <= n, f"cannot keep {n_keep} of {n} entries")
    require(not bool(torch.isnan(flat).any()), "mask scores contain NaN: training diverged; lower the learning rate")
    keep = _top_entries(flat, n_keep)
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start:start + s.numel()].reshape(s.shape)
        start += s.numel()
    return out


def _top_entries(flat: torch.Tensor, k: int) -> torch.Tensor:
    """``[n]`` bool: the ``k`` largest of ``flat`` ``[n]``, ties taken in index order."""
    if k == 0:
        return torch.zeros_like(flat, dtype=torch.bool)
    cut = torch.kthvalue(flat, flat.numel() - k + 1).values  # the k-th largest value
    keep = flat > cut
    tied = (flat == cut).nonzero()[:, 0]
    keep[tied[: k - int(keep.sum())]] = True
    return keep


def random_weight_mask(shapes: Mapping[str, Sequence[int]], n_keep: int, seed: int = 0) -> WeightMask:
    """A uniformly random mask keeping exactly ``n_keep`` entries of the given parameters (seeded).

    Args:
        shapes: ``{param_name: shape}`` of the masked parameters (e.g. a circuit's masks' shapes).
        n_keep: how many entries to keep.
        seed: seeds the draw (same seed, same mask).
    """
    gen = torch.Generator().manual_seed(whole_number(seed, "seed"))
    scores = {name: torch.rand(tuple(shape), generator=gen) for name, shape in shapes.items()}
    return threshold_logits(scores, n_keep)


# ----------------------------------------------------------------------------- the gated forward
def _ablation_values(lm, names: Sequence[str], ablation: str) -> dict[str, torch.Tensor | None]:
    """``{param_name: a}``, the float32 value a removed entry takes: None for ``"zero"`` (then ``W·z`` is
    computed without the ``a·(1 − z)`` term), the parameter's mean for ``"mean"`` (as in
    :func:`kcircuits.models.masking.ablation_deltas`)."""
    if ablation == "zero":
        return dict.fromkeys(names)
    params = dict(hf_module(lm).named_parameters())
    return {name: ablation_value(params[name], ablation).float() for name in names}


def _mix(weight: torch.Tensor, gates: torch.Tensor, value: torch.Tensor | None) -> torch.Tensor:
    """``W·z + a·(1 − z)`` in float32, returned in ``W``'s dtype; exactly ``W`` where ``z`` = 1."""
    out = weight.float() * gates
    if value is not None:
        out = out + value * (1 - gates)
    return out.to(weight.dtype)


class _GatedWeight(torch.autograd.Function):
    """``W·z + a·(1 − z)`` with ``z`` the hard-concrete gate of ``logits`` under logistic ``noise``,
    differentiable in ``logits`` only.

    Autograd through :func:`sample_gates` and :func:`_mix` would keep about ten intermediates per entry;
    this keeps one (the sigmoid ``s``): on SmolLM2-135M's 106M masked entries that is gigabytes and
    seconds per step. ``dz/dlog α = (r − l) / β · s (1 − s)`` where the stretched ``s`` lies in [0, 1], else 0.
    """

    @staticmethod
    def forward(ctx, logits, noise, weight, value, settings):  # noqa: D102 - see the class docstring
        s = (noise + logits).div_(settings.temperature).sigmoid_()
        span = settings.stretch_high - settings.stretch_low
        gates = (s * span).add_(settings.stretch_low).clamp_(0, 1)
        ctx.save_for_backward(s, weight, value)
        ctx.span, ctx.low, ctx.temperature = span, settings.stretch_low, settings.temperature
        return _mix(weight, gates, value)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - see the class docstring
        s, weight, value = ctx.saved_tensors
        d = (s - s * s).mul_(ctx.span / ctx.temperature)
        stretched = s * ctx.span + ctx.low
        d.masked_fill_((stretched < 0) | (stretched > 1), 0)  # clamp's gradient, as autograd's
        d.mul_(grad.float()).mul_(weight.float() if value is None else weight.float() - value)
        return d, None, None, None, None


def gated_weight(logits: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor, settings: WeightMaskSettings,
                 value: torch.Tensor | None = None) -> torch.Tensor:
    """One parameter under one hard-concrete sample: ``W·z + a·(1 − z)``, ``z`` = :func:`sample_gates`
    ``(logits, noise)``, differentiable in ``logits`` only, in ``W``'s dtype and shape.

    Equal to ``W·z + a·(1 − z)`` computed through autograd, with the memory of one float32 tensor per entry
    (see ``_GatedWeight``): what training uses.

    Args:
        logits: the parameter's mask logits ``log α`` (float32, its shape).
        noise: logistic samples of the same shape (:func:`logistic_noise`).
        weight: the parameter's values (not differentiated).
        settings: temperature and stretch.
        value: the ablation value ``a`` (a float32 scalar tensor); None for zero ablation.
    """
    return _GatedWeight.apply(logits, noise, weight.detach(), value, settings)


def _with_params(lm, replaced: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every parameter of the model (detached: no gradient reaches the model), ``replaced`` substituted."""
    params: dict[str, torch.Tensor] = {n: p.detach() for n, p in hf_module(lm).named_parameters()}
    params.update(replaced)
    return params


def _forward(lm, ids: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``[b, p, V]`` of the model run with ``params`` in place of its own."""
    return torch.func.functional_call(hf_module(lm), dict(params), args=(), kwargs={"input_ids": ids}).logits


def gated_logits(lm, ids: torch.Tensor, gates: Mapping[str, torch.Tensor], ablation: str = "zero") -> torch.Tensor:
    """Logits ``[b, p, V]`` of the model whose gated parameters are ``W·z + a·(1 − z)`` (``a``: the ablation
    value), differentiable in the gates; the model itself is not changed.

    With every gate 1 this is exactly the model's own forward (``W·1 = W``).

    Args:
        lm: the model (a :class:`~kcircuits.models.LoadedModel`).
        ids: ``[b, p]`` token ids (right padded: no attention mask needed).
        gates: ``{param_name: gates in [0, 1]}``, each of its parameter's shape (float32).
        ablation: ``"zero"`` or ``"mean"``.
    """
    one_of(ablation, ABLATIONS, "weight ablation")
    values = _ablation_values(lm, list(gates), ablation)
    weights = dict(hf_module(lm).named_parameters())
    return _forward(lm, ids, _with_params(lm, {n: _mix(weights[n].detach(), z, values[n]) for n, z in gates.items()}))


def _sampled_logits(lm, ids: torch.Tensor, logits: Mapping[str, torch.Tensor], noise: Mapping[str, torch.Tensor],
                    values: Mapping[str, torch.Tensor | None], settings: WeightMaskSettings) -> torch.Tensor:
    """Logits ``[b, p, V]`` of the model under one hard-concrete sample of the mask, differentiable in ``logits``."""
    weights = dict(hf_module(lm).named_parameters())
    gated = {n: gated_weight(x, noise[n], weights[n], settings, values[n]) for n, x in logits.items()}
    return _forward(lm, ids, _with_params(lm, gated))


def _at_targets(logits: torch.Tensor, target_pos: torch.Tensor) -> torch.Tensor:
    """``[b, T, V]``: the logits ``[b, p, V]`` at the positions ``target_pos [b, T]``."""
    return logits.gather(1, target_pos[..., None].expand(-1, -1, logits.shape[-1]))


def _model_logits(lm, batch: Batch) -> torch.Tensor:
    """The model's logits at the batch's target positions, ``[b, T, V]`` float32, without gradient."""
    with torch.no_grad():
        return _at_targets(hf_module(lm)(input_ids=batch.clean).logits, batch.target_pos).float()


def _objective(logits: torch.Tensor, reference: torch.Tensor | None, batch: Batch, objective: str) -> torch.Tensor:
    """Per prompt ``[b]``: KL(full ‖ circuit) averaged over the scored positions, or the answer's NLL.

    ``logits``, ``reference``: ``[b, T, V]`` at the batch's target positions."""
    if objective == "ce":
        return -answer_logprob(logits, batch)
    b, t, v = logits.shape
    kl = kl_div(reference.reshape(b * t, 1, v), logits.reshape(b * t, 1, v)).reshape(b, t)
    mask = batch.target_mask.float()
    return (kl * mask).sum(1) / mask.sum(1).clamp(min=1)


# ----------------------------------------------------------------------------- results
@dataclass
class WeightMaskResult:
    """A trained weight circuit.

    Fields:
        mask: the thresholded circuit, ``{param_name: bool tensor}`` on the CPU, keeping exactly
            :func:`n_keep_for` ``(settings.density, n)`` entries (the highest logits).
        logits: the final mask logits ``{param_name: float32 tensor}`` on the CPU (re-threshold them
            with :meth:`at_density`), in the model's parameter order.
        history: one record per step: ``step``, ``loss``, ``objective``, ``expected_density``,
            ``target_density``, ``lambda1``, ``lambda2``.
        settings: the :class:`WeightMaskSettings` used.
        expected_density: the final expected share of non-zero gates (the L0 expectation).
        relaxed_density: the share of entries whose deterministic gate exceeds 0.5 (the relaxation's own
            density; near ``settings.density`` when training converged).
        fingerprint: the fingerprint of the weights the mask was trained on.
    """

    mask: WeightMask
    logits: dict[str, torch.Tensor]
    history: list[dict] = field(repr=False)
    settings: WeightMaskSettings
    expected_density: float
    relaxed_density: float
    fingerprint: str

    def at_density(self, density: float) -> WeightMask:
        """The circuit thresholded at another ``density`` (exactly ``round(density · n)`` entries), from the
        same logits: nested circuits of one training run.

        Args:
            density: the share of entries kept, in (0, 1].
        """
        d = finite_number(density, "density")
        require(0 < d <= 1, f"density must be in (0, 1], got {d:g}")
        return threshold_logits(self.logits, n_keep_for(d, sum(x.numel() for x in self.logits.values())))


def _result(logits: Mapping[str, torch.Tensor], history: list[dict], settings: WeightMaskSettings,
            fingerprint: str) -> WeightMaskResult:
    cpu = {name: x.detach().float().cpu().clone() for name, x in logits.items()}
    n = sum(x.numel() for x in cpu.values())
    with torch.no_grad():
        relaxed = sum(int((deterministic_gates(x, settings) > 0.5).sum()) for x in cpu.values()) / n
        expected = float(expected_density(cpu, settings))
    mask = threshold_logits(cpu, n_keep_for(settings.density, n))
    return WeightMaskResult(mask, cpu, list(history), settings, expected, relaxed, fingerprint)


def save_weight_mask(path: str | os.PathLike, result: WeightMaskResult) -> None:
    """Write a result as one safetensors file (atomically): the masks (bool), the logits (float32) and
    the settings, history, densities and fingerprint as metadata.

    Args:
        path: the ``.safetensors`` file written.
        result: what :func:`train_weight_mask` returned.
    """
    tensors = {f"mask/{name}": m for name, m in result.mask.items()}
    tensors.update({f"logits/{name}": x for name, x in result.logits.items()})
    meta = {"format": FORMAT, "params": json.dumps(list(result.logits)),
            "settings": json.dumps(asdict(result.settings)), "history": json.dumps(result.history),
            "expected_density": repr(result.expected_density), "relaxed_density": repr(result.relaxed_density),
            "fingerprint": result.fingerprint}
    atomic_save_tensors(path, tensors, metadata=meta)


def load_weight_mask(path: str | os.PathLike) -> WeightMaskResult:
    """The result :func:`save_weight_mask` wrote (tensors on the CPU).

    Args:
        path: a file written by :func:`save_weight_mask`.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        tensors = load_tensors(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise KcircuitsError(f"cannot read the weight mask {path}: {exc}") from exc
    require(meta.get("format") == FORMAT, f"{path} is not a kcircuits weight mask (format {meta.get('format')!r})")
    names = json.loads(meta["params"])
    return WeightMaskResult(mask={n: tensors[f"mask/{n}"] for n in names},
                            logits={n: tensors[f"logits/{n}"] for n in names},
                            history=json.loads(meta["history"]),
                            settings=WeightMaskSettings(**json.loads(meta["settings"])),
                            expected_density=float(meta["expected_density"]),
                            relaxed_density=float(meta["relaxed_density"]), fingerprint=meta["fingerprint"])


# ----------------------------------------------------------------------------- training
@dataclass
class _State:
    """Everything a step changes: logits (leaf tensors), their optimiser, the multipliers, the step count,
    the gate-noise generator and the history."""

    logits: dict[str, torch.Tensor]
    optimizer: torch.optim.Adam
    lambdas: list[float]
    step: int
    generator: torch.Generator
    history: list[dict]
    start_density: float = 1.0  # the initial logits' expected density: where the warm-up's target starts


def _fresh_state(lm, settings: WeightMaskSettings, init: Mapping[str, torch.Tensor] | None = None) -> _State:
    """Every logit at :func:`_initial_logit` (or a copy of ``init``'s), a new Adam, zero multipliers, the
    generator seeded.

    Adam's ``eps`` is scaled by ``1/n``: every per-entry gradient shrinks like ``1/n`` (the expected density
    is a mean over ``n`` entries), and a fixed ``eps`` would make the dynamics depend on the model's size."""
    device = next(hf_module(lm).parameters()).device
    shapes = maskable_parameters(lm, settings.embeddings)
    require(bool(shapes), "this model has no parameters to mask")
    if init is not None:
        require(set(init) == set(shapes) and all(tuple(init[n].shape) == tuple(s) for n, s in shapes.items()),
                "the starting logits do not cover this model's maskable parameters (another model, or another "
                "--embeddings setting)")
        logits = {n: init[n].detach().float().to(device).clone().requires_grad_(True) for n in shapes}
    else:
        logits = {n: torch.full(s, _initial_logit(settings), dtype=torch.float32, device=device, requires_grad=True)
                  for n, s in shapes.items()}
    n = sum(x.numel() for x in logits.values())
    optimizer = torch.optim.Adam(list(logits.values()), lr=settings.lr, betas=ADAM_BETAS, eps=1e-8 / n,
                                 fused=device.type in ("cpu", "cuda"))
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    return _State(logits, optimizer, [0.0, QUADRATIC_INIT], 0, gen, [])


def _target_density(step: int, settings: WeightMaskSettings, start: float) -> float:
    """The density the Lagrangian aims at in ``step`` (0-based): linear from ``start`` (the initial logits'
    expected density) to ``settings.density`` over the warm-up, then constant."""
    ramp = settings.warmup * settings.steps
    if ramp <= 0 or step >= ramp:
        return settings.density
    return start + (settings.density - start) * step / ramp


def add_density_penalty(logits: Mapping[str, torch.Tensor], settings: WeightMaskSettings,
                        lambdas: Sequence[float], target: float) -> tuple[float, float]:
    """Add the gradient of the Lagrangian term ``λ₁ (E − t) + λ₂ (E − t)²`` to every logit's ``.grad``.

    The gradient is ``(λ₁ + 2 λ₂ (E − t)) · p (1 − p) / n`` with ``p`` = :func:`keep_probability` of each entry
    and ``n`` the number of entries; written out because autograd would keep ``p`` and its graph for every
    entry (on SmolLM2-135M, a second and a half per step on one core).

    Args:
        logits: ``{param_name: logits}``, leaf tensors (their ``.grad`` is created if missing).
        settings: temperature and stretch.
        lambdas: ``(λ₁, λ₂)``.
        target: the target density ``t``.

    Returns:
        ``(E, penalty)``: the expected density and the term's value, as floats.
    """
    n = sum(x.numel() for x in logits.values())
    with torch.no_grad():
        probs = {name: keep_probability(x.detach(), settings) for name, x in logits.items()}
        density = sum(float(p.sum(dtype=torch.float64)) for p in probs.values()) / n
        gap = density - target
        scale = (lambdas[0] + 2 * lambdas[1] * gap) / n
        for name, x in logits.items():
            p = probs.pop(name)
            if x.grad is None:
                x.grad = torch.zeros_like(x)
            x.grad.addcmul_(p, 1 - p, value=scale)
    return density, lambdas[0] * gap + lambdas[1] * gap ** 2


def _train_step(lm, state: _State, batch: Batch, references: list[torch.Tensor | None],
                ablation_values: Mapping[str, torch.Tensor | None], settings: WeightMaskSettings) -> dict:
    """One step: one gate sample, the objective's gradient over the batch's chunks, the Lagrangian's,
    an Adam step on the logits and an ascent step on the multipliers. Returns the step's record."""
    noise = {n: logistic_noise(x.shape, state.generator, x.device) for n, x in state.logits.items()}
    target = _target_density(state.step, settings, state.start_density)
    state.optimizer.zero_grad()
    total = 0.0
    for chunk, reference in zip(batch.split(settings.batch_size), references, strict=True):
        logits = _at_targets(_sampled_logits(lm, chunk.clean, state.logits, noise, ablation_values, settings),
                             chunk.target_pos)
        loss = _objective(logits, reference, chunk, settings.objective).sum() / len(batch)
        loss.backward()
        total += float(loss.detach())
    density, penalty = add_density_penalty(state.logits, settings, state.lambdas, target)
    record = {"step": state.step + 1, "loss": total + penalty, "objective": total, "expected_density": density,
              "target_density": target}
    check_finite(torch.tensor([record["loss"]]), "the weight-mask loss")
    state.optimizer.step()
    g = density - target
    state.lambdas = [state.lambdas[0] + settings.multiplier_lr * g, state.lambdas[1] + settings.multiplier_lr * g * g]
    state.step += 1
    record.update(lambda1=state.lambdas[0], lambda2=state.lambdas[1])
    return record


def _digest(settings: WeightMaskSettings, batches: Sequence[Batch],
            init: Mapping[str, torch.Tensor] | None = None) -> str:
    """Hash of what determines the training run besides the weights: the settings (less the fields that
    change how it is computed, not what), the prompts and the starting logits."""
    h = hashlib.sha256(json.dumps(hashed_dict(settings), sort_keys=True).encode())
    for name in sorted(init or {}):
        h.update(name.encode())
        h.update(tensor_digest(init[name]))
    for b in batches:
        for t in (b.clean, b.target_pos, b.target_ids, b.target_mask):
            h.update(tensor_digest(t))
    return h.hexdigest()[:16]


def _save_checkpoint(path: Path, state: _State, digest: str, fingerprint: str) -> None:
    atomic_torch_save(path, {"format": FORMAT, "digest": digest, "fingerprint": fingerprint, "step": state.step,
                             "logits": {n: x.detach().cpu() for n, x in state.logits.items()},
                             "optimizer": state.optimizer.state_dict(), "lambdas": list(state.lambdas),
                             "rng": state.generator.get_state(), "history": state.history})


def _load_checkpoint(path: Path, state: _State, digest: str, fingerprint: str) -> None:
    """Restore ``state`` from the checkpoint at ``path``; refuse one of other settings, prompts or weights."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the same user error
        raise KcircuitsError(f"cannot read the weight-mask checkpoint {path} ({exc}); delete it to start over") from exc
    require(saved.get("fingerprint") == fingerprint,
            f"the weight-mask checkpoint {path} was made for other weights (fingerprint {saved.get('fingerprint')}, "
            f"this model {fingerprint}); use another checkpoint folder or delete it to start over")
    require(saved.get("digest") == digest,
            f"the weight-mask checkpoint {path} was made with other settings or prompts; rerun with the same ones, "
            "or use another checkpoint folder (or delete it) to start over")
    with torch.no_grad():
        for name, x in state.logits.items():
            x.copy_(saved["logits"][name])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.lambdas = [float(v) for v in saved["lambdas"]]
    state.step = int(saved["step"])
    state.generator.set_state(saved["rng"])
    state.history = list(saved["history"])


def _check_batches(batches: Sequence[Batch], device: torch.device) -> list[Batch]:
    require(len(batches) > 0 and all(isinstance(b, Batch) for b in batches),
            "give at least one kcircuits.batching.Batch of prompts")
    return [b.to(device) for b in batches]


def train_weight_mask(lm, batches: Sequence[Batch], settings: WeightMaskSettings | None = None, *,
                      checkpoint_dir: str | os.PathLike | None = None, init: WeightMaskResult | None = None,
                      progress: bool = False) -> WeightMaskResult:
    """Learn a weight circuit: the entries that alone reproduce the model on ``batches`` (module docstring).

    Args:
        lm: the model (a :class:`~kcircuits.models.LoadedModel`); its weights are not changed and get
            no gradient.
        batches: :class:`~kcircuits.batching.Batch` objects (e.g. :func:`kcircuits.pipeline.model_batches`);
            step ``s`` trains on ``batches[s % len(batches)]`` at its scored positions.
        settings: density, steps, objective, ablation, ... (default :class:`WeightMaskSettings`).
        checkpoint_dir: a folder to checkpoint into (``weight_mask.ckpt``) and resume from; a checkpoint of
            other settings, prompts or weights is refused. ``None``: no checkpoints.
        init: start from this result's logits instead of the full model (the density sweep's ``nested``
            schedule: each smaller circuit continues from the larger one); the target density then falls
            from their expected density. Trained on the same model.
        progress: show a progress bar with the loss and the expected density.

    Returns:
        The thresholded mask, the final logits, the history and the densities.
    """
    settings = settings if settings is not None else WeightMaskSettings()
    require(isinstance(settings, WeightMaskSettings), f"expected WeightMaskSettings, got {type(settings).__name__}")
    device = next(hf_module(lm).parameters()).device
    batches = _check_batches(batches, device)
    fingerprint = weights_fingerprint(lm)
    tune_allocator()
    if init is not None:
        require(init.fingerprint == fingerprint, "the starting weight mask was trained on other weights")
    digest = _digest(settings, batches, None if init is None else init.logits)
    state = _fresh_state(lm, settings, None if init is None else init.logits)
    with torch.no_grad():
        state.start_density = float(expected_density(state.logits, settings))
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if path is not None and path.exists():
        _load_checkpoint(path, state, digest, fingerprint)
    values = _ablation_values(lm, list(state.logits), settings.ablation)
    with eval_mode(hf_module(lm)), torch.enable_grad():
        references = [[None if settings.objective == "ce" else _model_logits(lm, c)
                       for c in b.split(settings.batch_size)] for b in batches]
        bar = tqdm(total=settings.steps, initial=state.step, desc="weight mask", disable=not progress)
        with bar:
            while state.step < settings.steps:
                i = state.step % len(batches)
                record = _train_step(lm, state, batches[i], references[i], values, settings)
                state.history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4g}", density=f"{record['expected_density']:.4f}")
                if path is not None and (state.step % settings.checkpoint_every == 0 or state.step == settings.steps):
                    _save_checkpoint(path, state, digest, fingerprint)
    return _result(state.logits, state.history, settings, fingerprint)


# ----------------------------------------------------------------------------- evaluation
def _scores(runs: list[torch.Tensor], full: list[torch.Tensor], batches: Sequence[Batch]) -> dict:
    """Hit@1, Hit@10, answer probability and KL to the full model: mean and :func:`summary` of each."""
    values = {
        "hit@1": torch.cat([hit_at_k(x, b, 1) for x, b in zip(runs, batches, strict=True)]),
        "hit@10": torch.cat([hit_at_k(x, b, 10) for x, b in zip(runs, batches, strict=True)]),
        "answer_prob": torch.cat([answer_prob(x, b) for x, b in zip(runs, batches, strict=True)]),
        "kl": torch.cat([kl_div(f, x) for f, x in zip(full, runs, strict=True)]),
    }
    out: dict = {k: float(v.mean()) for k, v in values.items()}
    out["summary"] = {k: summary(v) for k, v in values.items()}
    return out


def _all_logits(lm, batches: Sequence[Batch]) -> list[torch.Tensor]:
    with eval_mode(hf_module(lm)):
        return [_model_logits(lm, b) for b in batches]


def evaluate_weight_circuit(lm, batches: Sequence[Batch], mask: Mapping[str, torch.Tensor], ablation: str = "zero",
                            *, seed: int = 0) -> dict:
    """Score a weight circuit on (held-out) prompts against the full model, its complement and chance.

    Runs the full model, the circuit alone (every other entry of the masked parameters ablated), the
    complement alone (the circuit's entries ablated) and a seeded random mask of exactly the circuit's
    size over the same parameters. For each: Hit@1 and Hit@10 (ties count against the answer), the
    answer's probability and the KL divergence from the full model's next-token distribution at the
    first answer position, as means and, under ``"summary"``, :func:`kcircuits.metrics.summary` of each.

    Args:
        lm: the model (its weights are restored exactly after each masked run).
        batches: :class:`~kcircuits.batching.Batch` objects of the prompts to evaluate on.
        mask: the circuit, ``{param_name: bool tensor of the parameter's shape}``.
        ablation: what a removed entry becomes: ``"zero"`` or ``"mean"`` (record it with the circuit).
        seed: seeds the random mask.

    Returns:
        ``{"full", "circuit", "complement", "random": {metric: mean, "summary": {...}}, "chance": {"hit@1",
        "hit@10"}, "density", "n_kept", "n_masked", "ablation", "seed", "n_prompts"}``.
    """
    one_of(ablation, ABLATIONS, "weight ablation")
    params = check_mask(lm, mask)
    batches = _check_batches(batches, next(hf_module(lm).parameters()).device)
    n_masked = sum(m.numel() for m in mask.values())
    require(n_masked > 0, "the weight mask is empty: it names no parameter entries")
    n_kept = sum(int(m.sum()) for m in mask.values())
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    variants = {"circuit": dict(mask), "complement": complement(mask),
                "random": random_weight_mask(shapes, n_kept, seed)}
    full = _all_logits(lm, batches)
    out: dict = {"full": _scores(full, full, batches)}
    for name, keep in variants.items():
        with masked(lm, keep, ablation):
            out[name] = _scores(_all_logits(lm, batches), full, batches)
    vocab = full[0].shape[-1]
    out.update({"chance": {"hit@1": 1 / vocab, "hit@10": min(10, vocab) / vocab}, "density": n_kept / n_masked,
                "n_kept": n_kept, "n_masked": n_masked, "ablation": ablation, "seed": seed,
                "n_prompts": sum(len(b) for b in batches)})
    return out
