"""Shared test helpers: random prompt pairs for tiny models, and blank GPT-2s to build circuits by hand."""

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


def blank_gpt2(n_layer: int, n_head: int, d: int, vocab: int):
    """A GPT-2 with every weight zero except one-hot token embeddings (x4, tied unembedding) and unit
    norms: a blank slate on which a test writes the heads it wants, so the expected circuit is known."""
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=d, vocab_size=vocab, n_positions=8, resid_pdrop=0,
                     embd_pdrop=0, attn_pdrop=0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        tr = hf.transformer
        tr.wte.weight.copy_(torch.eye(vocab, d) * 4)  # one-hot token directions
        for blk in tr.h:
            blk.ln_1.weight.fill_(1.0)
            blk.ln_2.weight.fill_(1.0)
        tr.ln_f.weight.fill_(1.0)
    return hf
