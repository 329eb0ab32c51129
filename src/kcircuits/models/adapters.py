"""One adapter per architecture family: Hugging Face module tree -> :class:`ModelWeights`.

Which parameter rows and columns make up ``W_Q``, ``W_K``, ... is not decided here: it is read from
the family's :class:`~kcircuits.models.layout.ParameterLayout` (the one place that knows each
family's layout), by gathering the per-head blocks. An adapter adds only what the layout does not
say: norm kinds and epsilons, the attention scale, the activation, rotary embeddings, and whether
the block is parallel. Adding a family means one layout function and one function here. Each
adapter is verified against the HF forward pass on a tiny random config in ``tests/test_adapters.py``.

The tensors are *views* of the HF parameters (detached, so the engine never builds a graph into
the HF model), except where the layout makes a view impossible (GPT-NeoX's per-head interleaved
q/k/v): those are copies that :meth:`ModelWeights.refresh` recomputes after an in-place edit.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from transformers.activations import ACT2FN

from kcircuits.models.families import MODEL_TYPES, check_supported, supported_model_types
from kcircuits.models.layout import ParameterLayout, ParamBlock, gather, parameter_layout
from kcircuits.models.weights import MLP, Attention, Block, ModelWeights, Norm, Rotary

__all__ = ["MODEL_TYPES", "adapt", "check_supported", "live_weights", "supported_model_types"]

#: HF model -> weak references to the ModelWeights adapted from it that hold copies (see ``live_weights``)
_LIVE: weakref.WeakKeyDictionary[torch.nn.Module, list[weakref.ref[ModelWeights]]] = weakref.WeakKeyDictionary()


class _Reader:
    """Reads role tensors of a layout out of detached views of the HF parameters, remembering copies."""

    def __init__(self, hf: torch.nn.Module, layout: ParameterLayout):
        self.layout = layout
        self.params = {n: p.detach() for n, p in hf.named_parameters()}
        self.copies: list[tuple[torch.Tensor, Callable[[], torch.Tensor]]] = []

    def take(self, nodes: list[str], role: str) -> torch.Tensor | None:
        """The ``role`` blocks of ``nodes`` gathered into one ``[d_out, d_in]`` tensor (None if absent)."""
        blocks = self.layout.role_blocks([n for n in nodes if n in self.layout], role)
        if not blocks:
            return None
        tensor, is_view = gather(blocks, self.params)
        if not is_view:
            self.copies.append((tensor, self._recompute(blocks)))
        return tensor

    def _recompute(self, blocks: list[ParamBlock]) -> Callable[[], torch.Tensor]:
        return lambda: gather(blocks, self.params)[0]

    def norm(self, node: str, module: torch.nn.Module, kind: str) -> Norm:
        if kind == "layer":
            eps = module.eps
        else:
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        return Norm(kind, self.take([node], "norm_w"), self.take([node], "norm_b"), float(eps))

    def attention(self, layer: int, scale: float) -> Attention:
        lay, heads = self.layout, self.layout.heads(layer)
        return Attention(
            W_Q=self.take(heads, "W_Q"), W_K=self.take(heads, "W_K"), W_V=self.take(heads, "W_V"),
            W_O=self.take(heads, "W_O"), b_Q=self.take(heads, "b_Q"), b_K=self.take(heads, "b_K"),
            b_V=self.take(heads, "b_V"), b_O=self.take([f"a{layer}.b_O"], "b_O"),
            n_heads=lay.n_heads, n_kv_heads=lay.n_kv_heads, head_dim=lay.head_dim, scale=scale,
        )

    def mlp(self, layer: int, act: Callable[[torch.Tensor], torch.Tensor]) -> MLP:
        node = [f"m{layer}"]
        return MLP(W_in=self.take(node, "W_in"), b_in=self.take(node, "b_in"), W_gate=self.take(node, "W_gate"),
                   b_gate=self.take(node, "b_gate"), W_out=self.take(node, "W_out"), b_out=self.take(node, "b_out"),
                   act=act)

    def finish(self, family: str, rotary: Rotary | None, blocks: list[Block], ln_final: Norm) -> ModelWeights:
        return ModelWeights(family, self.take(["input"], "W_E"), self.take(["input"], "W_pos"), rotary, blocks,
                            ln_final, self.take(["logits"], "W_U"), self.take(["logits"], "b_U"), copies=self.copies)


def _rotary_from_hf(rotary_module: torch.nn.Module, dim: int, probe: torch.Tensor) -> Rotary:
    """Wrap an HF rotary module: it returns cos/sin ``[1, pos, dim]`` for ``position_ids``."""

    def cos_sin(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rotary_module(probe, positions[None, :])
        return cos[0], sin[0]

    return Rotary(dim=dim, cos_sin=cos_sin)


def _act(config) -> Callable[[torch.Tensor], torch.Tensor]:
    name = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    return ACT2FN[name]


def _gpt2(hf, r: _Reader) -> ModelWeights:
    cfg = hf.config
    e = r.layout.head_dim
    blocks = []
    for i, blk in enumerate(hf.transformer.h):
        scale = e**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(i + 1)
        blocks.append(Block(r.norm(f"a{i}.ln", blk.ln_1, "layer"), r.attention(i, scale),
                            r.norm(f"m{i}.ln", blk.ln_2, "layer"), r.mlp(i, _act(cfg)), parallel=False))
    return r.finish("gpt2", None, blocks, r.norm("ln_final", hf.transformer.ln_f, "layer"))


def _gpt_neox(hf, r: _Reader) -> ModelWeights:
    cfg, base = hf.config, hf.gpt_neox
    e = r.layout.head_dim
    blocks = [Block(r.norm(f"a{i}.ln", blk.input_layernorm, "layer"), r.attention(i, e**-0.5),
                    r.norm(f"m{i}.ln", blk.post_attention_layernorm, "layer"), r.mlp(i, _act(cfg)),
                    parallel=bool(cfg.use_parallel_residual))
              for i, blk in enumerate(base.layers)]
    rot_dim = base.layers[0].attention.rotary_ndims
    rotary = _rotary_from_hf(base.rotary_emb, rot_dim, base.embed_in.weight.detach()[:1])
    return r.finish("gpt_neox", rotary, blocks, r.norm("ln_final", base.final_layer_norm, "layer"))


def _llama(hf, r: _Reader) -> ModelWeights:
    cfg, base = hf.config, hf.model
    e = r.layout.head_dim
    blocks = [Block(r.norm(f"a{i}.ln", blk.input_layernorm, "rms"),
                    r.attention(i, float(getattr(blk.self_attn, "scaling", e**-0.5))),
                    r.norm(f"m{i}.ln", blk.post_attention_layernorm, "rms"), r.mlp(i, _act(cfg)), parallel=False)
              for i, blk in enumerate(base.layers)]
    rotary = _rotary_from_hf(base.rotary_emb, e, base.embed_tokens.weight.detach()[:1])
    return r.finish("llama", rotary, blocks, r.norm("ln_final", base.norm, "rms"))


_ADAPTERS: dict[str, Callable[..., ModelWeights]] = {"gpt2": _gpt2, "gpt_neox": _gpt_neox, "llama": _llama}


def adapt(hf_model: torch.nn.Module, layout: ParameterLayout | None = None) -> ModelWeights:
    """Map a loaded HF causal LM onto :class:`ModelWeights` (detached views of its parameters).

    ``layout``: the model's :func:`~kcircuits.models.layout.parameter_layout`, if already built.
    The HF model itself is not changed (no flag, mode or parameter)."""
    family = check_supported(hf_model.config)
    layout = layout or parameter_layout(hf_model)
    weights = _ADAPTERS[family](hf_model, _Reader(hf_model, layout))
    if weights.copies:
        _LIVE.setdefault(hf_model, []).append(weakref.ref(weights))
    return weights


def live_weights(hf_model: torch.nn.Module) -> list[ModelWeights]:
    """The still-alive ModelWeights adapted from ``hf_model`` that hold copies (they need
    :meth:`ModelWeights.refresh` after an in-place change of the HF parameters)."""
    refs = _LIVE.get(hf_model, [])
    alive = [w for w in (ref() for ref in refs) if w is not None]
    if hf_model in _LIVE:
        _LIVE[hf_model] = [weakref.ref(w) for w in alive]
    return alive
