"""Influence functions: which training sequences taught the model a fact (issue 4).

I(z_m) = −∇f(θ)ᵀ (G + λI)⁻¹ ∇L(z_m, θ), with f the log-probability of a completion given its
prompt, L the summed token loss of a training sequence and G the Gauss-Newton Hessian, approximated
per linear layer by KFAC / EK-FAC (Grosse et al., 2023).
"""

from kcircuits.influence.sequences import Sequences

__all__ = ["Sequences"]
