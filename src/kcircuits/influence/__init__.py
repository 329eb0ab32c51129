"""Influence functions: which training sequences taught the model a fact (issue 4).

I(z_m) = −∇f(θ)ᵀ (G + λI)⁻¹ ∇L(z_m, θ), with f the log-probability of a completion given its
prompt, L the summed token loss of a training sequence and G the Gauss-Newton Hessian, approximated
per linear layer by KFAC / EK-FAC (Grosse et al., 2023).
"""

from kcircuits.influence.sequences import Sequences

__all__ = ["Sequences"]

# math core: curvature factors, inverse-Hessian-vector products, scores
from kcircuits.influence.factors import Factors, fit_factors
from kcircuits.influence.ihvp import Preconditioner, make_preconditioner
from kcircuits.influence.modules import component_blocks, module_layer, tracked_modules
from kcircuits.influence.scores import InfluenceScores, pairwise_scores, self_influence

__all__ += ["Factors", "InfluenceScores", "Preconditioner", "component_blocks", "fit_factors",
            "make_preconditioner", "module_layer", "pairwise_scores", "self_influence", "tracked_modules"]

# data, baselines, analysis and the run-folder API (`kcircuits influence fit|score`)
from kcircuits.influence import api
from kcircuits.influence.analysis import (
    PowerLawFit,
    power_law_tail,
    recall_at_k,
    top_influential,
)
from kcircuits.influence.bm25 import BM25
from kcircuits.influence.corpus import load_corpus, load_queries
from kcircuits.influence.facts import make_facts_corpus

__all__ += ["BM25", "PowerLawFit", "api", "load_corpus", "load_queries", "make_facts_corpus", "power_law_tail",
            "recall_at_k", "top_influential"]
