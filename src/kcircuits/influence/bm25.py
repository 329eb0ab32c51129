"""Okapi BM25: the lexical baseline for influence, and a cheap pre-filter for large corpora.

Why here: "the documents that share rare words with the query" is the obvious alternative to an
influence function, so every benchmark reports it; and scoring every document of a big corpus by
influence costs one backward pass per document, so ``score(..., bm25_candidates=N)`` first keeps
each query's BM25 top-N and scores only their union.

score(q, d) = Σ_{w ∈ q} idf(w) · tf(w, d) · (k1 + 1) / (tf(w, d) + k1 · (1 − b + b · |d| / avgdl)),
idf(w) = ln(1 + (N − n(w) + 0.5) / (n(w) + 0.5)) (the non-negative Lucene form), with words the
lowercase runs of letters/digits (``\\w+``). Repeated query words count once per occurrence.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch

from kcircuits.errors import KcircuitsError

_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens: ``"Zorvath's city, Mirdane!"`` -> ``["zorvath", "s", "city", "mirdane"]``."""
    return _WORD.findall(text.lower())


class BM25:
    """An inverted index over ``texts``; scores are ``[n_docs]`` float tensors."""

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75):
        if len(texts) == 0:
            raise KcircuitsError("BM25 needs at least one document")
        self.k1, self.b = float(k1), float(b)
        self.n_docs = len(texts)
        self.doc_len = torch.zeros(self.n_docs)
        self.postings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        raw: dict[str, tuple[list[int], list[int]]] = {}
        for i, text in enumerate(texts):
            words = tokenize(text)
            self.doc_len[i] = len(words)
            for w, tf in Counter(words).items():
                docs, tfs = raw.setdefault(w, ([], []))
                docs.append(i)
                tfs.append(tf)
        for w, (docs, tfs) in raw.items():
            self.postings[w] = (torch.tensor(docs, dtype=torch.long), torch.tensor(tfs, dtype=torch.float32))
        self.avgdl = float(self.doc_len.mean()) or 1.0  # all-empty corpus: avoid 0/0, every score is 0 anyway

    def idf(self, word: str) -> float:
        n = len(self.postings[word][0]) if word in self.postings else 0
        return math.log(1.0 + (self.n_docs - n + 0.5) / (n + 0.5))

    def scores(self, query: str) -> torch.Tensor:
        """BM25 score of every document for one query string, ``[n_docs]``."""
        out = torch.zeros(self.n_docs)
        norm = self.k1 * (1.0 - self.b + self.b * self.doc_len / self.avgdl)  # [n_docs]
        for word in tokenize(query):
            if word not in self.postings:
                continue
            docs, tf = self.postings[word]
            out[docs] += self.idf(word) * tf * (self.k1 + 1.0) / (tf + norm[docs])
        return out

    def score_matrix(self, queries: Sequence[str]) -> torch.Tensor:
        """``[n_queries, n_docs]``."""
        return torch.stack([self.scores(q) for q in queries]) if queries else torch.zeros(0, self.n_docs)

    def top_k(self, queries: Sequence[str], k: int) -> torch.Tensor:
        """Indices of each query's ``k`` best documents, best first, ``[n_queries, min(k, n_docs)]`` long.
        Ties keep corpus order (a stable sort), so results are reproducible."""
        if k < 1:
            raise KcircuitsError("k must be >= 1")
        order = torch.sort(self.score_matrix(queries), dim=1, descending=True, stable=True).indices
        return order[:, : min(k, self.n_docs)]

    def candidates(self, queries: Sequence[str], k: int) -> torch.Tensor:
        """Sorted union of every query's top-``k`` documents (the influence pre-filter), ``[n_candidates]``."""
        return torch.unique(self.top_k(queries, k))
