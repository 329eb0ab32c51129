"""Explaining circuits: logit lens per node and per layer (more analyses to come, see issue 3)."""

from kcircuits.analyze.logit_lens import LensResult, logit_lens

__all__ = ["LensResult", "logit_lens"]
