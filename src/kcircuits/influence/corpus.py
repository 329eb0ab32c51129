"""Read training corpora and influence queries from plain files.

Why plain files: the people asking "which documents taught the model this?" have their documents as
text dumps or JSONL exports, not as tokenised tensors. Accepted shapes:

* corpus: a ``.txt`` file (documents separated by one or more blank lines), a ``.jsonl`` file (one
  ``{"text": ..., "id": ...(optional), ...}`` object per line), or a folder of those (read
  recursively, in sorted path order so indices are reproducible);
* queries: a ``.jsonl`` file of ``{"prompt": ..., "completion": ..., "id"?: ..., "sources"?: [...]}``.

Every document keeps an ``id`` (given, or ``<file>:<line>``/``<file>#<n>``) and the remaining JSON
fields as metadata, so scores can be traced back to the source. Every bad input raises a
:class:`KcircuitsError` naming the file, the line and what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kcircuits.errors import KcircuitsError
from kcircuits.influence.sequences import Sequences

CORPUS_SUFFIXES = (".txt", ".jsonl")


@dataclass
class Document:
    """One training document or query with where it came from.

    ``text`` is the document (for queries: the prompt); ``completion`` is only set for queries.
    ``meta`` holds every other JSON field (e.g. ``sources`` of a query)."""

    text: str
    id: str
    source: str
    line: int
    completion: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading
def _corpus_files(path: Path) -> list[Path]:
    if not path.exists():
        raise KcircuitsError(f"{path}: no such file or folder; give a .txt/.jsonl file or a folder of them")
    if path.is_file():
        if path.suffix not in CORPUS_SUFFIXES:
            raise KcircuitsError(f"{path}: unsupported file type {path.suffix!r}; "
                                 "use .txt (blank-line separated) or .jsonl")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES)
    if not files:
        raise KcircuitsError(f"{path}: folder holds no .txt or .jsonl file")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise KcircuitsError(f"{path}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None


def _txt_documents(path: Path, rel: str) -> list[Document]:
    """Documents are runs of non-blank lines; ``line`` is the 1-based line the document starts on."""
    docs: list[Document] = []
    block: list[str] = []
    start = 0
    for lineno, line in enumerate(_read_text(path).splitlines() + [""], start=1):
        if line.strip():
            if not block:
                start = lineno
            block.append(line.rstrip())
        elif block:
            docs.append(Document("\n".join(block).strip(), f"{rel}#{len(docs)}", rel, start))
            block = []
    return docs


def _jsonl_objects(path: Path) -> Iterable[tuple[int, dict]]:
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KcircuitsError(f"{path}, line {lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
                                 "each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise KcircuitsError(f"{path}, line {lineno}: expected a JSON object like {{\"text\": ...}}, "
                                 f"got {type(obj).__name__}")
        yield lineno, obj


def _string_field(obj: dict, key: str, path: Path, lineno: int, example: str) -> str:
    if key not in obj:
        raise KcircuitsError(f"{path}, line {lineno}: missing key {key!r}; each line must look like {example}")
    value = obj[key]
    if not isinstance(value, str):
        raise KcircuitsError(f"{path}, line {lineno}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _doc_id(obj: dict, default: str) -> str:
    return str(obj["id"]) if obj.get("id") is not None else default


def _jsonl_documents(path: Path, rel: str) -> list[Document]:
    docs = []
    for lineno, obj in _jsonl_objects(path):
        text = _string_field(obj, "text", path, lineno, '{"text": "..."}')
        if not text.strip():
            continue  # an empty document has no token to learn from; skipping it is not an error
        meta = {k: v for k, v in obj.items() if k not in ("text", "id")}
        docs.append(Document(text, _doc_id(obj, f"{rel}:{lineno}"), rel, lineno, meta=meta))
    return docs


def read_documents(path: str | os.PathLike) -> list[Document]:
    """All documents of a corpus path (file or folder), in reading order; refuses an empty corpus."""
    root = Path(path)
    docs: list[Document] = []
    for f in _corpus_files(root):
        rel = str(f.relative_to(root)) if root.is_dir() else f.name
        docs += _txt_documents(f, rel) if f.suffix == ".txt" else _jsonl_documents(f, rel)
    if not docs:
        raise KcircuitsError(f"{path}: the corpus is empty (no non-blank document); add text or point at another path")
    return docs


def read_queries(path: str | os.PathLike) -> list[Document]:
    """Queries from a JSONL file of ``{"prompt", "completion"}`` objects (plus optional ``id``, ``sources``)."""
    p = Path(path)
    if not p.exists():
        raise KcircuitsError(f"{p}: no such query file; give a .jsonl file of {{\"prompt\": ..., \"completion\": ...}}")
    if not p.is_file():
        raise KcircuitsError(f"{p}: queries must be one .jsonl file, not a folder")
    example = '{"prompt": "...", "completion": " ..."}'
    out = []
    for lineno, obj in _jsonl_objects(p):
        prompt = _string_field(obj, "prompt", p, lineno, example)
        completion = _string_field(obj, "completion", p, lineno, example)
        if not completion:
            raise KcircuitsError(f"{p}, line {lineno}: empty completion; the completion is what the influence "
                                 "explains, give at least one token (e.g. \" Paris\")")
        meta = {k: v for k, v in obj.items() if k not in ("prompt", "completion", "id")}
        out.append(Document(prompt, _doc_id(obj, f"{p.name}:{lineno}"), p.name, lineno, completion, meta))
    if not out:
        raise KcircuitsError(f"{p}: no queries in the file; add lines like {example}")
    return out


# --------------------------------------------------------------------------- tokenising
def documents_to_sequences(docs: list[Document], tokenizer, max_length: int = 256) -> Sequences:
    """Training documents (``completion is None``) or queries into one :class:`Sequences`."""
    if max_length < 2:
        raise KcircuitsError("max_length must be >= 2 (one token to condition on, one to score)")
    if all(d.completion is not None for d in docs):
        return Sequences.from_pairs(tokenizer, [d.text for d in docs], [d.completion for d in docs], max_length)
    return Sequences.from_texts(tokenizer, [d.text for d in docs], max_length)


def load_corpus(path: str | os.PathLike, tokenizer, max_length: int = 256) -> Sequences:
    """Tokenise a corpus path (``.txt``, ``.jsonl`` or folder) into training sequences ``[n_docs, T]``,
    truncated to ``max_length`` tokens."""
    return documents_to_sequences(read_documents(path), tokenizer, max_length)


def load_queries(path: str | os.PathLike, tokenizer, max_length: int = 256) -> Sequences:
    """Tokenise a query JSONL file; only completion tokens are scored (``Sequences.from_pairs``)."""
    return documents_to_sequences(read_queries(path), tokenizer, max_length)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write rows as JSONL atomically (used by the facts generator and benchmarks)."""
    from kcircuits.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
