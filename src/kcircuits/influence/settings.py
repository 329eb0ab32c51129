"""Typed settings of ``kcircuits influence fit|score`` (DESIGN.md decision 10).

One frozen dataclass per command, declared like :mod:`kcircuits.settings`: each field's default,
validation, command-line flag and help live here once. :func:`kcircuits.influence.api.fit` takes a
:class:`FitSettings`, :func:`kcircuits.influence.api.score` a :class:`ScoreSettings` (each also
accepts the fields by name), :mod:`kcircuits.influence.cli` generates its options from them, and
``config.json``'s ``reproduce`` records :func:`kcircuits.settings.hashed_dict` of them.

Fields with ``hashed=False`` do not enter the run folder's hash: ``device`` and
``checkpoint_seconds`` change how a run is computed, not what; ``batch_size`` of ``score`` changes
only memory (the factor fit's batch size, which does change the true Fisher's label draws, is a
``fit`` setting); ``top_k``, ``highlight`` and ``power_law_bootstrap`` shape ``influence.json`` and
the report, which are rebuilt from the stored scores on every run.

This module imports no torch, so ``kcircuits --help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, fields
from typing import Any

from kcircuits.errors import KcircuitsError
from kcircuits.settings import DTYPES, finite_number, one_of, option, require, set_field, whole_number

#: strategies that fit curvature factors (``fit``), and every scoring strategy (``score``)
FACTOR_STRATEGIES = ("ekfac", "kfac", "diagonal")
SCORE_STRATEGIES = ("ekfac", "kfac", "diagonal", "identity", "lissa", "exact")
FISHERS = ("true", "empirical")
MEASUREMENTS = ("logprob", "margin")
NORMALIZE = ("none", "relative")
#: LiSSA's knobs, each a ``lissa_<key>`` field of :class:`ScoreSettings` (None: the core's default)
LISSA_KEYS = ("scale", "depth", "repeats", "batch_size", "seed")


def _names(value: Any, name: str) -> tuple[str, ...] | None:
    """A list of names or patterns as a tuple (a single string is one entry; empty: None)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable) or not all(isinstance(v, str) and v for v in value):
        raise KcircuitsError(f"{name} must be a list of non-empty strings, got {value!r}")
    return tuple(value) or None


def damping_value(value: Any) -> float | str:
    """``"heuristic"`` or a finite number >= 0 (numeric strings are read as numbers)."""
    if value == "heuristic":
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise KcircuitsError(f"damping must be a number or 'heuristic', got {value!r}") from None
    value = finite_number(value, "damping")
    require(value >= 0, f"damping must be >= 0, got {value:g}")
    return value


def _damping_arg(text: str) -> float | str:
    """argparse type of ``--damping`` (a bad value is a usage error: exit code 2)."""
    try:
        return damping_value(text)
    except KcircuitsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class _FactorSettings:
    """What both commands share: how sequences are cut, which modules are tracked, how factors are
    fitted, and where it runs (``strategy`` is redefined by each command, ``batch_size`` by ``score``)."""

    strategy: str = option("ekfac", "curvature approximation")
    fisher: str = option("true", "labels of the curvature's pseudo-loss: sampled from the model (true) or the data",
                         choices=FISHERS)
    max_length: int = option(256, "truncate sequences to this many tokens")
    batch_size: int = option(8, "sequences per batch (the true Fisher draws its labels per batch)")
    include: tuple | None = option(None, "fnmatch patterns of the linear modules to track (e.g. '*.mlp.*'); "
                                   "default all in the blocks", nargs="+", metavar="PATTERN")
    seed: int = option(0, "seed of the true Fisher's label draws (score: also of the power-law bootstrap)")
    dtype: str = option("float32", "weights' dtype", choices=DTYPES)
    device: str | None = option("cpu", "cpu, cuda, cuda:N or auto", hashed=False)
    checkpoint_seconds: float = option(60.0, "checkpoint the factor fit at most this often (0: after every batch)",
                                       hashed=False)

    def __post_init__(self) -> None:
        one_of(self.fisher, FISHERS, "fisher")
        set_field(self, "max_length", whole_number(self.max_length, "max_length", 2))
        set_field(self, "batch_size", whole_number(self.batch_size, "batch_size", 1))
        set_field(self, "include", _names(self.include, "include"))
        set_field(self, "seed", whole_number(self.seed, "seed"))
        one_of(self.dtype, DTYPES, "dtype")
        require(self.device is None or isinstance(self.device, str), f"device must be a string, got {self.device!r}")
        set_field(self, "checkpoint_seconds", finite_number(self.checkpoint_seconds, "checkpoint_seconds"))
        require(self.checkpoint_seconds >= 0, f"checkpoint_seconds must be >= 0, got {self.checkpoint_seconds:g}")


@dataclass(frozen=True)
class FitSettings(_FactorSettings):
    """``kcircuits influence fit``: how the curvature factors are fitted (see :func:`kcircuits.influence.api.fit`)."""

    strategy: str = option("ekfac", "curvature approximation to fit", choices=FACTOR_STRATEGIES)

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of(self.strategy, FACTOR_STRATEGIES, "strategy")


@dataclass(frozen=True)
class ScoreSettings(_FactorSettings):
    """``kcircuits influence score``: how queries are scored against the corpus (see
    :func:`kcircuits.influence.api.score`). ``fisher``, ``seed`` and ``checkpoint_seconds`` apply
    when the factors are fitted inside the score run (no ``factors`` given)."""

    strategy: str = option("ekfac", "inverse-Hessian approximation (identity: gradient dot product)",
                           choices=SCORE_STRATEGIES)
    batch_size: int = option(8, "sequences per batch (memory only when scoring; a factor fit inside the score run "
                             "also draws its true-Fisher labels per batch)", hashed=False)
    damping: float | str = option("heuristic", "a number (absolute λ) or 'heuristic' (0.1 × mean eigenvalue per "
                                  "module)", type=_damping_arg)
    per_layer: bool = option(True, "break the scores down per layer (--no-per-layer: skip it)", invert="--no-per-layer")
    per_token: bool = option(False, "keep per-token scores of every training sequence")
    components: tuple | None = option(None, "heads/MLPs to attribute to, e.g. a3.h2 m5", nargs="+", metavar="NODE")
    query_rank: int | None = option(32, "low-rank query gradients (0: exact)", zero_is_none=True, type=int)
    rescore_top_k: int | None = option(None, "rescore each query's top-k exactly (full-rank query)", type=int)
    bm25_candidates: int | None = option(None, "score only the union of each query's BM25 top-N documents", type=int)
    normalize: str | None = option(None, "relative: divide each training sequence's scores by sqrt(its "
                                   "self-influence) (RelatIF); none: raw influence (default)", choices=NORMALIZE)
    measurement: str = option("logprob", "query function: log-probability of the completion, or its log-odds "
                              "(margin), which does not vanish on facts the model is already certain of",
                              choices=MEASUREMENTS)
    top_k: int = option(10, "top sequences per query in the results and report", hashed=False)
    highlight: bool = option(True, "rescore each query's top-k per token to highlight their tokens in the report "
                             "(--no-highlight: skip it)", invert="--no-highlight", hashed=False)
    power_law_bootstrap: int = option(100, "power-law goodness-of-fit draws per query (0: none)", flag="--bootstrap",
                                      metavar="N", hashed=False)
    lissa_scale: float | None = option(None, "LiSSA scale (default: 2 x estimated top eigenvalue)", type=float)
    lissa_depth: int | None = option(None, "LiSSA recursion depth (default 500)", type=int)
    lissa_repeats: int | None = option(None, "LiSSA recursions averaged per query (default 1)", type=int)
    lissa_batch_size: int | None = option(None, "LiSSA training sequences per Gauss-Newton product (default 8)",
                                          type=int)
    lissa_seed: int | None = option(None, "LiSSA mini-batch seed (default 0)", type=int)

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of(self.strategy, SCORE_STRATEGIES, "strategy")
        set_field(self, "damping", damping_value(self.damping))
        for name in ("per_layer", "per_token", "highlight"):
            require(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        set_field(self, "components", _names(self.components, "components"))
        if self.query_rank is not None:
            rank = whole_number(self.query_rank, "query_rank", 0)
            set_field(self, "query_rank", rank or None)  # 0: exact, as on the command line
        for name in ("rescore_top_k", "bm25_candidates"):
            if getattr(self, name) is not None:
                set_field(self, name, whole_number(getattr(self, name), name, 1))
        if self.normalize == "none":
            set_field(self, "normalize", None)
        require(self.normalize in (None, "relative"), f"unknown normalize {self.normalize!r}: use none or relative")
        one_of(self.measurement, MEASUREMENTS, "measurement")
        set_field(self, "top_k", whole_number(self.top_k, "top_k", 1))
        set_field(self, "power_law_bootstrap", whole_number(self.power_law_bootstrap, "power_law_bootstrap", 0))
        if self.lissa_scale is not None:
            set_field(self, "lissa_scale", finite_number(self.lissa_scale, "lissa_scale"))
            require(self.lissa_scale > 0, f"lissa_scale must be > 0, got {self.lissa_scale:g}")
        for key in ("depth", "repeats", "batch_size"):
            if getattr(self, f"lissa_{key}") is not None:
                set_field(self, f"lissa_{key}", whole_number(getattr(self, f"lissa_{key}"), f"lissa_{key}", 1))
        if self.lissa_seed is not None:
            set_field(self, "lissa_seed", whole_number(self.lissa_seed, "lissa_seed"))

    @property
    def lissa(self) -> dict | None:
        """The LiSSA options given (the core's ``lissa=`` dict), or None for all defaults."""
        out = {k: getattr(self, f"lissa_{k}") for k in LISSA_KEYS if getattr(self, f"lissa_{k}") is not None}
        return out or None


def lissa_fields(lissa: Any) -> dict[str, Any]:
    """The ``lissa_<key>`` fields of a ``lissa={"depth": ..., ...}`` dict (the API's older form)."""
    if lissa is None:
        return {}
    if not isinstance(lissa, dict):
        raise KcircuitsError(f"lissa must be a dict of LiSSA options, got {lissa!r}")
    if "damping" in lissa:
        raise KcircuitsError("lissa={'damping': ...} is the score's damping: pass damping=... instead")
    unknown = sorted(set(lissa) - set(LISSA_KEYS))
    require(not unknown, f"unknown lissa option(s) {', '.join(map(str, unknown))}; known: {', '.join(LISSA_KEYS)}")
    return {f"lissa_{k}": v for k, v in lissa.items()}


def fields_doc(cls: type, param: str) -> str:
    """One line per field of ``cls`` (name, default, help), appended to the API's docstrings."""
    lines = [f"{cls.__name__} (pass ``{param}=`` or any of its fields by name):"]
    for f in fields(cls):
        default = f.default if f.default is not MISSING else "required"
        lines.append(f"    {f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
