"""``kcircuits trace RELATION``: a thin wrapper over :func:`kcircuits.edit.api.trace`.

The options come from :class:`~kcircuits.edit.settings.TraceSettings`; only the inputs (relation,
model, folder) are declared here. Wired into the main CLI with ``add_parser(sub)`` in ``build_parser``
and ``"trace"`` in the dispatch table. Importing this module loads no torch (the API is imported
inside :func:`run`), so ``kcircuits --help`` stays fast; bad input raises
:class:`~kcircuits.errors.KcircuitsError`, which the main CLI prints on one line (exit code 2).
"""

from __future__ import annotations

import argparse

from kcircuits.edit.settings import TraceSettings
from kcircuits.settings import add_arguments, from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``trace`` to the main CLI's subparsers (``subparsers``: what ``add_subparsers`` returned)."""
    p = subparsers.add_parser("trace", help="causal tracing: which layers and positions recall a relation's facts "
                                            "(heatmaps, and ROME's edit layer)")
    p.add_argument("relation", help="a bundled relation name (see `kcircuits datasets`) or a .json/.csv file")
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (bundled), a local HF folder, or a hub id")
    p.add_argument("--out", help="run folder (default: runs/trace_<relation>_<model>_<config hash>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_arguments(p, TraceSettings, group=p.add_argument_group("trace settings"))
    return p


def run(args: argparse.Namespace) -> None:
    """Run ``kcircuits trace`` from the parsed command line ``args``; print the critical layer and the report."""
    from kcircuits.edit.api import trace, trace_summary

    res = trace(args.relation, args.model, out=args.out, settings=from_args(TraceSettings, args),
                progress=not args.quiet)
    numbers = trace_summary(res.result)
    print(f"{numbers['n_prompts']} prompts: p(answer) clean {numbers['p_clean_mean']:.3f}, "
          f"subject corrupted {numbers['p_corrupt_mean']:.3f}")
    if res.critical_layer is not None:
        print(f"critical layer: {res.critical_layer} "
              "(largest MLP effect at the subject's last token; ROME's edit layer)")
    print(f"report: {res.report}")
