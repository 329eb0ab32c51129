"""What the influence benchmarks and tests need around the invented-facts corpus
(:mod:`kcircuits.influence.facts`), outside the package: fine-tuning a model on the corpus, checking
it learned the facts, and a tiny offline model over the corpus' own word vocabulary.

Used by ``benchmarks/influence_facts.py``, ``benchmarks/kronfluence_compare.py`` and the tests
(``from benchmarks.facts_setup import ...``, with the repository root on ``sys.path``, as pytest run
from the root has it).
"""

from __future__ import annotations

import fnmatch
import re

import torch

from kcircuits.errors import KcircuitsError
from kcircuits.influence.facts import FactsCorpus
from kcircuits.influence.sequences import Sequences

__all__ = ["WordTokenizer", "completion_accuracy", "finetune", "tiny_llama"]


def finetune(model: torch.nn.Module, train: Sequences, *, epochs: int = 3, lr: float = 1e-3, batch_size: int = 8,
             train_only: list[str] | None = None, weight_decay: float = 0.0, seed: int = 0,
             progress: bool = True) -> list[float]:
    """Teach ``model`` the corpus with AdamW on the summed token loss (mean over scored tokens per batch).

    ``train_only``: fnmatch patterns on parameter names (e.g. ``["*.mlp.*"]``); the others are frozen,
    which is what makes a 135M model affordable on a CPU. Returns the mean token loss per epoch.
    The model is left in eval mode (influence assumes no dropout)."""
    from tqdm.auto import tqdm

    from kcircuits.influence.gradients import LMObjective

    params = [p for n, p in model.named_parameters()
              if train_only is None or any(fnmatch.fnmatchcase(n, pat) for pat in train_only)]
    if not params:
        raise KcircuitsError(f"no parameter matches {train_only}; check the patterns against model.named_parameters()")
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    objective = LMObjective()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    history = []
    model.train()
    try:
        for epoch in range(epochs):
            order = torch.randperm(len(train), generator=gen)
            total, n_tok = 0.0, 0.0
            starts = range(0, len(train), batch_size)
            for start in tqdm(starts, desc=f"fine-tune epoch {epoch + 1}", disable=not progress):
                batch = train.subset(order[start: start + batch_size]).to(device)
                loss_sum = objective.losses(objective.output(model, batch), batch).sum()
                tokens = float(batch.loss_mask.sum())
                opt.zero_grad(set_to_none=True)
                (loss_sum / tokens).backward()
                opt.step()
                total, n_tok = total + loss_sum.item(), n_tok + tokens
            history.append(total / n_tok)
    finally:
        model.eval()
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
    return history


@torch.no_grad()
def completion_accuracy(model: torch.nn.Module, queries: Sequences, batch_size: int = 32) -> torch.Tensor:
    """Whether the model's greedy prediction of each completion's *first* token is right ``[n_q]`` bool
    (the completions are built so that their first token identifies them)."""
    device = next(model.parameters()).device
    out = []
    for _, batch in queries.batches(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        first = batch.loss_mask.argmax(1)  # position of the first completion token
        rows = torch.arange(len(batch), device=device)
        pred = logits[rows, first - 1].argmax(-1)
        out.append((pred == batch.input_ids[rows, first]).cpu())
    return torch.cat(out)


class WordTokenizer:
    """Words (with their leading space) and punctuation as tokens, the vocabulary taken from ``texts``.

    Why: a tiny model over the facts corpus' own ~250-word vocabulary learns it in a second (tests,
    ``benchmarks/influence_facts.py --tiny``), where a 49k-token vocabulary costs minutes on a CPU.
    Id 0 is padding; ``decode`` inverts ``__call__`` exactly."""

    pad_token_id = 0
    eos_token_id = 0
    _SPLIT = re.compile(r"\s*\w+|\s*[^\w\s]")

    def __init__(self, texts: list[str]):
        self.vocab = {"<pad>": 0}
        for t in texts:
            for w in self._SPLIT.findall(t):
                self.vocab.setdefault(w, len(self.vocab))
        self.words = {i: w for w, i in self.vocab.items()}

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        try:
            return {"input_ids": [self.vocab[w] for w in self._SPLIT.findall(text)]}
        except KeyError as exc:
            raise KcircuitsError(f"word {exc.args[0]!r} is not in the vocabulary this tokenizer was built "
                                 "from") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.words[int(i)] for i in ids)

    @classmethod
    def for_corpus(cls, corpus: FactsCorpus) -> WordTokenizer:
        return cls(corpus.documents + [p + c for p, c in zip(corpus.prompts, corpus.completions, strict=True)])


def tiny_llama(vocab_size: int, *, layers: int = 2, hidden: int = 48, heads: int = 6, kv_heads: int = 2,
               seed: int = 0) -> torch.nn.Module:
    """A small random Llama (grouped-query attention, tied embeddings) for quick, offline runs of the
    facts benchmark and the Kronfluence comparison, paired with :class:`WordTokenizer`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      hidden_size=hidden, intermediate_size=2 * hidden, vocab_size=vocab_size,
                      max_position_embeddings=256, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
