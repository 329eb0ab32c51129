"""Weight edits as deltas: apply and restore in one process, save and load as safetensors.

An edit (ROME, MEMIT, a fine-tuning step, a weight mask) is a set of deltas ``{param_name: Δ}``
with Δ of the parameter's stored shape (names as in ``model.named_parameters()``; a tied weight
may be named by any of its names). :func:`edited` adds them in place and restores the exact
original bytes on exit, so the edited model and the original can be compared in one process
without a second copy of the model. Everything that views the HF parameters sees the edit: the
engine's :class:`~kcircuits.models.weights.ModelWeights` are views, and the few tensors that are
copies (GPT-NeoX's gathered q/k/v) are refreshed on entry and exit. The weights' fingerprint
follows: an edited model hashes differently, the restored one to the original fingerprint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

import torch

from kcircuits.errors import KcircuitsError
from kcircuits.io import atomic_save_tensors, load_tensors
from kcircuits.models.adapters import live_weights
from kcircuits.models.fingerprint import hf_module, cached_fingerprint, remember_fingerprint

M = TypeVar("M")

#: marks a safetensors file as a kcircuits weight delta
FORMAT = "kcircuits-delta/1"


def _resolve(hf: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.nn.Parameter]:
    """Delta name -> the parameter it changes; checks names, shapes, and that no tensor is named twice."""
    params = dict(hf.named_parameters(remove_duplicate=False))
    out: dict[str, torch.nn.Parameter] = {}
    owner: dict[int, str] = {}
    for name, delta in deltas.items():
        if name not in params:
            raise KcircuitsError(f"the edit names an unknown parameter {name!r} "
                                 f"(examples: {', '.join(list(params)[:3])})")
        p = params[name]
        if tuple(delta.shape) != tuple(p.shape):
            raise KcircuitsError(f"the delta for {name} has shape {tuple(delta.shape)}; "
                                 f"the parameter is {tuple(p.shape)}")
        if id(p) in owner:
            raise KcircuitsError(f"{name} and {owner[id(p)]} are the same (tied) parameter; give one delta for it")
        owner[id(p)] = name
        out[name] = p
    return out


def _refresh(hf: torch.nn.Module) -> None:
    for weights in live_weights(hf):
        weights.refresh()


@contextmanager
def edited(model: M, deltas: Mapping[str, torch.Tensor]) -> Iterator[M]:
    """Add ``deltas`` to the model's parameters inside the block; restore the exact bytes after.

    Use it to compare an edited model with the original in one process, without a second copy::

        with edited(lm, {"model.layers.3.mlp.down_proj.weight": delta}):
            kcircuits.discover("country_capital", lm)

    Args:
        model: a :class:`~kcircuits.models.LoadedModel` or an HF module; it is yielded back.
        deltas: ``{param_name: Δ}``, names as in ``named_parameters()`` (a tied weight by any one of
            its names), each Δ of the parameter's shape (any dtype and device).

    The sum is formed in the wider of the two dtypes and rounded once to the parameter's dtype
    (a float32 delta on a bf16 model is not rounded before it is added). Restoring happens on
    normal exit and on an exception inside the block. Nested edits restore in reverse order.
    Memory: one copy of each edited parameter is held for the restore.
    """
    hf = hf_module(model)
    params = _resolve(hf, deltas)
    before = cached_fingerprint(hf)
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, p in params.items():
                saved[name] = p.detach().clone()
                p.copy_(p.detach() + deltas[name].detach().to(p.device))
        _refresh(hf)
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                params[name].copy_(original)
        _refresh(hf)
        if before is not None:
            remember_fingerprint(hf, before)


def save_delta(path: str | os.PathLike, deltas: Mapping[str, torch.Tensor], *, base_fingerprint: str | None = None,
               metadata: Mapping[str, str] | None = None) -> None:
    """Write deltas as one safetensors file (atomically), to share an edit or apply it later.

    Args:
        path: the ``.safetensors`` file written.
        deltas: ``{param_name: Δ}`` as :func:`edited` takes them (stored on the CPU).
        base_fingerprint: the fingerprint of the model they apply to (``LoadedModel.fingerprint``),
            recorded so a mismatch can be caught on load.
        metadata: more string metadata to record (read back by :func:`delta_metadata`).
    """
    meta = {"format": FORMAT, **(metadata or {})}
    if base_fingerprint is not None:
        meta["base_fingerprint"] = base_fingerprint
    # clones: safetensors refuses tensors that share memory (several views of one buffer)
    atomic_save_tensors(path, {k: v.detach().cpu().clone() for k, v in deltas.items()}, metadata=meta)


def load_delta(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The deltas :func:`save_delta` wrote, by parameter name (on the CPU), ready for :func:`edited`.

    Args:
        path: a file written by :func:`save_delta`.
    """
    return load_tensors(path)


def delta_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata :func:`save_delta` recorded (``format``, ``base_fingerprint`` if given, ...).

    Args:
        path: a file written by :func:`save_delta`.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})
