"""Knowledge editing: edit requests, edit methods (ROME, MEMIT, FT-L, FT-M), causal tracing, edit metrics.

Nothing is imported here eagerly (no torch): import the submodules by their full names, e.g.
``from kcircuits.edit.requests import load_requests`` or ``from kcircuits.edit.metrics import edit_metrics``.
"""
