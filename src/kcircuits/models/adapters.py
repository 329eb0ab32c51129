"""One adapter per architecture family: Hugging Face module tree -> :class:`ModelWeights`.

Adding a family means writing one function here that finds the weights and says how they are
laid out; the engine and everything above it stay untouched. Each adapter is verified against
the HF forward pass on a tiny random config in ``tests/test_adapters.py``.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.activations import ACT2FN

from kcircuits.errors import KcircuitsError
from kcircuits.models.weights import MLP, Attention, Block, ModelWeights, Norm, Rotary

#: HF ``config.model_type`` -> adapter family.
MODEL_TYPES: dict[str, str] = {
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "smollm3": "llama",
}


def _layer_norm(module: torch.nn.Module) -> Norm:
    return Norm("layer", module.weight, module.bias, float(module.eps))


def _rms_norm(module: torch.nn.Module) -> Norm:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    return Norm("rms", module.weight, None, float(eps))


def _rotary_from_hf(rotary_module: torch.nn.Module, dim: int, probe: torch.Tensor) -> Rotary:
    """Wrap an HF rotary module: it returns cos/sin ``[1, pos, dim]`` for ``position_ids``."""

    def cos_sin(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rotary_module(probe, positions[None, :])
        return cos[0], sin[0]

    return Rotary(dim=dim, cos_sin=cos_sin)


def _act(config) -> Callable[[torch.Tensor], torch.Tensor]:
    name = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    return ACT2FN[name]


def _gpt2(hf) -> ModelWeights:
    cfg, tr = hf.config, hf.transformer
    d, H = cfg.n_embd, cfg.n_head
    e = d // H
    blocks = []
    for i, blk in enumerate(tr.h):
        # GPT-2's Conv1D stores [d_in, d_out]; the transpose is a view, not a copy.
        w_qkv, b_qkv = blk.attn.c_attn.weight.T, blk.attn.c_attn.bias
        scale = e**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(i + 1)
        attn = Attention(
            W_Q=w_qkv[:d], W_K=w_qkv[d : 2 * d], W_V=w_qkv[2 * d :], W_O=blk.attn.c_proj.weight.T,
            b_Q=b_qkv[:d], b_K=b_qkv[d : 2 * d], b_V=b_qkv[2 * d :], b_O=blk.attn.c_proj.bias,
            n_heads=H, n_kv_heads=H, head_dim=e, scale=scale,
        )
        mlp = MLP(W_in=blk.mlp.c_fc.weight.T, b_in=blk.mlp.c_fc.bias, W_out=blk.mlp.c_proj.weight.T,
                  b_out=blk.mlp.c_proj.bias, act=_act(cfg))
        blocks.append(Block(_layer_norm(blk.ln_1), attn, _layer_norm(blk.ln_2), mlp, parallel=False))
    return ModelWeights("gpt2", tr.wte.weight, tr.wpe.weight, None, blocks, _layer_norm(tr.ln_f),
                        hf.lm_head.weight, None)


def _gpt_neox(hf) -> ModelWeights:
    cfg, base = hf.config, hf.gpt_neox
    d, H = cfg.hidden_size, cfg.num_attention_heads
    e = d // H
    blocks = []
    for blk in base.layers:
        a = blk.attention
        # Fused qkv is laid out per head: rows [H, 3, e] -> q, k, v.
        w = a.query_key_value.weight.view(H, 3, e, d)
        b = a.query_key_value.bias
        b = b.view(H, 3, e) if b is not None else None
        attn = Attention(
            W_Q=w[:, 0].reshape(H * e, d), W_K=w[:, 1].reshape(H * e, d), W_V=w[:, 2].reshape(H * e, d),
            W_O=a.dense.weight,
            b_Q=None if b is None else b[:, 0].reshape(-1), b_K=None if b is None else b[:, 1].reshape(-1),
            b_V=None if b is None else b[:, 2].reshape(-1), b_O=a.dense.bias,
            n_heads=H, n_kv_heads=H, head_dim=e, scale=e**-0.5,
        )
        mlp = MLP(W_in=blk.mlp.dense_h_to_4h.weight, b_in=blk.mlp.dense_h_to_4h.bias,
                  W_out=blk.mlp.dense_4h_to_h.weight, b_out=blk.mlp.dense_4h_to_h.bias, act=_act(cfg))
        blocks.append(Block(_layer_norm(blk.input_layernorm), attn, _layer_norm(blk.post_attention_layernorm),
                            mlp, parallel=bool(cfg.use_parallel_residual)))
    rot_dim = base.layers[0].attention.rotary_ndims
    rotary = _rotary_from_hf(base.rotary_emb, rot_dim, base.embed_in.weight[:1])
    return ModelWeights("gpt_neox", base.embed_in.weight, None, rotary, blocks, _layer_norm(base.final_layer_norm),
                        hf.get_output_embeddings().weight, None)


def _llama(hf) -> ModelWeights:
    cfg, base = hf.config, hf.model
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    e = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    blocks = []
    for blk in base.layers:
        a = blk.self_attn
        attn = Attention(
            W_Q=a.q_proj.weight, W_K=a.k_proj.weight, W_V=a.v_proj.weight, W_O=a.o_proj.weight,
            b_Q=a.q_proj.bias, b_K=a.k_proj.bias, b_V=a.v_proj.bias, b_O=a.o_proj.bias,
            n_heads=H, n_kv_heads=K, head_dim=e, scale=float(getattr(a, "scaling", e**-0.5)),
        )
        m = blk.mlp
        mlp = MLP(W_in=m.up_proj.weight, b_in=m.up_proj.bias, W_gate=m.gate_proj.weight, b_gate=m.gate_proj.bias,
                  W_out=m.down_proj.weight, b_out=m.down_proj.bias, act=_act(cfg))
        blocks.append(Block(_rms_norm(blk.input_layernorm), attn, _rms_norm(blk.post_attention_layernorm),
                            mlp, parallel=False))
    rotary = _rotary_from_hf(base.rotary_emb, e, base.embed_tokens.weight[:1])
    return ModelWeights("llama", base.embed_tokens.weight, None, rotary, blocks, _rms_norm(base.norm),
                        hf.lm_head.weight, getattr(hf.lm_head, "bias", None))


_ADAPTERS: dict[str, Callable] = {"gpt2": _gpt2, "gpt_neox": _gpt_neox, "llama": _llama}


def supported_model_types() -> list[str]:
    return sorted(MODEL_TYPES)


def check_supported(config) -> str:
    """Return the adapter family for an HF config, or raise a clear error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    family = MODEL_TYPES.get(model_type)
    if family is None:
        raise KcircuitsError(
            f"unsupported architecture {model_type!r}: kcircuits supports the model types "
            f"{', '.join(supported_model_types())} (GPT-2, Pythia/GPT-NeoX, Llama/TinyLlama/SmolLM/Mistral/Qwen2)"
        )
    if family == "llama":
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
            raise KcircuitsError("sliding-window attention is not supported; load the model with use_sliding_window=False")
        if (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0) != 1.0:
            raise KcircuitsError("partial rotary embeddings are only supported for gpt_neox models")
    return family


def adapt(hf_model) -> ModelWeights:
    """Map a loaded HF causal LM onto :class:`ModelWeights` (views of its parameters)."""
    family = check_supported(hf_model.config)
    return _ADAPTERS[family](hf_model)
