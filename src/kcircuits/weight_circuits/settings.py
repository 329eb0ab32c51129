"""Typed settings of ``kcircuits weight-circuit`` and ``kcircuits edit-inside`` (DESIGN.md decision 10).

Each field's default, validation, command-line flag and help live here once: the API
(:mod:`kcircuits.weight_circuits.api`) takes these objects (or their fields by name), the CLI generates its
options from them, and ``config.json`` records :func:`kcircuits.settings.hashed_dict` of each. The weight-mask
training settings (:class:`WeightMaskSettings`) live here too, so this module imports no torch and
``kcircuits --help`` stays fast; :mod:`kcircuits.discover.weight_masks` re-exports them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from kcircuits.settings import finite_number, one_of, option, require, set_field, whole_number

__all__ = ["DEFAULT_DENSITIES", "OBJECTIVES", "SCHEDULES", "WEIGHT_ABLATIONS", "CompositionSettings",
           "EditInsideSettings", "WeightCircuitSettings", "WeightMaskSettings"]

#: what a weight-mask objective reproduces (the same names as kcircuits.discover.weight_masks)
OBJECTIVES = ("kl", "ce")
#: what a removed weight becomes (the same names as kcircuits.models.masking.ABLATIONS; a test checks it)
WEIGHT_ABLATIONS = ("zero", "mean")
#: how the sweep's densities are trained
SCHEDULES = ("nested", "independent")
#: the circuit sizes of the sweep: Ge et al. (2024) find the "ideal" circuit between 5% and 50% of the weights
DEFAULT_DENSITIES = (0.05, 0.1, 0.25, 0.5)


def _open_unit(value: object, name: str) -> float:
    """``value`` as a float strictly between 0 and 1."""
    v = finite_number(value, name)
    require(0 < v < 1, f"{name} must be strictly between 0 and 1, got {v:g}")
    return v


def _positive(value: object, name: str) -> float:
    """``value`` as a finite float > 0."""
    v = finite_number(value, name)
    require(v > 0, f"{name} must be > 0, got {v:g}")
    return v


def _densities(value: Any) -> tuple[float, ...]:
    """The densities as a sorted tuple without repeats, each in (0, 1) (one number is one density)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)
    require(isinstance(value, Iterable) and not isinstance(value, str),
            f"densities must be a list of numbers in (0, 1), e.g. 0.05 0.1 0.25 0.5; got {value!r}")
    out = tuple(sorted({_open_unit(v, "each density") for v in value}))
    require(bool(out), "densities is empty: give at least one circuit size, e.g. --densities 0.1")
    return out


@dataclass(frozen=True)
class WeightMaskSettings:
    """How a weight circuit is trained (see :mod:`kcircuits.discover.weight_masks` for the method).

    Fields:
        density: the target share ``d`` of the masked entries the circuit keeps, in (0, 1); also the
            exact size of the thresholded mask (``round(d · n)`` entries). ``kcircuits weight-circuit``
            sets it from each of its ``densities``.
        steps: training steps, one batch (cycled through the batches given) and one gate sample each.
        lr: Adam's learning rate on the mask logits.
        objective: ``"kl"`` (KL from the full model's next-token distribution at the scored positions to
            the circuit's) or ``"ce"`` (the answer's cross-entropy).
        ablation: what a removed weight becomes, in training and in the recorded circuit (``"zero"`` or
            ``"mean"``: the mean of its parameter's entries).
        embeddings: also mask the token embedding (and learned positions) and the unembedding.
        batch_size: prompts per forward pass; a step's batch is split into chunks this size whose
            gradients add up (memory, not results, up to float rounding). The commands take it from
            ``--batch-size`` (:class:`~kcircuits.settings.RunSettings`).
        seed: seeds the gate samples (the initial logits are all equal). The commands take it from
            ``--seed`` (:class:`~kcircuits.settings.RunSettings`).
        checkpoint_every: write a checkpoint every this many steps (and after the last).
        temperature: the hard-concrete temperature β (Louizos et al.: 2/3).
        stretch_low: the stretch's lower end ``l`` < 0 (Louizos et al.: −0.1).
        stretch_high: the stretch's upper end ``r`` > 1 (Louizos et al.: 1.1).
        init_keep: every entry's initial probability that its gate is exactly 1 (near 1: training starts
            from the full model, as in Bhaskar et al.'s initialisation).
        warmup: share of the steps over which the target falls from the initial expected density to ``density``.
        multiplier_lr: step size of the gradient ascent on the Lagrange multipliers λ₁, λ₂.
    """

    density: float = option(0.1, "target share of the masked weights the circuit keeps, in (0, 1)")
    steps: int = option(500, "training steps (one batch and one gate sample each)")
    lr: float = option(0.1, "Adam's learning rate on the mask logits")
    objective: str = option("kl", "what the circuit reproduces: the full model's next-token distribution (KL) "
                            "or the answer (cross-entropy)", choices=OBJECTIVES)
    ablation: str = option("zero", "what a weight outside the circuit becomes (recorded with the circuit)",
                           flag="--weight-ablation", choices=WEIGHT_ABLATIONS)
    embeddings: bool = option(False, "also mask the token embedding and the unembedding")
    batch_size: int = option(8, "prompts per forward pass (memory, not results)", hashed=False, cli=False)
    seed: int = option(0, "seed of the hard-concrete gate samples", cli=False)
    checkpoint_every: int = option(50, "steps between checkpoints", hashed=False)
    temperature: float = option(2 / 3, "hard-concrete temperature beta", type=float)
    stretch_low: float = option(-0.1, "hard-concrete stretch, lower end l < 0", type=float)
    stretch_high: float = option(1.1, "hard-concrete stretch, upper end r > 1", type=float)
    init_keep: float = option(0.999, "initial probability that a gate is exactly 1, in (0, 1)", type=float)
    warmup: float = option(0.5, "share of the steps over which the target density falls to --density", type=float)
    multiplier_lr: float = option(1.0, "step size of the gradient ascent on the Lagrange multipliers", type=float)

    PARAM: ClassVar[str] = "mask"

    def __post_init__(self) -> None:
        set_field(self, "density", _open_unit(self.density, "--density"))
        set_field(self, "steps", whole_number(self.steps, "--steps", 1))
        set_field(self, "lr", _positive(self.lr, "--lr"))
        one_of(self.objective, OBJECTIVES, "weight-mask objective")
        one_of(self.ablation, WEIGHT_ABLATIONS, "weight ablation")
        require(isinstance(self.embeddings, bool), f"embeddings must be True or False, got {self.embeddings!r}")
        set_field(self, "batch_size", whole_number(self.batch_size, "--batch-size", 1))
        set_field(self, "seed", whole_number(self.seed, "--seed"))
        set_field(self, "checkpoint_every", whole_number(self.checkpoint_every, "--checkpoint-every", 1))
        set_field(self, "temperature", _positive(self.temperature, "temperature"))
        set_field(self, "stretch_low", finite_number(self.stretch_low, "stretch_low"))
        require(self.stretch_low < 0, f"stretch_low must be < 0 (gates must reach exactly 0), got {self.stretch_low:g}")
        set_field(self, "stretch_high", finite_number(self.stretch_high, "stretch_high"))
        require(self.stretch_high > 1, f"stretch_high must be > 1 (gates must reach exactly 1), "
                                       f"got {self.stretch_high:g}")
        set_field(self, "init_keep", _open_unit(self.init_keep, "init_keep"))
        set_field(self, "warmup", finite_number(self.warmup, "warmup"))
        require(0 <= self.warmup <= 1, f"warmup must be a share of the steps in [0, 1], got {self.warmup:g}")
        set_field(self, "multiplier_lr", _positive(self.multiplier_lr, "multiplier_lr"))


@dataclass(frozen=True)
class CompositionSettings:
    """How :func:`kcircuits.analyze.weight_composition.composition` decides which modules are in the circuit,
    and its random baseline.

    Fields:
        module_threshold: a module is in the circuit when the circuit keeps at least this share of its
            entries; in [0, 1] (0 counts every module, 1 only fully kept ones).
        random_draws: random masks drawn for the chance level of the module-level view (0: none).
        seed: seed of those draws.
    """

    module_threshold: float = option(0.5, "a module is in the circuit when the circuit keeps at least this share "
                                          "of its weights", type=float)
    random_draws: int = option(200, "random masks of the circuit's density drawn for the module-level chance level")
    seed: int = option(0, "seed of those random masks", cli=False)

    PARAM: ClassVar[str] = "composition"

    def __post_init__(self) -> None:
        set_field(self, "module_threshold", finite_number(self.module_threshold, "module_threshold"))
        require(0 <= self.module_threshold <= 1,
                f"module_threshold is a share of a module's weights: give a number in [0, 1], "
                f"got {self.module_threshold:g}")
        set_field(self, "random_draws", whole_number(self.random_draws, "random_draws", 0))
        set_field(self, "seed", whole_number(self.seed, "seed"))


@dataclass(frozen=True)
class WeightCircuitSettings:
    """What ``kcircuits weight-circuit`` sweeps and how it reads the sweep.

    Fields:
        densities: the circuit sizes, each a share of the masked weights in (0, 1); one mask is trained per
            density and relation (sorted, repeats dropped).
        schedule: ``"nested"``: the largest density is trained from the full model and each smaller one
            continues from the next larger one's logits, ``steps`` steps each (a small circuit then starts
            near its size instead of from the full model); ``"independent"``: every density is trained from
            the full model.
        keep_share: the circuit alone "keeps" the relation when its Hit@10 on the held-out prompts is at
            least this share of the full model's, and the complement "loses" it when its Hit@10 is below
            that share: the report gives the smallest density at which each holds.
    """

    densities: tuple[float, ...] = option(DEFAULT_DENSITIES, "circuit sizes to train, shares of the masked "
                                          "weights", nargs="+", type=float, metavar="D")
    schedule: str = option("nested", "nested: each smaller circuit continues training from the next larger one "
                                     "(--steps each); independent: every density from the full model",
                           choices=SCHEDULES)
    keep_share: float = option(0.7, "share of the full model's held-out Hit@10 the circuit must keep", type=float)

    PARAM: ClassVar[str] = "weight_circuit"

    def __post_init__(self) -> None:
        set_field(self, "densities", _densities(self.densities))
        one_of(self.schedule, SCHEDULES, "density schedule")
        set_field(self, "keep_share", _open_unit(self.keep_share, "--keep-share"))


@dataclass(frozen=True)
class EditInsideSettings:
    """Which circuit ``kcircuits edit-inside`` edits inside and outside of, and on how many requests.

    Fields:
        n: counterfactual edit requests drawn from the relation (new target: another object of it).
        density: the weight circuit of the ``weight-circuit`` run to use, by its density; ``None``: the
            smallest density whose circuit keeps the relation (its ``keep_share``), else the largest.
        ablation: how the circuit alone is run when checking whether it still holds the old fact
            (``None``: the ablation the circuit was trained with).
    """

    n: int = option(50, "counterfactual edit requests from the relation")
    density: float | None = option(None, "which circuit of the weight-circuit run (default: the smallest that "
                                         "keeps the relation)", type=float)
    ablation: str | None = option(None, "how the circuit alone runs in the old-fact check (default: as trained)",
                                  flag="--check-ablation", choices=WEIGHT_ABLATIONS)

    PARAM: ClassVar[str] = "edit_inside"

    def __post_init__(self) -> None:
        set_field(self, "n", whole_number(self.n, "--n", 1))
        if self.density is not None:
            set_field(self, "density", _open_unit(self.density, "--density"))
        if self.ablation is not None:
            one_of(self.ablation, WEIGHT_ABLATIONS, "weight ablation")
