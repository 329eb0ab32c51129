"""The step cache: each step's result stored under a key of exactly what it depends on.

A run folder is bound to a whole configuration, so any changed option gives a new folder. The
steps inside it depend on much less: the known-facts filter only on the model and the prompts,
the attribution scores on those plus the scoring and attribution settings, a circuit's
evaluation on the circuit and the test prompts. Each step looks here first, so a new circuit
size reuses the filtered prompts, the scores and the faithfulness curve, and a rerun with nothing
changed recomputes nothing.

Keys hash *inputs as computed*, not option names: the weights' fingerprint and dtype, the token
ids of the very prompt pairs a step runs on (:func:`pairs_digest`), the edges of the circuit
(:func:`circuit_digest`) and the settings that change the result (``hashed_dict``). Batch size and
device are left out: they change floating-point rounding, not what is computed. The kcircuits
version is part of every key.

Layout: ``<root>/<step>/<key>.json`` or ``.safetensors``, written atomically. The root is
``$KCIRCUITS_STEP_CACHE``, else ``<kcircuits cache>/steps`` (the user cache folder that also holds
the converted bundled model; see :func:`kcircuits.models.loader.cache_root`). ``--no-cache``
(``RunSettings.cache=False``) neither reads nor writes it; deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from kcircuits import __version__
from kcircuits.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json

STEP_CACHE_ENV = "KCIRCUITS_STEP_CACHE"


def step_cache_root() -> Path:
    """Where the step cache lives (see the module docstring)."""
    if os.environ.get(STEP_CACHE_ENV):
        return Path(os.environ[STEP_CACHE_ENV])
    from kcircuits.models.loader import cache_root

    return cache_root() / "steps"


def json_digest(value: Any, length: int = 20) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``value`` as sorted JSON (a value's identity in a key)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def step_key(step: str, **inputs: Any) -> str:
    """A 20-hex-digit key of a step and everything its result depends on (JSON-able values)."""
    return json_digest({"step": step, "kcircuits": __version__, **inputs})


def pairs_digest(pairs: list, fields: tuple[str, ...] = ("clean_ids", "corrupt_ids", "answer_ids",
                                                          "corrupt_answer_ids")) -> str:
    """Hash of the token ids of ``pairs`` (in order): what a step run on these prompts depends on.
    Token ids rather than texts, so a different tokenizer never reuses another's results."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([getattr(p, f) for f in fields]).encode())
    return h.hexdigest()[:20]


def circuit_digest(circuit) -> str:
    """Hash of a circuit's edges (names, sorted) and its graph's shape; scores do not enter."""
    g = circuit.graph
    edges = sorted(f"{s}->{d}" for s, d, _ in circuit.edge_list())
    shape = [g.n_layers, g.n_heads, g.n_kv_heads, g.grouped_kv]
    return hashlib.sha256(json.dumps([shape, edges]).encode()).hexdigest()[:20]


class StepCache:
    """Read and write step results by key; a cache with ``root=None`` is off (misses, stores nothing)."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = None if root is None else Path(root)

    @classmethod
    def default(cls, enabled: bool = True) -> StepCache:
        return cls(step_cache_root() if enabled else None)

    def _path(self, step: str, key: str, suffix: str) -> Path | None:
        return None if self.root is None else self.root / step / f"{key}{suffix}"

    def has(self, step: str, key: str, suffix: str = ".safetensors") -> bool:
        path = self._path(step, key, suffix)
        return path is not None and path.exists()

    def read_json(self, step: str, key: str) -> Any | None:
        """The stored JSON result, or None (missing, cache off, or unreadable: a damaged entry is a miss)."""
        path = self._path(step, key, ".json")
        if path is None or not path.exists():
            return None
        try:
            return read_json(path)
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            return None

    def write_json(self, step: str, key: str, data: Any) -> None:
        path = self._path(step, key, ".json")
        if path is not None:
            _quietly(lambda: atomic_write_json(path, data))

    def read_tensors(self, step: str, key: str) -> dict | None:
        path = self._path(step, key, ".safetensors")
        if path is None or not path.exists():
            return None
        try:
            return load_tensors(path)
        except Exception:  # noqa: BLE001  (a damaged entry is a miss, recomputed and rewritten)
            return None

    def write_tensors(self, step: str, key: str, tensors: dict) -> None:
        path = self._path(step, key, ".safetensors")
        if path is not None:
            _quietly(lambda: atomic_save_tensors(path, tensors))


def _quietly(write) -> None:
    """A cache that cannot be written (read-only home, full disk) costs time later, never the result now."""
    try:
        write()
    except OSError as exc:
        warnings.warn(f"kcircuits: the step cache could not be written ({exc.strerror or exc}); set "
                      f"{STEP_CACHE_ENV} to a writable folder, or pass --no-cache", stacklevel=3)
