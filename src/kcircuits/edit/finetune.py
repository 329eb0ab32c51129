"""FT-L and FT-M: write facts by fine-tuning MLP output matrices on the edit prompts.

Both methods train only the output matrix ``W [d_model, d_mlp]`` of the MLPs of ``settings.layers``
(GPT-2 ``c_proj``, GPT-NeoX ``dense_4h_to_h``, Llama/Qwen2 ``down_proj``, found by
:func:`kcircuits.edit.stats.mlp_output`; the bias is left alone) with Adam, on every request's edit
prompt at once (right-padded batches, the new target's tokens teacher-forced after the prompt):

* **FT-L** (ROME's constrained fine-tuning baseline; EasyEdit's ``FT`` with ``prompt_last``): the loss
  reads only the logits at the prompt's last token: ``-log p(y_j | x)`` for each target token ``y_j``
  at that one position (for a one-token target, the target's NLL). After every step each entry of the
  change is clamped to ``[-bound, bound]``: the L∞ bound of "FT-L".
* **FT-M** (EasyEdit's ``FT-M``, ``objective_optimization: target_new``): the loss is the
  teacher-forced NLL of every target token, ``-log p(y_j | x, y_<j)``, masked to the target's
  positions (the prompt's tokens are not trained on). Unbounded unless ``bound`` is set.

``settings.loss`` reduces a request's token NLLs (``"mean"``, EasyEdit's, or ``"sum"``, the whole
target's ``-log P(y | x)`` the edit metrics score); the loss is the mean over requests.

**Early stop** (``loss_margin``): before every step, each scored target token's *margin* is its logit
minus the largest other logit at its position; if every margin exceeds ``loss_margin`` (FT-M: every
target token of every request; FT-L: every request's first target token, the only one that can be the
top-1 answer at the prompt's last position), training stops there. So with ``loss_margin=0`` a target
the model already answers (greedily, token by token) is not trained at all and its change is exactly
zero; ties count against the target. ``None`` (the default) always runs ``steps`` steps. This stands
in for EasyEdit's stop at a loss below 0.01, which no target reaches while it is still tied.

The model's parameters are never written: the change ``Δ [d_model, d_mlp]`` is a separate float32
tensor added to each trained MLP's output as ``keys @ Δᵀ`` by a forward hook, so the model is
bit-identical after the call (no restore needed, the weights' fingerprint stays valid, no ``.grad`` is
left on any parameter). The result is ``{param_name: Δ}`` in the parameter's stored orientation, for
:func:`kcircuits.models.edits.edited`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from kcircuits.edit.requests import EditRequest, target_ids, validate_requests
from kcircuits.edit.registry import EditInputs, register
from kcircuits.edit.rome import teacher_forced_batch
from kcircuits.edit.settings import FT_LOSSES
from kcircuits.edit.stats import MlpOutput, mlp_output
from kcircuits.models import LoadedModel
from kcircuits.settings import finite_number, one_of, require, set_field, whole_number

__all__ = ["FT_L", "FT_M", "LOSSES", "Batch", "FinetuneSettings", "batch_loss", "batches", "finetune_deltas",
           "frozen", "ft_l", "ft_m", "logprobs_and_margins", "scored_logits"]

#: how a request's target-token NLLs are reduced
LOSSES = FT_LOSSES


@dataclass(frozen=True)
class FinetuneSettings:
    """What FT-L / FT-M train and for how long (see the module docstring).

    Fields:
        layers: the MLP layers whose output matrices are trained (together); repeats are dropped.
        steps: Adam steps at most (all requests in every step).
        lr: Adam's learning rate.
        bound: L∞ bound on every entry of each matrix's change, enforced after every step (FT-L);
            ``None``: unbounded.
        loss: ``"mean"`` (per-token mean NLL of the target) or ``"sum"`` (its whole NLL).
        loss_margin: stop as soon as every scored target token is the top-1 by more than this logit
            margin (``0``: stop once the targets are the model's answers); ``None``: run every step.
    """

    layers: tuple[int, ...] = (0,)
    steps: int = 25
    lr: float = 5e-4
    bound: float | None = None
    loss: str = "mean"
    loss_margin: float | None = None

    def __post_init__(self) -> None:
        set_field(self, "layers", _layers(self.layers))
        set_field(self, "steps", whole_number(self.steps, "steps", 0))
        set_field(self, "lr", finite_number(self.lr, "lr"))
        require(self.lr > 0, f"lr must be > 0, got {self.lr:g}")
        if self.bound is not None:
            set_field(self, "bound", finite_number(self.bound, "bound"))
            require(self.bound > 0, f"bound must be > 0 (or None for no bound), got {self.bound:g}")
        one_of(self.loss, LOSSES, "fine-tuning loss")
        if self.loss_margin is not None:
            set_field(self, "loss_margin", finite_number(self.loss_margin, "loss_margin"))
            require(self.loss_margin >= 0, f"loss_margin must be >= 0 (or None), got {self.loss_margin:g}")


def _layers(value: object) -> tuple[int, ...]:
    """The layers as a non-empty tuple of distinct non-negative ints (one int is one layer)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    require(isinstance(value, Iterable) and not isinstance(value, str),
            f"layers must be a list of layer indices, got {value!r}")
    layers = tuple(dict.fromkeys(whole_number(v, "layer", 0) for v in value))
    require(bool(layers), "layers is empty: give at least one MLP layer to fine-tune")
    return layers


#: ROME's FT-L for GPT-2 XL: layer 0, 25 steps, lr 5e-4, L∞ bound 5e-4 (pick ``layers`` for your model)
FT_L = FinetuneSettings(bound=5e-4)
#: EasyEdit's FT-M: 25 steps, lr 5e-4, no bound (pick ``layers`` for your model)
FT_M = FinetuneSettings()


@dataclass(frozen=True)
class Batch:
    """Some requests' teacher-forced inputs and what the loss reads (made by :func:`batches`).

    Fields:
        ids: ``[n, P]`` token ids, right-padded: each prompt followed by its target's tokens but the last.
        mask: ``[n, P]`` attention mask (1 on real tokens).
        positions: ``[n, t]`` the position whose logits score each target token.
        tokens: ``[n, t]`` the target tokens.
        scored: ``[n, t]`` bool, whether the target token exists (targets have different lengths).
        checked: ``[n, t]`` bool, the tokens whose margin decides the early stop.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor
    scored: torch.Tensor
    checked: torch.Tensor


def batches(lm: LoadedModel, requests: Sequence[EditRequest], masked: bool, batch_size: int) -> list[Batch]:
    """The requests' training inputs in batches of ``batch_size``, on the model's device.

    FT-M scores target token ``j`` at its own teacher-forced position; FT-L scores every target token
    at the prompt's last position (``positions[:, 0]``).

    Args:
        lm: the model (its tokenizer and pad token build the batches).
        requests: the validated requests, each trained on ``target_new`` after its filled prompt.
        masked: ``True`` for FT-M's teacher-forced positions, ``False`` for FT-L's.
        batch_size: requests per batch (the last batch may be smaller).
    """
    out = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        texts = [r.prompt_text for r in chunk]
        targets = [target_ids(lm.tokenizer, r.target_new, r.prompt_text) for r in chunk]
        ids, mask, positions, tokens, scored = teacher_forced_batch(lm, texts, targets)
        checked = scored.clone()
        if not masked:
            positions = positions[:, :1].expand_as(positions)
            checked[:, 1:] = False
        out.append(Batch(ids, mask, positions, tokens, scored, checked))
    return out


def scored_logits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The logits that score each target token: ``[n, t, V]`` in float32, row ``[i, j]`` the logits at
    ``batch.positions[i, j]`` (rows of tokens that do not exist, ``~batch.scored``, are padding).

    Args:
        logits: ``[n, P, V]`` the model's logits on ``batch.ids``.
        batch: the batch they were computed on.
    """
    return logits.gather(1, batch.positions[..., None].expand(-1, -1, logits.shape[-1])).float()


def logprobs_and_margins(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each scored target token's log-probability and its margin (its logit minus the largest other logit
    at its position; > 0 exactly when the token is the strict top-1), both ``[n, t]`` in float32; the
    margins are detached. Entries where ``batch.scored`` is False are padding.

    Args:
        logits: ``[n, P, V]`` the model's logits on ``batch.ids``.
        batch: the batch they were computed on.
    """
    picked = scored_logits(logits, batch)  # [n, t, V]
    tokens = batch.tokens[..., None]
    logp = torch.log_softmax(picked, -1).gather(-1, tokens)[..., 0]
    others = picked.detach().scatter(-1, tokens, float("-inf")).amax(-1)
    return logp, picked.detach().gather(-1, tokens)[..., 0] - others


def _request_nll(logp: torch.Tensor, scored: torch.Tensor, loss: str) -> torch.Tensor:
    """Each request's target NLL ``[n]`` from token log-probs ``[n, t]``: summed, or averaged over its tokens."""
    total = -(logp * scored).sum(1)
    return total / scored.sum(1) if loss == "mean" else total


def batch_loss(logits: torch.Tensor, batch: Batch, loss: str, n_requests: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's share of the training loss (the mean over all requests of each request's target NLL)
    and its scored tokens' margins: the one definition of the FT objective, so that every trainer
    (:func:`finetune_deltas`, :func:`kcircuits.edit.masked_finetune.masked_finetune`) optimises the same.

    Summed over the batches of :func:`batches`, the first value is the full loss; its gradient is the
    full loss's gradient whatever the batch size.

    Args:
        logits: ``[n, P, V]`` the model's logits on ``batch.ids``.
        batch: the batch they were computed on.
        loss: ``"mean"`` (each request's per-token mean NLL) or ``"sum"`` (its whole target NLL).
        n_requests: the number of requests over all batches (the mean's denominator).

    Returns:
        ``(loss [], margins [n, t])``: the margin of each scored token is its logit minus the largest
        other logit at its position (detached, float32).
    """
    logp, margins = logprobs_and_margins(logits, batch)
    return _request_nll(logp, batch.scored, loss).sum() / n_requests, margins


def _accumulate(lm: LoadedModel, prepared: list[Batch], settings: FinetuneSettings, n_requests: int) -> bool:
    """One pass over the batches: back-propagates the mean request loss (gradients accumulate on the
    changes) and returns whether every checked token's margin exceeds ``settings.loss_margin``."""
    holds = settings.loss_margin is not None
    for b in prepared:
        logits = lm.hf_model(input_ids=b.ids, attention_mask=b.mask).logits
        value, margins = batch_loss(logits, b, settings.loss, n_requests)
        if holds:
            holds = bool((margins[b.checked] > settings.loss_margin).all())
        value.backward()
    return holds


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block no parameter of ``module`` needs a gradient (only the changes are trained, and
    no ``.grad`` is left on the model); each parameter's flag is restored after, also on an exception.

    Args:
        module: the model whose parameters are frozen (``LoadedModel.hf_model``).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def _output_added(target: MlpOutput, change: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``target``'s projection outputs ``W k (+ b) + Δ k``: its output ``[b, p, d_model]``
    plus ``keys [b, p, d_mlp] @ change [d_model, d_mlp]ᵀ``, i.e. the model with ``W + Δ``, without writing ``W``."""
    def hook(module, inputs, output):
        return output + (inputs[0].to(change.dtype) @ change.T).to(output.dtype)

    handle = target.module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _train(lm: LoadedModel, prepared: list[Batch], targets: list[MlpOutput], settings: FinetuneSettings,
           n_requests: int) -> list[torch.Tensor]:
    """The trained changes ``Δ [d_model, d_mlp]`` (float32), one per target, each starting at zero."""
    changes = [torch.zeros(t.matrix(lm).shape, dtype=torch.float32, device=lm.device, requires_grad=True)
               for t in targets]
    opt = torch.optim.Adam(changes, lr=settings.lr)
    with ExitStack() as stack, torch.enable_grad():
        stack.enter_context(frozen(lm.hf_model))
        for target, change in zip(targets, changes, strict=True):
            stack.enter_context(_output_added(target, change))
        for _ in range(settings.steps):
            opt.zero_grad()
            if _accumulate(lm, prepared, settings, n_requests):
                break
            opt.step()
            if settings.bound is not None:
                with torch.no_grad():
                    for change in changes:
                        change.clamp_(-settings.bound, settings.bound)
    return [c.detach() for c in changes]


def finetune_deltas(lm: LoadedModel, requests: Iterable[EditRequest] | EditRequest, settings: FinetuneSettings, *,
                    masked: bool, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Fine-tune the output matrices of ``settings.layers``' MLPs on the requests; the weight change.

    Args:
        lm: the model; it is not changed (see the module docstring).
        requests: the facts to write, all trained together (conflicting requests for one subject are
            refused, as in :func:`kcircuits.edit.requests.validate_requests`).
        settings: layers, steps, learning rate, L∞ bound, loss reduction and early-stop margin.
        masked: ``True`` for FT-M (teacher-forced loss on every target token), ``False`` for FT-L's
            loss (every target token read at the prompt's last position).
        batch_size: requests per forward pass; gradients are accumulated over the batches, so each
            step sees every request whatever this is (memory, not results).

    Returns:
        ``{param_name: Δ}``, one float32 entry (on the model's device) per layer, in the parameter's
        stored shape (GPT-2's Conv1D stores ``W`` transposed), for :func:`kcircuits.models.edits.edited`.
    """
    reqs = validate_requests(requests, lm.tokenizer)
    batch_size = whole_number(batch_size, "batch_size", 1)
    targets = [mlp_output(lm, layer) for layer in settings.layers]
    prepared = batches(lm, reqs, masked, batch_size)
    changes = _train(lm, prepared, targets, settings, len(reqs))
    return {name: delta for t, c in zip(targets, changes, strict=True) for name, delta in t.delta(c).items()}


def ft_l(lm: LoadedModel, requests: Iterable[EditRequest] | EditRequest, settings: FinetuneSettings = FT_L, *,
         batch_size: int = 16) -> dict[str, torch.Tensor]:
    """FT-L: fine-tune with the loss at the prompt's last token and an L∞ bound on the change.

    Args:
        lm: the model (not changed).
        requests: the facts to write, trained together.
        settings: as for :func:`finetune_deltas`; ``bound`` must be set (default :data:`FT_L`).
        batch_size: requests per forward pass (memory, not results).
    """
    require(settings.bound is not None, "FT-L needs an L∞ bound: set FinetuneSettings.bound (or use FT-M)")
    return finetune_deltas(lm, requests, settings, masked=False, batch_size=batch_size)


def ft_m(lm: LoadedModel, requests: Iterable[EditRequest] | EditRequest, settings: FinetuneSettings = FT_M, *,
         batch_size: int = 16) -> dict[str, torch.Tensor]:
    """FT-M: fine-tune with the teacher-forced loss masked to the target's tokens.

    Args:
        lm: the model (not changed).
        requests: the facts to write, trained together.
        settings: as for :func:`finetune_deltas` (default :data:`FT_M`: no bound, no early stop).
        batch_size: requests per forward pass (memory, not results).
    """
    return finetune_deltas(lm, requests, settings, masked=True, batch_size=batch_size)


def _from_options(inputs: EditInputs, bound: bool) -> FinetuneSettings:
    """The fine-tuning settings of ``kcircuits edit``: its edited layers and its ``--ft-*`` options."""
    ft = inputs.finetune
    return FinetuneSettings(layers=tuple(inputs.edit.layers()), steps=ft.ft_steps, lr=ft.ft_lr,
                            bound=ft.ft_bound if bound else None, loss=ft.ft_loss, loss_margin=ft.loss_margin)


@register("ft-l", "fine-tune the edited layers' MLP output matrices on the targets (the first target token at the "
                  "prompt's end), each weight within +-ft-bound")
def apply_ft_l(lm: LoadedModel, requests: Sequence[EditRequest], inputs: EditInputs) -> dict[str, torch.Tensor]:
    """The edit registry's FT-L: :func:`ft_l` of ``requests`` on ``lm`` with ``inputs`` (layers and ``--ft-*``)."""
    return ft_l(lm, requests, _from_options(inputs, bound=True), batch_size=inputs.edit.batch_size)


@register("ft-m", "fine-tune the edited layers' MLP output matrices with the loss masked to the target tokens "
                  "(EasyEdit's FT-M), unbounded")
def apply_ft_m(lm: LoadedModel, requests: Sequence[EditRequest], inputs: EditInputs) -> dict[str, torch.Tensor]:
    """The edit registry's FT-M: :func:`ft_m` of ``requests`` on ``lm`` with ``inputs`` (layers and ``--ft-*``)."""
    return ft_m(lm, requests, _from_options(inputs, bound=False), batch_size=inputs.edit.batch_size)
