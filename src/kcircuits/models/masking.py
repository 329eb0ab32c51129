"""Weight masks: which entries of a model's parameters a weight circuit keeps, and the model without the rest.

A *weight mask* is ``{param_name: bool tensor}``: names as in ``hf_model.named_parameters()``, each
tensor of the parameter's stored shape, True where the entry is kept. Parameters absent from the
dict are not masked (always kept, in the circuit and in its complement): with embeddings left out of
a weight circuit, for example, the circuit and its complement both keep them.

Running the model with a mask is an edit like any other (DESIGN decision 12): the masked entries
are replaced by their ablation value through :func:`kcircuits.models.edits.edited`, which restores
the exact bytes afterwards and refreshes the weights' fingerprint, so no cache of the full model is
reused by the masked one. Ablations (recorded by the callers in their config):

* ``"zero"``: a removed entry is 0 (Ge et al. 2024; the default);
* ``"mean"``: a removed entry is the mean of its parameter's entries (a norm's weights keep their scale).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from kcircuits.errors import KcircuitsError
from kcircuits.models.edits import edited
from kcircuits.models.fingerprint import hf_module

__all__ = ["ABLATIONS", "WeightMask", "ablation_deltas", "ablation_value", "check_mask", "check_mask_shapes",
           "complement", "density", "masked"]

#: what a removed weight is replaced by
ABLATIONS = ("zero", "mean")

WeightMask = dict[str, torch.Tensor]


def check_mask_shapes(param_shapes: Mapping[str, tuple[int, ...]], mask: Mapping[str, torch.Tensor],
                      what: str = "weight mask", allow_empty: bool = False) -> None:
    """Check a mask's names, dtypes and shapes against a model's parameter shapes (one-line errors).

    Args:
        param_shapes: ``{param_name: shape}`` of the model (e.g. ``ParameterLayout.param_shapes``).
        mask: the weight mask to check; it must name at least one parameter.
        what: how the errors call the mask.
        allow_empty: accept a mask that names no parameter.
    """
    if not isinstance(mask, Mapping) or not (mask or allow_empty):
        raise KcircuitsError(f"the {what} is empty or not a {{param_name: bool tensor}} dict: give at least one "
                             "masked parameter")
    for name, m in mask.items():
        if name not in param_shapes:
            examples = ", ".join(list(param_shapes)[:3])
            raise KcircuitsError(f"the {what} names {name!r}, which this model does not have (examples: {examples}); "
                                 "was the mask made for another model?")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise KcircuitsError(f"the {what} of {name!r} must be a bool tensor, got "
                                 f"{getattr(m, 'dtype', type(m).__name__)}")
        if tuple(m.shape) != tuple(param_shapes[name]):
            raise KcircuitsError(f"the {what} of {name!r} has shape {tuple(m.shape)}, the parameter "
                                 f"{tuple(param_shapes[name])}: was the mask made for another model?")


def check_mask(model, mask: Mapping[str, torch.Tensor], what: str = "weight mask") -> dict[str, torch.nn.Parameter]:
    """The model's parameters named by ``mask``, after :func:`check_mask_shapes` against the model.

    Args:
        model: a :class:`~kcircuits.models.LoadedModel` or an HF module.
        mask: the weight mask.
        what: how the errors call the mask.
    """
    params = dict(hf_module(model).named_parameters(remove_duplicate=False))
    check_mask_shapes({n: tuple(p.shape) for n, p in params.items()}, mask, what, allow_empty=True)
    return {name: params[name] for name in mask}


def complement(mask: Mapping[str, torch.Tensor]) -> WeightMask:
    """The entries the mask removes, over the same parameters: mask and complement partition them.

    Args:
        mask: the weight mask.
    """
    return {name: ~m for name, m in mask.items()}


def density(mask: Mapping[str, torch.Tensor]) -> float:
    """The share of the masked parameters' entries that the mask keeps (NaN for an empty mask).

    Args:
        mask: the weight mask.
    """
    total = sum(m.numel() for m in mask.values())
    return float(sum(int(m.sum()) for m in mask.values()) / total) if total else float("nan")


def ablation_value(param: torch.Tensor, ablation: str) -> torch.Tensor:
    """The value a removed entry of ``param`` takes, a 0-d tensor of its dtype: 0, or its entries' mean.

    Args:
        param: the parameter (any shape).
        ablation: ``"zero"`` or ``"mean"`` (see the module docstring).
    """
    if ablation not in ABLATIONS:
        raise KcircuitsError(f"unknown weight ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
    p = param.detach()
    return p.float().mean().to(p.dtype) if ablation == "mean" else p.new_zeros(())


def ablation_deltas(model, keep: Mapping[str, torch.Tensor], ablation: str = "zero") -> dict[str, torch.Tensor]:
    """``{param_name: Δ}`` that turns each masked parameter ``W`` into ``W·keep + a·(1 − keep)``, ``a`` the
    ablation value (0, or the parameter's mean): the model with only the kept entries, for :func:`edited`.

    Only parameters with at least one removed entry get a delta (the others stay bit-identical).

    Args:
        model: a :class:`~kcircuits.models.LoadedModel` or an HF module.
        keep: the weight mask (True = kept).
        ablation: ``"zero"`` or ``"mean"`` (see the module docstring).
    """
    if ablation not in ABLATIONS:
        raise KcircuitsError(f"unknown weight ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
    params = check_mask(model, keep)
    out = {}
    with torch.no_grad():
        for name, m in keep.items():
            if bool(m.all()):
                continue
            p = params[name].detach()
            value = ablation_value(p, ablation)
            out[name] = torch.where(m.to(p.device), torch.zeros_like(p), value - p)
    return out


@contextmanager
def masked(model, keep: Mapping[str, torch.Tensor], ablation: str = "zero") -> Iterator:
    """Inside the block the model has only ``keep``'s entries of the masked parameters (the rest ablated);
    the exact weights are restored after, also on an exception. Yields the model.

    Args:
        model: a :class:`~kcircuits.models.LoadedModel` or an HF module.
        keep: the weight mask (True = kept).
        ablation: ``"zero"`` or ``"mean"`` (see the module docstring).
    """
    with edited(model, ablation_deltas(model, keep, ablation)) as m:
        yield m
