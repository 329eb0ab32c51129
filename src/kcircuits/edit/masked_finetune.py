"""Editing inside vs outside a circuit: FT-M that may change only the entries a weight mask allows.

:func:`masked_finetune` writes counterfactual facts with FT-M's objective (the teacher-forced NLL of
every target token, the prompt's tokens not trained on; :func:`kcircuits.edit.finetune.batch_loss`,
the very function FT-M trains on) and Adam, but over *any* set of weight entries: a weight circuit
(Ge et al. 2024), its complement, the whole model, or the parameter blocks of an edge circuit's heads
and MLPs (:func:`edge_component_masks`). :func:`inside_outside` runs it once per allowed set with the
same settings (same optimiser, learning rate and step budget: no bound, no early stop) and reports,
for each, the edit metrics after every ``eval_every`` steps and whether the circuit alone still holds
the *old* fact once the edit is in.

**How the restriction is enforced.** One float32 change ``Δ_p`` per parameter ``p`` with at least one
allowed entry, zero at the start. Each step runs the model with ``W_p + Δ_p · allowed_p`` in place of
``W_p`` through :func:`torch.func.functional_call`: any parameter can be trained (attention rows, norm
weights, tied embeddings), not only the MLP outputs that FT-M reaches with a forward hook, and the
model's own parameters are never written (frozen for the call, so no ``.grad`` is left on them; the
weights' fingerprint stays valid). The sum is formed in float32 and rounded once to the parameter's
dtype, exactly as :func:`kcircuits.models.edits.edited` applies the result, so the model trained is the
model evaluated. Entries outside ``allowed`` are kept at exactly zero three ways, not by relying on
Adam leaving a zero gradient at zero: the forward multiplies by the mask, each gradient is zeroed
outside the mask before the optimiser's step, and each ``Δ`` is zeroed there again after it. With
``allowed`` = one layer's whole MLP output matrix the result is FT-M's (a test checks it).

**Curves.** At step 0 (before training), every ``eval_every`` steps and after the last step the
changes are applied with :func:`~kcircuits.models.edits.edited` and, under ``torch.no_grad()``, the
training loss and the means over the requests of :func:`kcircuits.edit.metrics.edit_metrics`'
efficacy, generalisation and neighbourhood specificity (success and margin; no generation) are
recorded: :data:`CURVE_METRICS`, plain JSON-ready dicts.

**Old fact in the circuit** (:func:`old_fact_scores`): on each edit prompt, the rank (1 = top; the
worst rank over the target's tokens under teacher forcing, so rank 1 means greedy decoding gives the
whole target, as :func:`kcircuits.metrics.answer_rank` scores whole answers; ties count against it),
Hit@1 and whole-target probability of ``target_true``, with :func:`kcircuits.models.masking.masked`
(the circuit alone) applied on top of the edited model.

**Resume.** With a :class:`kcircuits.steps.StepCache`, each fine-tuning's deltas and curve are stored
(atomically) under a key of the weights' fingerprint, the settings, the requests' token ids and the
allowed mask: a rerun after a crash redoes only the fine-tunings that had not finished.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from kcircuits.edit.finetune import Batch, batch_loss, batches, frozen, logprobs_and_margins, scored_logits
from kcircuits.edit.metrics import edit_metrics
from kcircuits.edit.requests import EditRequest, validate_requests
from kcircuits.edit.settings import MaskedFinetuneSettings
from kcircuits.errors import KcircuitsError
from kcircuits.metrics import rank_of, summary
from kcircuits.models import LoadedModel
from kcircuits.models.edits import edited
from kcircuits.models.layout import ParameterLayout
from kcircuits.models.masking import ABLATIONS, WeightMask, check_mask, complement, masked
from kcircuits.settings import hashed_dict, one_of, require
from kcircuits.steps import StepCache, json_digest, step_key

__all__ = ["CURVE_METRICS", "MaskedEditResult", "MaskedFinetuneSettings", "edge_component_masks", "inside_outside",
           "masked_finetune", "old_fact_scores"]

#: the edit metrics (means over the requests) recorded at every point of a curve, besides step and loss
CURVE_METRICS = ("efficacy_success", "efficacy_margin", "generalisation_success", "generalisation_margin",
                 "specificity_success", "specificity_margin")

#: the step cache's name for one masked fine-tuning
CACHE_STEP = "masked_finetune"


@dataclass
class MaskedEditResult:
    """What :func:`masked_finetune` trained and how the edit metrics moved on the way.

    Fields:
        deltas: ``{param_name: Δ}`` (float32, the model's device, the parameter's stored shape), one per
            parameter with at least one allowed entry, exactly zero outside the allowed entries; ready
            for :func:`kcircuits.models.edits.edited`.
        curve: one JSON-ready dict per recorded step, in step order: ``step``, ``loss`` (the training
            objective at that point) and each of :data:`CURVE_METRICS` (mean over the evaluated
            requests; NaN where no request has such prompts or a ``target_true``).
        n_trainable: how many weight entries were allowed to change.
    """

    deltas: dict[str, torch.Tensor]
    curve: list[dict]
    n_trainable: int

    def to_dict(self) -> dict:
        """The JSON-ready part: ``n_trainable``, ``trained_params`` (the deltas' names) and ``curve``."""
        return {"n_trainable": self.n_trainable, "trained_params": list(self.deltas),
                "curve": [dict(point) for point in self.curve]}


# --------------------------------------------------------------------------- allowed entries


def _allowed_entries(lm: LoadedModel, allowed: object) -> dict[str, torch.Tensor]:
    """``{param_name: bool mask}`` on the model's device for each parameter with an allowed entry, after
    the checks of :func:`kcircuits.models.masking.check_mask`; an empty set or a tied parameter named
    twice is a one-line error."""
    require(isinstance(allowed, Mapping), f"allowed must be a weight mask {{param_name: bool tensor}}, got "
                                          f"{type(allowed).__name__}")
    params = check_mask(lm, allowed)
    named: dict[int, str] = {}
    out = {}
    for name, m in allowed.items():
        p = params[name]
        if id(p) in named:
            raise KcircuitsError(f"the allowed mask names {named[id(p)]} and {name}, which are the same (tied) "
                                 "parameter; give one mask for it")
        named[id(p)] = name
        if bool(m.any()):
            out[name] = m.to(p.device)
    require(bool(out), "the allowed mask keeps no weight entry, so nothing can be trained; allow at least one entry")
    return out


def _mask_digest(masks: Mapping[str, torch.Tensor]) -> str:
    """Hash of the allowed entries (names, shapes and bits): what a fine-tuning's result depends on."""
    h = hashlib.sha256()
    for name in sorted(masks):
        m = masks[name]
        h.update(f"{name}:{tuple(m.shape)}".encode())
        h.update(m.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


# --------------------------------------------------------------------------- training


def _effective(params: Mapping[str, torch.Tensor], changes: Mapping[str, torch.Tensor],
               masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: W + Δ · allowed}`` in each parameter's dtype (stored shape): the weights one step runs with.
    ``W`` is detached, so the gradient reaches only ``Δ`` (and only its allowed entries)."""
    return {name: (params[name].detach() + change * masks[name]).to(params[name].dtype)
            for name, change in changes.items()}


def _optimizer(changes: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """FT-M's optimiser: Adam with torch's defaults (betas 0.9/0.999, eps 1e-8, no weight decay)."""
    return torch.optim.Adam(changes, lr=lr)


def _step(lm: LoadedModel, prepared: list[Batch], changes: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
          opt: torch.optim.Optimizer, loss: str, n_requests: int) -> None:
    """One Adam step on every request (gradients accumulated over the batches), the gradient and the
    changes zeroed outside the allowed entries before and after the update."""
    params = dict(lm.hf_model.named_parameters(remove_duplicate=False))
    opt.zero_grad()
    for b in prepared:
        weights = _effective(params, changes, masks)
        logits = functional_call(lm.hf_model, weights, args=(), kwargs={"input_ids": b.ids,
                                                                        "attention_mask": b.mask}).logits
        batch_loss(logits, b, loss, n_requests)[0].backward()
    with torch.no_grad():
        for name, change in changes.items():
            if change.grad is not None:
                change.grad.masked_fill_(~masks[name], 0.0)
    opt.step()
    with torch.no_grad():
        for name, change in changes.items():
            change.masked_fill_(~masks[name], 0.0)


def _objective(lm: LoadedModel, prepared: list[Batch], loss: str, n_requests: int) -> float:
    """The training loss of the model as it is now (run inside ``edited`` and ``no_grad``)."""
    total = 0.0
    for b in prepared:
        logits = lm.hf_model(input_ids=b.ids, attention_mask=b.mask).logits
        total += float(batch_loss(logits, b, loss, n_requests)[0])
    return total


def _curve_point(lm: LoadedModel, step: int, deltas: dict[str, torch.Tensor], prepared: list[Batch],
                 evaluated: list[EditRequest], settings: MaskedFinetuneSettings, n_requests: int) -> dict:
    """``{"step", "loss", *CURVE_METRICS}`` of the model with ``deltas`` applied (restored after)."""
    with edited(lm, deltas), torch.no_grad():
        loss = _objective(lm, prepared, settings.loss, n_requests)
        metrics = edit_metrics(lm.hf_model, lm.tokenizer, evaluated, generation_tokens=0,
                               batch_size=settings.batch_size)
    return {"step": step, "loss": loss, **{k: metrics["summary"][k]["mean"] for k in CURVE_METRICS}}


def _recorded(step: int, settings: MaskedFinetuneSettings) -> bool:
    """Whether the curve has a point after ``step`` steps: step 0, every ``eval_every``-th, and the last."""
    return step % settings.eval_every == 0 or step == settings.steps


def _train(lm: LoadedModel, prepared: list[Batch], masks: dict[str, torch.Tensor], evaluated: list[EditRequest],
           settings: MaskedFinetuneSettings, n_requests: int, progress: bool) -> MaskedEditResult:
    """The training loop: changes from zero, ``settings.steps`` steps, a curve point where :func:`_recorded`."""
    changes = {name: torch.zeros(m.shape, dtype=torch.float32, device=m.device, requires_grad=True)
               for name, m in masks.items()}
    opt = _optimizer(list(changes.values()), settings.lr)
    curve = [_curve_point(lm, 0, _detached(changes), prepared, evaluated, settings, n_requests)]
    devices = [lm.device] if torch.device(lm.device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), frozen(lm.hf_model):
        torch.manual_seed(settings.seed)
        for step in tqdm(range(1, settings.steps + 1), desc="masked fine-tuning", disable=not progress):
            with torch.enable_grad():
                _step(lm, prepared, changes, masks, opt, settings.loss, n_requests)
            if _recorded(step, settings):
                curve.append(_curve_point(lm, step, _detached(changes), prepared, evaluated, settings, n_requests))
    deltas = _detached(changes)
    _check_outside_zero(deltas, masks)
    return MaskedEditResult(deltas, curve, sum(int(m.sum()) for m in masks.values()))


def _detached(changes: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The changes as plain tensors (no autograd history), for ``edited`` and the result."""
    return {name: change.detach().clone() for name, change in changes.items()}


def _check_outside_zero(deltas: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """The guarantee callers rely on, checked once at the end: no change outside the allowed entries."""
    for name, delta in deltas.items():
        if bool(delta[~masks[name]].ne(0).any()):
            raise KcircuitsError(f"internal error: the change of {name} is not zero outside the allowed entries; "
                                 "please report it")


# --------------------------------------------------------------------------- cache


def _cache_key(lm: LoadedModel, prepared: list[Batch], masks: Mapping[str, torch.Tensor],
               evaluated: list[EditRequest], settings: MaskedFinetuneSettings) -> str:
    """The step-cache key: weights, dtype, hashed settings, the training token ids (per request, no padding),
    the evaluated requests and the allowed entries."""
    rows = [[b.ids[i][b.mask[i].bool()].tolist(), b.tokens[i][b.scored[i]].tolist()]
            for b in prepared for i in range(b.ids.shape[0])]
    return step_key(CACHE_STEP, weights=lm.fingerprint, dtype=str(lm.dtype), settings=hashed_dict(settings),
                    train=json_digest(rows), evaluated=json_digest([r.to_dict() for r in evaluated]),
                    allowed=_mask_digest(masks))


def _cached(cache: StepCache, key: str, lm: LoadedModel) -> MaskedEditResult | None:
    """A finished fine-tuning from the cache (its JSON is written last, so it marks a complete entry)."""
    meta = cache.read_json(CACHE_STEP, key)
    if not isinstance(meta, dict) or not {"curve", "n_trainable", "trained_params"} <= set(meta):
        return None
    tensors = cache.read_tensors(CACHE_STEP, key)
    if tensors is None or set(tensors) != set(meta["trained_params"]):
        return None
    deltas = {name: tensors[name].to(lm.device) for name in meta["trained_params"]}  # the mask's order
    return MaskedEditResult(deltas, meta["curve"], int(meta["n_trainable"]))


def _store(cache: StepCache, key: str, result: MaskedEditResult) -> None:
    """Write the deltas, then the JSON that marks the entry complete (both atomically)."""
    cache.write_tensors(CACHE_STEP, key, result.deltas)
    cache.write_json(CACHE_STEP, key, result.to_dict())


# --------------------------------------------------------------------------- public API


def _requests(lm: LoadedModel, requests: Iterable[EditRequest] | EditRequest, eval_requests) -> tuple[list, list]:
    """The validated training requests and the evaluated ones (the training requests when not given)."""
    require(lm.tokenizer is not None, "this model has no tokenizer, so edit requests cannot be tokenised; "
                                      "wrap it with from_hf(model, tokenizer)")
    reqs = validate_requests(requests, lm.tokenizer)
    evaluated = reqs if eval_requests is None else validate_requests(eval_requests, lm.tokenizer, one_batch=False)
    return reqs, evaluated


def masked_finetune(lm: LoadedModel, requests: Iterable[EditRequest] | EditRequest, allowed: Mapping[str, torch.Tensor],
                    settings: MaskedFinetuneSettings | None = None, *,
                    eval_requests: Iterable[EditRequest] | None = None, cache: StepCache | None = None,
                    progress: bool = False) -> MaskedEditResult:
    """Fine-tune (FT-M's objective, Adam) only the allowed weight entries on the requests; the change and its curve.

    The model is never written and is bit-identical after the call (see the module docstring for how
    the restriction is enforced and what the curve records).

    Args:
        lm: the model (not changed).
        requests: the facts to write, trained together (conflicting requests for one subject are refused,
            as in :func:`kcircuits.edit.requests.validate_requests`).
        allowed: a weight mask ``{param_name: bool tensor of the parameter's shape}``, True where an entry
            may change; parameters it does not name are not trained. Must allow at least one entry.
        settings: steps, learning rate, loss reduction, batch size, curve spacing and seed (default
            :class:`MaskedFinetuneSettings`).
        eval_requests: the requests whose edit metrics make the curve; ``None``: ``requests``.
        cache: a :class:`kcircuits.steps.StepCache` to reuse a finished fine-tuning and store this one;
            ``None``: no cache.
        progress: show a progress bar over the steps.

    Returns:
        :class:`MaskedEditResult`: the deltas (zero outside ``allowed``), the curve and the number of
        trainable entries.
    """
    settings = MaskedFinetuneSettings() if settings is None else settings
    require(isinstance(settings, MaskedFinetuneSettings),
            f"settings must be MaskedFinetuneSettings, got {type(settings).__name__}")
    reqs, evaluated = _requests(lm, requests, eval_requests)
    masks = _allowed_entries(lm, allowed)
    prepared = batches(lm, reqs, True, settings.batch_size)
    cache = cache or StepCache(None)
    key = _cache_key(lm, prepared, masks, evaluated, settings)
    hit = _cached(cache, key, lm)
    if hit is not None:
        return hit
    result = _train(lm, prepared, masks, evaluated, settings, len(reqs), progress)
    _store(cache, key, result)
    return result


def old_fact_scores(lm: LoadedModel, requests: Sequence[EditRequest], *, batch_size: int = 16) -> dict:
    """How strongly the model as it is now holds each request's *old* fact on its edit prompt.

    Per request (NaN where ``target_true`` is None): ``rank`` of ``target_true`` (1 = top; the worst
    over its tokens under teacher forcing, ties counted against it), ``hit_at_1`` (1.0 when the rank is
    1: greedy decoding gives the whole old target) and ``prob`` (its whole-target probability). Run it
    inside :func:`~kcircuits.models.edits.edited` and/or :func:`~kcircuits.models.masking.masked` to
    score an edited model or a circuit alone.

    Args:
        lm: the model, scored as it is (under ``torch.no_grad()``).
        requests: the edit requests (validated here; conflicting ones are fine, nothing is trained).
        batch_size: requests per forward pass.

    Returns:
        ``{"rank": [...], "hit_at_1": [...], "prob": [...], "summary": {name: summary}}`` (lists in
        request order; summaries as :func:`kcircuits.metrics.summary`, NaNs left out).
    """
    reqs = validate_requests(requests, lm.tokenizer, one_batch=False)
    known = [i for i, r in enumerate(reqs) if r.target_true is not None]
    old = [EditRequest(reqs[i].prompt, reqs[i].subject, reqs[i].target_true) for i in known]
    ranks, probs = [], []
    with torch.no_grad():
        for b in batches(lm, old, True, batch_size):
            logits = lm.hf_model(input_ids=b.ids, attention_mask=b.mask).logits
            picked = scored_logits(logits, b)  # [n, t, V]
            token_ranks = rank_of(picked, picked.gather(-1, b.tokens[..., None]))  # [n, t]
            ranks += token_ranks.masked_fill(~b.scored, 1).amax(1).tolist()
            logp, _ = logprobs_and_margins(logits, b)
            probs += (logp * b.scored).sum(1).exp().tolist()
    values = {k: [math.nan] * len(reqs) for k in ("rank", "hit_at_1", "prob")}
    for i, rank, prob in zip(known, ranks, probs, strict=True):
        values["rank"][i], values["hit_at_1"][i], values["prob"][i] = float(rank), float(rank == 1), prob
    values["summary"] = {k: summary(torch.tensor(v, dtype=torch.float64)) for k, v in values.items()}
    return values


def _old_fact(lm: LoadedModel, reqs: list[EditRequest], circuit: WeightMask, ablation: str, batch_size: int) -> dict:
    """:func:`old_fact_scores` of the model as it is now (``"model"``) and of the circuit alone (``"circuit"``)."""
    out = {"model": old_fact_scores(lm, reqs, batch_size=batch_size)}
    with masked(lm, circuit, ablation):
        out["circuit"] = old_fact_scores(lm, reqs, batch_size=batch_size)
    return out


def inside_outside(lm: LoadedModel, requests: Iterable[EditRequest] | EditRequest,
                   masks: Mapping[str, Mapping[str, torch.Tensor]], settings: MaskedFinetuneSettings | None = None, *,
                   circuit: Mapping[str, torch.Tensor] | None = None, ablation: str = "zero",
                   eval_requests: Iterable[EditRequest] | None = None, cache: StepCache | None = None,
                   progress: bool = False) -> dict:
    """Fine-tune inside vs outside a circuit: :func:`masked_finetune` once per allowed set, same settings.

    Typical ``masks``: ``{"circuit": m, "complement": complement(m), "all": all_ones}`` for a weight
    circuit ``m``, or :func:`edge_component_masks` for an edge circuit. The deltas are not returned (a
    full-model delta is the model's size); with a ``cache``, :func:`masked_finetune` with the same
    arguments returns them without training again.

    Args:
        lm: the model (not changed).
        requests: the facts to write (the same for every variant).
        masks: ``{variant name: allowed weight mask}``, run in this order.
        settings: the one :class:`MaskedFinetuneSettings` every variant trains with.
        circuit: a weight mask (True = kept); if given, whether the circuit alone still holds the old fact
            is measured before the edits and after each one (``masked`` applied on top of the edited model).
        ablation: how the circuit's removed entries are ablated: ``"zero"`` or ``"mean"``
            (:data:`kcircuits.models.masking.ABLATIONS`).
        eval_requests: the requests whose edit metrics make the curves; ``None``: ``requests``.
        cache: a :class:`kcircuits.steps.StepCache`: finished variants are reused after a crash.
        progress: show a progress bar per variant.

    Returns:
        A JSON-ready dict: ``settings``, ``ablation`` (None without a circuit), ``n_requests``,
        ``old_fact_before`` (``{"model", "circuit"}`` of :func:`old_fact_scores`, None without a circuit)
        and ``variants``: ``{name: {"n_trainable", "trained_params", "curve", "old_fact_after"}}``.
    """
    settings = MaskedFinetuneSettings() if settings is None else settings
    reqs, _ = _requests(lm, requests, None)
    require(isinstance(masks, Mapping) and bool(masks), "masks must be a non-empty {name: weight mask} dict")
    if circuit is not None:
        one_of(ablation, ABLATIONS, "weight ablation")
        require(isinstance(circuit, Mapping), f"circuit must be a weight mask, got {type(circuit).__name__}")
        check_mask(lm, circuit)
    for allowed in masks.values():  # every mask checked before the first (long) fine-tuning starts
        _allowed_entries(lm, allowed)
    before = None if circuit is None else _old_fact(lm, reqs, dict(circuit), ablation, settings.batch_size)
    variants = {}
    for name, allowed in masks.items():
        result = masked_finetune(lm, reqs, allowed, settings, eval_requests=eval_requests, cache=cache,
                                 progress=progress)
        entry = result.to_dict()
        if circuit is not None:
            with edited(lm, result.deltas):
                entry["old_fact_after"] = _old_fact(lm, reqs, dict(circuit), ablation, settings.batch_size)
        variants[str(name)] = entry
    return {"settings": asdict(settings),
            "ablation": None if circuit is None else ablation, "n_requests": len(reqs),
            "old_fact_before": before, "variants": variants}


def edge_component_masks(layout: ParameterLayout, nodes: str | Iterable[str],
                         over: Iterable[str] | None = None) -> dict[str, WeightMask]:
    """An edge circuit's components as allowed sets: ``{"edge circuit": its entries, "rest": the others}``.

    ``"edge circuit"`` is :meth:`ParameterLayout.mask_for` of the nodes, restricted to the parameters in
    ``over`` (each of them present, all-False where no node owns an entry); ``"rest"`` is its complement
    over the same parameters. Entries shared by several nodes (a kv group's k/v rows under grouped-query
    attention, tied embeddings) are in the circuit if any of their owners is.

    Args:
        layout: the model's parameter layout (``LoadedModel.layout``).
        nodes: the circuit's components, named as graph nodes (``Circuit.nodes()``: ``"a3.h2"``, ``"m5"``,
            ``"input"``, ``"logits"``).
        over: the parameter names the comparison covers (a weight mask's keys work too); ``None``: every
            parameter of the model's heads and MLPs.
    """
    names = [nodes] if isinstance(nodes, str) else list(nodes)
    inside = layout.mask_for(names)
    params = list(layout.mask_for(layout.nodes(("head", "mlp")))) if over is None else list(dict.fromkeys(over))
    require(bool(params), "over names no parameter; give the parameters the comparison covers")
    for name in params:
        layout.owners(name)  # an unknown parameter name is a one-line error
    circuit = {p: inside[p] if p in inside else torch.zeros(layout.param_shapes[p], dtype=torch.bool) for p in params}
    return {"edge circuit": circuit, "rest": complement(circuit)}

