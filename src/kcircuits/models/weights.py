"""A uniform description of a decoder-only transformer's weights.

Every supported family (GPT-2, GPT-NeoX, Llama-like) is mapped onto these dataclasses by its
adapter, so the engine has one forward pass to get right. Linear weights follow the
``torch.nn.functional.linear`` convention ``[d_out, d_in]`` and are *views* of the Hugging Face
parameters wherever possible (no copy of the model).

Shapes use: d = d_model, H = query heads, K = key/value heads, e = head dim, f = MLP width, V = vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Norm:
    """LayerNorm (``bias`` may be None) or RMSNorm (``kind == "rms"``), applied over the last dim."""

    kind: str  # "layer" | "rms"
    weight: torch.Tensor  # [d]
    bias: torch.Tensor | None  # [d] or None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x̂`` (centred for LayerNorm, then scaled) ``[..., d]`` and ``1/σ`` or ``1/r`` ``[..., 1]``, in float32."""
        x32 = x.float()
        if self.kind == "layer":
            x32 = x32 - x32.mean(-1, keepdim=True)
        scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32 * scale, scale

    def backward(self, x: torch.Tensor, grad_out: torch.Tensor, weighted: bool = False) -> torch.Tensor:
        """Vector-Jacobian product of the norm at input ``x``: d(metric)/dx from d(metric)/d(norm(x)).

        ``x`` is ``[..., d]``; ``grad_out`` is ``[..., d]`` or ``[n, ..., d]``: several cotangents may
        share one input (leading dim n), which is how per-head q/k/v input gradients are obtained
        without materialising a residual copy per head. ``weighted=True`` means ``grad_out`` is
        already multiplied by the norm weight. Exact, in closed form, with g = grad_out ⊙ weight:
        LayerNorm: dx = (g - mean(g) - x̂·mean(g·x̂)) / σ;  RMSNorm: dx = (g - x̂·mean(g·x̂)) / r.
        """
        x_hat, scale = self.stats(x)
        g = grad_out.float() if weighted else grad_out.float() * self.weight.float()
        proj = (g * x_hat).mean(-1, keepdim=True)  # mean(g·x̂), [n, ..., 1] or [..., 1]
        if self.kind == "layer":
            g = g - g.mean(-1, keepdim=True)
        return (torch.addcmul(g, x_hat, proj, value=-1) * scale).to(grad_out.dtype)


@dataclass
class Attention:
    """Multi-head (or grouped-query) self-attention with optional rotary embedding."""

    W_Q: torch.Tensor  # [H*e, d]
    W_K: torch.Tensor  # [K*e, d]
    W_V: torch.Tensor  # [K*e, d]
    W_O: torch.Tensor  # [d, H*e]
    b_Q: torch.Tensor | None  # [H*e]
    b_K: torch.Tensor | None  # [K*e]
    b_V: torch.Tensor | None  # [K*e]
    b_O: torch.Tensor | None  # [d]
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float


@dataclass
class MLP:
    """Either ``W_out · act(W_in x + b_in) + b_out`` or the gated ``W_out · (act(W_gate x) ⊙ W_in x)``."""

    W_in: torch.Tensor  # [f, d]
    W_out: torch.Tensor  # [d, f]
    act: Callable[[torch.Tensor], torch.Tensor]
    b_in: torch.Tensor | None = None  # [f]
    b_out: torch.Tensor | None = None  # [d]
    W_gate: torch.Tensor | None = None  # [f, d]
    b_gate: torch.Tensor | None = None  # [f]

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's hidden activation ``[..., f]`` from its input ``x`` ``[..., d]``.

        This is what the output projection reads (after the nonlinearity and the gate): the
        "key" that ROME/MEMIT edit and that key statistics are collected over."""
        pre = F.linear(x, self.W_in, self.b_in)
        if self.W_gate is not None:
            return self.act(F.linear(x, self.W_gate, self.b_gate)) * pre
        return self.act(pre)

    def out_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MLP's output ``[..., d]`` from its hidden activation ``[..., f]`` (the "value" side)."""
        return F.linear(hidden, self.W_out, self.b_out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_from_hidden(self.hidden(x))


@dataclass
class Block:
    ln1: Norm
    attn: Attention
    ln2: Norm
    mlp: MLP
    parallel: bool  # GPT-NeoX style: attention and MLP both read the block's input


@dataclass
class Rotary:
    """Rotary position embedding of the first ``dim`` dims of each head (rotate-half convention).

    ``cos_sin(positions)`` returns ``cos, sin`` of shape ``[pos, dim]``; it wraps the HF model's own
    rotary module so every rope variant (linear, dynamic, llama3, yarn ...) is handled by HF.
    """

    dim: int
    cos_sin: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [batch, pos, heads, e]; cos/sin: [pos, dim]."""
        cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        half = self.dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


@dataclass
class ModelWeights:
    """Every weight the engine reads, as views of the HF parameters (detached: no gradient flows
    back into the HF model, whatever its ``requires_grad`` flags).

    A few tensors cannot be views (GPT-NeoX interleaves q/k/v per head, so ``W_Q`` gathered over
    heads is a copy); the adapter lists them in ``copies`` as ``(tensor, recompute)`` and
    :meth:`refresh` brings them up to date after an in-place change of the HF parameters
    (:func:`kcircuits.models.edits.edited` calls it).
    """

    family: str  # "gpt2" | "gpt_neox" | "llama"
    W_E: torch.Tensor  # [V, d]
    W_pos: torch.Tensor | None  # [n_ctx, d] (learned absolute positions) or None
    rotary: Rotary | None
    blocks: list[Block]
    ln_final: Norm
    W_U: torch.Tensor  # [V, d]
    b_U: torch.Tensor | None  # [V]
    copies: list[tuple[torch.Tensor, Callable[[], torch.Tensor]]] = field(default_factory=list, repr=False)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the tensors that are copies (not views) of the HF parameters, in place."""
        for tensor, recompute in self.copies:
            tensor.copy_(recompute())

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def n_heads(self) -> int:
        return self.blocks[0].attn.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.blocks[0].attn.n_kv_heads

    @property
    def d_model(self) -> int:
        return self.W_E.shape[1]

    @property
    def parallel(self) -> bool:
        return self.blocks[0].parallel

    def parameters(self) -> list[torch.Tensor]:
        """Every distinct tensor the engine reads (to freeze them for attribution)."""
        seen: dict[int, torch.Tensor] = {}

        def add(t: torch.Tensor | None) -> None:
            if t is not None:
                seen.setdefault(id(t), t)

        for t in (self.W_E, self.W_pos, self.W_U, self.b_U, self.ln_final.weight, self.ln_final.bias):
            add(t)
        for b in self.blocks:
            for t in (b.ln1.weight, b.ln1.bias, b.ln2.weight, b.ln2.bias):
                add(t)
            a, m = b.attn, b.mlp
            for t in (a.W_Q, a.W_K, a.W_V, a.W_O, a.b_Q, a.b_K, a.b_V, a.b_O):
                add(t)
            for t in (m.W_in, m.W_out, m.b_in, m.b_out, m.W_gate, m.b_gate):
                add(t)
        return list(seen.values())
