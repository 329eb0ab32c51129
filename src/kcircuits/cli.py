"""The ``kcircuits`` command. Each subcommand is a thin wrapper over the Python API (:mod:`kcircuits.api`,
:mod:`kcircuits.studies`, :mod:`kcircuits.influence.api`, :mod:`kcircuits.edit.api`).

Bad input prints one line ``kcircuits: error: ...`` on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from kcircuits.errors import KcircuitsError


#: The settings each command takes (kcircuits.settings); their fields are the command's options.
DISCOVER_SETTINGS = ("ScoringSettings", "AttributionSettings", "CircuitSize", "PromptSettings", "EvaluationSettings",
                     "RunSettings")
EVALUATE_SETTINGS = ("ScoringSettings", "PromptSettings", "EvaluationSettings", "RunSettings")


def _settings_args(p: argparse.ArgumentParser, names: tuple[str, ...], exclude: tuple[str, ...] = (),
                   defaults: dict | None = None) -> None:
    """The options of ``p`` generated from the settings dataclasses, one argument group per concern."""
    from kcircuits import settings

    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (bundled), a local HF folder, or a hub id")
    p.add_argument("--out", help="run folder (default: runs/<command>_<...>_<config hash>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    for name in names:
        cls = getattr(settings, name)
        settings.add_arguments(p, cls, exclude=exclude, defaults=defaults,
                               group=p.add_argument_group(f"{settings.param_name(cls)} settings"))


def _settings_from(args, names: tuple[str, ...]) -> dict:
    """API keyword arguments (``scoring=...``, ``size=...``) from the parsed command line."""
    from kcircuits import settings

    return {settings.param_name(getattr(settings, n)): settings.from_args(getattr(settings, n), args) for n in names}


def _thresholds_args(p: argparse.ArgumentParser) -> None:
    """Head-role thresholds (docs/analysis.md has the criteria), generated from :class:`RoleThresholds`."""
    from kcircuits.settings import RoleThresholds
    from kcircuits.settings import add_arguments

    add_arguments(p, RoleThresholds, group=p.add_argument_group("head-role thresholds"))


def _thresholds(args):
    from kcircuits.settings import RoleThresholds
    from kcircuits.settings import from_args

    return from_args(RoleThresholds, args)


#: The settings every study takes, and the fields a study does not use (kept off its options).
STUDY_SETTINGS = ("ScoringSettings", "AttributionSettings", "CircuitSize", "PromptSettings", "RunSettings")
STUDY_EXCLUDE = ("answer_scoring", "threshold", "split", "known_k", "known_only_on", "templates")


def _study_args(p: argparse.ArgumentParser, max_pairs: int, *, known_only: bool = False) -> None:
    _settings_args(p, STUDY_SETTINGS, exclude=STUDY_EXCLUDE + (() if known_only else ("known_only",)),
                   defaults={"max_pairs": max_pairs})


def _study_kwargs(args) -> dict:
    return dict(model=args.model, out=args.out, progress=not args.quiet, **_settings_from(args, STUDY_SETTINGS))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kcircuits",
                                     description="Find and measure knowledge circuits in language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("discover", help="find the circuit of a relation and evaluate it")
    d.add_argument("relation", help="a bundled relation name (see `kcircuits datasets`) or a .json/.csv file")
    _settings_args(d, DISCOVER_SETTINGS)
    _thresholds_args(d)

    sl = sub.add_parser("select", help="a circuit of another size from a discover run's stored scores (evaluated "
                                       "and explained in its own folder; nothing recomputed but the new circuit's "
                                       "evaluation)")
    sl.add_argument("run", help="a discover run folder")
    sl.add_argument("--model", help="the model to load (default: the run's; its weights must be the run's)")
    sl.add_argument("--out", help="run folder (default: the folder discover would use at this size)")
    sl.add_argument("--quiet", action="store_true", help="no progress bars")
    from kcircuits import settings

    settings.add_arguments(sl, settings.CircuitSize, group=sl.add_argument_group("the new size"),
                           defaults={"selection": None, "absolute": None})

    e = sub.add_parser("evaluate", help="evaluate an existing circuit on one or more relations")
    e.add_argument("circuit", help="a circuit.json or a discover run folder")
    e.add_argument("relations", nargs="+", help="relations to evaluate on (with --split: their held-out subjects)")
    _settings_args(e, EVALUATE_SETTINGS, exclude=("known_only_on", "curve"))
    _thresholds_args(e)

    c = sub.add_parser("compare", help="compare the circuits of several relations: overlap and cross-faithfulness")
    c.add_argument("relations", nargs="+", help="two or more relations")
    _study_args(c, 32, known_only=True)

    st = sub.add_parser("study", help="studies that write a run folder with figures and a summary")
    studies = st.add_subparsers(dest="study", required=True)
    h = studies.add_parser("hallucination", help="right vs wrong answers within a relation: circuits, rank-by-layer "
                                                 "traces, where the answer is lost, heads moving the wrong attribute")
    h.add_argument("relation")
    h.add_argument("--max-per-group", type=int, default=32, help="prompts analysed per group (right, wrong)")
    h.add_argument("--min-per-group", type=int, default=4, help="fail when a group has fewer prompts")
    h.add_argument("--top-heads", type=int, default=10, help="heads moving the wrong attribute to list")
    _study_args(h, 96)
    _thresholds_args(h)
    i = studies.add_parser("icl", help="k = 0..4 demonstrations: accuracy, circuits, heads that appear only with "
                                       "demonstrations and their ablation vs random heads")
    i.add_argument("relation")
    i.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="numbers of demonstrations (must include 0)")
    i.add_argument("--template", type=int, default=0, help="index of the relation's template to use")
    i.add_argument("--random-draws", type=int, default=5, help="random head sets ablated for comparison")
    _study_args(i, 24)

    from kcircuits.influence.cli import add_parser as add_influence

    add_influence(sub)

    from kcircuits.edit.cli import add_bench_parser, add_circuits_parser, add_edit_parser
    from kcircuits.edit.cli import add_parser as add_trace

    add_trace(sub)
    add_edit_parser(sub)
    add_bench_parser(sub)
    add_circuits_parser(sub)

    from kcircuits.weight_circuits.cli import add_inside_parser
    from kcircuits.weight_circuits.cli import add_parser as add_weight_circuit

    add_weight_circuit(sub)
    add_inside_parser(sub)

    ds = sub.add_parser("datasets", help="list the bundled relation datasets, or check/show one")
    ds.add_argument("name", nargs="?", help="a bundled name or a .json/.csv file to validate and show")

    m = sub.add_parser("models", help="list the bundled model and the supported architectures")
    m.add_argument("name", nargs="?", help="load this model and print its graph size")
    m.add_argument("--ungrouped", action="store_true")
    return parser


def _discover(args) -> None:
    from kcircuits.api import discover

    res = discover(args.relation, args.model, out=args.out, thresholds=_thresholds(args), progress=not args.quiet,
                   **_settings_from(args, DISCOVER_SETTINGS))
    _print_result(res)


def _select(args) -> None:
    from kcircuits.api import select

    size = {k: getattr(args, k) for k in ("n_edges", "percent", "threshold", "selection", "absolute")
            if getattr(args, k) is not None}
    _print_result(select(args.run, model=args.model, out=args.out, progress=not args.quiet, **size))


def _evaluate(args) -> None:
    from kcircuits.api import evaluate

    res = evaluate(args.circuit, args.relations, args.model, out=args.out, thresholds=_thresholds(args),
                   progress=not args.quiet, **_settings_from(args, EVALUATE_SETTINGS))
    _print_result(res)


def _compare(args) -> None:
    from kcircuits.studies import compare

    res = compare(args.relations, **_study_kwargs(args))
    names = res["relations"]
    width = max(len(n) for n in names) + 2
    col = max(max(len(n) for n in names), 6) + 2  # whole relation names: no header cut short
    kept = ", ".join(f"{n} {k}" for n, k in res["n_edges_kept"].items())
    print(f"faithfulness of the row's circuit (edges after pruning: {kept}) on the column's prompts:")
    print(" " * width + "".join(f"{n:>{col}}" for n in names))
    for name, row in zip(names, res["faithfulness"], strict=True):
        print(f"{name:<{width}}" + "".join(f"{v:>{col}.3f}" for v in row))
    print(f"report: {res['folder']}/report.html")


def _study(args) -> None:
    from kcircuits import studies

    if args.study == "hallucination":
        res = studies.hallucination(args.relation, max_per_group=args.max_per_group, min_per_group=args.min_per_group,
                                    top_heads=args.top_heads, thresholds=_thresholds(args), **_study_kwargs(args))
        print(f"{res['n_right']} right, {res['n_wrong']} wrong; circuits share {res['overlap']['edge_jaccard']:.0%} "
              "of their edges")
    else:
        res = studies.icl(args.relation, ks=args.ks, template=args.template, n_random=args.random_draws,
                          **_study_kwargs(args))
        print("accuracy by k: " + ", ".join(f"{k}: {v:.2f}" for k, v in res["accuracy"].items())
              + f"; {len(res['new_heads'])} heads only with demonstrations")
    print(f"report: {res['folder']}/report.html")


def _influence(args) -> None:
    from kcircuits.influence.cli import run

    run(args)


def _edit(args) -> None:
    from kcircuits.edit.cli import run_edit

    run_edit(args)


def _edit_bench(args) -> None:
    from kcircuits.edit.cli import run_bench

    run_bench(args)


def _edit_circuits(args) -> None:
    from kcircuits.edit.cli import run_circuits

    run_circuits(args)


def _weight_circuit(args) -> None:
    from kcircuits.weight_circuits.cli import run

    run(args)


def _edit_inside(args) -> None:
    from kcircuits.weight_circuits.cli import run_inside

    run_inside(args)


def _trace(args) -> None:
    from kcircuits.edit.cli import run

    run(args)


def _print_result(res) -> None:
    from kcircuits.report.data import random_mean

    print(f"circuit: {res.circuit.n_edges} edges, {len(res.circuit.nodes())} nodes")
    for role, m in res.metrics["sets"].items():
        rnd = random_mean(m, "faithfulness_of_means")
        rnd_txt = f"  random circuit (same size) {rnd:.3f}" if rnd is not None else ""
        unstable = m.get("unstable_prompts", {}).get("n", 0)
        print(f"{role:>10}: {m['n_prompts']} prompts  faithfulness {m['faithfulness_of_means']:.3f}"
              f" (per prompt {m['faithfulness']['mean']:.3f} ± {m['faithfulness']['std']:.3f}"
              f"{f', {unstable} unstable prompts left out' if unstable else ''}){rnd_txt}")
        for k in (1, 10):
            rk = random_mean(m, f"circuit_hit{k}")
            print(f"{'':>10}  Hit@{k}: full {m[f'full_hit{k}']:.2f}  circuit {m[f'circuit_hit{k}']:.2f}"
                  + (f"  random {rk:.2f}" if rk is not None else "") + f"  chance {m[f'chance_hit{k}']:.2f}")
    if "curve" in res.metrics:
        c = res.metrics["curve"]
        print(f"     curve: CPR {c['cpr']:.3f}  CMD {c['cmd']:.3f}")
    print(f"report: {res.report}")


def _datasets(args) -> None:
    from kcircuits.data import dataset_info, load_dataset

    if args.name:
        ds = load_dataset(args.name)
        print(f"{ds.name} ({ds.category}): {len(ds.samples)} samples, {len(ds.prompt_templates)} templates, "
              f"from {ds.source}")
        for t in ds.prompt_templates:
            print(f"  template: {t}")
        for s in ds.samples[:10]:
            print(f"  {s['subject']} -> {s['object']}")
        return
    print(f"{'name':<24}{'category':<13}{'samples':>8}{'templates':>10}")
    for info in dataset_info():
        print(f"{info['name']:<24}{info['category']:<13}{info['n_samples']:>8}{info['n_templates']:>10}")
    print("\nAlso accepted: a .json file of the same shape or a .csv with subject,object[,template] columns.")


def _models(args) -> None:
    from kcircuits.models import BUNDLED, supported_model_types

    if args.name:
        from kcircuits.graph import Graph
        from kcircuits.models import load_model

        lm = load_model(args.name)
        g = Graph.from_model(lm.weights, grouped=not args.ungrouped)
        print(f"{args.name}: family {lm.weights.family}, {g.n_layers} layers, {g.n_heads} heads, "
              f"{g.n_kv_heads} kv-heads, d_model {lm.weights.d_model}; graph: {g.n_src} sources, {g.n_dst} "
              f"destinations, {g.n_edges} edges")
        return
    print("bundled (offline):")
    for name, info in BUNDLED.items():
        print(f"  {name:<16}{info['about']}")
    print("supported HF model types: " + ", ".join(supported_model_types()))
    print("also accepted: a local folder saved with save_pretrained(), or a hub id when the hub is reachable")


#: OpenMP threads spin this many iterations before sleeping while they wait (libgomp's default is
#: 300,000). On a busy 2-core machine long spins burn the CPU the other thread needs: the demo took
#: 2-3x longer at a load of 2 (docs/benchmarks.md); idle it costs about 10%. A value the user set wins.
GOMP_SPINCOUNT = "3000"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)  # read when torch loads libgomp, after this
    from kcircuits.runtime import tune_allocator

    tune_allocator()  # freed blocks stay for reuse: no page faults on every torch op (kcircuits.runtime)
    parser = build_parser()
    args = parser.parse_args(argv)
    runs = sys.modules.get("kcircuits.runs")
    made_before = len(runs.CREATED) if runs is not None else 0
    handlers = {"discover": _discover, "select": _select, "evaluate": _evaluate, "compare": _compare, "study": _study,
                "influence": _influence, "trace": _trace, "edit": _edit, "edit-bench": _edit_bench,
                "edit-circuits": _edit_circuits, "weight-circuit": _weight_circuit, "edit-inside": _edit_inside,
                "datasets": _datasets, "models": _models}
    try:
        handlers[args.command](args)
    except KcircuitsError as exc:
        if "kcircuits.runs" in sys.modules:  # a folder this command made before the error, with no result, goes
            sys.modules["kcircuits.runs"].discard_empty_created(since=made_before)
        print(f"kcircuits: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kcircuits: interrupted; finished steps are kept in the run folder, rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
