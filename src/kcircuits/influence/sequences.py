"""Tokenised texts for influence functions: training documents and queries share one container.

Why one container: every influence quantity is a gradient of a *masked, summed token loss*
``L = -Σ_t loss_mask[t] · log p(input_ids[t] | input_ids[:t])``. For a training document every
real token after the first counts; for a query (prompt, completion) only the completion tokens
count, so ``f = -L`` is the log-probability of the completion given the prompt.

Shapes: ``n`` sequences, ``T`` positions, right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterator, Sequence

import torch

from kcircuits.errors import KcircuitsError


@dataclass
class Sequences:
    """``input_ids`` ``[n, T]`` long; ``attention_mask`` ``[n, T]`` (1 real, 0 pad);
    ``loss_mask`` ``[n, T]`` float (1 where token t is *predicted* and counts, i.e. the logits at
    position t-1 score ``input_ids[t]``; always 0 at t = 0 and on padding); ``texts``: the source
    strings (for reports and BM25); ``prompt_lengths``: tokens of the prompt part per sequence
    (0 for training documents)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    texts: list[str]
    prompt_lengths: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.input_ids.shape[0]
        if n == 0:
            raise KcircuitsError("no sequences: the corpus or query set is empty")
        if self.attention_mask.shape != self.input_ids.shape or self.loss_mask.shape != self.input_ids.shape:
            raise KcircuitsError("input_ids, attention_mask and loss_mask must have the same shape [n, T]")
        if len(self.texts) != n:
            raise KcircuitsError(f"{len(self.texts)} texts for {n} sequences")
        if not self.prompt_lengths:
            self.prompt_lengths = [0] * n
        if (self.loss_mask.sum(1) == 0).any():
            bad = int(torch.nonzero(self.loss_mask.sum(1) == 0)[0, 0])
            raise KcircuitsError(f"sequence {bad} has no token to score ({self.texts[bad]!r}); "
                                 "it needs at least two tokens")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_tokens(self) -> torch.Tensor:
        """Scored tokens per sequence ``[n]``."""
        return self.loss_mask.sum(1)

    def subset(self, index: Sequence[int] | torch.Tensor) -> Sequences:
        """The sequences at ``index`` (in that order), without the columns that are padding in all of them."""
        idx = torch.as_tensor(index, dtype=torch.long)
        keep = int(self.attention_mask[idx].sum(1).max())  # drop columns that are padding everywhere
        return Sequences(self.input_ids[idx, :keep], self.attention_mask[idx, :keep], self.loss_mask[idx, :keep],
                         [self.texts[i] for i in idx.tolist()], [self.prompt_lengths[i] for i in idx.tolist()])

    def batches(self, batch_size: int) -> Iterator[tuple[range, Sequences]]:
        """Consecutive slices of ``batch_size`` sequences: ``(indices, sub-Sequences)``; padding trimmed per
        batch."""
        if batch_size < 1:
            raise KcircuitsError("batch size must be >= 1")
        for start in range(0, len(self), batch_size):
            rows = range(start, min(start + batch_size, len(self)))
            yield rows, self.subset(list(rows))

    def to(self, device: torch.device | str) -> Sequences:
        """A copy with the tensors on ``device``."""
        return Sequences(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device),
                         self.texts, self.prompt_lengths)

    # ------------------------------------------------------------- construction
    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str], max_length: int = 256,
                   pad_id: int | None = None) -> Sequences:
        """Training documents: every token after the first is scored.

        Args:
            tokenizer: a Hugging Face tokenizer (no special tokens are added).
            texts: the documents.
            max_length: tokens kept per document (longer ones are truncated).
            pad_id: the padding token (default: the tokenizer's pad, else EOS, else 0).
        """
        return cls.from_pairs(tokenizer, ["" for _ in texts], list(texts), max_length, pad_id)

    @classmethod
    def from_pairs(cls, tokenizer, prompts: Sequence[str], completions: Sequence[str], max_length: int = 256,
                   pad_id: int | None = None) -> Sequences:
        """Queries: ``prompt + completion``; only the completion's tokens are scored.

        The prompt and completion are tokenised separately and concatenated, so the scored tokens
        are exactly the completion's tokens (no merge across the boundary). An empty prompt means a
        training document (its first token cannot be predicted and is not scored).

        Args:
            tokenizer: a Hugging Face tokenizer (no special tokens are added).
            prompts: the queries' prompts.
            completions: their completions, one per prompt, each non-empty (e.g. ``" Paris"``).
            max_length: tokens kept per sequence (prompt and completion together).
            pad_id: the padding token (default: the tokenizer's pad, else EOS, else 0).
        """
        if len(prompts) != len(completions):
            raise KcircuitsError(f"{len(prompts)} prompts for {len(completions)} completions")
        if len(prompts) == 0:
            raise KcircuitsError("no sequences: the corpus or query set is empty")
        if pad_id is None:
            pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        rows, starts, prompt_lengths = [], [], []
        for p, c in zip(prompts, completions, strict=True):
            if not c:
                raise KcircuitsError(f"empty completion for prompt {p!r}")
            p_ids = tokenizer(p, add_special_tokens=False)["input_ids"] if p else []
            c_ids = tokenizer(c, add_special_tokens=False)["input_ids"]
            ids = (p_ids + c_ids)[:max_length]
            rows.append(ids)
            starts.append(max(len(p_ids), 1))
            prompt_lengths.append(len(p_ids))
        T = max(len(r) for r in rows)
        n = len(rows)
        input_ids = torch.full((n, T), int(pad_id), dtype=torch.long)
        attention = torch.zeros(n, T, dtype=torch.long)
        loss = torch.zeros(n, T)
        for i, (ids, s) in enumerate(zip(rows, starts, strict=True)):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[i, : len(ids)] = 1
            loss[i, s: len(ids)] = 1.0
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        return cls(input_ids, attention, loss, texts, prompt_lengths)
