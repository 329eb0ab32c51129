"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ROME §2).

Where does a model recall a fact? Run the prompt clean and keep every hidden state; run it again with
the subject's token embeddings corrupted by Gaussian noise (``noise`` × the standard deviation of the
embedding matrix's entries, ``samples`` draws), so the model loses the answer; then restore one clean
state at a time in the corrupted run and see how much of the answer's probability comes back:

    indirect effect(kind, l, i) = p(answer | corrupted, state (kind, l, i) restored) - p(answer | corrupted)

Three kinds of state, at every layer ``l`` and position ``i`` (as in the paper):

* ``hidden``: the output of decoder layer ``l`` (the residual stream after block ``l``);
* ``mlp``: the MLP outputs of the ``window`` layers centred on ``l`` (clipped to the model);
* ``attn``: the attention outputs of the same window.

The layer with the largest mean MLP effect at the subject's last token is ROME's default edit layer
(:meth:`TraceResult.critical_layer`).

Everything runs on the Hugging Face module through forward hooks (:func:`trace_modules` knows where
each family keeps its embeddings, blocks, MLPs and attentions). Per prompt the clean run is done once;
every (restoration, noise sample) pair is one row of a batch, ``batch_size`` rows per forward pass.
States at positions before the subject are not run: a causal model computes them from uncorrupted
tokens only, so restoring them changes nothing (their probability is ``p_corrupt``).

Each row computes only what differs from the corrupted run with nothing restored (done once per
prompt, keeping every layer's output and the key/value cache): the positions from the first one it
restores (the cache holds the keys and values of those before; causal attention leaves them
corrupted) through the layers from the first one it restores (the layers before return the corrupted
run's output: their ``forward`` is shadowed for the pass). On SmolLM2's 5-token prompts that is a
fifth of the whole prompt through every layer, with the same numbers up to float rounding.

Shapes: ``L`` layers, ``P`` prompt positions, ``S`` noise samples, ``n`` subject tokens, ``d`` model width.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from kcircuits.data.prompts import answer_token_ids
from kcircuits.errors import KcircuitsError
from kcircuits.models.families import check_supported
from kcircuits.models.loader import LoadedModel, eval_mode

__all__ = [
    "GROUPS",
    "KINDS",
    "CleanRun",
    "CorruptedRun",
    "PromptTrace",
    "State",
    "SubjectPrompt",
    "TraceModules",
    "TraceResult",
    "causal_trace",
    "clean_run",
    "corrupted_run",
    "embedding_std",
    "group_positions",
    "layers_returning",
    "locate_subject",
    "restored_probs",
    "subject_noise",
    "trace_modules",
    "trace_restorations",
    "window_layers",
]

#: the kinds of state causal tracing restores
KINDS = ("hidden", "mlp", "attn")

#: ROME's position groups for averaging over prompts (:meth:`TraceResult.mean_effect`'s columns)
GROUPS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
          "further tokens", "last token")

#: one restored state: ``(kind, layer, position)``; for ``mlp``/``attn`` a single layer's output (no window)
State = tuple[str, int, int]

#: a prompt's token ids and the subject's token range ``[start, end)`` (None when not found)
_Span = tuple[list[int], tuple[int, int] | None]

#: family -> (base model attribute, embeddings, decoder layers, MLP and attention attributes of a layer)
_PATHS = {
    "gpt2": ("transformer", "wte", "h", "mlp", "attn"),
    "gpt_neox": ("gpt_neox", "embed_in", "layers", "mlp", "attention"),
    "llama": ("model", "embed_tokens", "layers", "mlp", "self_attn"),
}


# ----------------------------------------------------------------------------- modules
@dataclass(frozen=True)
class TraceModules:
    """The HF modules causal tracing hooks (what :func:`trace_modules` returns).

    family: the adapter family (``gpt2``, ``gpt_neox``, ``llama``); embed: the token-embedding module
    (the noise is added to its output); layers, mlps, attns: per layer the decoder block, its MLP and
    its attention, whose outputs are the ``hidden``, ``mlp`` and ``attn`` states.
    """

    family: str
    embed: torch.nn.Module
    layers: tuple[torch.nn.Module, ...]
    mlps: tuple[torch.nn.Module, ...]
    attns: tuple[torch.nn.Module, ...]

    @property
    def n_layers(self) -> int:
        """The number of decoder layers."""
        return len(self.layers)

    def module(self, kind: str, layer: int) -> torch.nn.Module:
        """The module whose output is state ``kind`` (one of :data:`KINDS`) of layer ``layer``."""
        return {"hidden": self.layers, "mlp": self.mlps, "attn": self.attns}[kind][layer]


def trace_modules(hf_model: torch.nn.Module) -> TraceModules:
    """Where a supported HF causal LM (``hf_model``) keeps its embeddings, blocks, MLPs and attentions.

    GPT-2: ``transformer.wte``, ``transformer.h[l].mlp/.attn``; GPT-NeoX/Pythia: ``gpt_neox.embed_in``,
    ``gpt_neox.layers[l].mlp/.attention`` (parallel residual: both read the block's input, which
    changes nothing here); Llama/Mistral/Qwen2/SmolLM: ``model.embed_tokens``,
    ``model.layers[l].mlp/.self_attn``. Raises :class:`KcircuitsError` for other architectures.
    """
    family = check_supported(hf_model.config)
    base_name, embed, blocks, mlp, attn = _PATHS[family]
    base = getattr(hf_model, base_name)
    layers = tuple(getattr(base, blocks))
    return TraceModules(family, getattr(base, embed), layers, tuple(getattr(b, mlp) for b in layers),
                        tuple(getattr(b, attn) for b in layers))


def embedding_std(modules: TraceModules) -> float:
    """Standard deviation of the entries of ``modules.embed``'s weight matrix (the unit of the noise)."""
    return float(modules.embed.weight.detach().float().std())


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The ``window`` layers centred on ``layer``, clipped to ``[0, n_layers)`` (ROME's convention:
    ``[layer - window // 2, layer + ceil(window / 2))``; ``window=1`` is the layer alone)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


# ----------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class SubjectPrompt:
    """A prompt tokenised for tracing (what :func:`locate_subject` returns).

    prompt, subject, answer: the texts; input_ids: the prompt's token ids as the model sees them
    (special tokens included), ``[P]``; subject_range: the subject's token positions ``[start, end)``;
    answer_id: the answer's first token; tokens: each token decoded, ``[P]``.
    """

    prompt: str
    subject: str
    answer: str
    input_ids: tuple[int, ...]
    subject_range: tuple[int, int]
    answer_id: int
    tokens: tuple[str, ...]

    @property
    def n_positions(self) -> int:
        """The prompt's number of tokens ``P``."""
        return len(self.input_ids)


def locate_subject(tokenizer: Any, prompt: str, subject: str, answer: str) -> SubjectPrompt:
    """Tokenise ``prompt`` with ``tokenizer`` and find the tokens of ``subject``'s first occurrence in it.

    The positions come from the tokenizer's character offsets: every token overlapping the subject's
    characters (so ``" France"`` counts although its space precedes the subject). Tokenizers without
    offsets fall back to counting the tokens of the text before and up to the subject. ``answer`` is
    scored on its first token as it follows the prompt (:func:`kcircuits.data.answer_token_ids`).
    Raises :class:`KcircuitsError` (one line) when the subject is not in the prompt.
    """
    if not subject or subject not in prompt:
        raise KcircuitsError(f"subject {subject!r} does not occur in the prompt {prompt!r}; "
                             "pass the subject exactly as it is written in the prompt")
    first = prompt.index(subject)
    chars = (first, first + len(subject))
    ids, span = _token_span(tokenizer, prompt, chars)
    if span is None:
        raise KcircuitsError(f"cannot find the tokens of subject {subject!r} in the prompt {prompt!r}")
    answer_ids = answer_token_ids(tokenizer, prompt, answer)
    if not answer_ids:
        raise KcircuitsError(f"the answer {answer!r} has no tokens after the prompt {prompt!r}")
    tokens = tuple(tokenizer.decode([i]) for i in ids)
    return SubjectPrompt(prompt, subject, answer, tuple(ids), span, int(answer_ids[0]), tokens)


def _token_span(tokenizer: Any, prompt: str, chars: tuple[int, int]) -> _Span:
    """The prompt's token ids and the token range ``[start, end)`` covering characters ``chars``."""
    try:
        enc = tokenizer(prompt, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError, ValueError):  # slow tokenizers have no offsets
        offsets = None
    if offsets is None:
        return _token_span_by_prefix(tokenizer, prompt, chars)
    ids = [int(i) for i in enc["input_ids"]]
    inside = [t for t, (s, e) in enumerate(offsets) if e > s and s < chars[1] and e > chars[0]]
    return ids, (inside[0], inside[-1] + 1) if inside else None


def _token_span_by_prefix(tokenizer: Any, prompt: str, chars: tuple[int, int]) -> _Span:
    """Fallback: the subject starts after the tokens of the text before it (without its trailing
    space, which joins the subject's first token) and ends after the tokens of the text up to its end."""
    ids = [int(i) for i in tokenizer(prompt).input_ids]
    start = len(tokenizer(prompt[: chars[0]].rstrip()).input_ids)
    end = len(tokenizer(prompt[: chars[1]]).input_ids)
    return ids, (start, end) if 0 <= start < end <= len(ids) else None


def _noise_seed(seed: int, sp: SubjectPrompt) -> int:
    """A seed for one prompt's noise from the run's seed and the prompt itself, so a prompt gets the
    same noise whatever else is traced with it."""
    digest = hashlib.sha256(f"{seed}\0{sp.prompt}\0{sp.subject}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def subject_noise(n_tokens: int, width: int, samples: int, sigma: float, seed: int) -> torch.Tensor:
    """Gaussian noise for the subject's ``n_tokens`` embeddings of ``width`` entries,
    ``[samples, n_tokens, width]`` float32 on the CPU, entries N(0, sigma^2), drawn from a generator
    seeded with ``seed`` (reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n_tokens, width, generator=generator) * sigma


# ----------------------------------------------------------------------------- runs
@dataclass
class CleanRun:
    """The uncorrupted run (:func:`clean_run`): p_clean, the answer's probability, and states, every
    state's value ``states[(kind, layer)]`` ``[P, d]``."""

    p_clean: float
    states: dict[tuple[str, int], torch.Tensor]


@contextmanager
def _hooked(hooks: Iterable[tuple[torch.nn.Module, Callable]]) -> Iterator[None]:
    """Register forward hooks for the duration of the block (removed even on error)."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _first(output: Any) -> torch.Tensor:
    """The hidden states in a module's output (a tensor, or the first element of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced, in the same structure."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _cache_kwarg(hf_model: torch.nn.Module) -> str:
    """The name under which ``hf_model``'s forward takes a key/value cache (``cache`` in recent
    transformers, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


def _forward(hf_model: torch.nn.Module, ids: torch.Tensor, cache: Any = None, keep_cache: bool = False) -> Any:
    """Run ``ids`` ``[rows, n]`` through ``hf_model`` as the positions after those ``cache`` holds (None:
    from position 0; the model takes the positions, rotary or learned, from the cache's length).
    Only the last position's logits are computed; ``keep_cache``: the output holds the cache."""
    kwargs: dict[str, Any] = {"use_cache": cache is not None or keep_cache}
    if cache is not None:
        kwargs[_cache_kwarg(hf_model)] = cache
    head = hf_model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    try:
        return hf_model(input_ids=ids, logits_to_keep=1, **kwargs)
    finally:
        head.remove()


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook on the unembedding: its input, the last position's hidden states
    ``[rows, 1, d]``, is a strided slice of ``[rows, n, d]``, which ``linear`` multiplies as a batched
    matmul against a per-row copy of the weight (about 20 times slower than one matmul on CPU);
    a contiguous copy makes it one ``[rows, d] @ [d, vocab]`` (same numbers up to float rounding)."""
    return (args[0].contiguous(), *args[1:])


def _last_prob(output: Any, answer_id: int) -> torch.Tensor:
    """p(answer) at the last position of each row of a forward's ``output`` -> ``[rows]`` float32."""
    return torch.softmax(output.logits[:, -1].float(), dim=-1)[:, answer_id]


def _answer_prob(hf_model: torch.nn.Module, ids: torch.Tensor, answer_id: int) -> torch.Tensor:
    """p(answer) at the last position of each row of ``ids`` ``[rows, P]`` -> ``[rows]`` float32."""
    return _last_prob(_forward(hf_model, ids), answer_id)


def _returned_cache(output: Any) -> Any | None:
    """The key/value cache in a forward's ``output`` when rows can be picked from it (a transformers
    ``Cache``); None otherwise (e.g. old-style tuples): then every row runs the whole prompt."""
    for name in ("cache", "past_key_values"):
        cache = getattr(output, name, None)
        if cache is not None:
            return cache if hasattr(cache, "batch_select_indices") else None
    return None


def _ids(model: LoadedModel, sp: SubjectPrompt) -> torch.Tensor:
    return torch.tensor([sp.input_ids], device=model.device)


def clean_run(model: LoadedModel, sp: SubjectPrompt, modules: TraceModules | None = None) -> CleanRun:
    """Run the clean prompt ``sp`` through ``model`` once and keep the output of every block, MLP and
    attention ``[P, d]`` (``modules``: :func:`trace_modules` of the model, computed when None)."""
    modules = trace_modules(model.hf_model) if modules is None else modules
    states: dict[tuple[str, int], torch.Tensor] = {}

    def keep(key: tuple[str, int]) -> Callable:
        def hook(module, inputs, output):
            states[key] = _first(output)[0].detach()
        return hook

    hooks = [(modules.module(kind, layer), keep((kind, layer)))
             for kind in KINDS for layer in range(modules.n_layers)]
    with torch.no_grad(), eval_mode(model.hf_model), _hooked(hooks):
        p_clean = float(_answer_prob(model.hf_model, _ids(model, sp), sp.answer_id)[0])
    return CleanRun(p_clean, states)


@dataclass
class CorruptedRun:
    """The corrupted run with nothing restored, one row per noise sample (:func:`corrupted_run`).

    probs: p(answer) per noise sample ``[S]`` float32; outputs: each decoder layer's output as the
    layer returned it, hidden states ``[S, P, d]`` (rows that restore nothing before layer ``f`` take
    layer ``f - 1``'s instead of computing it); cached: whether the model returns a key/value cache
    rows can be picked from, so that rows can skip the positions before the first one they restore.
    """

    probs: torch.Tensor
    outputs: list[Any]
    cached: bool


def _noise_hooks(modules: TraceModules, sp: SubjectPrompt, noise: torch.Tensor, positions: tuple[int, int]
                 ) -> list[tuple[torch.nn.Module, Callable]]:
    """The embedding hook adding ``noise`` ``[rows, n, d]`` to the subject's tokens in a run of the
    prompt's positions ``[first, last)`` (none when the subject is outside them)."""
    start, end = sp.subject_range
    first, last = max(start, positions[0]), min(end, positions[1])
    if first >= last:
        return []
    span = (first - positions[0], last - positions[0])
    return [(modules.embed, _noise_hook(noise[:, first - start:last - start], span))]


def _noisy_forward(model: LoadedModel, sp: SubjectPrompt, noise: torch.Tensor, modules: TraceModules, length: int,
                   hooks: Iterable[tuple[torch.nn.Module, Callable]] = ()) -> Any:
    """The corrupted prompt's first ``length`` positions, one row per noise sample of ``noise``
    ``[S, n, d]``, through the model (with ``hooks`` too); the output keeps the key/value cache."""
    ids = _ids(model, sp)[:, :length].expand(noise.shape[0], -1)
    with _hooked([*_noise_hooks(modules, sp, noise, (0, length)), *hooks]):
        return _forward(model.hf_model, ids, keep_cache=True)


def corrupted_run(model: LoadedModel, sp: SubjectPrompt, noise: torch.Tensor,
                  modules: TraceModules | None = None) -> CorruptedRun:
    """Run the prompt ``sp`` with the subject's embeddings corrupted by each sample of ``noise``
    ``[S, n, d]`` (nothing restored) and keep every decoder layer's output ``[S, P, d]``."""
    modules = trace_modules(model.hf_model) if modules is None else modules
    outputs: list[Any] = [None] * modules.n_layers

    def keep(layer: int) -> Callable:
        def hook(module, inputs, output):
            outputs[layer] = output
        return hook

    with torch.no_grad(), eval_mode(model.hf_model):
        out = _noisy_forward(model, sp, noise.to(model.device), modules, sp.n_positions,
                             [(block, keep(layer)) for layer, block in enumerate(modules.layers)])
    return CorruptedRun(_last_prob(out, sp.answer_id), outputs, _returned_cache(out) is not None)


def _prefix_cache(model: LoadedModel, sp: SubjectPrompt, noise: torch.Tensor, modules: TraceModules,
                  length: int) -> Any:
    """The key/value cache of the corrupted prompt's first ``length`` positions, one row per noise
    sample: what rows that start at position ``length`` attend to."""
    return _returned_cache(_noisy_forward(model, sp, noise, modules, length))


def _rows_cache(cache: Any, samples: torch.Tensor) -> Any:
    """A copy of ``cache`` (one row per noise sample) whose row ``k`` is sample ``samples[k]``'s
    ``[B]``; a copy because a forward pass extends the cache it is given."""
    rows = copy.deepcopy(cache)
    rows.batch_select_indices(samples)
    return rows


def _check_states(restorations: Sequence[Iterable[State]], n_layers: int, n_positions: int) -> list[tuple[State, ...]]:
    """The restorations as tuples, each state checked (a bad one is a programming error: ValueError)."""
    out = []
    for states in restorations:
        states = tuple(states)
        for kind, layer, pos in states:
            if kind not in KINDS or not 0 <= layer < n_layers or not 0 <= pos < n_positions:
                raise ValueError(f"invalid state {(kind, layer, pos)} for {n_layers} layers, {n_positions} positions")
        out.append(states)
    return out


#: where a restoration's rows start computing: (position i, layer f, the states restored at or after the subject)
_Start = tuple[int, int, tuple[State, ...]]


def _start(states: tuple[State, ...], subject_start: int) -> _Start | None:
    """Where the corrupted run with ``states`` restored first differs from the one with nothing
    restored; None when nowhere (its probability is the corrupted one).

    States before the subject are dropped: a causal model computes them from clean tokens only, so
    the corrupted run already holds their clean values. Every state before the first restored
    position ``i`` is the corrupted run's (causal attention), and so is every state of the layers
    before ``f``, the first layer restored (``mlp``, ``attn``: that layer's block computes again;
    ``hidden``: the block after it). So a row only runs positions ``[i, P)`` through layers ``[f, L)``.
    """
    kept = tuple(state for state in states if state[2] >= subject_start)
    if not kept:
        return None
    return (min(pos for _, _, pos in kept), min(layer + (kind == "hidden") for kind, layer, _ in kept), kept)


@dataclass(frozen=True)
class _Chunk:
    """Rows run in one forward pass (what :func:`_chunks` yields).

    position: the first position the rows run (a key/value cache holds the ones before; 0: the
    whole prompt); layer: the first layer they compute (the earlier ones return the corrupted
    run's output); restorations, samples: ``[B]`` each row's restoration and noise sample.
    """

    position: int
    layer: int
    restorations: torch.Tensor
    samples: torch.Tensor


def _chunks(starts: Sequence[_Start | None], samples: int, batch_size: int, cached: bool) -> Iterator[_Chunk]:
    """The rows (restoration × noise sample) of the restorations that restore something, sorted by
    where they start and cut into forward passes of at most ``batch_size`` rows that share their first
    position; each pass computes from the smallest first layer of its rows (its first row's), so rows
that start later compute a few layers more (with ``batch_size`` 128, about 10% more than each row
alone on SmolLM2). Without a cache every row runs from position 0."""
    def key(r: int) -> tuple[int, int]:
        position, layer, _ = starts[r]
        return (position if cached else 0), layer

    order = sorted((r for r, start in enumerate(starts) if start is not None), key=key)
    for position, group in itertools.groupby(order, key=lambda r: key(r)[0]):
        rows = [(r, s) for r in group for s in range(samples)]
        for first in range(0, len(rows), batch_size):
            restorations, noise_samples = zip(*rows[first:first + batch_size], strict=True)
            yield _Chunk(position, key(restorations[0])[1], torch.tensor(restorations), torch.tensor(noise_samples))


def _targets(restorations: Sequence[tuple[State, ...]]) -> dict[tuple[str, int], tuple[list[int], list[int]]]:
    """Per module ``(kind, layer)``, the (row, position) pairs to restore; row ``k`` restores
    ``restorations[k]``."""
    targets: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
    for row, states in enumerate(restorations):
        for kind, layer, pos in states:
            rows, positions = targets.setdefault((kind, layer), ([], []))
            rows.append(row)
            positions.append(pos)
    return targets


def _noise_hook(noise: torch.Tensor, span: tuple[int, int]) -> Callable:
    """Embedding hook adding ``noise`` ``[rows, n, d]`` to the positions ``span`` of its output."""
    def hook(module, inputs, output):
        out = output.clone()
        out[:, span[0]:span[1]] += noise.to(out.dtype)
        return out
    return hook


def _restore_hook(rows: list[int], positions: list[int], clean: torch.Tensor, first: int = 0) -> Callable:
    """Module hook putting the clean state ``clean[pos]`` back at each ``(row, pos)`` of a run of the
    prompt's positions from ``first`` on (``pos - first`` in its output)."""
    device = clean.device
    index = (torch.tensor(rows, device=device), torch.tensor(positions, device=device) - first)
    values = clean[torch.tensor(positions, device=device)]

    def hook(module, inputs, output):
        hidden = _first(output)
        return _with_first(output, hidden.index_put(index, values.to(hidden.dtype)))
    return hook


@contextmanager
def layers_returning(layers: Sequence[torch.nn.Module], output: Any) -> Iterator[None]:
    """Make ``layers`` (the first decoder layers) return ``output`` without computing; hooks still run.

    Args:
        layers: the decoder layers to skip.
        output: what each of them returns (the output a run already computed for the last one).

    A pass whose rows restore nothing before layer ``f`` gets from layers ``[0, f)`` what the corrupted
    run computed, so their ``forward`` is shadowed by an instance attribute for the duration of the
    block (one set earlier, e.g. by accelerate, is put back). Only the last one's output is used; the
    others return the same object, which the next one ignores.
    """
    def constant(*args: Any, **kwargs: Any) -> Any:
        return output

    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = constant
    try:
        yield
    finally:
        for layer, forward in zip(layers, saved, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def _rows_output(output: Any, samples: torch.Tensor, first: int) -> Any:
    """A layer's corrupted-run ``output`` (hidden states ``[S, P, d]``) for rows of noise samples
    ``samples`` ``[B]`` and the positions from ``first`` on: ``[B, P - first, d]``, same structure."""
    return _with_first(output, _first(output)[samples, first:])


def _chunk_probs(model: LoadedModel, sp: SubjectPrompt, modules: TraceModules, clean: CleanRun,
                 corrupted: CorruptedRun, noise: torch.Tensor, kept: Sequence[tuple[State, ...]], chunk: _Chunk,
                 cache: Any) -> torch.Tensor:
    """p(answer) ``[B]`` for one pass's rows, each restoring ``kept`` (its states at or after the subject).

    Runs positions ``[i, P)`` (``i``: ``chunk.position``; ``cache``: the corrupted run's keys and
    values before it, per row's noise sample) from layer ``chunk.layer`` on (the layers before return
    the corrupted run's output); adds the noise to the subject's tokens it runs when it computes
    from the embeddings, and puts back each row's clean states.
    """
    first, layer = chunk.position, chunk.layer
    samples = chunk.samples.to(model.device)
    hooks = _noise_hooks(modules, sp, noise[samples], (first, sp.n_positions)) if layer == 0 else []
    hooks += [(modules.module(*key), _restore_hook(rows, positions, clean.states[key], first))
              for key, (rows, positions) in _targets(kept).items()]
    skipped = _rows_output(corrupted.outputs[layer - 1], samples, first) if layer else None
    ids = _ids(model, sp)[:, first:].expand(len(samples), -1)
    with _hooked(hooks), layers_returning(modules.layers[:layer], skipped):
        return _last_prob(_forward(model.hf_model, ids, cache), sp.answer_id)


def restored_probs(model: LoadedModel, sp: SubjectPrompt, restorations: Sequence[Iterable[State]],
                   noise: torch.Tensor, *, clean: CleanRun | None = None, batch_size: int = 128,
                   modules: TraceModules | None = None, kv_cache: bool = True) -> torch.Tensor:
    """p(answer) in the corrupted run with each set of clean states restored, averaged over the noise.

    Each row (one restoration under one noise sample) computes only what differs from the corrupted
    run (:func:`_start`): the positions from the first one it restores, with the corrupted run's
    key/value cache of those before, through the layers from the first one it restores, taking the
    corrupted run's output of the layer before. A restoration of nothing (or only of states before
    the subject) is the corrupted run itself. The numbers are those of running every row through the
    whole model (up to float rounding).

    Args:
        model: the model (its HF module is run; nothing is changed).
        sp: the prompt (:func:`locate_subject`).
        restorations: R sets of states ``(kind, layer, position)`` restored together; an empty set
            gives the corrupted probability, every state (or just the last layer's ``hidden`` at the
            last position) the clean one. Each ``mlp``/``attn`` state is one layer's output.
        noise: ``[S, n, d]`` added to the subject's ``n`` token embeddings (:func:`subject_noise`).
        clean: the clean run's states (:func:`clean_run`; computed when None).
        batch_size: rows per forward pass (one row = one restoration under one noise sample).
        modules: :func:`trace_modules` of the model (computed when None).
        kv_cache: reuse the key/value cache for the positions before each row's first restored one
            (False, or a model that returns no usable cache: every row runs the whole prompt).

    Returns:
        ``[R]`` float64 on the CPU: per restoration, the mean over the S noise samples of p(answer).
    """
    modules = trace_modules(model.hf_model) if modules is None else modules
    clean = clean_run(model, sp, modules) if clean is None else clean
    checked = _check_states(restorations, modules.n_layers, sp.n_positions)
    start, end = sp.subject_range
    if noise.shape[1] != end - start:
        raise ValueError(f"noise covers {noise.shape[1]} tokens, the subject has {end - start}")
    samples = noise.shape[0]
    noise = noise.to(model.device)
    starts = [_start(states, start) for states in checked]
    sums = torch.zeros(len(checked), dtype=torch.float64)
    with torch.no_grad(), eval_mode(model.hf_model):
        corrupted = corrupted_run(model, sp, noise, modules)
        sums[[r for r, s in enumerate(starts) if s is None]] = float(corrupted.probs.double().sum())
        cached = kv_cache and corrupted.cached
        positions = {s[0] for s in starts if s is not None and s[0] > 0} if cached else set()
        prefixes = {i: _prefix_cache(model, sp, noise, modules, i) for i in positions}
        for chunk in _chunks(starts, samples, batch_size, cached):
            cache = _rows_cache(prefixes[chunk.position], chunk.samples.to(model.device)) if chunk.position else None
            kept = [starts[r][2] for r in chunk.restorations.tolist()]
            probs = _chunk_probs(model, sp, modules, clean, corrupted, noise, kept, chunk, cache)
            sums.index_add_(0, chunk.restorations, probs.double().cpu())
    return sums / samples


def trace_restorations(kind: str, n_layers: int, positions: Iterable[int], window: int
                       ) -> tuple[list[tuple[int, int]], list[tuple[State, ...]]]:
    """The grid of one ``kind``'s trace over ``n_layers`` layers and the given ``positions``: the cells
    ``(layer, position)`` and, per cell, the states restored (``hidden``: that block's output;
    ``mlp``/``attn``: the ``window`` layers around it, :func:`window_layers`, at that position)."""
    positions = list(positions)
    cells, restorations = [], []
    for layer in range(n_layers):
        layers = [layer] if kind == "hidden" else list(window_layers(layer, window, n_layers))
        for pos in positions:
            cells.append((layer, pos))
            restorations.append(tuple((kind, m, pos) for m in layers))
    return cells, restorations


# ----------------------------------------------------------------------------- results
def group_positions(subject_range: tuple[int, int], n_positions: int) -> tuple[list[int], ...]:
    """The positions of each of ROME's six :data:`GROUPS` in one prompt of ``n_positions`` tokens whose
    subject is at ``subject_range`` ``[start, end)``.

    As in ROME's averaging: a one-token subject is both its first and last token, and when the subject
    is followed by a single token that token is both the first subsequent and the last token; a group
    can be empty (no middle tokens, nothing after the subject).
    """
    start, end = subject_range
    last = n_positions - 1
    return ([start], list(range(start + 1, end - 1)), [end - 1], [end] if end <= last else [],
            list(range(end + 1, last)), [last])


@dataclass
class PromptTrace:
    """One prompt's trace.

    prompt, subject, answer: the texts; input_ids: the prompt's token ids ``[P]``; answer_id: the scored
    token; scores[kind]: ``[L, P]`` p(answer) with that cell's state(s) restored in the corrupted run.
    p_clean, p_corrupt: p(answer) in the clean run and (mean over the noise) in the corrupted run.
    subject_range: the subject's token positions ``[start, end)``; tokens: the decoded tokens ``[P]``.
    """

    prompt: str
    subject: str
    answer: str
    tokens: list[str]
    input_ids: list[int]
    subject_range: tuple[int, int]
    answer_id: int
    p_clean: float
    p_corrupt: float
    scores: dict[str, torch.Tensor]

    def effect(self, kind: str) -> torch.Tensor:
        """Indirect effects of ``kind`` ``[L, P]``: restored probability minus the corrupted one."""
        return self.scores[kind] - self.p_corrupt

    def to_json(self) -> dict:
        """Plain JSON (lists and numbers)."""
        return {"prompt": self.prompt, "subject": self.subject, "answer": self.answer, "tokens": self.tokens,
                "input_ids": self.input_ids, "subject_range": list(self.subject_range), "answer_id": self.answer_id,
                "p_clean": self.p_clean, "p_corrupt": self.p_corrupt,
                "scores": {k: v.tolist() for k, v in self.scores.items()}}

    @classmethod
    def from_json(cls, data: dict) -> PromptTrace:
        """The inverse of :meth:`to_json` (``data`` is its dict)."""
        scores = {k: torch.tensor(v, dtype=torch.float64) for k, v in data["scores"].items()}
        return cls(data["prompt"], data["subject"], data["answer"], list(data["tokens"]), list(data["input_ids"]),
                   tuple(data["subject_range"]), int(data["answer_id"]), float(data["p_clean"]),
                   float(data["p_corrupt"]), scores)


@dataclass
class TraceResult:
    """What :func:`causal_trace` returns: the per-prompt traces and the settings that produced them.

    prompts: one :class:`PromptTrace` per prompt; kinds: the traced kinds; n_layers: ``L``; noise: the
    multiple of the embeddings' standard deviation; noise_std: the absolute standard deviation of the
    noise that was added; samples, window, seed: as passed; groups: :data:`GROUPS`, the columns of
    :meth:`mean_effect`.
    """

    prompts: list[PromptTrace]
    kinds: tuple[str, ...]
    n_layers: int
    noise: float
    noise_std: float
    samples: int
    window: int
    seed: int
    groups: tuple[str, ...] = field(default=GROUPS)

    def mean_effect(self, kind: str) -> torch.Tensor:
        """``kind``'s indirect effects averaged over prompts by position group, ``[L, 6]`` (columns: :data:`GROUPS`).

        Prompts of different lengths are aligned the ROME way: every (prompt, position) in a group
        counts once (so the middle-token columns weigh prompts by their number of such tokens).
        A group no prompt has is NaN.
        """
        self._check_kind(kind)
        sums = torch.zeros(self.n_layers, len(GROUPS), dtype=torch.float64)
        counts = torch.zeros(len(GROUPS), dtype=torch.float64)
        for trace in self.prompts:
            effect = trace.effect(kind).double()
            for g, positions in enumerate(group_positions(trace.subject_range, len(trace.input_ids))):
                sums[:, g] += effect[:, positions].sum(dim=1)
                counts[g] += len(positions)
        return sums / counts  # 0/0 -> NaN for empty groups

    def critical_layer(self) -> int:
        """The layer with the largest mean MLP indirect effect at the subject's last token (ROME's
        default edit layer)."""
        if "mlp" not in self.kinds:
            raise KcircuitsError("the critical layer needs the MLP trace; trace with kinds including 'mlp'")
        return int(self.mean_effect("mlp")[:, GROUPS.index("last subject token")].argmax())

    def to_json(self) -> dict:
        """Plain JSON (NaN written as null): the settings, the averaged heatmaps, the critical layer
        (when the MLP was traced) and every prompt's trace."""
        out = {"kinds": list(self.kinds), "n_layers": self.n_layers, "noise": self.noise,
               "noise_std": self.noise_std, "samples": self.samples, "window": self.window, "seed": self.seed,
               "groups": list(self.groups),
               "mean_effect": {k: _nan_to_none(self.mean_effect(k).tolist()) for k in self.kinds},
               "prompts": [p.to_json() for p in self.prompts]}
        if "mlp" in self.kinds:
            out["critical_layer"] = self.critical_layer()
        return out

    @classmethod
    def from_json(cls, data: dict) -> TraceResult:
        """The inverse of :meth:`to_json` (``data`` is its dict; derived fields are recomputed)."""
        return cls([PromptTrace.from_json(p) for p in data["prompts"]], tuple(data["kinds"]), int(data["n_layers"]),
                   float(data["noise"]), float(data["noise_std"]), int(data["samples"]), int(data["window"]),
                   int(data["seed"]), tuple(data.get("groups", GROUPS)))

    def _check_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            raise KcircuitsError(f"kind {kind!r} was not traced; traced: {', '.join(self.kinds)}")


def _nan_to_none(rows: list[list[float]]) -> list[list[float | None]]:
    return [[None if math.isnan(x) else x for x in row] for row in rows]


# ----------------------------------------------------------------------------- the trace
def _check_args(prompts: Sequence[str], subjects: Sequence[str], answers: Sequence[str], kinds: Sequence[str],
                noise: float, samples: int, window: int, batch_size: int) -> tuple[str, ...]:
    if not (len(prompts) == len(subjects) == len(answers)) or not prompts:
        raise KcircuitsError(f"causal tracing needs as many subjects and answers as prompts (at least one); "
                             f"got {len(prompts)} prompts, {len(subjects)} subjects, {len(answers)} answers")
    kinds = tuple(dict.fromkeys(kinds))
    if not kinds or any(k not in KINDS for k in kinds):
        raise KcircuitsError(f"unknown trace kind(s) {list(kinds)}; use some of {', '.join(KINDS)}")
    if not noise >= 0 or samples < 1 or window < 1 or batch_size < 1:
        raise KcircuitsError(f"causal tracing needs noise >= 0, samples >= 1, window >= 1 and batch_size >= 1; "
                             f"got noise={noise}, samples={samples}, window={window}, batch_size={batch_size}")
    return kinds


def _trace_one(model: LoadedModel, modules: TraceModules, sp: SubjectPrompt, kinds: tuple[str, ...],
               sigma: float, samples: int, window: int, seed: int, batch_size: int) -> PromptTrace:
    """One prompt: the clean run, then the corrupted run with nothing restored and with every cell of
    every kind restored, all through one batched :func:`restored_probs` call."""
    clean = clean_run(model, sp, modules)
    start, end = sp.subject_range
    noise = subject_noise(end - start, modules.embed.weight.shape[1], samples, sigma, _noise_seed(seed, sp))
    grids = {k: trace_restorations(k, modules.n_layers, range(start, sp.n_positions), window) for k in kinds}
    restorations = [()] + [r for k in kinds for r in grids[k][1]]
    probs = restored_probs(model, sp, restorations, noise, clean=clean, batch_size=batch_size, modules=modules)
    p_corrupt, offset, scores = float(probs[0]), 1, {}
    for kind in kinds:
        cells = grids[kind][0]
        grid = torch.full((modules.n_layers, sp.n_positions), p_corrupt, dtype=torch.float64)
        layer_index, pos_index = (torch.tensor(x, dtype=torch.long) for x in zip(*cells, strict=True))
        grid[layer_index, pos_index] = probs[offset:offset + len(cells)]
        scores[kind], offset = grid, offset + len(cells)
    return PromptTrace(sp.prompt, sp.subject, sp.answer, list(sp.tokens), list(sp.input_ids), sp.subject_range,
                       sp.answer_id, clean.p_clean, p_corrupt, scores)


def causal_trace(model: LoadedModel, prompts: Sequence[str], subjects: Sequence[str], answers: Sequence[str], *,
                 noise: float = 3.0, samples: int = 10, window: int = 10, kinds: Sequence[str] = KINDS,
                 seed: int = 0, batch_size: int = 128, progress: bool = True) -> TraceResult:
    """Causal tracing of each prompt's answer (see the module docstring).

    Args:
        model: a loaded model with its tokenizer (any supported family; it is not changed).
        prompts: the prompts, each containing its subject verbatim (the first occurrence is corrupted).
        subjects: the subject of each prompt.
        answers: each prompt's answer; its first token (after ``" "``) is scored.
        noise: the noise's standard deviation as a multiple of the embedding entries' (ROME: 3).
        samples: noise draws per prompt; every probability is their mean.
        window: layers restored together for ``mlp``/``attn`` (centred on each layer; ROME: 10).
        kinds: which of ``hidden``, ``mlp``, ``attn`` to trace.
        seed: the noise seed (each prompt's noise is drawn from it and the prompt's text).
        batch_size: rows per forward pass (restorations × noise samples); bounds the memory.
        progress: show a progress bar over the prompts.

    Returns:
        A :class:`TraceResult`: per prompt ``[L, P]`` restored probabilities per kind, ``p_clean``,
        ``p_corrupt``; :meth:`~TraceResult.mean_effect` and :meth:`~TraceResult.critical_layer`.

    Cost per prompt: ``1 + len(kinds) * L * (P - subject start)`` restorations, each ``samples`` rows;
    a row runs only the positions and layers from its first restored state on (:func:`restored_probs`).
    """
    kinds = _check_args(prompts, subjects, answers, kinds, noise, samples, window, batch_size)
    if model.tokenizer is None:
        raise KcircuitsError("causal tracing needs the model's tokenizer; load the model with one")
    located = [locate_subject(model.tokenizer, p, s, a) for p, s, a in zip(prompts, subjects, answers, strict=True)]
    modules = trace_modules(model.hf_model)
    sigma = noise * embedding_std(modules)
    traces = [_trace_one(model, modules, sp, kinds, sigma, samples, window, seed, batch_size)
              for sp in tqdm(located, desc="causal tracing", unit="prompt", disable=not progress)]
    return TraceResult(traces, kinds, modules.n_layers, float(noise), sigma, samples, window, seed)
