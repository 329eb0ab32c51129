"""Model loading, per-family adapters, parameter layouts, weight fingerprints and edits."""

from kcircuits.models.adapters import MODEL_TYPES, supported_model_types
from kcircuits.models.edits import delta_metadata, edited, load_delta, save_delta
from kcircuits.models.fingerprint import weights_fingerprint
from kcircuits.models.layout import ParamBlock, ParameterLayout, parameter_layout
from kcircuits.models.loader import BUNDLED, LoadedModel, cache_root, eval_mode, from_hf, load_model
from kcircuits.models.weights import ModelWeights

__all__ = ["BUNDLED", "MODEL_TYPES", "LoadedModel", "ModelWeights", "ParamBlock", "ParameterLayout", "cache_root",
           "delta_metadata", "edited", "eval_mode", "from_hf", "load_delta", "load_model", "parameter_layout",
           "save_delta", "supported_model_types", "weights_fingerprint"]
