"""Model loading and per-family adapters."""

from kcircuits.models.adapters import MODEL_TYPES, supported_model_types
from kcircuits.models.loader import BUNDLED, LoadedModel, cache_root, from_hf, load_model
from kcircuits.models.weights import ModelWeights

__all__ = ["BUNDLED", "MODEL_TYPES", "LoadedModel", "ModelWeights", "cache_root", "from_hf", "load_model",
           "supported_model_types"]
