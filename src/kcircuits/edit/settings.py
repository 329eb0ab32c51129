"""Typed settings of ``kcircuits trace`` (DESIGN.md decision 10), declared like :mod:`kcircuits.settings`.

Each field's default, validation, command-line flag and help live here once:
:func:`kcircuits.edit.api.trace` takes a :class:`TraceSettings` (or its fields by name),
:mod:`kcircuits.edit.cli` generates its options from it, and ``config.json``'s ``reproduce`` records
:func:`kcircuits.settings.hashed_dict` of it. ``device`` and ``batch_size`` change how a trace is
computed (memory, float rounding), not what: they stay out of the run folder's hash.

This module imports no torch, so ``kcircuits --help`` stays fast; that is also why the trace kinds
are spelled out here rather than read from :data:`kcircuits.edit.trace.KINDS` (a test checks that
the two agree).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kcircuits.settings import DTYPES, finite_number, one_of, option, require, set_field, whole_number

__all__ = ["TRACE_KINDS", "TraceSettings"]

#: the states causal tracing restores (the same names, in the same order, as kcircuits.edit.trace.KINDS)
TRACE_KINDS = ("hidden", "mlp", "attn")


def _kinds(value: Any) -> tuple[str, ...]:
    """The traced kinds as a tuple without repeats, each one of :data:`TRACE_KINDS` (a string is one kind)."""
    if isinstance(value, str):
        value = (value,)
    require(isinstance(value, Iterable), f"kinds must be a list of {', '.join(TRACE_KINDS)}, got {value!r}")
    kinds = tuple(dict.fromkeys(value))
    require(bool(kinds), f"kinds is empty: give some of {', '.join(TRACE_KINDS)}")
    for kind in kinds:
        one_of(kind, TRACE_KINDS, "trace kind")
    return kinds


@dataclass(frozen=True)
class TraceSettings:
    """``kcircuits trace``: which prompts of a relation are traced and how (see :func:`kcircuits.edit.api.trace`)."""

    noise: float = option(3.0, "noise on the subject's embeddings, in standard deviations of the embedding "
                          "matrix's entries (ROME: 3)", type=float)
    samples: int = option(10, "noise draws per prompt; every probability is their mean")
    window: int = option(10, "layers restored together for the MLP and attention traces, centred on each layer "
                         "(ROME: 10)")
    kinds: tuple = option(TRACE_KINDS, "states to trace, any of: hidden (residual stream), mlp (MLP outputs), "
                          "attn (attention outputs); default all three",
                          nargs="+", choices=TRACE_KINDS, metavar="KIND")
    max_prompts: int = option(32, "at most this many prompts of the relation, a seeded choice made after the "
                              "known-facts filter")
    known_only: bool = option(True, "trace only facts the model knows (answer within --known-k)",
                              invert="--all-facts", invert_help="trace every fact, also those the model gets wrong")
    known_k: int = option(1, "rank within which a fact counts as known")
    template: int = option(0, "index of the relation's prompt template to fill with each subject")
    seed: int = option(0, "seed of the noise and of the prompts' choice")
    batch_size: int = option(128, "rows per forward pass (restorations x noise draws; memory, not results)",
                             hashed=False)
    device: str | None = option("cpu", "cpu, cuda, cuda:N or auto", hashed=False)
    dtype: str = option("float32", "weights' dtype", choices=DTYPES)

    def __post_init__(self) -> None:
        set_field(self, "noise", finite_number(self.noise, "--noise"))
        require(self.noise >= 0, f"--noise must be >= 0, got {self.noise:g}")
        set_field(self, "samples", whole_number(self.samples, "--samples", 1))
        set_field(self, "window", whole_number(self.window, "--window", 1))
        set_field(self, "kinds", _kinds(self.kinds))
        set_field(self, "max_prompts", whole_number(self.max_prompts, "--max-prompts", 1))
        require(isinstance(self.known_only, bool), f"known_only must be True or False, got {self.known_only!r}")
        set_field(self, "known_k", whole_number(self.known_k, "--known-k", 1))
        set_field(self, "template", whole_number(self.template, "--template", 0))
        set_field(self, "seed", whole_number(self.seed, "--seed"))
        set_field(self, "batch_size", whole_number(self.batch_size, "--batch-size", 1))
        require(self.device is None or isinstance(self.device, str), f"device must be a string, got {self.device!r}")
        one_of(self.dtype, DTYPES, "--dtype")
