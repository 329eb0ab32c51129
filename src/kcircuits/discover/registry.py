"""The registry of circuit-discovery methods: every method module in :mod:`kcircuits.discover` registers
itself here under its command-line name, and ``api.discover``, the studies and the CLI find it here.

A method takes the engine, the discovery batches and the settings and returns either edge scores
``[n_src, n_dst]`` (then the circuit is selected from them by :class:`~kcircuits.settings.CircuitSize`)
or a circuit (methods that search for the circuit themselves, such as ACDC). Score methods may
accept ``resume`` / ``on_batch`` to checkpoint per batch (see :func:`kcircuits.pipeline.attribute_resumable`).

This module imports no torch: listing the methods for ``--help`` stays cheap until a method runs.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from kcircuits.errors import KcircuitsError

OUTPUTS = ("scores", "circuit")


@dataclass(frozen=True)
class DiscoveryMethod:
    """One registered method. ``find(engine, batches, *, scoring, attribution, mean, progress, **extra)``."""

    name: str
    summary: str
    find: Callable
    output: str = "scores"
    resumable: bool = False  # accepts ``resume=`` and ``on_batch=`` (per-batch checkpoints)


METHODS: dict[str, DiscoveryMethod] = {}


def register(name: str, summary: str, *, output: str = "scores", resumable: bool = False) -> Callable:
    """Decorator: register ``find`` as the discovery method ``name`` (once; a second registration is a bug)."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}")

    def wrap(find: Callable) -> Callable:
        if name in METHODS and METHODS[name].find is not find:
            raise ValueError(f"discovery method {name!r} is registered twice")
        METHODS[name] = DiscoveryMethod(name, summary, find, output, resumable)
        return find

    return wrap


_loaded = False


def load_all() -> dict[str, DiscoveryMethod]:
    """Import every module of :mod:`kcircuits.discover` (each registers its methods) and return the registry."""
    global _loaded
    if not _loaded:
        import kcircuits.discover as pkg

        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name != "registry":
                importlib.import_module(f"kcircuits.discover.{mod.name}")
        _loaded = True
    return METHODS


def get_method(name: str) -> DiscoveryMethod:
    methods = load_all()
    if name not in methods:
        raise KcircuitsError(f"unknown discovery method {name!r}: use one of {', '.join(methods)}")
    return methods[name]
