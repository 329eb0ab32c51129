"""ROME (Meng et al. 2022): write one fact into one MLP with a rank-one change of its output matrix.

For a request "(prompt with {} for the subject, subject, new target)":

1. the key ``k*`` (:func:`subject_key`): the MLP's hidden activation at the subject's last token,
   averaged over the prompt preceded by a few context prefixes;
2. the value ``v*`` (:func:`target_value`): ``v0 + δ`` where ``v0 = W k* (+ b)`` and ``δ [d_model]``,
   added to the MLP's output at the subject's last token, is optimised for the new target's
   log-likelihood (teacher-forced over all its tokens) plus ``kl_factor`` × KL(new ‖ unedited) of the
   distribution at the subject's last token of "{subject} is a" (ROME's "essence" term) plus
   ``weight_decay`` × ‖δ‖/‖v0‖² (the norm not squared, as ROME's and MEMIT's reference code and EasyEdit
   write it), with ‖δ‖ clamped to ``clamp_norm`` × ‖v0‖ after every step, and
   stopped early once that loss is below ``stop_loss`` (ROME's reference code: 5e-2);
3. the update :func:`kcircuits.edit.updates.rank_one_update` with the keys' second moment ``C``
   (:func:`kcircuits.edit.stats.key_second_moment`), so that ``W' k* + b = v*``.

The result is a delta ``{param_name: Δ}`` (:func:`kcircuits.models.edits.edited` applies and restores it).

Cost: each step of the value optimisation runs the model forward and backward. Attention is causal and
δ enters at the subject's last token, so neither the positions before that token nor the decoder layers
below the one δ enters depend on δ: the former are run once, without gradients, and their attention
keys and values reused by every step (the model's own cache path); the latter compute on the first
step and, on later ones, return that output at once. A step runs each row only from the subject's
last token to its last scored one, and applies the unembedding only where a log-probability is
scored. It is thus the same function of δ as a full forward pass (tests/test_rome.py compares the two
on every family) at a fraction of its cost (benchmarks/edit_cost.py). :func:`optimised_values` runs
several requests' rows in one pass (MEMIT), and a request that stops early leaves it. Keys are read
in batches, each forward pass ending at the layer read (:func:`read_at`).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kcircuits.data.prompts import answer_token_ids
from kcircuits.edit.registry import EditInputs, register
from kcircuits.edit.settings import ValueSettings  # noqa: F401  (re-exported: ROME's value settings)
from kcircuits.edit.stats import MlpOutput, body, mlp_output
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


#: ROME's reference code (``rome/compute_v.py``, also MEMIT's ``compute_z.py``) ends the value optimisation
#: as soon as its loss is below this; the default of ``stop_loss`` when the settings do not give one
STOP_LOSS = 5e-2

log = logging.getLogger(__name__)


class _Reached(Exception):
    """Raised by :func:`read_at`'s hook: the module read has run, the rest of the forward pass is not needed."""


def _rows_batch(rows: Sequence[Sequence[int]], pad_id: int, device,
                width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids ``[n, T]`` (``T``: ``width``, else the longest row) and their attention mask (causal
    attention: real tokens see no padding)."""
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def read_at(lm: LoadedModel, module: torch.nn.Module, rows: Sequence[Sequence[int]], positions: Sequence[int], *,
            read: str = "output", batch_size: int = 64) -> torch.Tensor:
    """``[n, d]``: ``module``'s input (``read="input"``, its first argument) or output (a tensor, or the first
    element of a tuple) at ``positions[i]`` of token row ``rows[i]``.

    The rows are cut after their read position (causal attention: later tokens change nothing there),
    run ``batch_size`` at a time, right-padded, and each forward pass ends once ``module`` has run (a
    hook raises; nothing after the module is computed)."""
    if read not in ("input", "output"):
        raise ValueError(f"read must be 'input' or 'output', got {read!r}")
    out: list[torch.Tensor] = []
    seen: dict[str, torch.Tensor] = {}

    def hook(mod, inputs, output):
        value = inputs[0] if read == "input" else output
        seen["value"] = (value[0] if isinstance(value, tuple) else value).detach()
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        for start in range(0, len(rows), batch_size):
            part = [list(r[:p + 1]) for r, p in zip(rows[start:start + batch_size], positions[start:start + batch_size],
                                                    strict=True)]
            ids, mask = _rows_batch(part, lm.pad_token_id, lm.device)
            seen.clear()
            try:
                body(lm)(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Reached:
                pass
            if "value" not in seen:
                raise KcircuitsError(f"the module read ({type(module).__name__}) did not run in the forward pass")
            at = torch.tensor([len(r) - 1 for r in part], device=seen["value"].device)
            out.append(seen["value"][torch.arange(len(part), device=at.device), at])
    finally:
        handle.remove()
    return torch.cat(out)


def _prompt_rows(tokenizer, prompt: str, subject: str, prefixes: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """The token rows ``prefix + prompt`` (subject filled in) for each of ``prefixes`` and the subject's
    last token's index in each."""
    before, after = split_template(prompt, subject)
    rows = [tokenizer(p + before + subject + after, add_special_tokens=False).input_ids for p in prefixes]
    return rows, [subject_position(tokenizer, p + before, subject) for p in prefixes]


@torch.no_grad()
def subject_keys(lm: LoadedModel, target: MlpOutput, items: Sequence[tuple[str, str]],
                 prefixes: Sequence[str] = ("",), *, batch_size: int = 64) -> torch.Tensor:
    """``K [n, d_mlp]``: :func:`subject_key` of each ``(prompt, subject)`` of ``items``, the rows of all
    of them run together (:func:`read_at`)."""
    rows, positions = [], []
    for prompt, subject in items:
        r, p = _prompt_rows(lm.tokenizer, prompt, subject, prefixes)
        rows += r
        positions += p
    keys = read_at(lm, target.module, rows, positions, read="input", batch_size=batch_size)
    return keys.view(len(items), len(prefixes), -1).mean(1)


def subject_key(lm: LoadedModel, target: MlpOutput, prompt: str, subject: str,
                prefixes: Sequence[str] = ("",)) -> torch.Tensor:
    """``k* [d_mlp]``: the output projection's input at the subject's last token, averaged over
    ``prefix + prompt`` for each of ``prefixes``."""
    return subject_keys(lm, target, [(prompt, subject)], prefixes)[0]


@contextmanager
def added_at(module: torch.nn.Module, delta: torch.Tensor, positions: torch.Tensor) -> Iterator[None]:
    """Inside the block, add ``delta`` (``[d_model]``, or ``[b, d_model]``: one row per sequence) to
    ``module``'s output ``[b, p, d_model]`` (a tensor, or the first element of a tuple, as decoder layers
    return) of sequence i at position ``positions[i]``."""
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


@dataclass(frozen=True)
class _ValueRows:
    """The token rows one value optimisation runs: ``prefix + prompt + target[:-1]`` for each prefix, then
    "{subject} is a" (ROME's essence prompt, scored at the subject's last token, as ROME's reference code
    reads it), with the subject's last token's
    index in each (where δ is added) and the scored positions and target ids of the prefix rows."""

    rows: list[list[int]]
    subject: list[int]
    scored: list[list[int]]
    targets: list[list[int]]


def _value_rows(tokenizer, prompt: str, subject: str, new_target: str, prefixes: Sequence[str]) -> _ValueRows:
    before, after = split_template(prompt, subject)
    texts = [p + before + subject + after for p in prefixes]
    targets = [answer_token_ids(tokenizer, t, new_target) for t in texts]
    if not all(targets):
        raise KcircuitsError(f"the new target {new_target!r} tokenises to nothing")
    rows = [tokenizer(t, add_special_tokens=False).input_ids + tgt[:-1] for t, tgt in zip(texts, targets, strict=True)]
    at = [subject_position(tokenizer, p + before, subject) for p in prefixes]
    # the logits at the prompt's last token score the first target token
    scored = [list(range(len(r) - len(t), len(r))) for r, t in zip(rows, targets, strict=True)]
    essence = tokenizer(f"{subject} is a", add_special_tokens=False).input_ids
    essence_at = subject_position(tokenizer, "", subject)
    return _ValueRows(rows + [essence], at + [essence_at], scored + [[essence_at]], targets)


def _cache_keyword(module: torch.nn.Module) -> str:
    """The forward argument taking the attention cache: ``cache`` in recent transformers, else ``past_key_values``."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def optimised_value(lm: LoadedModel, module: torch.nn.Module, v0: torch.Tensor, prompt: str, subject: str,
                    new_target: str, prefixes: Sequence[str] = ("",),
                    settings: ValueSettings | None = None) -> torch.Tensor:
    """``v0 + δ [d_model]``: ``δ`` added to ``module``'s output at the subject's last token (ROME: the MLP
    output; MEMIT: a decoder layer's residual output) and optimised for ``new_target`` after ``prompt``
    (a template with ``{}`` for ``subject``) on each of ``prefixes``, with ROME's KL, weight-decay and
    norm-clamp terms relative to ``‖v0‖`` and its early stop (``settings``: :class:`ValueSettings`;
    see :func:`optimised_values`)."""
    return optimised_values(lm, module, v0[None], [(prompt, subject, new_target)], prefixes, settings)[0]


def optimised_values(lm: LoadedModel, module: torch.nn.Module, v0: torch.Tensor, edits: Sequence[tuple[str, str, str]],
                     prefixes: Sequence[str] = ("",), settings: ValueSettings | None = None, *,
                     batch_size: int = 1) -> torch.Tensor:
    """``v0 + δ [n, d_model]``: :func:`optimised_value` of each ``(prompt, subject, new_target)`` of ``edits``
    from its row of ``v0 [n, d_model]``, each with its own δ, optimiser and early stop, the rows of
    ``batch_size`` of them run in one forward pass (the same values as one by one, up to float rounding).

    Each step evaluates the loss of every request still running: ``nll`` (the new target's teacher-forced
    log-likelihood, a mean over its tokens, then over the prefixes) + ``kl_factor`` × KL(new ‖ base) of
    the distribution at the subject's last token of "{subject} is a" (base: δ = 0) + ``weight_decay`` ×
    ‖δ‖/‖v0‖² (ROME's reference form: the norm not squared).
    A request whose loss is below ``settings.stop_loss`` keeps its δ and is done; the others take an Adam
    step (lr ``settings.lr``) and have ‖δ‖ clamped to ``clamp_norm`` × ‖v0‖: at most ``settings.steps``
    steps each. The early stop, the KL and the weight decay are those of ROME's and MEMIT's reference
    code (``compute_v``/``compute_z``: stop once the loss is below 5e-2, the default; 0 never stops).
    One difference remains: ``steps`` counts Adam steps, while their ``v_num_grad_steps`` counts loss
    evaluations (20 of them take 19 steps)."""
    st = settings or ValueSettings()
    if v0.ndim != 2 or v0.shape[0] != len(edits):
        raise KcircuitsError(f"v0 has shape {tuple(v0.shape)}; expected [{len(edits)}, d_model] (one row per edit)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KcircuitsError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    plans = [_value_rows(lm.tokenizer, *e, prefixes) for e in edits]
    # requests of similar widths (tokens from the subject on) together: less padding in each batch
    width = [max(len(r) - a for r, a in zip(p.rows, p.subject, strict=True)) for p in plans]
    order = sorted(range(len(edits)), key=lambda i: (width[i], i))
    out = torch.empty(v0.shape, dtype=v0.dtype, device=v0.device)
    steps, losses = [0] * len(edits), [float("nan")] * len(edits)
    params = [p for p in lm.hf_model.parameters() if p.requires_grad]
    for p in params:  # only δ is optimised
        p.requires_grad_(False)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            out[chunk], ran, last = _optimise(lm, module, v0[chunk], [plans[i] for i in chunk], st)
            for i, s, x in zip(chunk, ran, last, strict=True):
                steps[i], losses[i] = s, x
    finally:
        for p in params:
            p.requires_grad_(True)
    log.debug("value optimisation of %d request(s): steps [%s], last losses [%s]", len(edits),
              ", ".join(map(str, steps)), ", ".join(f"{x:.9g}" for x in losses))
    return out


#: the essence rows run in a forward pass of their own when that saves at least this many padded token
#: positions: a pass reads every weight once more, about what a product of 64 rows costs on a CPU
#: (benchmarks/edit_cost.py: one ROME request runs one pass, MEMIT's batches two)
SPLIT_TOKENS = 64


class _Bottom:
    """The decoder layers below ``module`` (and its layer itself when ``module`` is a decoder layer) do not
    depend on δ: ``with bottom():`` around each step's forward pass records their output on the first
    pass and, on later ones, makes them return it without computing (the model's loop still calls them;
    ``module``'s own hooks still run on what it returns). One per pass, made anew when its rows change."""

    def __init__(self, lm: LoadedModel, module: torch.nn.Module):
        from kcircuits.edit.trace import trace_modules

        layers = trace_modules(lm.hf_model).layers
        home = next(i for i, layer in enumerate(layers) if any(m is module for m in layer.modules()))
        self.layers = layers[:home + 1] if layers[home] is module else layers[:home]
        self.kept: dict[str, object] = {}

    @contextmanager
    def __call__(self) -> Iterator[None]:
        layers = self.layers
        if not layers:
            yield
            return
        if "out" not in self.kept:
            def hook(mod, inputs, output):
                self.kept["out"] = output
            handle = layers[-1].register_forward_hook(hook, prepend=True)  # before δ is added there
            try:
                yield
            finally:
                handle.remove()
            return
        from kcircuits.edit.trace import layers_returning

        with layers_returning(layers, self.kept["out"]):
            yield


@dataclass
class _Pass:
    """One forward pass's inputs, every tensor on the model's device: each row's tokens from its subject's
    last (where δ is added) to its last scored one (``ids``; ``mask`` also covers the cached earlier
    positions; ``positions``), each row's request (``owner``, an index into the batch's), the scored
    positions (``score_row``/``score_col``), and the attention cache of the rows' earlier positions."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    owner: torch.Tensor
    score_row: torch.Tensor
    score_col: torch.Tensor
    cache: object


def _pass_inputs(lm: LoadedModel, rows: list[tuple[int, list[int], int, list[int]]], past_len: int,
                 cache) -> _Pass:
    """The :class:`_Pass` of ``rows`` (each: request, tokens, subject's last token's index, scored indices),
    their first ``past_len`` positions in ``cache``."""
    ends = [max(scored) + 1 for _, _, _, scored in rows]  # nothing after the last scored position matters
    n, width = len(rows), max(end - a for (_, _, a, _), end in zip(rows, ends, strict=True))
    ids = torch.full((n, width), lm.pad_token_id, dtype=torch.long)
    mask = torch.zeros(n, past_len + width, dtype=torch.long)
    positions = torch.zeros(n, width, dtype=torch.long)
    score_row, score_col = [], []
    for i, ((_, r, a, scored), end) in enumerate(zip(rows, ends, strict=True)):
        ids[i, :end - a] = torch.tensor(r[a:end], dtype=torch.long)
        mask[i, :a] = 1  # the row's own tokens before its subject's last (the cache's later ones are recomputed)
        mask[i, past_len:past_len + end - a] = 1
        positions[i] = torch.arange(a, a + width).clamp(max=end - 1)
        score_row += [i] * len(scored)
        score_col += [s - a for s in scored]
    dev = lm.device
    return _Pass(ids.to(dev), mask.to(dev), positions.to(dev), torch.tensor([j for j, _, _, _ in rows], device=dev),
                 torch.tensor(score_row, device=dev), torch.tensor(score_col, device=dev), cache)


def _cache_rows(cache, rows: torch.Tensor):
    """The attention cache ``cache`` of a batch cut to its ``rows`` (a new object), or None when its type
    offers no way to (then the caller runs those rows again)."""
    if isinstance(cache, tuple):  # the legacy format: per layer (keys, values, ...) [b, ...]
        return tuple(tuple(t[rows] for t in layer) for layer in cache)
    if not hasattr(cache, "batch_select_indices"):
        return None
    cut = copy.deepcopy(cache)
    try:
        cut.batch_select_indices(rows)
    except (AttributeError, NotImplementedError, ValueError, TypeError):
        return None
    return cut


def _optimise(lm: LoadedModel, module: torch.nn.Module, v0: torch.Tensor, plans: list[_ValueRows],
              st: ValueSettings) -> tuple[torch.Tensor, list[int], list[float]]:
    """:func:`optimised_values` of one batch of requests (``v0 [k, d_model]``, their rows ``plans``): the
    values, the steps each took and the loss each had when it ended (the last evaluated).

    The essence rows have one scored position each (often their first): with many requests they get a
    forward pass of their own, padded to their own width (see :data:`SPLIT_TOKENS`). A request that
    stops leaves the batch: later passes run only the rows of those still going."""
    dev, k = lm.device, len(plans)
    first = [0]
    for p in plans:
        first.append(first[-1] + len(p.rows))
    rows = [r for p in plans for r in p.rows]
    # positions before the subject's last token do not depend on δ: run once, their keys/values cached
    past_len = max(a for p in plans for a in p.subject)
    full = None
    if past_len:
        past_ids, past_real = _rows_batch([r[:past_len] for r in rows], lm.pad_token_id, dev, width=past_len)
        with torch.no_grad():
            full = _returned_cache(body(lm)(input_ids=past_ids, attention_mask=past_real, use_cache=True))
    cache_kw = _cache_keyword(body(lm))

    def cut(indices: list[int]):
        if full is None:
            return None
        got = _cache_rows(full, torch.tensor(indices, device=dev))
        if got is None:  # no way to cut this cache type: run those rows' earlier positions again
            ids, real = _rows_batch([rows[i][:past_len] for i in indices], lm.pad_token_id, dev, width=past_len)
            with torch.no_grad():
                got = _returned_cache(body(lm)(input_ids=ids, attention_mask=real, use_cache=True))
        return got

    def passes(going: list[int]) -> tuple[list[_Pass], tuple[torch.Tensor, ...]]:
        """The forward passes of the rows of ``going`` (the prefix rows, then the essence rows: in one pass,
        or in two when that saves :data:`SPLIT_TOKENS` padded positions or more) and the target tokens'
        ids, requests and weights."""
        main = [(j, plans[j].rows[r], plans[j].subject[r], plans[j].scored[r], first[j] + r)
                for j in going for r in range(len(plans[j].targets))]
        ess = [(j, plans[j].rows[-1], plans[j].subject[-1], plans[j].scored[-1], first[j + 1] - 1) for j in going]
        targets = [(t, j, 1.0 / (len(plans[j].targets[r]) * len(plans[j].targets)))  # mean over tokens, prefixes
                   for j in going for r in range(len(plans[j].targets)) for t in plans[j].targets[r]]
        tok = tuple(torch.tensor(col, device=dev) for col in zip(*targets, strict=True))
        width = [max(max(sc) + 1 - a for _, _, a, sc, _ in part) for part in (main, ess)]
        groups = [main, ess] if len(ess) * (width[0] - width[1]) >= SPLIT_TOKENS else [main + ess]
        return [_pass_inputs(lm, [x[:4] for x in g], past_len, cut([x[4] for x in g])) for g in groups], tok

    def run(p: _Pass, bottom: _Bottom) -> torch.Tensor:
        """log-probabilities ``[scored, vocab]`` at the pass's scored positions, δ added."""
        kw = {cache_kw: copy.deepcopy(p.cache)} if p.cache is not None else {}  # each pass appends to a copy
        with added_at(module, delta[p.owner], torch.zeros_like(p.owner)), bottom():
            hidden = body(lm)(input_ids=p.ids, attention_mask=p.mask, position_ids=p.positions,
                              use_cache=bool(kw), **kw).last_hidden_state
        return torch.log_softmax(unembed(hidden[p.score_row, p.score_col]).float(), -1)

    going = list(range(k))
    todo, (tok_id, tok_owner, tok_weight) = passes(going)
    bottoms = [_Bottom(lm, module) for _ in todo]
    unembed = lm.hf_model.get_output_embeddings()
    v0f = v0.float()
    v0_sq = v0f.norm(dim=1) ** 2
    limit = st.clamp_norm * v0f.norm(dim=1)
    stop = getattr(st, "stop_loss", STOP_LOSS)  # settings without the field: ROME's 5e-2
    delta = torch.zeros_like(v0f, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=st.lr)
    done = torch.zeros(k, dtype=torch.bool, device=dev)
    ran = [0] * k
    last = [float("nan")] * k
    base = None
    for _ in range(st.steps):
        opt.zero_grad()
        running = torch.tensor(going, device=dev)
        logp = torch.cat([run(p, bottom) for p, bottom in zip(todo, bottoms, strict=True)])
        n_tok = len(tok_id)  # the target tokens' log-probabilities, then the essence rows'
        nll_tok = -logp[torch.arange(n_tok, device=dev), tok_id] * tok_weight
        nll = torch.zeros(k, device=dev).index_add(0, tok_owner, nll_tok)[running]
        new = logp[n_tok:]
        if base is None:
            base = new.detach()  # δ = 0 at the first pass, every request in it: the unedited model's distribution
        kl = (new.exp() * (new - base[running])).sum(-1)  # KL(new ‖ base), as ROME's compute_v
        loss = nll + st.kl_factor * kl + st.weight_decay * delta[running].norm(dim=1) / v0_sq[running]
        for j, x in zip(going, loss.detach().tolist(), strict=True):
            last[j] = x
        finished = loss.detach() < stop
        done[running[finished]] = True
        if done.all():
            break
        for j in running[~finished].tolist():
            ran[j] += 1
        keep = delta.detach()[done].clone()
        loss[~finished].sum().backward()
        opt.step()
        with torch.no_grad():
            delta[done] = keep  # a finished request's δ stays as it was (Adam's momentum would move it)
            norms = delta.norm(dim=1)
            over = norms > limit
            delta[over] *= (limit[over] / norms[over])[:, None]
        if finished.any():  # the next passes run only the requests still going
            going = [j for j in going if not done[j]]
            todo, (tok_id, tok_owner, tok_weight) = passes(going)
            bottoms = [_Bottom(lm, module) for _ in todo]
    return (v0f + delta.detach()).to(v0.dtype), ran, last


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
