"""``kcircuits influence fit|score``: thin wrappers over :mod:`kcircuits.influence.api`.

Wire into the main CLI with ``add_parser(sub)`` in ``build_parser`` and ``"influence": run`` in the
dispatch table; bad input raises :class:`KcircuitsError`, which the main CLI prints on one line
(exit code 2).
"""

from __future__ import annotations

import argparse

from kcircuits.errors import KcircuitsError


def _damping(text: str) -> float | str:
    if text == "heuristic":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"damping must be a number or 'heuristic', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("damping must be >= 0")
    return value


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (bundled), a local HF folder, or a hub id")
    p.add_argument("--out", help="run folder (default: runs/influence[-fit]_<...>_<config hash>)")
    p.add_argument("--fisher", default="true", choices=["true", "empirical"],
                   help="labels of the curvature's pseudo-loss: sampled from the model (true) or the data")
    p.add_argument("--max-length", type=int, default=256, help="truncate sequences to this many tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--include", nargs="+", metavar="PATTERN",
                   help="fnmatch patterns of the linear modules to track (e.g. '*.mlp.*'); default all in the blocks")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-seconds", type=float, default=60.0,
                   help="checkpoint the factor fit at most this often (0: after every batch)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``influence`` (with ``fit`` and ``score``) to the main CLI's subparsers."""
    inf = subparsers.add_parser("influence", help="which training sequences taught the model a completion")
    sub = inf.add_subparsers(dest="influence_command", required=True)

    f = sub.add_parser("fit", help="fit curvature factors (EK-FAC) on a training corpus; resumable")
    f.add_argument("corpus", help="a .txt (blank-line separated), .jsonl ({\"text\": ...}) file, or a folder of them")
    f.add_argument("--strategy", default="ekfac", choices=["ekfac", "kfac", "diagonal"])
    _shared(f)

    s = sub.add_parser("score", help="influence of every training sequence on each query's completion")
    s.add_argument("queries", help='a .jsonl file of {"prompt": ..., "completion": ...}')
    s.add_argument("corpus", help="the training corpus (as for fit)")
    s.add_argument("--factors", help="a fit run folder to reuse (default: fit here on the whole corpus)")
    s.add_argument("--strategy", default="ekfac", choices=["ekfac", "kfac", "diagonal", "identity", "lissa", "exact"])
    s.add_argument("--damping", type=_damping, default="heuristic", help="a number (absolute λ) or 'heuristic'")
    s.add_argument("--no-per-layer", action="store_true", help="skip the per-layer breakdown")
    s.add_argument("--per-token", action="store_true", help="keep per-token scores of every training sequence")
    s.add_argument("--components", nargs="+", metavar="NODE", help="heads/MLPs to attribute to, e.g. a3.h2 m5")
    s.add_argument("--circuit", help="take --components from a circuit.json or discover run folder")
    s.add_argument("--query-rank", type=int, default=32, help="low-rank query gradients (0: exact)")
    s.add_argument("--rescore-top-k", type=int, help="rescore each query's top-k exactly (full-rank query)")
    s.add_argument("--bm25-candidates", type=int, help="score only the union of each query's BM25 top-N documents")
    s.add_argument("--normalize", choices=["none", "relative"], default="none",
                   help="relative: divide each training sequence's scores by sqrt(its self-influence) (RelatIF)")
    s.add_argument("--measurement", choices=["logprob", "margin"], default="logprob",
                   help="query function: log-probability of the completion, or its log-odds (margin), which "
                        "does not vanish on facts the model is already certain of")
    s.add_argument("--top-k", type=int, default=10, help="top sequences per query in the results and report")
    s.add_argument("--no-highlight", action="store_true", help="skip rescoring the top-k per token for the report")
    s.add_argument("--bootstrap", type=int, default=100, help="power-law goodness-of-fit draws per query (0: none)")
    s.add_argument("--checkpoints", nargs="+", metavar="FOLDER",
                   help="earlier training checkpoints of --model: add their scores (each with its own factors), "
                        "which finds the sources of facts the final model has memorised")
    s.add_argument("--lissa-depth", type=int, help="LiSSA recursion depth (strategy lissa)")
    s.add_argument("--lissa-scale", type=float, help="LiSSA scale (strategy lissa)")
    _shared(s)
    return inf


def run(args: argparse.Namespace) -> None:
    """Dispatch ``kcircuits influence fit|score``."""
    from kcircuits.influence import api

    if args.influence_command == "fit":
        res = api.fit(args.model, args.corpus, out=args.out, strategy=args.strategy, fisher=args.fisher,
                      max_length=args.max_length, batch_size=args.batch_size, include=args.include, seed=args.seed,
                      device=args.device, dtype=args.dtype, checkpoint_seconds=args.checkpoint_seconds,
                      progress=not args.quiet)
        print(f"factors: {res.info['n_sequences']} sequences, {res.info['n_tokens']} tokens, "
              f"{len(res.info['modules'])} modules, {res.info['fit_s']:.1f} s -> {res.folder / 'factors'}")
        print(f"report: {res.report}")
        return
    if args.influence_command != "score":
        raise KcircuitsError(f"unknown influence command {args.influence_command!r}: use fit or score")
    lissa = {k: v for k, v in (("depth", args.lissa_depth), ("scale", args.lissa_scale)) if v is not None} or None
    res = api.score(args.model, args.queries, args.corpus, factors=args.factors, out=args.out, strategy=args.strategy,
                    fisher=args.fisher, damping=args.damping, per_layer=not args.no_per_layer,
                    per_token=args.per_token, components=args.components, circuit=args.circuit,
                    query_rank=args.query_rank or None, rescore_top_k=args.rescore_top_k,
                    bm25_candidates=args.bm25_candidates,
                    normalize=None if args.normalize == "none" else args.normalize,
                    measurement=args.measurement, top_k=args.top_k, highlight=not args.no_highlight,
                    max_length=args.max_length, batch_size=args.batch_size, include=args.include, lissa=lissa,
                    power_law_bootstrap=args.bootstrap, seed=args.seed, device=args.device, dtype=args.dtype,
                    checkpoint_seconds=args.checkpoint_seconds, checkpoints=args.checkpoints,
                    progress=not args.quiet)
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
