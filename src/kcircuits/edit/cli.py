"""``kcircuits trace RELATION`` and ``kcircuits edit SOURCE``: thin wrappers over :func:`kcircuits.edit.api.trace`
and :func:`kcircuits.edit.api.edit`.

The options come from :class:`~kcircuits.edit.settings.TraceSettings`; only the inputs (relation,
model, folder) are declared here. Wired into the main CLI with ``add_parser(sub)`` in ``build_parser``
and ``"trace"`` in the dispatch table. Importing this module loads no torch (the API is imported
inside :func:`run`), so ``kcircuits --help`` stays fast; bad input raises
:class:`~kcircuits.errors.KcircuitsError`, which the main CLI prints on one line (exit code 2).
"""

from __future__ import annotations

import argparse

from kcircuits.edit.settings import (
    EditCircuitSettings,
    EditSettings,
    FinetuneOptions,
    RequestSettings,
    TraceSettings,
    ValueSettings,
)
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


def add_edit_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``edit`` to the main CLI's subparsers: options from EditSettings, RequestSettings,
    ValueSettings and FinetuneOptions."""
    p = subparsers.add_parser("edit", help="write new facts into the model (ROME, ...) and measure efficacy, "
                                           "generalisation, specificity and fluency before and after")
    p.add_argument("source", help="a bundled relation (new targets drawn from its objects), a relation file, or a "
                                  "CounterFact / zsRE .json file of edit requests")
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (bundled), a local HF folder, or a hub id")
    p.add_argument("--out", help="run folder (default: runs/edit_<source>_<model>_<method>_<config hash>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_arguments(p, EditSettings, group=p.add_argument_group("edit settings"))
    add_arguments(p, RequestSettings, group=p.add_argument_group("requests"))
    add_arguments(p, ValueSettings, group=p.add_argument_group("value optimisation (ROME, MEMIT)"))
    add_arguments(p, FinetuneOptions, group=p.add_argument_group("fine-tuning (FT-L, FT-M)"))
    return p


def run_edit(args: argparse.Namespace) -> None:
    """Run ``kcircuits edit`` from the parsed command line; print the metrics' means before and after."""
    from kcircuits.edit.api import SHOWN_METRICS, edit

    res = edit(args.source, args.model, out=args.out, settings=from_args(EditSettings, args),
               requests=from_args(RequestSettings, args), value=from_args(ValueSettings, args),
               finetune=from_args(FinetuneOptions, args),
               progress=not args.quiet)
    before, after = res.metrics["before"]["summary"], res.metrics["after"]["summary"]
    print(f"{res.metrics['after']['n_requests']} requests; means before -> after:")
    for key in SHOWN_METRICS:
        b, a = before.get(key, {}).get("mean"), after.get(key, {}).get("mean")
        if a is not None:
            print(f"  {key:<28}{b:>8.3f} -> {a:.3f}")
    print(f"report: {res.report}")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``edit-bench`` to the main CLI's subparsers (the edit options, less ``--method``, plus ``--methods``)."""
    p = subparsers.add_parser("edit-bench", help="the same edit requests through several edit methods: one table "
                                                 "of efficacy, generalisation, specificity, fluency and time per edit")
    p.add_argument("sources", nargs="+", help="relations or request files (each edited with every method)")
    p.add_argument("--methods", default="rome,memit,ft-l,ft-m", help="comma-separated edit methods")
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (bundled), a local HF folder, or a hub id")
    p.add_argument("--out", help="bench folder (default: runs/edit-bench_<sources>_<model>_<config hash>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_arguments(p, EditSettings, exclude=("method",), group=p.add_argument_group("edit settings"))
    add_arguments(p, RequestSettings, group=p.add_argument_group("requests"))
    add_arguments(p, ValueSettings, group=p.add_argument_group("value optimisation (ROME, MEMIT)"))
    add_arguments(p, FinetuneOptions, group=p.add_argument_group("fine-tuning (FT-L, FT-M)"))
    return p


def run_bench(args: argparse.Namespace) -> None:
    """Run ``kcircuits edit-bench`` from the parsed command line; print the table."""
    from kcircuits.edit.api import BENCH_METRICS, edit_bench

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    res = edit_bench(args.sources, args.model, methods=methods, out=args.out,
                     settings=from_args(EditSettings, args, method=methods[0] if methods else "rome"),
                     requests=from_args(RequestSettings, args), value=from_args(ValueSettings, args),
                     finetune=from_args(FinetuneOptions, args), progress=not args.quiet)
    print(f"{'source':<20}{'method':<8}" + "".join(f"{k.split('_')[0][:12]:>14}" for k in BENCH_METRICS)
          + f"{'s/edit':>9}")
    for row in res["rows"]:
        cells = "".join(f"{row[k + ' after'] if row[k + ' after'] is not None else float('nan'):>14.3f}"
                        for k in BENCH_METRICS)
        secs = row["seconds_per_edit"]
        print(f"{row['source'][:19]:<20}{row['method']:<8}{cells}{'' if secs is None else f'{secs:9.1f}'}")
    print(f"report: {res['folder']}/report.html")


#: the concerns ``edit-circuits`` takes settings for, and the fields it does not use
CIRCUIT_CONCERNS = ("ScoringSettings", "AttributionSettings", "CircuitSize", "RunSettings")
CIRCUIT_EXCLUDE = ("answer_scoring", "threshold")


def add_circuits_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``edit-circuits`` to the main CLI's subparsers: options from EditCircuitSettings, the discovery
    settings (scoring, attribution, size, run) and the head-role thresholds."""
    from kcircuits import settings

    p = subparsers.add_parser("edit-circuits", help="what an edit did to each edited fact's circuit (before vs after, "
                                                    "side by side), to the logit lens, the mover heads and the "
                                                    "neighbours' circuit")
    p.add_argument("edit_run", help="an edit run folder (what `kcircuits edit` printed)")
    p.add_argument("--model", help="the model the edit was made on (default: the one the edit run names)")
    p.add_argument("--out", help="run folder (default: runs/edit-circuits_<source>_<model>_<method>_<config hash>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_arguments(p, EditCircuitSettings, group=p.add_argument_group("facts and prompts"))
    for name in CIRCUIT_CONCERNS:
        cls = getattr(settings, name)
        add_arguments(p, cls, exclude=CIRCUIT_EXCLUDE, group=p.add_argument_group(f"{settings.param_name(cls)} "
                                                                                  "settings"))
    add_arguments(p, settings.RoleThresholds, group=p.add_argument_group("head-role thresholds"))
    return p


def run_circuits(args: argparse.Namespace) -> None:
    """Run ``kcircuits edit-circuits`` from the parsed command line; print one line per fact."""
    from kcircuits import settings
    from kcircuits.edit.edit_circuits import edit_circuits

    concerns = {settings.param_name(getattr(settings, n)): from_args(getattr(settings, n), args)
                for n in CIRCUIT_CONCERNS}
    res = edit_circuits(args.edit_run, args.model, out=args.out, thresholds=from_args(settings.RoleThresholds, args),
                        progress=not args.quiet, edit_circuits=from_args(EditCircuitSettings, args), **concerns)
    for f in res["facts"]:
        ch = f["change"]
        print(f"{f['prompt']!r} {f['target_true']} -> {f['target_new']}: node Jaccard {ch['node_jaccard']:.2f}, "
              f"edge Jaccard {ch['edge_jaccard']:.2f}, {len(ch['nodes_gained'])} nodes gained, "
              f"{len(ch['nodes_lost'])} lost")
    nb = res["neighbours"]
    if nb:
        print(f"neighbours: full-model Hit@10 {nb['before']['full_hit10']:.2f} -> {nb['after']['full_hit10']:.2f}, "
              f"edge Jaccard of their circuits {nb['change']['edge_jaccard']:.2f}")
    print(f"report: {res['folder']}/report.html")
