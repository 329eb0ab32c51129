"""Weight circuits (Ge et al. 2024) as a second kind of circuit beside the edge circuits: ``kcircuits
weight-circuit`` (a density sweep of learned weight masks, their composition and overlap) and ``kcircuits
edit-inside`` (fine-tuning inside vs outside a circuit). The pieces live where DESIGN.md puts them
(:mod:`kcircuits.discover.weight_masks`, :mod:`kcircuits.analyze.weight_composition`,
:mod:`kcircuits.edit.masked_finetune`); this package runs them as commands. See docs/weight-circuits.md.
"""
