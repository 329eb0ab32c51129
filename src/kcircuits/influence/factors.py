"""Curvature factors of the Gauss-Newton Hessian, per tracked linear module (Grosse et al. 2023).

The curvature is ``G = E_seq[E_y ∇L_seq(y) ∇L_seq(y)ᵀ]`` (per-sequence Fisher averaged over the
training sequences; for softmax cross-entropy the true Fisher equals the Gauss-Newton Hessian),
block-diagonal across modules. Per module with gradient ``G_seq = Σ_t g_t ā_tᵀ`` ``[d_out, d_in(+1)]``:

* ``kfac``: ``G ≈ A ⊗ S`` with ``A = mean_tokens ā āᵀ`` ``[d_in, d_in]`` (non-padding tokens) and
  ``S = mean_seq Σ_t g_t g_tᵀ`` ``[d_out, d_out]`` (g is exactly 0 on padding and after the last scored
  token; prompt positions attended by scored tokens do carry gradient and are kept); eigendecompositions
  ``A = Q_A diag(e_A) Q_Aᵀ``, ``S = Q_S diag(e_S) Q_Sᵀ`` in float64, eigenvalues ``Λ = e_S e_Aᵀ`` ``[d_out, d_in]``.
* ``ekfac``: same eigenbasis, eigenvalues refitted on per-sequence gradients,
  ``Λ = mean_seq (Q_Sᵀ G_seq Q_A)²`` (a second pass over the data).
* ``diagonal``: ``mean_seq G_seq²`` (elementwise).
* ``identity``: nothing to fit (gradient dot products).

``fisher="true"`` draws the labels of the pseudo-loss from the model (seeded per batch, so a resumed
fit draws the same labels); ``"empirical"`` uses the real next tokens.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kcircuits.errors import KcircuitsError
from kcircuits.influence.gradients import (
    LMObjective,
    check_finite,
    sequence_grads,
    token_grads,
)
from kcircuits.influence.modules import matrix_shape, tracked_modules
from kcircuits.influence.sequences import Sequences
from kcircuits.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from kcircuits.models.fingerprint import weights_fingerprint

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
FISHERS = ("true", "empirical")
#: data passes per strategy, in order
_PASSES = {"identity": [], "diagonal": ["diagonal"], "kfac": ["covariance"], "ekfac": ["covariance", "eigen"]}


@dataclass
class Factors:
    """Fitted curvature: what :func:`fit_factors` returns and ``FitOutput.factors`` holds.

    Attributes:
        strategy: ``ekfac``, ``kfac``, ``diagonal`` or ``identity``.
        fisher: labels of the pseudo-loss: ``true`` (sampled from the model) or ``empirical`` (the data's).
        modules: names of the tracked linear modules.
        n_tokens: non-padding tokens seen.
        n_sequences: training sequences seen.
        shapes: per module its gradient-matrix shape ``(d_out, d_in)`` (``d_in`` counts a bias as one more column).
        tensors: per module (depending on ``strategy``): ``A`` ``[d_in, d_in]``, ``S`` ``[d_out, d_out]``,
            ``QA``, ``QS`` (eigenvectors as columns), ``eA`` ``[d_in]``, ``eS`` ``[d_out]``, ``lambda``
            ``[d_out, d_in]`` (EK-FAC), ``diag`` ``[d_out, d_in]`` (diagonal); float64.
        config: everything that identifies the fit (including the weights' fingerprint).
    """

    strategy: str
    fisher: str
    modules: list[str]
    n_tokens: int
    n_sequences: int
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def eigenvalues(self, name: str, kind: str) -> torch.Tensor:
        """``[d_out, d_in]`` curvature eigenvalues of module ``name`` for a ``kind`` preconditioner
        (``ekfac``, ``kfac`` or ``diagonal``; the factors must have been fitted for it)."""
        t = self.tensors.get(name, {})
        if kind == "ekfac" and "lambda" in t:
            return t["lambda"]
        if kind == "kfac" and "eS" in t:
            return torch.outer(t["eS"], t["eA"])
        if kind == "diagonal" and "diag" in t:
            return t["diag"]
        raise KcircuitsError(f"factors fitted with strategy {self.strategy!r} cannot serve a {kind!r} preconditioner; "
                             f"fit them with strategy={kind!r} (ekfac factors also serve kfac)")

    def save(self, folder: str | Path) -> None:
        """Write ``factors.safetensors`` and ``factors.json`` into ``folder`` (atomically)."""
        folder = Path(folder)
        flat = {f"{m}::{k}": v for m, kinds in self.tensors.items() for k, v in kinds.items()}
        atomic_save_tensors(folder / "factors.safetensors", flat)
        atomic_write_json(folder / "factors.json", {
            "strategy": self.strategy, "fisher": self.fisher, "modules": self.modules, "n_tokens": self.n_tokens,
            "n_sequences": self.n_sequences, "shapes": self.shapes, "config": self.config})

    @classmethod
    def load(cls, folder: str | Path) -> Factors:
        """The factors :meth:`save` (or a fit) wrote into ``folder``."""
        folder = Path(folder)
        if not (folder / "factors.json").exists():
            raise KcircuitsError(f"no fitted factors in {folder}; run the factor fit first (fit_factors / "
                                 "`kcircuits influence fit`)")
        meta = read_json(folder / "factors.json")
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        if (folder / "factors.safetensors").exists():
            for key, value in _load_fresh(folder / "factors.safetensors").items():
                module, kind = key.split("::")
                tensors.setdefault(module, {})[kind] = value
        shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
        return cls(meta["strategy"], meta["fisher"], meta["modules"], meta["n_tokens"], meta["n_sequences"],
                   shapes, tensors, meta.get("config", {}))


def _load_fresh(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, each copied into its own contiguous allocation.

    Why: safetensors' buffers need not be 64-byte aligned, while tensors computed in memory sit
    in torch's 64-byte-aligned allocations, and MKL documents that its kernels may round
    differently for differently aligned operands. A resumed fit must compute with operands laid out
    exactly like an uninterrupted one to be bit-identical. Copies one tensor at a time, so the peak
    memory is the file plus its largest tensor."""
    tensors = load_tensors(path)
    for key in list(tensors):
        tensors[key] = tensors[key].clone(memory_format=torch.contiguous_format)
    return tensors


def data_fingerprint(seqs: Sequences) -> str:
    h = hashlib.sha256()
    for t in (seqs.input_ids, seqs.attention_mask, seqs.loss_mask):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- fitting
class _State:
    """Running sums (float64) and progress; checkpointed atomically as one safetensors file."""

    FILE = "fit_state.safetensors"

    def __init__(self, config: dict):
        self.config = config
        self.sums: dict[str, torch.Tensor] = {}
        self.done: list[str] = []
        self.next_batch = 0
        self.n_tokens = 0

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.double().cpu()
        self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()

    def save(self, folder: Path | None) -> None:
        if folder is not None:
            meta = {"state": json.dumps({"config": self.config, "done": self.done, "next_batch": self.next_batch,
                                         "n_tokens": self.n_tokens})}
            atomic_save_tensors(folder / self.FILE, self.sums, metadata=meta)

    @classmethod
    def resume(cls, folder: Path | None, config: dict) -> _State:
        state = cls(config)
        if folder is None or not (folder / cls.FILE).exists():
            return state
        from safetensors import safe_open

        with safe_open(str(folder / cls.FILE), framework="pt") as fh:
            saved = json.loads(fh.metadata()["state"])
        if saved["config"] != config:
            raise KcircuitsError(f"{folder} holds a factor fit with another configuration; use a new folder or delete "
                                 f"{cls.FILE} there")
        state.sums = _load_fresh(folder / cls.FILE)
        state.done, state.next_batch, state.n_tokens = saved["done"], saved["next_batch"], saved["n_tokens"]
        return state


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise KcircuitsError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


def fit_factors(model: torch.nn.Module, train: Sequences, *, strategy: str = "ekfac", fisher: str = "true",
                batch_size: int = 8, seed: int = 0, include: list[str] | None = None,
                folder: str | Path | None = None, progress: bool = True, objective=None,
                callback: Callable[[str, int], None] | None = None, samples: int = 1,
                checkpoint_seconds: float = 60.0) -> Factors:
    """Fit per-module curvature factors on ``train`` (see module docstring for the estimators).

    With ``folder``, the running sums are checkpointed atomically at the end of a batch once
    ``checkpoint_seconds`` have passed since the last checkpoint (0: after every batch; the sums of a
    real model are gigabytes in float64, so writing them after every batch would dominate the fit),
    and at the end of every pass; a rerun with the same folder and configuration resumes from the
    last checkpoint (a finished fit is simply loaded). The configuration includes the fingerprint of
    the model's weights (``config["weights"]``), so factors of other weights are never resumed or
    reused. ``samples``: label draws per sequence for the true Fisher (averaged; more draws = less
    sampling noise in S and Λ; ignored for the empirical Fisher). ``callback(pass_name, batch_index)``
    runs after each checkpoint (progress reporting; tests use it to simulate a crash).
    ``objective``: internal hook for a non-LM loss (tests).
    """
    from tqdm.auto import tqdm

    _check_choice(strategy, STRATEGIES, "factor strategy")
    _check_choice(fisher, FISHERS, "fisher")
    if batch_size < 1 or samples < 1:
        raise KcircuitsError("batch_size and samples must be >= 1")
    samples = samples if fisher == "true" else 1
    objective = objective or LMObjective()
    modules = tracked_modules(model, include)
    folder = Path(folder) if folder is not None else None
    config = {"strategy": strategy, "fisher": fisher, "batch_size": batch_size, "seed": seed,
              "modules": list(modules), "n_sequences": len(train), "data": data_fingerprint(train),
              "weights": weights_fingerprint(model), "objective": type(objective).__name__, "samples": samples}
    if folder is not None and (folder / "factors.json").exists():
        done = Factors.load(folder)
        if done.config == config:
            return done
        raise KcircuitsError(f"{folder} already holds factors fitted with another configuration; use a new folder")
    state = _State.resume(folder, config)
    batches = list(train.batches(batch_size))
    last_save = time.monotonic()
    for pass_name in _PASSES[strategy]:
        if pass_name in state.done:
            continue
        eig = _eigen(state, modules) if pass_name == "eigen" else None
        for bi, (rows, batch) in enumerate(tqdm(batches, desc=f"factors ({pass_name})", disable=not progress)):
            if bi < state.next_batch:
                continue
            for draw in range(samples):
                gen = torch.Generator().manual_seed(seed * 1_000_003 + bi * 1009 + draw) if fisher == "true" else None
                a, g = token_grads(model, batch, modules, objective, gen)
                _accumulate(state, pass_name, batch, a, g, eig, rows, train, draw, samples)
            state.next_batch = bi + 1
            if time.monotonic() - last_save >= checkpoint_seconds:
                state.save(folder)
                last_save = time.monotonic()
            if callback is not None:
                callback(pass_name, bi)
        if pass_name == "covariance":
            _eigen(state, modules)
        state.done.append(pass_name)
        state.next_batch = 0
        state.save(folder)
    factors = _finish(state, strategy, fisher, modules, train, config)
    if folder is not None:
        factors.save(folder)
    return factors


def _accumulate(state: _State, pass_name: str, batch: Sequences, a, g, eig, rows, train, draw: int,
                samples: int) -> None:
    """Add one batch (label draw ``draw`` of ``samples``) to the running sums of ``pass_name``."""
    if pass_name == "covariance":
        check_finite(g, rows, train, "training")
        check_finite(a, rows, train, "training")
        for n in a:
            if draw == 0:  # A does not depend on the labels
                state.add(f"{n}::A", torch.einsum("bti,btj->ij", a[n], a[n]))
            state.add(f"{n}::S", torch.einsum("bto,btp->op", g[n], g[n]).double() / samples)
        state.n_tokens += int(batch.attention_mask.sum()) if draw == 0 else 0
        return
    if pass_name == "diagonal":
        G = sequence_grads(a, g)
        check_finite(G, rows, train, "training")
        for n, Gn in G.items():
            state.add(f"{n}::diag", (Gn.double() ** 2).sum(0) / samples)
        return
    # EK-FAC: the per-sequence gradient in the eigenbasis, Q_Sᵀ G Q_A = Σ_t (Q_Sᵀ g_t)(Q_Aᵀ ā_t)ᵀ. Rotating
    # the per-token factors first costs T·(d_out² + d_in²) + T·d_out·d_in per sequence instead of the
    # d_out·d_in·(d_out + d_in) of rotating the full gradient matrix: far less when T < d.
    rotated = {}
    for n in a:
        QS, QA = (q.to(a[n].device) for q in eig[n])
        rotated[n] = torch.einsum("btp,btq->bpq", g[n].double() @ QS, a[n].double() @ QA)  # [B, d_out, d_in]
    check_finite(rotated, rows, train, "training")
    for n, R in rotated.items():
        state.add(f"{n}::lambda", (R ** 2).sum(0) / samples)


def _eigen(state: _State, modules) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Eigendecompose the covariance sums once (stored in the state so a resumed fit reuses them)."""
    out = {}
    for n in modules:
        if f"{n}::QS" not in state.sums:
            for kind in ("A", "S"):
                cov = state.sums[f"{n}::{kind}"]
                if not torch.isfinite(cov).all():
                    raise KcircuitsError(f"NaN/inf in the {kind} covariance of {n}; check the model weights and dtype")
                evals, evecs = torch.linalg.eigh(cov)
                # eigh returns the eigenvectors column-major (a transposed view); a checkpoint stores
                # them row-major. Store them row-major here too: MKL's gemm may round a transposed
                # operand differently, and the eigen pass must multiply by the same operands whether or
                # not the fit was resumed (see _load_fresh).
                state.sums[f"{n}::e{kind}"], state.sums[f"{n}::Q{kind}"] = evals.clamp_min(0), evecs.contiguous()
        out[n] = (state.sums[f"{n}::QS"], state.sums[f"{n}::QA"])
    return out


def _finish(state: _State, strategy: str, fisher: str, modules, train: Sequences, config: dict) -> Factors:
    """Normalise the sums: A by non-padding tokens, S / Λ / diag by sequences (so A ⊗ S ≈ G)."""
    n_seq = len(train)
    n_tok = state.n_tokens or int(train.attention_mask.sum())
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for n in modules:
        s = state.sums
        t: dict[str, torch.Tensor] = {}
        if strategy in ("kfac", "ekfac"):
            t = {"A": s[f"{n}::A"] / n_tok, "S": s[f"{n}::S"] / n_seq, "QA": s[f"{n}::QA"], "QS": s[f"{n}::QS"],
                 "eA": s[f"{n}::eA"] / n_tok, "eS": s[f"{n}::eS"] / n_seq}
        if strategy == "ekfac":
            t["lambda"] = s[f"{n}::lambda"] / n_seq
        if strategy == "diagonal":
            t["diag"] = s[f"{n}::diag"] / n_seq
        tensors[n] = t
    shapes = {n: matrix_shape(m) for n, m in modules.items()}
    return Factors(strategy, fisher, list(modules), n_tok, n_seq, shapes, tensors, config)
