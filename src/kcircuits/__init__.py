"""kcircuits: find, measure, explain and edit knowledge circuits in transformer language models.

The API functions are reached lazily (``import kcircuits`` stays fast for the command line):
``kcircuits.discover``, ``kcircuits.select``, ``kcircuits.evaluate`` (:mod:`kcircuits.api`),
``kcircuits.load_model`` and the building blocks below.
"""

__version__ = "0.1.0"

from kcircuits.errors import KcircuitsError  # noqa: E402

#: Top-level names and where they live; each is imported on first use. ``discover`` and ``evaluate``
#: are modules of the same names made callable as the API functions (:mod:`kcircuits.api_module`).
_LAZY = {"discover": None, "evaluate": None, "select": "kcircuits.api", "prepare_prompts": "kcircuits.api",
         "load_model": "kcircuits.models", "Graph": "kcircuits.graph", "Circuit": "kcircuits.graph",
         "Engine": "kcircuits.engine", "attribute": "kcircuits.discover.eap"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(name)
    import importlib

    if _LAZY[name] is None:  # the callable module kcircuits.<name>
        return importlib.import_module(f"kcircuits.{name}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = ["KcircuitsError", "load_model", "discover", "select", "evaluate", "Graph", "Circuit", "Engine", "attribute"]
