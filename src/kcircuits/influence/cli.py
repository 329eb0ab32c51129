"""``kcircuits influence fit|score``: thin wrappers over :mod:`kcircuits.influence.api`.

The options come from the settings dataclasses (:class:`~kcircuits.influence.settings.FitSettings`,
:class:`~kcircuits.influence.settings.ScoreSettings`); only the inputs (model, data, folders) are
declared here. Wire into the main CLI with ``add_parser(sub)`` in ``build_parser`` and
``"influence": run`` in the dispatch table; bad input raises :class:`KcircuitsError`, which the main
CLI prints on one line (exit code 2).
"""

from __future__ import annotations

import argparse

from kcircuits.errors import KcircuitsError
from kcircuits.influence.settings import FitSettings, ScoreSettings
from kcircuits.settings import add_arguments, from_args


def _inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (bundled), a local HF folder, or a hub id")
    p.add_argument("--out", help="run folder (default: runs/influence[-fit]_<...>_<config hash>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``influence`` (with ``fit`` and ``score``) to the main CLI's subparsers."""
    inf = subparsers.add_parser("influence", help="which training sequences taught the model a completion")
    sub = inf.add_subparsers(dest="influence_command", required=True)

    f = sub.add_parser("fit", help="fit curvature factors (EK-FAC) on a training corpus; resumable")
    f.add_argument("corpus", help="a .txt (blank-line separated), .jsonl ({\"text\": ...}) file, or a folder of them")
    _inputs(f)
    add_arguments(f, FitSettings, group=f.add_argument_group("fit settings"))

    s = sub.add_parser("score", help="influence of every training sequence on each query's completion")
    s.add_argument("queries", help='a .jsonl file of {"prompt": ..., "completion": ...}')
    s.add_argument("corpus", help="the training corpus (as for fit)")
    _inputs(s)
    s.add_argument("--factors", help="a fit run folder to reuse (default: fit here on the whole corpus)")
    s.add_argument("--circuit", help="add the heads and MLPs of a circuit.json or discover run folder to --components")
    s.add_argument("--checkpoints", nargs="+", metavar="FOLDER",
                   help="earlier training checkpoints of --model: add their scores (each with its own factors), "
                        "which finds the sources of facts the final model has memorised")
    add_arguments(s, ScoreSettings, defaults={"normalize": "none"}, group=s.add_argument_group("score settings"))
    return inf


def run(args: argparse.Namespace) -> None:
    """Dispatch ``kcircuits influence fit|score``."""
    from kcircuits.influence import api

    if args.influence_command == "fit":
        res = api.fit(args.model, args.corpus, out=args.out, settings=from_args(FitSettings, args),
                      progress=not args.quiet)
        print(f"factors: {res.info['n_sequences']} sequences, {res.info['n_tokens']} tokens, "
              f"{len(res.info['modules'])} modules, {res.info['fit_s']:.1f} s -> {res.folder / 'factors'}")
        print(f"report: {res.report}")
        return
    if args.influence_command != "score":
        raise KcircuitsError(f"unknown influence command {args.influence_command!r}: use fit or score")
    res = api.score(args.model, args.queries, args.corpus, factors=args.factors, out=args.out, circuit=args.circuit,
                    checkpoints=args.checkpoints, settings=from_args(ScoreSettings, args), progress=not args.quiet)
    _print_scores(res)


def _print_scores(res) -> None:
    r = res.results
    k = r["top_k"]
    print(f"{r['n_queries']} queries x {r['n_scored']} training sequences ({r['strategy']})")
    for q in r["queries"][:20]:
        best = q["top"][0] if q["top"] else None
        recall = f"  recall@{k} {q[f'recall@{k}']:.2f}" if f"recall@{k}" in q else ""
        top = f"  top: {best['id']} ({best['score']:.3g})" if best else ""
        print(f"  {q['prompt']!r} -> {q['completion']!r}{top}{recall}")
    if f"mean_recall@{k}" in r:
        print(f"mean recall@{k} of known sources: {r[f'mean_recall@{k}']:.3f}")
    print(f"report: {res.report}")
