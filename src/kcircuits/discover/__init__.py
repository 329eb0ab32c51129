"""Circuit discovery methods (one module each)."""

from kcircuits.discover.eap import METHODS, attribute

__all__ = ["METHODS", "attribute"]
