"""Typed settings, one frozen dataclass per concern (DESIGN.md decision 10).

Every command's options live here, once: a field's default, its validation, its command-line flag
and help all come from this module. The API (:mod:`kcircuits.api`), the studies and the CLI take
these objects; ``asdict()`` of each is what ``config.json`` records, and the run folder's hash is
computed from them after they normalised their values (``percent=1`` and ``percent=1.0`` are one
configuration). Adding an option = adding one field to one dataclass.

Concerns:

- :class:`ScoringSettings`: what is measured (metric, answer scoring) and what a patched edge carries;
- :class:`AttributionSettings`: how edges are scored (discovery method, integration steps, k/v grouping);
- :class:`CircuitSize`: how many edges the circuit keeps and how they are chosen;
- :class:`PromptSettings`: which prompt pairs are built (split, known-facts filter, cap, templates);
- :class:`EvaluationSettings`: what is measured about a circuit (curve, random baselines, explanation);
- :class:`RunSettings`: where and how it runs (device, dtype, batch size, seed).

This module imports no torch, so ``kcircuits --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

from kcircuits.errors import KcircuitsError

#: Circuit sizes of the faithfulness curve, in percent of all edges (MIB's grid).
CURVE_PERCENTS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
METRIC_NAMES = ("logit_diff", "logprob", "prob")
ABLATIONS = ("corrupt", "zero", "mean")
ANSWER_SCORING = ("first_token", "full")
SELECTIONS = ("topn", "greedy")
KNOWN_ONLY_ON = ("both", "discover")
DTYPES = ("float32", "bfloat16", "float16")


def option(default: Any, help: str, *, flag: str | None = None,
           choices: Iterable[str] | Callable[[], Iterable[str]] | None = None,
           invert: str | None = None, invert_help: str | None = None, nargs: str | None = None,
           metavar: str | None = None,
           zero_is_none: bool = False, const: Any = None, hashed: bool = True, cli: bool = True,
           parse: Callable[[Any], Any] | None = None, type: Callable[[str], Any] | None = None) -> Any:
    """A settings field with what the command line needs to offer it.

    ``flag`` defaults to ``--field-name``; ``invert`` names a ``store_true`` flag that sets a True
    default to False (``--ungrouped`` for ``grouped``), described by ``invert_help``; ``zero_is_none`` reads 0
    as "no limit"; ``hashed=False`` keeps a field out of the configuration hash (it changes how a run is computed,
    not what it computes: batch size, device); ``cli=False`` keeps it off the command line.
    """
    meta = dict(help=help, flag=flag, choices=choices, invert=invert, invert_help=invert_help, nargs=nargs,
                metavar=metavar, zero_is_none=zero_is_none, const=const, hashed=hashed, cli=cli, parse=parse, type=type)
    if isinstance(default, (list, dict, set)):
        raise TypeError("settings defaults must be immutable (use a tuple)")
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- validation helpers
# Public: every settings module (this one, kcircuits.influence.settings) validates with these.
def require(ok: bool, message: str) -> None:
    """Raise the one-line user error ``message`` unless ``ok``."""
    if not ok:
        raise KcircuitsError(message)


def whole_number(value: Any, name: str, minimum: int | None = None) -> int:
    """``value`` as an int (1.0 is accepted, 1.5 and True are not), at least ``minimum`` if given."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not value.is_integer())):
        raise KcircuitsError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    require(minimum is None or value >= minimum, f"{name} must be >= {minimum}, got {value}")
    return value


def finite_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KcircuitsError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def set_field(obj: Any, name: str, value: Any) -> None:
    """Store a normalised value on a frozen settings object (done once, in ``__post_init__``)."""
    object.__setattr__(obj, name, value)


def one_of(value: Any, allowed: Iterable[str], what: str) -> str:
    allowed = tuple(allowed)
    require(value in allowed, f"unknown {what} {value!r}: use one of {', '.join(allowed)}")
    return value


def discovery_method_names() -> tuple[str, ...]:
    """Names of the registered discovery methods (read without importing them: see ``registry.method_names``)."""
    from kcircuits.discover import registry

    return registry.method_names()


@dataclass(frozen=True)
class ScoringSettings:
    """What is measured and what a patched edge carries; shared by attribution and evaluation."""

    metric: str = option("logit_diff", "what the circuit must preserve", choices=METRIC_NAMES)
    ablation: str = option("corrupt", "what edges outside the circuit carry (default: the corrupted run)",
                           choices=ABLATIONS)
    answer_scoring: str = option("first_token", "score the answer's first token (default) or the whole answer "
                                 "(teacher-forced; for answers such as years that share their first token)",
                                 choices=ANSWER_SCORING)

    def __post_init__(self) -> None:
        one_of(self.metric, METRIC_NAMES, "metric")
        one_of(self.ablation, ABLATIONS, "ablation")
        one_of(self.answer_scoring, ANSWER_SCORING, "answer scoring")
        require(not (self.answer_scoring == "full" and self.metric == "logit_diff"),
              "the logit difference compares single tokens; with --answer-scoring full use --metric logprob or prob")


@dataclass(frozen=True)
class AttributionSettings:
    """How edges are scored: the discovery method (see ``kcircuits.discover.registry``) and its knobs."""

    method: str = option("eap-ig", "discovery method", choices=discovery_method_names)
    steps: int = option(5, "integration steps of EAP-IG (m)")
    grouped: bool = option(True, "k/v destinations per kv-head (grouped-query attention models)",
                           invert="--ungrouped", invert_help="one k/v destination per query head (GQA models)")

    def __post_init__(self) -> None:
        one_of(self.method, discovery_method_names(), "discovery method")
        set_field(self, "steps", whole_number(self.steps, "--steps"))
        require(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class CircuitSize:
    """How big the circuit is: ``n_edges``, or ``percent`` of all edges, or every edge scoring at least
    ``threshold`` (at most one of them; default 1%), chosen by ``selection`` and then pruned."""

    n_edges: int | None = option(None, "circuit size in edges", flag="--edges", type=int)
    percent: float | None = option(None, "circuit size in percent of all edges, in (0, 100] (default 1)", type=float)
    threshold: float | None = option(None, "keep every edge scoring at least this", type=float)
    selection: str = option("topn", "top edges by score, or greedy growth from the logits", choices=SELECTIONS)
    absolute: bool = option(True, "rank edges by |score| (False: by signed score)", invert="--signed",
                            invert_help="rank edges by signed score instead of |score|")

    def __post_init__(self) -> None:
        given = [k for k in ("n_edges", "percent", "threshold") if getattr(self, k) is not None]
        require(len(given) <= 1, f"give one circuit size, not {' and '.join(given)}")
        if self.n_edges is not None:
            set_field(self, "n_edges", whole_number(self.n_edges, "--edges"))
            require(self.n_edges >= 1, f"--edges must be >= 1, got {self.n_edges}")
        if self.percent is not None:
            set_field(self, "percent", finite_number(self.percent, "--percent"))
            require(0 < self.percent <= 100, f"--percent must be in (0, 100], got {self.percent:g}")
        if self.threshold is not None:
            set_field(self, "threshold", finite_number(self.threshold, "--threshold"))
        one_of(self.selection, SELECTIONS, "selection")

    def edges_for(self, n_graph_edges: int) -> int | None:
        """The number of edges to select in a graph of ``n_graph_edges`` (None: select by threshold)."""
        if self.threshold is not None:
            return None
        if self.n_edges is not None:
            return self.n_edges
        return max(1, round(n_graph_edges * (self.percent if self.percent is not None else 1.0) / 100))


def _parse_templates(value: Any) -> tuple | None:
    if value is None:
        return None
    from kcircuits.data.prompts import parse_template_specs

    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise KcircuitsError(f"templates must be a list of indices or zs<i>, got {value!r}")
    return tuple(parse_template_specs([str(v) for v in value]))


@dataclass(frozen=True)
class PromptSettings:
    """Which prompt pairs are built from a relation."""

    split: float | None = option(None, "find the circuit on this fraction of the subjects (default 0.5), "
                                       "test on the rest", nargs="?", const=0.5, type=float)
    known_only: bool = option(False, "keep only facts the model answers within --known-k")
    known_k: int = option(1, "rank within which a fact counts as known")
    known_only_on: str = option("both", "with --known-only: filter both halves, or only the discovery half so the "
                                "circuit is tested on every held-out fact (the Knowledge Circuits paper's protocol)",
                                choices=KNOWN_ONLY_ON)
    max_pairs: int | None = option(64, "cap on prompt pairs per relation and split half, applied after --known-only "
                                   "(0: no cap)", zero_is_none=True, type=int)
    templates: tuple | None = option(None, "prompt templates: indices of prompt_templates, or zs0 zs1 ... / zs for an "
                                     "LRE file's zero-shot templates (default: every prompt_templates entry)",
                                     nargs="+", metavar="T", parse=_parse_templates)

    def __post_init__(self) -> None:
        if self.split is not None:
            set_field(self, "split", finite_number(self.split, "--split"))
            require(0 < self.split < 1, f"--split must be a fraction strictly between 0 and 1, got {self.split:g}")
        set_field(self, "known_k", whole_number(self.known_k, "--known-k"))
        require(self.known_k >= 1, f"--known-k must be >= 1, got {self.known_k}")
        one_of(self.known_only_on, KNOWN_ONLY_ON, "--known-only-on")
        if self.max_pairs is not None:
            set_field(self, "max_pairs", whole_number(self.max_pairs, "--max-pairs"))
            require(self.max_pairs >= 1, f"--max-pairs must be >= 1 (or 0 for no cap), got {self.max_pairs}")
        set_field(self, "templates", _parse_templates(self.templates))


@dataclass(frozen=True)
class EvaluationSettings:
    """What is measured about a circuit besides its faithfulness and Hit@k."""

    curve: bool = option(True, "draw the faithfulness curve over circuit sizes", invert="--no-curve",
                         invert_help="skip the faithfulness curve")
    curve_percents: tuple = option(CURVE_PERCENTS, "circuit sizes of the curve, in percent of all edges", cli=False)
    n_random: int = option(3, "random circuits of the circuit's exact size drawn per kind of baseline",
                           flag="--random-draws")
    explain_prompts: int = option(16, "explain the circuit on this many test prompts: logit lens, head roles (0: skip)")
    export_mib: bool = option(False, "also write circuit_mib.json (EAP-IG/MIB graph format)")

    def __post_init__(self) -> None:
        set_field(self, "curve_percents", tuple(finite_number(p, "curve percent") for p in self.curve_percents))
        require(all(0 < p <= 100 for p in self.curve_percents), "curve percents must be in (0, 100]")
        set_field(self, "n_random", whole_number(self.n_random, "--random-draws"))
        require(self.n_random >= 0, f"--random-draws must be >= 0, got {self.n_random}")
        set_field(self, "explain_prompts", whole_number(self.explain_prompts, "--explain-prompts"))
        require(self.explain_prompts >= 0, f"--explain-prompts must be >= 0, got {self.explain_prompts}")


@dataclass(frozen=True)
class RunSettings:
    """Where and how a command runs; the seed seeds splits, caps and random baselines."""

    device: str | None = option("cpu", "cpu, cuda, cuda:N or auto", hashed=False)
    dtype: str = option("float32", "weights' dtype", choices=DTYPES)
    batch_size: int = option(8, "prompt pairs per batch (memory, not results)", hashed=False)
    seed: int = option(0, "seed of the split, the pair cap and the random baselines")
    cache: bool = option(True, "reuse and store each step's result in the step cache (kcircuits.steps)",
                         invert="--no-cache", invert_help="recompute every step: neither read nor write the step cache "
                         "($KCIRCUITS_STEP_CACHE, default ~/.cache/kcircuits/steps)", hashed=False)

    def __post_init__(self) -> None:
        one_of(self.dtype, DTYPES, "--dtype")
        set_field(self, "batch_size", whole_number(self.batch_size, "--batch-size"))
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        set_field(self, "seed", whole_number(self.seed, "--seed"))


@dataclass
class RoleThresholds:
    """Thresholds of the head-role criteria (:mod:`kcircuits.analyze.head_roles`, docs/analysis.md); every one
    can be set by the user. Kept here, with the other settings, so the command line builds its options
    without importing torch."""

    subject_mass_min: float = option(0.3, "mover: attention to the subject", type=float)
    relation_mass_min: float = option(0.3, "relation head: attention to the relation", type=float)
    answer_z_min: float = option(2.0, "mover: z-score of the answer's direct effect", type=float)
    specificity_min: float = option(1.0, "mover: answer z minus range z", type=float)
    range_z_min: float = option(1.0, "relation head: z-score on the answer range", type=float)

    def moves_subject(self, subject_mass: float, answer_z: float, specificity: float) -> bool:
        return (subject_mass >= self.subject_mass_min and answer_z >= self.answer_z_min
                and specificity >= self.specificity_min)

    def reads_relation(self, relation_mass: float, range_z: float) -> bool:
        return relation_mass >= self.relation_mass_min and range_z >= self.range_z_min

    def role(self, row: dict) -> str:
        mover = self.moves_subject(row["subject_mass"], row["answer_z"], row["specificity"])
        relation = self.reads_relation(row["relation_mass"], row["range_z"])
        roles = {(True, True): "mixture", (True, False): "mover", (False, True): "relation"}
        return roles.get((mover, relation), "none")


# --------------------------------------------------------------------------- building settings
def resolve(cls: type, given: Any, options: dict[str, Any]) -> Any:
    """``given`` (an instance of ``cls`` or None for defaults) with the ``options`` that name its fields
    applied; those options are removed from ``options``. Validation runs once, on the result."""
    if given is not None and not isinstance(given, cls):
        raise KcircuitsError(f"expected {cls.__name__}, got {type(given).__name__}")
    names = {f.name for f in fields(cls)}
    mine = {k: options.pop(k) for k in list(options) if k in names}
    if given is None:
        return cls(**mine)
    return replace(given, **mine) if mine else given


def resolve_all(options: dict[str, Any], given: Mapping[type, Any], classes: Iterable[type], command: str) -> dict:
    """One settings object per class in ``classes``: the object in ``given`` (or the defaults) updated by the
    flat ``options`` naming its fields; an option no class has is an error."""
    out = {cls: resolve(cls, given.get(cls), options) for cls in classes}
    reject_unknown(options, command)
    return out


def reject_unknown(options: Mapping[str, Any], command: str) -> None:
    if options:
        raise KcircuitsError(f"{command}: unknown option(s) {', '.join(sorted(options))}")


def hashed_dict(settings: Any) -> dict:
    """The fields of a settings object that define what a run computes (``asdict`` less ``hashed=False``)."""
    return {f.name: _plain(getattr(settings, f.name)) for f in fields(settings) if f.metadata.get("hashed", True)}


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def settings_doc(*classes: type, param: str | None = None) -> str:
    """One line per field of ``classes``: name, default and help (appended to the API's docstrings).
    ``param`` names the parameter that takes the object when it is not :func:`param_name`'s."""
    lines = []
    for cls in classes:
        lines.append(f"{cls.__name__} (pass ``{param or param_name(cls)}=`` or any of its fields by name):")
        for f in fields(cls):
            default = f.default if f.default is not MISSING else "required"
            lines.append(f"    {f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


#: the API parameter names of this module's settings classes; a settings class elsewhere declares its own
#: as a class attribute ``PARAM`` (e.g. ``EditCircuitSettings.PARAM = "edit_circuits"``)
_PARAMS = {"ScoringSettings": "scoring", "AttributionSettings": "attribution", "CircuitSize": "size",
           "PromptSettings": "prompts", "EvaluationSettings": "evaluation", "RunSettings": "run"}


def param_name(cls: type) -> str:
    """The keyword under which the API takes a ``cls`` object (``scoring=``, ``size=``, ``edit_circuits=``, ...)."""
    return cls.__dict__.get("PARAM") or _PARAMS.get(cls.__name__, cls.__name__.lower())


# --------------------------------------------------------------------------- the command line
def add_arguments(parser: argparse.ArgumentParser, cls: type, *, defaults: Mapping[str, Any] | None = None,
                  exclude: Iterable[str] = (), group: Any = None) -> None:
    """Add one command-line option per field of ``cls`` (its flag, help, choices and default)."""
    target = group or parser
    defaults = dict(defaults or {})
    for f in fields(cls):
        meta = f.metadata
        if f.name in exclude or not meta.get("cli", True):
            continue
        default = defaults.get(f.name, f.default)
        if meta.get("invert"):
            target.add_argument(meta["invert"], dest=f.name, action="store_false", default=default,
                                help=meta.get("invert_help") or meta["help"])
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if isinstance(default, bool) and f.type in ("bool", bool):
            target.add_argument(flag, action="store_true", default=default, **kwargs)
            continue
        choices = meta.get("choices")
        if callable(choices):
            choices = choices()
        if choices is not None:
            kwargs["choices"] = list(choices)
        if meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
        if meta.get("const") is not None:
            kwargs["const"] = meta["const"]
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        typ = meta.get("type") or (type(default) if default is not None and not isinstance(default, tuple) else None)
        if typ is not None and meta.get("parse") is None:
            kwargs["type"] = typ
        target.add_argument(flag, default=default, **kwargs)


def from_args(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """The ``cls`` settings the parsed command line describes (fields absent from ``args`` keep their defaults)."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in fixed:
            values[f.name] = fixed[f.name]
        elif hasattr(args, f.name):
            v = getattr(args, f.name)
            if f.metadata.get("zero_is_none") and v == 0:
                v = None
            values[f.name] = v
    return cls(**values)
