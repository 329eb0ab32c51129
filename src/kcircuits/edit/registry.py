"""The registry of knowledge-edit methods: each method module of :mod:`kcircuits.edit` registers itself
here under its command-line name (``@register("rome", ...)``), and ``kcircuits edit``, the API and the
report find it here (:class:`kcircuits.registry.Registry`; the names are read without importing torch).

A method is ``apply(lm, requests, inputs: EditInputs) -> {param_name: Δ}``: a weight change, never
applied to the model by the method (:func:`kcircuits.models.edits.edited` applies and restores it).
``inputs.key_stats(layer)`` gives the layer's key second moment ``C [d_mlp, d_mlp]`` of the unedited
model, computed on first use and cached; methods that do not need it never call it.

This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kcircuits.registry import Registry


@dataclass(frozen=True)
class EditInputs:
    """Everything an edit method may use besides the model and the requests.

    Attributes:
        edit: :class:`~kcircuits.edit.settings.EditSettings` (layer, layers(), covariance weight, batch size).
        value: :class:`~kcircuits.edit.settings.ValueSettings` (ROME/MEMIT's value optimisation).
        finetune: :class:`~kcircuits.edit.settings.FinetuneOptions` (FT-L/FT-M).
        key_stats: ``key_stats(layer) -> C [d_mlp, d_mlp]`` of the unedited model.
        prefixes: the context prefixes keys are averaged over (the first is "").
    """

    edit: Any
    value: Any
    finetune: Any
    key_stats: Callable
    prefixes: tuple[str, ...] = ("",)


@dataclass(frozen=True)
class EditMethod:
    """One registered edit method: ``apply(lm, requests, inputs) -> deltas``; ``batched``:
    all requests are written at once (their subjects must not conflict), else one after another."""

    name: str
    summary: str
    apply: Callable
    batched: bool = False


REGISTRY: Registry[EditMethod] = Registry("edit method", "kcircuits.edit")


def register(name: str, summary: str, *, batched: bool = False) -> Callable:
    """Decorator: register ``apply`` as the edit method ``name``."""
    def wrap(apply: Callable) -> Callable:
        REGISTRY.add(name, EditMethod(name, summary, apply, batched), apply)
        return apply

    return wrap


def edit_method_names() -> tuple[str, ...]:
    """The registered edit methods' names, read without importing them (no torch)."""
    return REGISTRY.names()


def get_edit_method(name: str) -> EditMethod:
    """The edit method ``name``, or a one-line error listing the registered ones."""
    return REGISTRY.get(name)
