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
from pathlib import Path

from kcircuits.errors import KcircuitsError
from kcircuits.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


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
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cfg_file, config)
        except OSError as exc:
            raise KcircuitsError(f"cannot write the run folder {self.path}: {exc.strerror or exc}; "
                                 "pass a writable --out folder") from None

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
