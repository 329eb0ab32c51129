"""Prompt pairs -> right-padded tensors with the positions and tokens each metric reads.

Right padding needs no attention mask: with causal attention, real tokens never see the pads
that follow them, so every real position computes exactly what it would unpadded, and pad
positions receive zero gradient from metrics read at real positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from kcircuits.errors import KcircuitsError
from kcircuits.settings import ANSWER_SCORING  # the one list of answer scorings



@dataclass
class Batch:
    """One batch of clean/corrupt prompt pairs.

    clean, corrupt:      ``[b, p]`` token ids, right padded, same length pairwise.
    target_pos:          ``[b, T]`` positions whose next-token logits are scored.
    target_ids:          ``[b, T]`` the answer's tokens at those positions (T = 1 for first-token scoring).
    target_mask:         ``[b, T]`` False where an answer is shorter than T.
    corrupt_target_ids:  ``[b]`` first token of the corrupt answer (for the logit difference).
    real:                ``[b, p]`` True at real (non-pad) positions.
    """

    clean: torch.Tensor
    corrupt: torch.Tensor
    target_pos: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    corrupt_target_ids: torch.Tensor
    real: torch.Tensor

    def __len__(self) -> int:
        return self.clean.shape[0]

    def to(self, device) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def split(self, size: int) -> list[Batch]:
        """Consecutive sub-batches of at most ``size`` prompts (to bound per-pass memory)."""
        return [Batch(**{f.name: getattr(self, f.name)[i : i + size] for f in fields(self)})
                for i in range(0, len(self), max(1, size))]


def make_batch(pairs: Sequence, pad_id: int, answer_scoring: str = "first_token") -> Batch:
    """Build a :class:`Batch` from prompt pairs (objects with clean_ids, corrupt_ids, answer_ids, corrupt_answer_ids).

    With ``answer_scoring="full"`` the clean answer's tokens are appended (teacher forcing) to both
    the clean and the corrupt prompt, and every answer token is scored.
    """
    if answer_scoring not in ANSWER_SCORING:
        raise KcircuitsError(f"unknown answer scoring {answer_scoring!r}: use one of {', '.join(ANSWER_SCORING)}")
    if not pairs:
        raise KcircuitsError("empty batch: no prompt pairs to evaluate")
    seqs_clean, seqs_corrupt, positions, targets = [], [], [], []
    for pair in pairs:
        if len(pair.clean_ids) != len(pair.corrupt_ids):
            raise KcircuitsError(
                f"clean and corrupt prompts differ in token length "
                f"({len(pair.clean_ids)} vs {len(pair.corrupt_ids)}): "
                f"{getattr(pair, 'clean_text', '')!r} / {getattr(pair, 'corrupt_text', '')!r}; "
                "patching needs equal lengths"
            )
        if not pair.answer_ids or not pair.corrupt_answer_ids:
            raise KcircuitsError(f"empty answer tokens for {getattr(pair, 'clean_text', '')!r}")
        n = len(pair.clean_ids)
        answer = list(pair.answer_ids) if answer_scoring == "full" else [pair.answer_ids[0]]
        extra = answer[:-1]
        seqs_clean.append(list(pair.clean_ids) + extra)
        seqs_corrupt.append(list(pair.corrupt_ids) + extra)
        positions.append([n - 1 + i for i in range(len(answer))])
        targets.append(answer)
    b, p, T = len(pairs), max(map(len, seqs_clean)), max(map(len, targets))
    clean = torch.full((b, p), pad_id, dtype=torch.long)
    corrupt = torch.full((b, p), pad_id, dtype=torch.long)
    real = torch.zeros(b, p, dtype=torch.bool)
    target_pos = torch.zeros(b, T, dtype=torch.long)
    target_ids = torch.zeros(b, T, dtype=torch.long)
    target_mask = torch.zeros(b, T, dtype=torch.bool)
    for i in range(b):
        n = len(seqs_clean[i])
        clean[i, :n] = torch.tensor(seqs_clean[i])
        corrupt[i, :n] = torch.tensor(seqs_corrupt[i])
        real[i, :n] = True
        t = len(targets[i])
        target_pos[i, :t] = torch.tensor(positions[i])
        target_pos[i, t:] = positions[i][-1]
        target_ids[i, :t] = torch.tensor(targets[i])
        target_mask[i, :t] = True
    corrupt_first = torch.tensor([pair.corrupt_answer_ids[0] for pair in pairs], dtype=torch.long)
    return Batch(clean, corrupt, target_pos, target_ids, target_mask, corrupt_first, real)


def make_batches(pairs: Sequence, pad_id: int, batch_size: int, answer_scoring: str = "first_token") -> list[Batch]:
    if batch_size < 1:
        raise KcircuitsError("batch size must be >= 1")
    return [make_batch(pairs[i : i + batch_size], pad_id, answer_scoring) for i in range(0, len(pairs), batch_size)]
