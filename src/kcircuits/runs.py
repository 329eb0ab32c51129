"""Run folders: every command writes one, self-contained, and a rerun with the same config reuses it.

Layout (DESIGN.md item 7): ``config.json`` (everything needed to reproduce), ``prompts.json``,
``scores.safetensors``, ``circuit.json``, ``metrics.json``, ``report.html``. Each file is written
atomically once its step finishes, so a crash midway keeps every finished step, and the rerun
picks up from the first missing file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kcircuits.errors import KcircuitsError
from kcircuits.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


#: Files a run folder holds before any result: a failed command that leaves only these leaves nothing.
BOOKKEEPING = frozenset({"config.json", "timings.json", "prompts.json", "steps.json"})

#: The run folders this process created (the CLI removes the empty ones after a user error).
CREATED: list[RunFolder] = []


def discard_empty_created(since: int = 0) -> None:
    """Remove the run folders this process created (from the ``since``-th on) that hold no result."""
    for folder in CREATED[since:]:
        folder.discard_if_empty()


class RunFolder:
    """A folder bound to one config; refuses to mix results of different configs."""

    def __init__(self, path: str | os.PathLike, config: dict):
        self.path = Path(path)
        self.config = config
        cfg_file = self.path / "config.json"
        if cfg_file.exists():
            try:
                old = read_json(cfg_file)
            except (json.JSONDecodeError, OSError, UnicodeDecodeError) as exc:
                raise KcircuitsError(
                    f"{cfg_file} cannot be read ({type(exc).__name__}), so it is unclear which run the folder "
                    "holds; pass another --out folder, or delete the folder to start over"
                ) from None
            if not isinstance(old, dict) or old.get("reproduce") != config.get("reproduce"):
                raise KcircuitsError(
                    f"{self.path} holds a run with a different configuration; pass another --out folder or delete it"
                )
        self.created = not self.path.exists()  # by this invocation: removed again if it fails with nothing to keep
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cfg_file, config)
            (self.path / "timings.json").unlink(missing_ok=True)  # the timings of this invocation only
            if self.created:
                CREATED.append(self)
        except OSError as exc:
            raise KcircuitsError(f"cannot write the run folder {self.path}: {exc.strerror or exc}; "
                                 "pass a writable --out folder") from None

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        """Record the wall and CPU seconds of ``step`` in ``timings.json`` (CPU: every thread of this process)."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.record_time(step, time.perf_counter() - wall, time.process_time() - cpu)

    def record_time(self, step: str, wall_s: float, cpu_s: float) -> None:
        """Add one step's seconds to ``timings.json`` (steps repeated in one run add up)."""
        path = self.path / "timings.json"
        try:
            timings = read_json(path) if path.exists() else {}
        except (json.JSONDecodeError, OSError):
            timings = {}
        steps = timings.setdefault("steps", {})
        entry = steps.setdefault(step, {"wall_s": 0.0, "cpu_s": 0.0})
        entry["wall_s"] = round(entry["wall_s"] + wall_s, 3)
        entry["cpu_s"] = round(entry["cpu_s"] + cpu_s, 3)
        timings["load_average_1min"] = round(os.getloadavg()[0], 2)
        atomic_write_json(path, timings)

    @contextmanager
    def removed_if_failed(self) -> Iterator[None]:
        """On a user error (:class:`KcircuitsError`), remove the folder if this invocation created it and it
        holds no result worth keeping (only config, timings and prompts): a failed command leaves no
        orphan folder. Scores (final or partial) keep the folder, so a rerun or ``kcircuits select``
        reuses them; an interrupt (Ctrl-C) keeps it too, to resume."""
        try:
            yield
        except KcircuitsError:
            self.discard_if_empty()
            raise

    def discard_if_empty(self) -> bool:
        """Remove the folder if this invocation created it and it holds only bookkeeping (no result)."""
        if not (self.created and self.path.is_dir()):
            return False
        if {p.name for p in self.path.iterdir()} <= BOOKKEEPING:
            shutil.rmtree(self.path, ignore_errors=True)
            return True
        return False

    def record_step(self, step: str, key: str) -> None:
        """Note in ``steps.json`` the step-cache key of a result in this folder (``kcircuits select``
        checks it before reusing the folder's scores)."""
        path = self.path / "steps.json"
        steps = read_json(path) if path.exists() else {}
        steps[step] = key
        atomic_write_json(path, steps)

    @staticmethod
    def recorded_step(folder: str | os.PathLike, step: str) -> str | None:
        """The step-cache key ``folder``'s ``steps.json`` records for ``step`` (None if none)."""
        path = Path(folder) / "steps.json"
        try:
            steps = read_json(path) if path.exists() else {}
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            return None
        return steps.get(step) if isinstance(steps, dict) else None

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    def write_json(self, name: str, data) -> Path:
        atomic_write_json(self.path / name, data)
        return self.path / name

    def read_json(self, name: str):
        return read_json(self.path / name)

    def write_tensors(self, name: str, tensors: dict, metadata: dict | None = None) -> Path:
        atomic_save_tensors(self.path / name, tensors, metadata)
        return self.path / name

    def read_tensors(self, name: str) -> dict:
        return load_tensors(self.path / name)


def default_run_dir(kind: str, parts: list[str], config: dict, root: str | os.PathLike = "runs") -> Path:
    safe = "_".join(p.replace("/", "-").replace(os.sep, "-") for p in parts if p)
    return Path(root) / f"{kind}_{safe}_{config_hash(config)}"
