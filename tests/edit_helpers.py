"""Helpers shared by the knowledge-editing tests: a small corpus for the key statistics and a direct
answer log-probability (no kcircuits code in between, so it can check the edits)."""

from __future__ import annotations

import torch

from kcircuits.data import load_dataset


def statistics_corpus(n: int = 80) -> list[str]:
    """``n`` filled country_capital templates (~700 tokens for 80): more tokens than the tiny models' MLP
    hidden sizes, so the key second moment C is invertible."""
    ds = load_dataset("country_capital")
    return [t.format(s["subject"]) + " " + s["object"] + "." for s in ds.samples for t in ds.prompt_templates][:n]


def answer_logprob(lm, text: str, answer: str) -> float:
    """log p(" " + answer | text) summed over the answer's tokens, from one plain forward pass."""
    ids = lm.tokenizer(text + " " + answer, add_special_tokens=False).input_ids
    n = len(lm.tokenizer(text, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(lm.hf_model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return float(sum(logp[i - 1, ids[i]] for i in range(n, len(ids))))
