"""Tiny models and random sequences for the influence-function tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kcircuits.influence.sequences import Sequences
from tests.model_helpers import tiny_hf


def rand_seqs(n: int, T: int, vocab: int = 31, seed: int = 0, min_len: int = 3) -> Sequences:
    """Right-padded random training documents of lengths in [min_len, T]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    lens = torch.randint(min_len, T + 1, (n,), generator=g)
    lens[0] = T
    att = (torch.arange(T)[None] < lens[:, None]).long()
    loss = att.float().clone()
    loss[:, 0] = 0
    return Sequences(ids, att, loss, [f"seq{i}" for i in range(n)])


def tiny_gpt2(seed: int = 0):
    return tiny_hf("gpt2", seed, n_embd=8, n_layer=2, n_head=2, vocab_size=31, n_inner=16)


def tiny_llama(seed: int = 0):
    return tiny_hf("llama", seed, hidden_size=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
                   num_hidden_layers=2, vocab_size=31)


class _Block(torch.nn.Module):
    def __init__(self, d_in: int, d_hidden: int | None, d_out: int, bias: bool):
        super().__init__()
        if d_hidden is None:
            self.proj = torch.nn.Linear(d_in, d_out, bias=bias)
        else:
            self.fc1 = torch.nn.Linear(d_in, d_hidden, bias=bias)
            self.fc2 = torch.nn.Linear(d_hidden, d_out, bias=bias)

    def forward(self, x):
        if hasattr(self, "proj"):
            return self.proj(x)
        return self.fc2(torch.tanh(self.fc1(x)))


class FeatureModel(torch.nn.Module):
    """``output = block(F[input_ids])`` with fixed token features ``F`` ``[vocab, d_in]``: the only
    parameters are the block's linear layers (named ``layers.0.*`` so they are tracked). With
    ``d_hidden=None`` it is one linear map (softmax regression under the LM loss: convex)."""

    def __init__(self, features: torch.Tensor, d_out: int, d_hidden: int | None = None, bias: bool = True,
                 seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.register_buffer("features", features)
        self.layers = torch.nn.ModuleList([_Block(features.shape[1], d_hidden, d_out, bias)])

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.layers[0](self.features[input_ids]))


class SquaredErrorObjective:
    """``L = ½ Σ_t mask[t] ‖out[t−1] − Y[input_ids[t]]‖²``: a linear-Gaussian model whose
    Gauss-Newton/Fisher is exactly Kronecker when output gradients are independent of inputs."""

    def __init__(self, targets: torch.Tensor):
        self.targets = targets

    def output(self, model, batch):
        return model(batch.input_ids, batch.attention_mask).logits

    def losses(self, out, batch):
        diff = out[:, :-1] - self.targets[batch.input_ids[:, 1:]]
        return 0.5 * ((diff ** 2).sum(-1) * batch.loss_mask[:, 1:]).sum(1)
