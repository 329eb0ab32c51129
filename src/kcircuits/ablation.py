"""What a patched edge carries instead of its clean value: the corrupted run, zero, or the dataset mean."""

from __future__ import annotations

import torch

from kcircuits.batching import Batch
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.settings import ABLATIONS  # the one list of ablations (settings own the choices)



def check_ablation(kind: str) -> str:
    if kind not in ABLATIONS:
        raise KcircuitsError(f"unknown ablation {kind!r}: use one of {', '.join(ABLATIONS)}")
    return kind


@torch.no_grad()
def mean_activations(engine: Engine, batches: list[Batch]) -> torch.Tensor:
    """Mean clean output of every source over all real positions of all prompts, ``[n_src, 1, 1, d]``."""
    total, count = None, 0
    for batch in batches:
        acts = engine.run(engine.embed(batch.clean), batch.target_pos, record=True).acts  # [s, b, p, d]
        real = batch.real[None, :, :, None].to(acts.dtype)
        part = (acts * real).sum((1, 2))
        total = part if total is None else total + part
        count += int(batch.real.sum())
    if total is None:
        raise KcircuitsError("mean ablation needs at least one prompt")
    return (total / count)[:, None, None, :]


@torch.no_grad()
def ablated_acts(engine: Engine, batch: Batch, kind: str, mean: torch.Tensor | None = None) -> torch.Tensor | None:
    """Source outputs used for patched edges: ``[n_src, b, p, d]``, ``[n_src, 1, 1, d]``, or None (zero)."""
    check_ablation(kind)
    if kind == "corrupt":
        return engine.run(engine.embed(batch.corrupt), batch.target_pos, record=True).acts
    if kind == "mean":
        if mean is None:
            raise KcircuitsError("mean ablation needs the dataset means: call mean_activations() first")
        return mean
    return None


def ablated_input(engine: Engine, batch: Batch, ablated: torch.Tensor | None) -> torch.Tensor:
    """The input source's ablated output, ``[b, p, d]`` (the start of the EAP-IG path)."""
    b, p = batch.clean.shape
    if ablated is None:
        return torch.zeros(b, p, engine.w.d_model, dtype=engine.w.W_E.dtype, device=batch.clean.device)
    return ablated[0].expand(b, p, -1)
