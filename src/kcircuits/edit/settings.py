"""Typed settings of ``kcircuits trace`` (DESIGN.md decision 10), declared like :mod:`kcircuits.settings`.

Each field's default, validation, command-line flag and help live here once:
:func:`kcircuits.edit.api.trace` takes a :class:`TraceSettings` (or its fields by name),
:mod:`kcircuits.edit.cli` generates its options from it, and ``config.json``'s ``reproduce`` records
:func:`kcircuits.settings.hashed_dict` of it. ``device`` and ``batch_size`` change how a trace is
computed (memory, float rounding), not what: they stay out of the run folder's hash.

This module imports no torch, so ``kcircuits --help`` stays fast; that is also why the trace kinds
are spelled out here rather than read from :data:`kcircuits.edit.trace.KINDS` (a test checks that
the two agree).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from kcircuits.errors import KcircuitsError
from kcircuits.settings import DTYPES, finite_number, one_of, option, require, set_field, whole_number

__all__ = ["FT_LOSSES", "MEASURED_LAYERS", "TRACE_KINDS", "EditCircuitSettings", "EditSettings", "FinetuneOptions",
           "MaskedFinetuneSettings", "RequestSettings", "TraceSettings", "ValueSettings"]

#: how a request's target-token NLLs are reduced in fine-tuning (FT-L, FT-M, masked fine-tuning)
FT_LOSSES = ("mean", "sum")

#: the states causal tracing restores (the same names, in the same order, as kcircuits.edit.trace.KINDS)
TRACE_KINDS = ("hidden", "mlp", "attn")


def _kinds(value: Any) -> tuple[str, ...]:
    """The traced kinds as a tuple without repeats, each one of :data:`TRACE_KINDS` (a string is one kind)."""
    if isinstance(value, str):
        value = (value,)
    require(isinstance(value, Iterable), f"kinds must be a list of {', '.join(TRACE_KINDS)}, got {value!r}")
    kinds = tuple(dict.fromkeys(value))
    require(bool(kinds), f"kinds is empty: give some of {', '.join(TRACE_KINDS)}")
    for kind in kinds:
        one_of(kind, TRACE_KINDS, "trace kind")
    return kinds


@dataclass(frozen=True)
class TraceSettings:
    """``kcircuits trace``: which prompts of a relation are traced and how (see :func:`kcircuits.edit.api.trace`)."""

    noise: float = option(3.0, "noise on the subject's embeddings, in standard deviations of the embedding "
                          "matrix's entries (ROME: 3)", type=float)
    samples: int = option(10, "noise draws per prompt; every probability is their mean")
    window: int = option(10, "layers restored together for the MLP and attention traces, centred on each layer "
                         "(ROME: 10)")
    kinds: tuple = option(TRACE_KINDS, "states to trace, any of: hidden (residual stream), mlp (MLP outputs), "
                          "attn (attention outputs); default all three",
                          nargs="+", choices=TRACE_KINDS, metavar="KIND")
    max_prompts: int = option(32, "at most this many prompts of the relation, a seeded choice made after the "
                              "known-facts filter")
    known_only: bool = option(True, "trace only facts the model knows (answer within --known-k)",
                              invert="--all-facts", invert_help="trace every fact, also those the model gets wrong")
    known_k: int = option(1, "rank within which a fact counts as known")
    template: int = option(0, "index of the relation's prompt template to fill with each subject")
    seed: int = option(0, "seed of the noise and of the prompts' choice")
    batch_size: int = option(128, "rows per forward pass (restorations x noise draws; memory, not results)",
                             hashed=False)
    device: str | None = option("cpu", "cpu, cuda, cuda:N or auto", hashed=False)
    dtype: str = option("float32", "weights' dtype", choices=DTYPES)

    def __post_init__(self) -> None:
        set_field(self, "noise", finite_number(self.noise, "--noise"))
        require(self.noise >= 0, f"--noise must be >= 0, got {self.noise:g}")
        set_field(self, "samples", whole_number(self.samples, "--samples", 1))
        set_field(self, "window", whole_number(self.window, "--window", 1))
        set_field(self, "kinds", _kinds(self.kinds))
        set_field(self, "max_prompts", whole_number(self.max_prompts, "--max-prompts", 1))
        require(isinstance(self.known_only, bool), f"known_only must be True or False, got {self.known_only!r}")
        set_field(self, "known_k", whole_number(self.known_k, "--known-k", 1))
        set_field(self, "template", whole_number(self.template, "--template", 0))
        set_field(self, "seed", whole_number(self.seed, "--seed"))
        set_field(self, "batch_size", whole_number(self.batch_size, "--batch-size", 1))
        require(self.device is None or isinstance(self.device, str), f"device must be a string, got {self.device!r}")
        one_of(self.dtype, DTYPES, "--dtype")


def _edit_methods() -> tuple[str, ...]:
    from kcircuits.edit.registry import edit_method_names

    return edit_method_names()


@dataclass(frozen=True)
class RequestSettings:
    """Which edit requests ``kcircuits edit SOURCE`` makes (:func:`kcircuits.edit.requests.load_requests`)."""

    n: int = option(10, "number of edit requests (a relation: seeded subjects; a file: its first N records)")
    n_paraphrases: int = option(2, "paraphrase prompts per request (a relation's other templates)")
    n_neighbours: int = option(5, "neighbourhood prompts per request (other subjects whose answer must not change)")
    other_relations: tuple = option((), "relations whose facts (asked with their own templates) must not change "
                                    "either: specificity beyond the edited relation", nargs="*", metavar="RELATION")
    n_other: int = option(5, "prompts per request from --other-relations")

    def __post_init__(self) -> None:
        set_field(self, "n", whole_number(self.n, "--n", 1))
        set_field(self, "n_paraphrases", whole_number(self.n_paraphrases, "--n-paraphrases", 0))
        set_field(self, "n_neighbours", whole_number(self.n_neighbours, "--n-neighbours", 0))
        require(not isinstance(self.other_relations, str), "other_relations must be a list of relation names")
        set_field(self, "other_relations", tuple(str(r) for r in self.other_relations))
        set_field(self, "n_other", whole_number(self.n_other, "--n-other", 0))


@dataclass(frozen=True)
class ValueSettings:
    """How ROME/MEMIT optimise the value they write (ROME's defaults for GPT-2 XL: 20 steps, lr 0.5,
    KL factor 0.0625, clamp 4, weight decay 0.5; the loss terms as in ROME's reference code, see
    :func:`kcircuits.edit.rome.optimised_values`)."""

    steps: int = option(20, "optimisation steps of the value written (ROME/MEMIT)", flag="--v-steps")
    lr: float = option(0.5, "learning rate of the value's optimisation (Adam)", flag="--v-lr", type=float)
    kl_factor: float = option(0.0625, "weight of the KL term keeping '{subject} is a' as it was", type=float)
    clamp_norm: float = option(4.0, "the value's change is at most this times the original value's norm",
                               type=float)
    weight_decay: float = option(0.5, "weight of ||change|| / ||value||^2 in the value's loss (ROME's form)",
                                 type=float)

    def __post_init__(self) -> None:
        set_field(self, "steps", whole_number(self.steps, "--v-steps", 0))
        for name in ("lr", "kl_factor", "clamp_norm", "weight_decay"):
            flag = "--v-lr" if name == "lr" else "--" + name.replace("_", "-")
            set_field(self, name, finite_number(getattr(self, name), flag))
            require(getattr(self, name) >= 0, f"{flag} must be >= 0, got {getattr(self, name):g}")


@dataclass(frozen=True)
class FinetuneOptions:
    """FT-L / FT-M on the command line (:class:`kcircuits.edit.finetune.FinetuneSettings` is built from
    these and the edited layers): ROME's FT-L bounds each weight's change by 5e-4 on GPT-2 XL."""

    ft_steps: int = option(25, "fine-tuning steps at most (FT-L, FT-M)")
    ft_lr: float = option(5e-4, "fine-tuning learning rate (Adam)", type=float)
    ft_bound: float = option(5e-4, "FT-L: every weight's change stays within +-this (L-infinity)", type=float)
    ft_loss: str = option("mean", "a request's loss: mean or sum of its target tokens' NLL", choices=FT_LOSSES)
    loss_margin: float | None = option(None, "stop once every target token is top-1 by more than this logit "
                                       "margin (default: run every step)", type=float)

    def __post_init__(self) -> None:
        set_field(self, "ft_steps", whole_number(self.ft_steps, "--ft-steps", 0))
        for name, flag in (("ft_lr", "--ft-lr"), ("ft_bound", "--ft-bound")):
            set_field(self, name, finite_number(getattr(self, name), flag))
            require(getattr(self, name) > 0, f"{flag} must be > 0, got {getattr(self, name):g}")
        one_of(self.ft_loss, FT_LOSSES, "--ft-loss")
        if self.loss_margin is not None:
            set_field(self, "loss_margin", finite_number(self.loss_margin, "--loss-margin"))
            require(self.loss_margin >= 0, f"--loss-margin must be >= 0, got {self.loss_margin:g}")


#: the MLP layer ``kcircuits edit`` writes at when ``--layer`` is not given, by model name: chosen by measuring
#: ROME at several layers (docs/editing.md, "Choosing the layer"); other models need ``--layer``
MEASURED_LAYERS = {"smollm2-135m": 2}


@dataclass(frozen=True)
class EditSettings:
    """How ``kcircuits edit`` writes the requests: the method, where, and with which key statistics."""

    method: str = option("rome", "edit method", choices=_edit_methods)
    layer: int | None = option(None, "the MLP layer edited (ROME, FT; MEMIT: the last layer of its range); default "
                               "for the bundled SmolLM2: 2, chosen by measurement (docs/editing.md); other models "
                               "need it (`kcircuits trace RELATION` prints the critical layer)", type=int)
    n_layers: int = option(1, "layers edited, ending at --layer (MEMIT spreads each edit over them, FT-L/FT-M "
                           "train them; ROME edits one)")
    corpus: str | None = option(None, "text file, JSONL (a 'text' field per line) or folder of .txt files for the "
                                "key statistics (default: text the model generates from neutral prefixes)")
    corpus_texts: int = option(64, "texts the model generates for the key statistics when no --corpus is given")
    corpus_tokens: int = option(64, "tokens per generated text (key statistics and the held-out perplexity texts)")
    perplexity_texts: int = option(16, "generated held-out texts whose log-perplexity is compared before and after")
    n_prefixes: int = option(5, "context prefixes (generated) the key is averaged over, besides the bare prompt")
    covariance_weight: float = option(15000.0, "MEMIT: weight of keeping other keys' values (lambda)", type=float)
    generation_tokens: int = option(32, "tokens generated per generation prompt for the fluency metric (0: skip)")
    seed: int = option(0, "seed of the requests drawn from a relation, the generated corpus and the prefixes")
    batch_size: int = option(16, "sequences per forward pass (memory, not results)", hashed=False)
    device: str | None = option("cpu", "cpu, cuda, cuda:N or auto", hashed=False)
    dtype: str = option("float32", "weights' dtype", choices=DTYPES)

    def __post_init__(self) -> None:
        one_of(self.method, _edit_methods(), "edit method")
        if self.layer is not None:
            set_field(self, "layer", whole_number(self.layer, "--layer", 0))
        set_field(self, "n_layers", whole_number(self.n_layers, "--n-layers", 1))
        set_field(self, "corpus_texts", whole_number(self.corpus_texts, "--corpus-texts", 1))
        set_field(self, "corpus_tokens", whole_number(self.corpus_tokens, "--corpus-tokens", 1))
        set_field(self, "perplexity_texts", whole_number(self.perplexity_texts, "--perplexity-texts", 0))
        set_field(self, "n_prefixes", whole_number(self.n_prefixes, "--n-prefixes", 0))
        set_field(self, "covariance_weight", finite_number(self.covariance_weight, "--covariance-weight"))
        require(self.covariance_weight >= 0, f"--covariance-weight must be >= 0, got {self.covariance_weight:g}")
        set_field(self, "generation_tokens", whole_number(self.generation_tokens, "--generation-tokens", 0))
        set_field(self, "seed", whole_number(self.seed, "--seed"))
        set_field(self, "batch_size", whole_number(self.batch_size, "--batch-size", 1))
        require(self.device is None or isinstance(self.device, str), f"device must be a string, got {self.device!r}")
        one_of(self.dtype, DTYPES, "--dtype")

    def layers(self) -> list[int]:
        """The ``n_layers`` layers ending at ``layer`` (MEMIT's range, FT's trained layers)."""
        if self.layer is None:
            raise KcircuitsError("give the MLP layer to edit with --layer; `kcircuits trace RELATION` prints the "
                                 "critical layer, ROME's choice")
        return list(range(self.layer - self.n_layers + 1, self.layer + 1))


@dataclass(frozen=True)
class EditCircuitSettings:
    """Which edited facts ``kcircuits edit-circuits`` compares, and on how many prompt pairs.

    Each fact's circuit is found on ``pairs`` clean/corrupt pairs: the edit prompt and its
    paraphrases, each paired with prompts of other subjects that have the same number of tokens
    (one circuit per fact, like a relation's circuit but over one subject's prompts)."""

    facts: int = option(2, "edited facts whose circuits are compared: the first N requests of the edit run")
    pairs: int = option(8, "clean/corrupt prompt pairs per fact (the edit prompt and its paraphrases, each with "
                           "other subjects' prompts of the same token length)")
    neighbours: int = option(8, "neighbour prompts whose circuit is compared before and after the edit, and whose "
                                "Hit@10 is measured (0: skip the leak check)")
    top_heads: int = option(5, "heads that move the subject's attribute listed per fact")

    PARAM: ClassVar[str] = "edit_circuits"

    def __post_init__(self) -> None:
        set_field(self, "facts", whole_number(self.facts, "--facts", 1))
        set_field(self, "pairs", whole_number(self.pairs, "--pairs", 1))
        set_field(self, "neighbours", whole_number(self.neighbours, "--neighbours", 0))
        set_field(self, "top_heads", whole_number(self.top_heads, "--top-heads", 1))


@dataclass(frozen=True)
class MaskedFinetuneSettings:
    """How :func:`kcircuits.edit.masked_finetune.masked_finetune` trains (the same for every allowed set it is
    compared on).

    FT-M's objective and Adam, with no bound and no early stop: every variant gets the same step budget.

    Fields:
        steps: Adam steps (each on every request); 0 records only the untrained model.
        lr: Adam's learning rate.
        loss: ``"mean"`` (each request's per-token mean target NLL, EasyEdit's) or ``"sum"`` (its whole NLL).
        batch_size: requests per forward pass; gradients are accumulated over the batches, so this
            changes memory and float rounding, not what is trained.
        eval_every: record the curve every this many steps (1 = after every step); step 0 and the last
            step are always recorded.
        seed: seeds torch's random generator during the call (only dropout of a model left in train mode
            draws from it); the caller's generator state is restored after.
    """

    steps: int = option(25, "Adam steps, each on every request (EasyEdit's FT-M: 25)")
    lr: float = option(5e-4, "Adam's learning rate (EasyEdit's FT-M: 5e-4)", type=float)
    loss: str = option("mean", "target NLL per request: mean over its tokens, or their sum", choices=FT_LOSSES)
    batch_size: int = option(16, "requests per forward pass (memory, not results)", hashed=False)
    eval_every: int = option(1, "record the edit metrics every this many steps (1 = every step)")
    seed: int = option(0, "seed of torch's generator during training (dropout only)")

    PARAM: ClassVar[str] = "finetune"

    def __post_init__(self) -> None:
        set_field(self, "steps", whole_number(self.steps, "steps", 0))
        set_field(self, "lr", finite_number(self.lr, "lr"))
        require(self.lr > 0, f"lr must be > 0, got {self.lr:g}")
        one_of(self.loss, FT_LOSSES, "fine-tuning loss")
        set_field(self, "batch_size", whole_number(self.batch_size, "batch_size", 1))
        set_field(self, "eval_every", whole_number(self.eval_every, "eval_every", 1))
        set_field(self, "seed", whole_number(self.seed, "seed", 0))
