"""The registry of circuit-discovery methods: every method module in :mod:`kcircuits.discover` registers
itself here under its command-line name, and ``api.discover``, the studies and the CLI find it here.

A method takes the engine, the discovery batches and the settings and returns either edge scores
``[n_src, n_dst]`` (then the circuit is selected from them by :class:`~kcircuits.settings.CircuitSize`)
or a circuit (methods that search for the circuit themselves, such as ACDC). Score methods may
accept ``resume`` / ``on_batch`` to checkpoint per batch (see :func:`kcircuits.pipeline.attribute_resumable`).

This module imports no torch: listing the methods for ``--help`` stays cheap until a method runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kcircuits.registry import Registry

OUTPUTS = ("scores", "circuit")


@dataclass(frozen=True)
class DiscoveryMethod:
    """One registered method. ``find(engine, batches, *, scoring, attribution, mean, progress, **extra)``."""

    name: str
    summary: str
    find: Callable
    output: str = "scores"
    resumable: bool = False  # accepts ``resume=`` and ``on_batch=`` (per-batch checkpoints)


REGISTRY: Registry[DiscoveryMethod] = Registry("discovery method", "kcircuits.discover")
METHODS: dict[str, DiscoveryMethod] = REGISTRY.entries


def register(name: str, summary: str, *, output: str = "scores", resumable: bool = False) -> Callable:
    """Decorator: register ``find`` as the discovery method ``name`` (once; a second registration is a bug)."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}")

    def wrap(find: Callable) -> Callable:
        REGISTRY.add(name, DiscoveryMethod(name, summary, find, output, resumable), find)
        return find

    return wrap


def load_all() -> dict[str, DiscoveryMethod]:
    """Import every module of :mod:`kcircuits.discover` (each registers its methods) and return the registry."""
    return REGISTRY.load_all()


def method_names() -> tuple[str, ...]:
    """The registered methods' names, without importing them (and torch) until one runs (see
    :meth:`kcircuits.registry.Registry.names`)."""
    return REGISTRY.names()


def declared_method_names() -> tuple[str, ...]:
    """The names in the literal ``@register("name", ...)`` calls of the method modules' source."""
    return REGISTRY.declared_names()


def get_method(name: str) -> DiscoveryMethod:
    """The method ``name``, or a one-line error listing the registered ones."""
    return REGISTRY.get(name)
