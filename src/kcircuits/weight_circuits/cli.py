"""``kcircuits weight-circuit RELATION...`` and ``kcircuits edit-inside RELATION --circuit RUN``: thin wrappers
over :func:`kcircuits.weight_circuits.api.weight_circuit` and :func:`~kcircuits.weight_circuits.api.edit_inside`.

The options come from the settings dataclasses (:mod:`kcircuits.weight_circuits.settings`,
:class:`~kcircuits.edit.settings.MaskedFinetuneSettings`, :class:`~kcircuits.settings.PromptSettings`,
:class:`~kcircuits.settings.RunSettings`); only the inputs are declared here. Importing this module loads no
torch. The masks' and the fine-tuning's seed and batch size are ``--seed`` and ``--batch-size``.
"""

from __future__ import annotations

import argparse

from kcircuits.edit.settings import MaskedFinetuneSettings
from kcircuits.settings import PromptSettings, RunSettings, add_arguments, from_args
from kcircuits.weight_circuits.settings import (
    CompositionSettings,
    EditInsideSettings,
    WeightCircuitSettings,
    WeightMaskSettings,
)

#: options another concern of the same command already offers (its value is used for both)
_SHARED = ("batch_size", "seed")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``weight-circuit`` to the main CLI's subparsers (``subparsers``: what ``add_subparsers`` returned)."""
    p = subparsers.add_parser("weight-circuit", help="weight-level circuits (learned masks over the weights, Ge et al. "
                                                     "2024): a density sweep, composition, overlap between relations")
    p.add_argument("relations", nargs="+", help="bundled relation names (see `kcircuits datasets`) or .json/.csv files")
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (bundled), a local HF folder, or a hub id")
    p.add_argument("--out", help="run folder (default: runs/weight-circuit_<relations>_<model>_<config hash>)")
    p.add_argument("--edge-circuits", nargs="*", default=(), metavar="RUN",
                   help="discover run folders of the same relations: overlap of each weight circuit with its edge "
                        "circuit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_arguments(p, WeightCircuitSettings, group=p.add_argument_group("sweep"))
    add_arguments(p, WeightMaskSettings, exclude=("density",), group=p.add_argument_group("mask training"))
    add_arguments(p, CompositionSettings, group=p.add_argument_group("composition"))
    add_arguments(p, PromptSettings, defaults={"split": 0.5}, group=p.add_argument_group("prompts"))
    add_arguments(p, RunSettings, group=p.add_argument_group("run"))
    return p


def run(args: argparse.Namespace) -> None:
    """Run ``kcircuits weight-circuit`` from the parsed command line ``args``; print one line per relation."""
    from kcircuits.weight_circuits.api import weight_circuit

    res = weight_circuit(args.relations, args.model, out=args.out, edge_circuits=args.edge_circuits,
                         progress=not args.quiet, weight_circuit=from_args(WeightCircuitSettings, args),
                         mask=from_args(WeightMaskSettings, args), composition=from_args(CompositionSettings, args),
                         prompts=from_args(PromptSettings, args), run=from_args(RunSettings, args))
    for relation, rel in res["relations"].items():
        cells = ", ".join(f"{r['density']:g}: circuit {r['evaluation']['circuit']['hit@10']:.2f} / complement "
                          f"{r['evaluation']['complement']['hit@10']:.2f}" for r in rel["sweep"])
        full = rel["sweep"][0]["evaluation"]["full"]["hit@10"] if rel["sweep"] else float("nan")
        print(f"{relation}: held-out Hit@10, full model {full:.2f}; by density {cells}")
    print(f"report: {res['folder']}/report.html")


def add_inside_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``edit-inside`` to the main CLI's subparsers."""
    p = subparsers.add_parser("edit-inside", help="fine-tune new facts into a weight circuit only, its complement "
                                                  "only, or all weights (and an edge circuit's components vs the rest)")
    p.add_argument("relation", help="the relation (one of the weight-circuit run's)")
    p.add_argument("--circuit", required=True, metavar="RUN", help="a `kcircuits weight-circuit` run folder")
    p.add_argument("--edge-circuit", metavar="RUN", help="a discover run folder: also its heads and MLPs vs the rest")
    p.add_argument("--model", help="the model (default: the one the weight-circuit run names)")
    p.add_argument("--out", help="run folder (default: runs/edit-inside_<relation>_<model>_<config hash>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_arguments(p, EditInsideSettings, group=p.add_argument_group("requests and circuit"))
    add_arguments(p, MaskedFinetuneSettings, exclude=_SHARED, group=p.add_argument_group("fine-tuning (FT-M)"))
    add_arguments(p, RunSettings, group=p.add_argument_group("run"))
    return p


def run_inside(args: argparse.Namespace) -> None:
    """Run ``kcircuits edit-inside`` from the parsed command line; print the metrics after the last step."""
    from kcircuits.weight_circuits.api import edit_inside

    res = edit_inside(args.relation, args.circuit, args.model, out=args.out, edge_circuit=args.edge_circuit,
                      progress=not args.quiet, edit_inside=from_args(EditInsideSettings, args),
                      finetune=from_args(MaskedFinetuneSettings, args), run=from_args(RunSettings, args))
    print(f"{res['n_requests']} requests, circuit of density {res['density']:g}; after the last step:")
    for name, v in res["variants"].items():
        last = v["curve"][-1]
        print(f"  {name:<14} ({v['n_trainable']:>11,} weights) efficacy {last['efficacy_success']:.2f}  "
              f"generalisation {last['generalisation_success']:.2f}  specificity {last['specificity_success']:.2f}")
    print(f"report: {res['folder']}/report.html")
