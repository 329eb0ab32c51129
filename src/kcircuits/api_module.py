"""Modules that are also an API function: ``kcircuits.discover`` and ``kcircuits.evaluate``.

The method subpackage :mod:`kcircuits.discover` and the evaluator module :mod:`kcircuits.evaluate`
share their names with the API functions :func:`kcircuits.api.discover` and
:func:`kcircuits.api.evaluate`, and Python makes ``kcircuits.discover`` the subpackage as soon as
anything imports it. Rather than fight that (which breaks ``import kcircuits.discover.eap as eap``),
the two modules are made callable: ``kcircuits.discover(...)`` runs the API function, and their
``__doc__`` and ``__signature__`` are the function's, so ``help(kcircuits.discover)`` documents the
function (followed by the module's own docstring). The API module (and torch) is imported only when
the function is called or its documentation read.

This module imports no torch.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from collections.abc import Callable


class ApiModule(types.ModuleType):
    """A module whose calls, ``__doc__`` and ``__signature__`` are those of ``kcircuits.api.<__api__>``."""

    def _function(self) -> Callable:
        return getattr(importlib.import_module("kcircuits.api"), self.__dict__["__api__"])

    def __call__(self, *args, **kwargs):
        return self._function()(*args, **kwargs)

    @property
    def __doc__(self) -> str:  # type: ignore[override]
        own = self.__dict__.get("__doc__") or ""
        name = self.__dict__["__api__"]
        return (f"kcircuits.{name}(...) is kcircuits.api.{name}:\n\n{inspect.getdoc(self._function())}\n\n"
                f"The module {self.__name__}:\n\n{own}")

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self._function())


def make_callable(module_name: str, api_function: str) -> None:
    """Make the (already imported) module ``module_name`` call and document ``kcircuits.api.<api_function>``."""
    module = sys.modules[module_name]
    module.__dict__["__api__"] = api_function
    module.__class__ = ApiModule
