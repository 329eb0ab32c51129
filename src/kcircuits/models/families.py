"""Which Hugging Face architectures kcircuits supports, and which adapter family each maps to.

Kept apart from :mod:`kcircuits.models.adapters` and :mod:`kcircuits.models.layout` so that both
can ask "which family is this?" without importing each other.
"""

from __future__ import annotations

from kcircuits.errors import KcircuitsError

#: HF ``config.model_type`` -> adapter family.
MODEL_TYPES: dict[str, str] = {
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "smollm3": "llama",
}


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
            raise KcircuitsError("sliding-window attention is not supported; "
                                 "load the model with use_sliding_window=False")
        if (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0) != 1.0:
            raise KcircuitsError("partial rotary embeddings are only supported for gpt_neox models")
    return family
