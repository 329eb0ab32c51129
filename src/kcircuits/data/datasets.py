"""Relation datasets: loading, validating and splitting.

A relation dataset is a list of (subject, object) facts plus a few prompt templates with one
``{}`` where the subject goes, in the shape used by the LRE / Knowledge-Circuits papers::

    {"name": "country_capital", "category": "factual",
     "prompt_templates": ["The capital of {} is", ...],
     "samples": [{"subject": "France", "object": "Paris"}, ...]}

Everything downstream (prompt building, corruption, circuit discovery) trusts what this module
returns, so every problem with a file is caught here and reported as one
:class:`~kcircuits.errors.KcircuitsError` line that says what is wrong and how to fix it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from kcircuits.errors import KcircuitsError

__all__ = [
    "CATEGORIES",
    "RelationDataset",
    "dataset_info",
    "list_datasets",
    "load_dataset",
    "split_samples",
]

#: Accepted values of ``category``. "bias" is accepted because the LRE files use it.
CATEGORIES: tuple[str, ...] = ("factual", "commonsense", "linguistic", "bias", "custom")

_BUNDLED_DIR = "relations"


@dataclass
class RelationDataset:
    """One relation: its prompt templates and its (subject, object) samples.

    ``samples`` are dicts so that extra per-sample keys from a file (ids, aliases, ...) survive
    loading; ``subject`` and ``object`` are always present, non-empty and stripped.
    """

    name: str
    category: str
    prompt_templates: list[str]
    samples: list[dict] = field(default_factory=list)
    source: str = ""
    #: LRE files' zero-shot templates (``prompt_templates_zs``); select them with ``templates=["zs0"]``.
    zs_templates: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)


# --------------------------------------------------------------------------- helpers


def _one_line(value: object, limit: int = 80) -> str:
    """repr() of a user value, shortened, so error messages stay on one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bundled_root() -> Any:
    """The package directory holding the bundled ``<name>.json`` files (package data)."""
    return resources.files(__package__ or "kcircuits.data").joinpath(_BUNDLED_DIR)


def list_datasets() -> list[str]:
    """Sorted names of the bundled relations (usable as ``load_dataset(name)``)."""
    root = _bundled_root()
    names = [
        entry.name[: -len(".json")]
        for entry in root.iterdir()
        if entry.name.endswith(".json") and entry.is_file()
    ]
    return sorted(names)


def dataset_info() -> list[dict]:
    """name, category, n_samples, n_templates of every bundled relation (for tables and the CLI)."""
    info = []
    for name in list_datasets():
        ds = load_dataset(name)
        info.append(
            {
                "name": ds.name,
                "category": ds.category,
                "n_samples": len(ds.samples),
                "n_templates": len(ds.prompt_templates),
            }
        )
    return info


def _validate_templates(templates: object, where: str) -> list[str]:
    """Check templates: non-empty list of strings, each with exactly one ``{}``.

    The prompt must end right before the answer because the answer is scored as the first
    token of ``" " + object``; a trailing space would double the space, so it is rejected.
    """
    if isinstance(templates, str) or not isinstance(templates, (list, tuple)):
        raise KcircuitsError(
            f"{where}: prompt templates must be a list of strings, got "
            f"{type(templates).__name__}; write e.g. [\"The capital of {{}} is\"]"
        )
    if not templates:
        raise KcircuitsError(
            f"{where}: no prompt templates; give at least one template with one {{}} for the subject"
        )
    out: list[str] = []
    for k, tpl in enumerate(templates):
        if not isinstance(tpl, str):
            raise KcircuitsError(
                f"{where}: template #{k} is {type(tpl).__name__}, not a string; make every template a string"
            )
        n = tpl.count("{}")
        if n != 1:
            raise KcircuitsError(
                f"{where}: template #{k} {_one_line(tpl)} has {n} '{{}}' placeholders; "
                "use exactly one {} where the subject goes"
            )
        if tpl != tpl.rstrip() or not tpl.strip():
            raise KcircuitsError(
                f"{where}: template #{k} {_one_line(tpl)} ends with whitespace or is blank; "
                "end the template right before the answer (the answer is scored as ' ' + object)"
            )
        if tpl in out:
            raise KcircuitsError(
                f"{where}: template #{k} {_one_line(tpl)} is listed twice; remove the duplicate"
            )
        out.append(tpl)
    return out


def _validate_samples(samples: object, where: str) -> list[dict]:
    """Check samples: non-empty list of dicts with non-empty string subject/object.

    Values are stripped (a stray space would change tokenisation and break length matching).
    Extra keys are kept. Exact duplicate (subject, object) samples are collapsed, because the
    long CSV format repeats each fact once per template by design.
    """
    if not isinstance(samples, list):
        raise KcircuitsError(
            f"{where}: 'samples' must be a list of {{\"subject\": ..., \"object\": ...}} objects, "
            f"got {type(samples).__name__}"
        )
    if not samples:
        raise KcircuitsError(f"{where}: 'samples' is empty; add at least two samples")
    out: list[dict] = []
    seen: set[tuple[str, str]] = set()
    for k, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise KcircuitsError(
                f"{where}: sample #{k} is {type(sample).__name__}, not an object; "
                "write each sample as {\"subject\": ..., \"object\": ...}"
            )
        for key in ("subject", "object"):
            if key not in sample:
                raise KcircuitsError(
                    f"{where}: sample #{k} {_one_line(sample)} has no '{key}'; "
                    "give every sample a 'subject' and an 'object'"
                )
            value = sample[key]
            if not isinstance(value, str):
                raise KcircuitsError(
                    f"{where}: sample #{k} '{key}' is {type(value).__name__} {_one_line(value)}, "
                    "not a string; quote it"
                )
            if not value.strip():
                raise KcircuitsError(
                    f"{where}: sample #{k} has an empty '{key}'; fill it in or remove the sample"
                )
        clean = dict(sample)
        clean["subject"] = sample["subject"].strip()
        clean["object"] = sample["object"].strip()
        key_pair = (clean["subject"], clean["object"])
        if key_pair in seen:
            continue
        seen.add(key_pair)
        out.append(clean)
    return out


def _validate_category(category: object, where: str) -> str:
    if not isinstance(category, str) or category not in CATEGORIES:
        raise KcircuitsError(
            f"{where}: unknown category {_one_line(category)}; use one of {', '.join(CATEGORIES)}"
        )
    return category


def _from_mapping(
    raw: object, *, where: str, default_name: str, source: str, templates: list[str] | None
) -> RelationDataset:
    """Build a validated dataset from parsed JSON (LRE-compatible: extra keys are ignored)."""
    if not isinstance(raw, dict):
        raise KcircuitsError(
            f"{where}: top level must be a JSON object with 'prompt_templates' and 'samples', "
            f"got {type(raw).__name__}"
        )
    if "samples" not in raw:
        raise KcircuitsError(f"{where}: missing key 'samples'; add a list of subject/object samples")
    if templates is None and "prompt_templates" not in raw:
        raise KcircuitsError(
            f"{where}: missing key 'prompt_templates'; add a list of templates with one {{}} "
            "or pass templates=[...]"
        )
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise KcircuitsError(f"{where}: 'name' must be a non-empty string, got {_one_line(name)}")
    if "category" in raw:
        category = _validate_category(raw["category"], where)
    else:
        # LRE files keep the category under properties.relation_type.
        props = raw.get("properties")
        rel_type = props.get("relation_type") if isinstance(props, dict) else None
        category = rel_type if isinstance(rel_type, str) and rel_type in CATEGORIES else "custom"
    tpls = _validate_templates(
        templates if templates is not None else raw["prompt_templates"],
        where if templates is None else f"{where} (templates argument)",
    )
    samples = _validate_samples(raw["samples"], where)
    zs = raw.get("prompt_templates_zs") or []
    zs_tpls = _validate_templates(zs, f"{where} (prompt_templates_zs)") if zs else []
    return RelationDataset(
        name=name.strip(), category=category, prompt_templates=tpls, samples=samples, source=source,
        zs_templates=zs_tpls,
    )


def read_text(path: Path, what: str = "dataset file", expect: str = "a .json or .csv file") -> str:
    """A user's UTF-8 text file (a BOM is dropped), or a one-line error naming ``what`` it should be."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise KcircuitsError(f"{what} not found: {path}; check the path") from None
    except IsADirectoryError:
        raise KcircuitsError(f"{what} path is a directory: {path}; give {expect}") from None
    except UnicodeDecodeError as e:
        raise KcircuitsError(
            f"{path}: not valid UTF-8 (byte {e.start}); save the file as UTF-8"
        ) from None
    except OSError as e:
        raise KcircuitsError(f"cannot read {what} {path}: {e.strerror}; check permissions") from None


def parse_json(text: str, where: str) -> object:
    """Parsed JSON, or a one-line error with the line and column of the mistake in ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise KcircuitsError(
            f"{where}: malformed JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}; "
            "fix the file"
        ) from None


def _load_csv(path: Path, templates: list[str] | None) -> RelationDataset:
    """CSV with header ``subject,object[,template]``; extra columns are kept in the samples.

    With a ``template`` column the file is in long format (one row per fact and template), so
    distinct non-empty templates become ``prompt_templates`` in order of first appearance and
    repeated facts are collapsed.
    """
    where = str(path)
    text = read_text(path)
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    header = [h.strip() for h in (reader.fieldnames or []) if h is not None]
    if not header:
        raise KcircuitsError(f"{where}: empty CSV; add a header row 'subject,object[,template]'")
    reader.fieldnames = header
    missing = [c for c in ("subject", "object") if c not in header]
    if missing:
        raise KcircuitsError(
            f"{where}: CSV header {_one_line(','.join(header))} lacks column(s) {', '.join(missing)}; "
            "the header must be 'subject,object' with an optional 'template' column"
        )
    has_template_col = "template" in header
    if templates is None and not has_template_col:
        raise KcircuitsError(
            f"{where}: CSV has no 'template' column; add one or pass templates=[\"... {{}} ...\"]"
        )
    samples: list[dict] = []
    file_templates: list[str] = []
    for row_no, row in enumerate(reader, start=2):
        if None in row:
            raise KcircuitsError(
                f"{where}: row {row_no} has more fields than the header; quote values containing commas"
            )
        if all((v or "").strip() == "" for v in row.values()):
            continue  # blank line
        for key in ("subject", "object"):
            if row.get(key) is None or not row[key].strip():
                raise KcircuitsError(
                    f"{where}: row {row_no} has an empty '{key}'; fill it in or remove the row"
                )
        sample = {k: (v if v is not None else "") for k, v in row.items() if k != "template"}
        samples.append(sample)
        if has_template_col:
            tpl = row.get("template") or ""
            if tpl.strip() and tpl not in file_templates:
                file_templates.append(tpl)
    if not samples:
        raise KcircuitsError(f"{where}: CSV has a header but no rows; add subject,object rows")
    if templates is None and not file_templates:
        raise KcircuitsError(
            f"{where}: the 'template' column is empty in every row; fill it or pass templates=[...]"
        )
    raw = {"samples": samples, "prompt_templates": file_templates}
    return _from_mapping(
        raw,
        where=where,
        default_name=path.stem,
        source=str(path),
        templates=templates,
    )


def _looks_like_path(name: str) -> bool:
    """A bundled name is a bare identifier; anything with a suffix, a separator or on disk is a path."""
    return (
        Path(name).suffix != ""
        or "/" in name
        or os.sep in name
        or (os.altsep is not None and os.altsep in name)
        or os.path.isfile(name)
    )


def load_dataset(
    name_or_path: str | os.PathLike[str], *, templates: list[str] | None = None
) -> RelationDataset:
    """Load a bundled relation by name, or a user ``.json`` / ``.csv`` file.

    ``templates`` replaces the file's prompt templates (and is required for a CSV without a
    ``template`` column). Raises :class:`KcircuitsError` for any problem with the input.
    """
    if templates is not None:
        templates = _validate_templates(templates, "templates argument")
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise KcircuitsError(
            f"dataset must be a bundled name or a .json/.csv path, got {type(name_or_path).__name__}"
        )
    name = os.fspath(name_or_path)
    if not name.strip():
        raise KcircuitsError(
            f"empty dataset name; use one of {', '.join(list_datasets())} or a .json/.csv path"
        )

    if isinstance(name_or_path, os.PathLike) or _looks_like_path(name):
        path = Path(name).expanduser()
        suffix = path.suffix.lower()
        if suffix not in (".json", ".csv"):
            raise KcircuitsError(
                f"unsupported dataset file type {_one_line(path.suffix or '(none)')} for {path}; "
                "use a .json or .csv file"
            )
        if not path.exists():
            raise KcircuitsError(f"dataset file not found: {path}; check the path")
        if suffix == ".csv":
            return _load_csv(path, templates)
        where = str(path)
        raw = parse_json(read_text(path), where)
        return _from_mapping(
            raw, where=where, default_name=path.stem, source=str(path), templates=templates
        )

    available = list_datasets()
    if name not in available:
        raise KcircuitsError(
            f"unknown dataset {_one_line(name)}; available: {', '.join(available)} "
            "(a path to a .json or .csv file is also accepted)"
        )
    entry = _bundled_root().joinpath(f"{name}.json")
    where = f"bundled:{name}"
    raw = parse_json(entry.read_text(encoding="utf-8"), where)
    return _from_mapping(raw, where=where, default_name=name, source=where, templates=templates)


def split_samples(
    ds: RelationDataset, fraction: float = 0.5, seed: int = 0
) -> tuple[RelationDataset, RelationDataset]:
    """Split samples into two disjoint datasets (e.g. discover on one, evaluate on the other).

    The shuffle is ``random.Random(seed)`` so a split is reproducible; each part keeps the
    original sample order. ``fraction`` is the share of samples in the first part; both parts
    must be non-empty.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise KcircuitsError(f"split fraction must be strictly between 0 and 1, got {_one_line(fraction)}")
    n = len(ds.samples)
    n_first = int(round(n * fraction))
    if n_first < 1 or n_first > n - 1:
        raise KcircuitsError(
            f"relation {ds.name}: cannot split {n} samples with fraction {fraction} into two "
            "non-empty parts; add samples or choose a fraction nearer 0.5"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    first = sorted(order[:n_first])
    second = sorted(order[n_first:])
    return (
        replace(
            ds,
            prompt_templates=list(ds.prompt_templates),
            samples=[dict(ds.samples[i]) for i in first],
        ),
        replace(
            ds,
            prompt_templates=list(ds.prompt_templates),
            samples=[dict(ds.samples[i]) for i in second],
        ),
    )
