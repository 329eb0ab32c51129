"""Shared test helpers: random prompt pairs for tiny models."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kcircuits.batching import make_batch


@dataclass
class Pair:
    clean_ids: list
    corrupt_ids: list
    answer_ids: list
    corrupt_answer_ids: list
    clean_text: str = ""
    corrupt_text: str = ""


def random_pairs(n: int, vocab: int = 97, lengths=(5, 7, 6), seed: int = 0, answer_len: int = 1) -> list[Pair]:
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        p = lengths[i % len(lengths)]
        clean = torch.randint(0, vocab, (p,), generator=gen).tolist()
        corrupt = list(clean)
        corrupt[1] = (clean[1] + 1 + i) % vocab  # the "subject" token differs
        ans = torch.randint(0, vocab, (answer_len,), generator=gen).tolist()
        pairs.append(Pair(clean, corrupt, ans, [(ans[0] + 7) % vocab]))
    return pairs


def random_batch(n: int = 4, **kw):
    return make_batch(random_pairs(n, **kw), pad_id=0)
