"""Analyses that span several circuits: comparing relations, hallucinations, in-context learning.

Each is a function that writes a run folder (JSON, tensors, report.html with its figures and an
auto-written summary of the numbers) and a CLI command that mirrors it.
"""

from kcircuits.studies.compare import compare
from kcircuits.studies.hallucination import hallucination
from kcircuits.studies.icl import icl

__all__ = ["compare", "hallucination", "icl"]
