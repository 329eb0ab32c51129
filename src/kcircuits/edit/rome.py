"""ROME (Meng et al. 2022): write one fact into one MLP with a rank-one change of its output matrix.

For a request "(prompt with {} for the subject, subject, new target)":

1. the key ``k*`` (:func:`subject_key`): the MLP's hidden activation at the subject's last token,
   averaged over the prompt preceded by a few context prefixes;
2. the value ``v*`` (:func:`target_value`): ``v0 + δ`` where ``v0 = W k* (+ b)`` and ``δ [d_model]``,
   added to the MLP's output at the subject's last token, is optimised for the new target's
   log-likelihood (teacher-forced over all its tokens) plus ``kl_factor`` × the KL divergence of the
   "{subject} is a" distribution from the unedited model's (ROME's "essence" term) plus
   ``weight_decay`` × ‖δ‖²/‖v0‖², with ‖δ‖ clamped to ``clamp_norm`` × ‖v0‖ after every step;
3. the update :func:`kcircuits.edit.updates.rank_one_update` with the keys' second moment ``C``
   (:func:`kcircuits.edit.stats.key_second_moment`), so that ``W' k* + b = v*``.

The result is a delta ``{param_name: Δ}`` (:func:`kcircuits.models.edits.edited` applies and restores it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kcircuits.data.prompts import answer_token_ids
from kcircuits.edit.registry import EditInputs, register
from kcircuits.edit.settings import ValueSettings  # noqa: F401  (re-exported: ROME's value settings)
from kcircuits.edit.stats import MlpOutput, body, capture_keys, mlp_output
from kcircuits.edit.updates import rank_one_update
from kcircuits.errors import KcircuitsError
from kcircuits.models import LoadedModel
from kcircuits.models.edits import edited


@dataclass(frozen=True)
class RomeEdit:
    """One computed ROME edit: the layer, the key ``k* [d_mlp]``, the value ``v* [d_model]`` the matrix
    now maps it to (bias included), and the delta of the stored parameter."""

    layer: int
    key: torch.Tensor
    value: torch.Tensor
    delta: dict[str, torch.Tensor]


def subject_position(tokenizer, text_before_subject: str, subject: str) -> int:
    """Index of the subject's last token in a text that starts with ``text_before_subject + subject``
    (tokenising that prefix alone: a subject ending at a word boundary keeps its tokens)."""
    n = len(tokenizer(text_before_subject + subject, add_special_tokens=False).input_ids)
    if n == 0:
        raise KcircuitsError(f"the subject {subject!r} tokenises to nothing")
    return n - 1


def split_template(prompt: str, subject: str) -> tuple[str, str]:
    """The template's text before and after its ``{}``, checked."""
    if prompt.count("{}") != 1:
        raise KcircuitsError(f"the edit prompt must contain the subject's place '{{}}' exactly once: {prompt!r}")
    if not subject or not subject.strip():
        raise KcircuitsError("the edit's subject is empty")
    before, after = prompt.split("{}")
    return before, after


@torch.no_grad()
def subject_key(lm: LoadedModel, target: MlpOutput, prompt: str, subject: str,
                prefixes: Sequence[str] = ("",)) -> torch.Tensor:
    """``k* [d_mlp]``: the output projection's input at the subject's last token, averaged over
    ``prefix + prompt`` for each of ``prefixes``."""
    before, after = split_template(prompt, subject)
    keys = []
    with capture_keys(target) as seen:
        for prefix in prefixes:
            text = prefix + before + subject + after
            pos = subject_position(lm.tokenizer, prefix + before, subject)
            ids = torch.tensor([lm.tokenizer(text, add_special_tokens=False).input_ids], device=lm.device)
            body(lm)(input_ids=ids)
            keys.append(seen["keys"][0, pos])
    return torch.stack(keys).mean(0)


@contextmanager
def added_at(module: torch.nn.Module, delta: torch.Tensor, positions: torch.Tensor) -> Iterator[None]:
    """Inside the block, add ``delta [d_model]`` to ``module``'s output ``[b, p, d_model]`` (a tensor, or
    the first element of a tuple, as decoder layers return) of sequence i at position ``positions[i]``."""
    def hook(mod, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        rows = torch.arange(len(positions), device=hidden.device)
        extra = torch.zeros_like(hidden)
        extra[rows, positions] = delta.to(hidden.dtype)
        return (hidden + extra, *output[1:]) if isinstance(output, tuple) else hidden + extra

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def teacher_forced_batch(lm: LoadedModel, texts: list[str], targets: list[list[int]]):
    """Right-padded ids ``[n, T]``, attention mask, and the positions whose logits score each target
    token: ``score_pos [n, t_max]``, ``score_ids [n, t_max]``, ``score_mask [n, t_max]``."""
    rows = [lm.tokenizer(t, add_special_tokens=False).input_ids + tgt[:-1] for t, tgt in zip(texts, targets,
                                                                                             strict=True)]
    width, t_max = max(len(r) for r in rows), max(len(t) for t in targets)
    ids = torch.full((len(rows), width), lm.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros(len(rows), t_max, dtype=torch.long)
    tgt_ids = torch.zeros(len(rows), t_max, dtype=torch.long)
    tgt_mask = torch.zeros(len(rows), t_max, dtype=torch.bool)
    for i, (row, tgt) in enumerate(zip(rows, targets, strict=True)):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        first = len(row) - len(tgt)  # the logits at the prompt's last token score the first target token
        pos[i, :len(tgt)] = torch.arange(first, first + len(tgt))
        tgt_ids[i, :len(tgt)], tgt_mask[i, :len(tgt)] = torch.tensor(tgt), True
    dev = lm.device
    return ids.to(dev), mask.to(dev), pos.to(dev), tgt_ids.to(dev), tgt_mask.to(dev)


def target_value(lm: LoadedModel, target: MlpOutput, key: torch.Tensor, prompt: str, subject: str, new_target: str,
                 prefixes: Sequence[str] = ("",), settings: ValueSettings | None = None) -> torch.Tensor:
    """``v* [d_model]`` for writing ``new_target`` after ``prompt`` at ``target`` (the MLP's output matrix),
    starting from ``v0 = W k (+ b)`` of ``key [d_mlp]`` (see the module docstring)."""
    with torch.no_grad():
        v0 = key.to(lm.dtype) @ target.matrix(lm).T
        bias = target.bias_vector(lm)
        v0 = v0 + bias if bias is not None else v0
    return optimised_value(lm, target.module, v0, prompt, subject, new_target, prefixes, settings)


def optimised_value(lm: LoadedModel, module: torch.nn.Module, v0: torch.Tensor, prompt: str, subject: str,
                    new_target: str, prefixes: Sequence[str] = ("",),
                    settings: ValueSettings | None = None) -> torch.Tensor:
    """``v0 + δ [d_model]``: ``δ`` added to ``module``'s output at the subject's last token (ROME: the MLP
    output; MEMIT: a decoder layer's residual output) and optimised for ``new_target`` after ``prompt``
    (a template with ``{}`` for ``subject``) on each of ``prefixes``, with ROME's KL, weight-decay and
    norm-clamp terms relative to ``‖v0‖`` (``settings``: :class:`ValueSettings`)."""
    st = settings or ValueSettings()
    before, after = split_template(prompt, subject)
    texts = [p + before + subject + after for p in prefixes]
    targets = [answer_token_ids(lm.tokenizer, t, new_target) for t in texts]
    if not all(targets):
        raise KcircuitsError(f"the new target {new_target!r} tokenises to nothing")
    positions = torch.tensor([subject_position(lm.tokenizer, p + before, subject) for p in prefixes], device=lm.device)
    ids, mask, score_pos, score_ids, score_mask = teacher_forced_batch(lm, texts, targets)
    essence = lm.tokenizer(f"{subject} is a", add_special_tokens=False).input_ids
    essence_ids = torch.tensor([essence], device=lm.device)
    essence_pos = torch.tensor([subject_position(lm.tokenizer, "", subject)], device=lm.device)
    with torch.no_grad():
        base = F.log_softmax(lm.hf_model(input_ids=essence_ids).logits[0, -1].float(), -1)
    delta = torch.zeros_like(v0, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=st.lr)
    limit = st.clamp_norm * v0.float().norm()
    params = [p for p in lm.hf_model.parameters() if p.requires_grad]
    for p in params:  # only δ is optimised
        p.requires_grad_(False)
    try:
        for _ in range(st.steps):
            opt.zero_grad()
            with added_at(module, delta, positions):
                logits = lm.hf_model(input_ids=ids, attention_mask=mask).logits.float()
                logp = torch.log_softmax(logits.gather(1, score_pos[..., None].expand(-1, -1, logits.shape[-1])), -1)
                nll = -(logp.gather(-1, score_ids[..., None])[..., 0] * score_mask).sum(1) / score_mask.sum(1)
            with added_at(module, delta, essence_pos):
                new = F.log_softmax(lm.hf_model(input_ids=essence_ids).logits[0, -1].float(), -1)
            kl = F.kl_div(new, base, log_target=True, reduction="sum")  # KL(base ‖ new)
            loss = nll.mean() + st.kl_factor * kl + st.weight_decay * delta.norm() ** 2 / v0.float().norm() ** 2
            loss.backward()
            opt.step()
            with torch.no_grad():
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    finally:
        for p in params:
            p.requires_grad_(True)
    return (v0.float() + delta.detach()).to(v0.dtype)


def rome_edit(lm: LoadedModel, prompt: str, subject: str, new_target: str, layer: int, C: torch.Tensor, *,
              prefixes: Sequence[str] = ("",), settings: ValueSettings | None = None) -> RomeEdit:
    """ROME's edit of layer ``layer`` of ``lm`` writing ``new_target`` after ``prompt`` (a template with
    ``{}`` for ``subject``). ``C [d_mlp, d_mlp]``: the layer's key second moment
    (:func:`kcircuits.edit.stats.key_second_moment`); ``prefixes``: the contexts the key is averaged
    over and the value optimised on; ``settings``: the value optimisation. The model is not changed;
    apply ``.delta`` with :func:`kcircuits.models.edits.edited`."""
    target = mlp_output(lm, layer)
    key = subject_key(lm, target, prompt, subject, prefixes)
    value = target_value(lm, target, key, prompt, subject, new_target, prefixes, settings)
    bias = target.bias_vector(lm)
    wanted = value - bias if bias is not None else value
    dW = rank_one_update(target.matrix(lm).detach(), key, wanted.detach(), C.to(key.device))
    return RomeEdit(layer, key, value, target.delta(dW))


@register("rome", "one rank-one update of --layer's MLP per request, the requests written one after another")
def apply_rome(lm: LoadedModel, requests: Sequence, inputs: EditInputs) -> dict[str, torch.Tensor]:
    """The edit registry's ROME: :func:`rome_edit` for each of ``requests`` (:class:`EditRequest` s) in turn,
    each computed on the model ``lm`` with the earlier ones applied (sequential editing, as in the ROME
    paper); returns the summed delta.

    ``inputs`` (:class:`~kcircuits.edit.registry.EditInputs`): ``edit.layer`` is the layer, ``value`` the
    value optimisation, ``key_stats(layer)`` the layer's key second moment (of the unedited model: keys
    at the edited layer do not depend on its own output matrix), ``prefixes`` the contexts."""
    edit = inputs.edit
    if edit.n_layers != 1:
        raise KcircuitsError(f"ROME edits one layer; got --n-layers {edit.n_layers} (use memit to spread an edit)")
    C = inputs.key_stats(edit.layer)
    total: dict[str, torch.Tensor] = {}
    for req in requests:
        with edited(lm, total):
            step = rome_edit(lm, req.prompt, req.subject, req.target_new, edit.layer, C, prefixes=inputs.prefixes,
                             settings=inputs.value)
        for name, delta in step.delta.items():
            total[name] = total[name] + delta if name in total else delta
    return total
