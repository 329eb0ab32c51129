"""Influence functions: which training sequences taught the model a fact (issue 4).

I(z_m) = −∇f(θ)ᵀ (G + λI)⁻¹ ∇L(z_m, θ), with f the log-probability of a completion given its
prompt, L the summed token loss of a training sequence and G the Gauss-Newton Hessian, approximated
per linear layer by KFAC / EK-FAC (Grosse et al., 2023).

Every name below is imported on first use, so ``import kcircuits.influence.factors`` loads the math
core only, not the run-folder API or the report, and the CLI's ``--help`` loads no torch through
this package.
"""

from __future__ import annotations

import importlib

#: public name -> the module defining it
_NAMES = {
    # math core: curvature factors, inverse-Hessian-vector products, scores
    "Sequences": "sequences",
    "Factors": "factors", "fit_factors": "factors",
    "Preconditioner": "ihvp", "make_preconditioner": "ihvp",
    "component_blocks": "modules", "module_layer": "modules", "tracked_modules": "modules",
    "InfluenceScores": "scores", "pairwise_scores": "scores", "self_influence": "scores",
    # data, baselines, analysis
    "PowerLawFit": "analysis", "power_law_tail": "analysis", "recall_at_k": "analysis", "top_influential": "analysis",
    "BM25": "bm25",
    "load_corpus": "corpus", "load_queries": "corpus",
    "make_facts_corpus": "facts",
    # settings and the run-folder API (`kcircuits influence fit|score`)
    "FitSettings": "settings", "ScoreSettings": "settings",
}
_MODULES = ("api",)

__all__ = sorted([*_NAMES, *_MODULES])


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    elif name in _MODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
