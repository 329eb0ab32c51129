"""A registry of methods that live one file each in a package and register themselves on import.

Discovery methods (:mod:`kcircuits.discover`) and edit methods (:mod:`kcircuits.edit`) use it: a
new method is one file with a ``@register("name", ...)`` decorator, and the command line and the
report find it here. Listing the names does not import the method modules (nor torch): they are
read from the literal ``register("name", ...)`` calls in the modules' source, so ``--help`` stays
fast; a test checks that both ways agree.

This module imports no torch.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
from typing import Generic, TypeVar

from kcircuits.errors import KcircuitsError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind (``what``, e.g. "discovery method") registered by the modules of ``package``."""

    def __init__(self, what: str, package: str):
        self.what, self.package = what, package
        self.entries: dict[str, T] = {}
        self._functions: dict[str, object] = {}
        self._loaded = False
        self._declared: tuple[str, ...] | None = None  # the sources do not change while the process runs

    def add(self, name: str, entry: T, function: object) -> None:
        """Register ``entry`` (which wraps ``function``) under ``name``. Registering another function
        under a taken name is a bug; the same one again (a module imported twice) is not."""
        if name in self.entries and self._functions[name] is not function:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self.entries[name] = entry
        self._functions[name] = function

    def load_all(self) -> dict[str, T]:
        """Import every module of the package (each registers its entries) and return the entries."""
        if not self._loaded:
            pkg = importlib.import_module(self.package)
            for mod in pkgutil.iter_modules(pkg.__path__):
                if mod.name != "registry":
                    importlib.import_module(f"{self.package}.{mod.name}")
            self._loaded = True
        return self.entries

    def names(self) -> tuple[str, ...]:
        """The registered names, without importing the modules until one of them has been loaded."""
        return tuple(self.entries) if self._loaded else self.declared_names()

    def declared_names(self) -> tuple[str, ...]:
        """The names in the literal ``register("name", ...)`` calls of the package's module sources (read once:
        settings objects check their method against these names every time one is built)."""
        if self._declared is None:
            self._declared = self._scan()
        return self._declared

    def _scan(self) -> tuple[str, ...]:
        pkg = importlib.import_module(self.package)
        names: list[str] = []
        for mod in pkgutil.iter_modules(pkg.__path__):
            source = Path(pkg.__path__[0], f"{mod.name}.py")
            if mod.name == "registry" or not source.exists():
                continue
            for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
                func = getattr(node, "func", None)
                called = getattr(func, "id", None) or getattr(func, "attr", None)
                if (isinstance(node, ast.Call) and called == "register" and node.args
                        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                    names.append(node.args[0].value)
        return tuple(names)

    def get(self, name: str) -> T:
        """The entry ``name``, or a one-line error listing the known names."""
        entries = self.load_all()
        if name not in entries:
            raise KcircuitsError(f"unknown {self.what} {name!r}: use one of {', '.join(entries)}")
        return entries[name]

