"""kcircuits: find, measure, explain and edit knowledge circuits in transformer language models."""

__version__ = "0.1.0"

from kcircuits.errors import KcircuitsError  # noqa: E402


def __getattr__(name):
    # The heavier API is imported lazily so `import kcircuits` stays fast for the CLI's --help.
    if name in ("discover", "evaluate", "prepare_prompts"):
        from kcircuits import api

        return getattr(api, name)
    if name == "load_model":
        from kcircuits.models import load_model

        return load_model
    if name in ("Graph", "Circuit"):
        from kcircuits import graph

        return getattr(graph, name)
    if name == "Engine":
        from kcircuits.engine import Engine

        return Engine
    if name == "attribute":
        from kcircuits.discover.eap import attribute

        return attribute
    raise AttributeError(name)


__all__ = ["KcircuitsError", "load_model", "discover", "evaluate", "Graph", "Circuit", "Engine", "attribute"]
