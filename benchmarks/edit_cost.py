"""What ROME and MEMIT edits cost on SmolLM2-135M: (a) the key statistics of one layer, (b) one ROME edit,
(c) N MEMIT edits written in one batch, each timed in this process with an empty step cache (a new
temporary ``$KCIRCUITS_STEP_CACHE``), so nothing earlier is reused.

(a) is the generated corpus (the texts the model writes, as ``kcircuits edit`` does without ``--corpus``)
and the key second moment C of ``--layer``. (b) is :func:`kcircuits.edit.rome.rome_edit` of one request
at ``--layer`` given C: the subject's key, the value optimisation and the rank-one update. (c) is MEMIT
(:func:`kcircuits.edit.memit.memit_deltas`, the registry's ``memit``: the step ``kcircuits edit --method
memit`` times as "edit (memit)") of ``--n`` requests over ``--n-layers`` layers ending at ``--layer``,
timed in its two parts: the residual targets (one value optimisation per request, ``--batch`` requests
per forward pass) and their spreading over the layers. The other layers' key statistics are computed
before it and not counted, as an edit run reads them from the step cache. The requests are drawn from
several relations (``--sources``, the same number from each, seeded), or are the first N records of a
CounterFact-shaped ``--requests`` file.

Every figure is wall and CPU seconds (CPU: every thread of this process) with the 1-minute load average
after it, so figures taken on a busy machine say so; the value optimisations' steps (early stops)
are counted from :mod:`kcircuits.edit.rome`'s debug log.

    .venv/bin/python benchmarks/edit_cost.py [--layer 5] [--n-layers 3] [--n 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

SOURCES = ("country_capital", "company_headquarters", "landmark_in_country", "person_occupation", "city_in_country")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def timed(results: dict, name: str):
    """Time the block into ``results[name]`` (wall and CPU seconds, load average after) and print it."""
    start, cpu = time.perf_counter(), cpu_seconds()
    yield
    row = {"wall_s": round(time.perf_counter() - start, 2), "cpu_s": round(cpu_seconds() - cpu, 2),
           "load_1min_after": round(os.getloadavg()[0], 2)}
    results[name] = row
    print(f"  {name:<44}{row['wall_s']:>9.1f} s wall{row['cpu_s']:>9.1f} s CPU   load {row['load_1min_after']}",
          flush=True)


class StepLog(logging.Handler):
    """Counts the value optimisations' steps from kcircuits.edit.rome's debug lines."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.steps: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"steps \[([^\]]*)\]", record.getMessage())
        if found and found.group(1):
            self.steps += [int(s) for s in found.group(1).split(",")]

    def summary(self, max_steps: int) -> dict:
        steps, self.steps = self.steps, []
        if not steps:
            return {}
        return {"requests": len(steps), "mean_steps": round(sum(steps) / len(steps), 2),
                "stopped_early": sum(s < max_steps for s in steps)}


def load_requests_for(args, tokenizer) -> list:
    from kcircuits.edit.requests import load_requests, validate_requests

    if args.requests:
        reqs = load_requests(args.requests, args.n)
    else:
        sources = args.sources.split(",")
        share = [args.n // len(sources) + (i < args.n % len(sources)) for i in range(len(sources))]
        reqs = [r for src, k in zip(sources, share, strict=True) if k for r in load_requests(src, k, args.seed)]
    return validate_requests(reqs, tokenizer, one_batch=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=5, help="ROME's layer; MEMIT's last layer")
    ap.add_argument("--n-layers", type=int, default=3, help="MEMIT's layers, ending at --layer")
    ap.add_argument("--n", type=int, default=100, help="MEMIT requests written in one batch")
    ap.add_argument("--sources", default=",".join(SOURCES), help="relations the requests are drawn from, evenly")
    ap.add_argument("--requests", help="a CounterFact-shaped JSON file instead of --sources (its first --n records)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--v-steps", type=int, default=None, help="value optimisation steps (default: ValueSettings')")
    ap.add_argument("--batch", type=int, default=None,
                    help="MEMIT requests per forward pass of the target optimisation (default: memit.TARGET_BATCH)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip", nargs="*", default=(), choices=("rome", "memit"), help="parts not run")
    ap.add_argument("--cache", help="use this step cache (e.g. a second run's corpus and statistics) instead of an "
                    "empty one: then (a) is not timed from scratch")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    from kcircuits.cli import GOMP_SPINCOUNT  # torch-free

    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)  # as `kcircuits edit` runs (before torch loads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["KCIRCUITS_STEP_CACHE"] = args.cache or tempfile.mkdtemp(prefix="kc_edit_cost_")  # nothing reused

    import torch

    from kcircuits.edit import memit
    from kcircuits.edit.api import context_prefixes
    from kcircuits.edit.requests import validate_requests
    from kcircuits.edit.rome import rome_edit
    from kcircuits.edit.settings import EditSettings, ValueSettings
    from kcircuits.edit.stats import generated_corpus, key_second_moment
    from kcircuits.models import load_model
    from kcircuits.steps import StepCache

    if args.threads:
        torch.set_num_threads(args.threads)
    steps_log = StepLog()
    logging.getLogger("kcircuits.edit.rome").addHandler(steps_log)
    logging.getLogger("kcircuits.edit.rome").setLevel(logging.DEBUG)
    results: dict = {"model": args.model, "layer": args.layer, "n_layers": args.n_layers, "n": args.n,
                     "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                     "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
                     "load_1min_before": round(os.getloadavg()[0], 2), "fresh_cache": not args.cache, "steps": {}}
    print(f"step cache {os.environ['KCIRCUITS_STEP_CACHE']}")
    print(f"{args.model}, layer {args.layer}; torch threads {torch.get_num_threads()} of {os.cpu_count()} CPUs "
          f"(GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT')}); load before {results['load_1min_before']}")
    es = EditSettings(method="memit", layer=args.layer, n_layers=args.n_layers)
    vs = ValueSettings() if args.v_steps is None else ValueSettings(steps=args.v_steps)
    steps = results["steps"]
    with timed(steps, "load model"):
        lm = load_model(args.model)
    cache = StepCache.default()
    stats: dict[int, torch.Tensor] = {}

    def key_stats(layer: int) -> torch.Tensor:
        if layer not in stats:
            texts = generated_corpus(lm, n_texts=es.corpus_texts, n_tokens=es.corpus_tokens, seed=es.seed, cache=cache)
            stats[layer] = key_second_moment(lm, layer, texts, batch_size=es.batch_size, cache=cache)
        return stats[layer]

    print("(a) key statistics")
    with timed(steps, "generated corpus"):
        generated_corpus(lm, n_texts=es.corpus_texts, n_tokens=es.corpus_tokens, seed=es.seed, cache=cache)
    with timed(steps, f"key second moment, layer {args.layer}"):
        key_stats(args.layer)
    with timed(steps, "context prefixes"):
        prefixes = tuple(context_prefixes(lm, es.n_prefixes, es.seed, cache))
    reqs = load_requests_for(args, lm.tokenizer)
    results["requests"] = {"n": len(reqs), "sources": sorted({r.relation for r in reqs})}
    if "rome" not in args.skip:
        print("(b) one ROME edit")
        req = reqs[0]
        with timed(steps, "ROME edit (1 request)"):
            rome_edit(lm, req.prompt, req.subject, req.target_new, args.layer, key_stats(args.layer),
                      prefixes=prefixes, settings=vs)
        results["rome_value_steps"] = steps_log.summary(vs.steps)
    if "memit" not in args.skip:
        print(f"(c) {len(reqs)} MEMIT edits in one batch, layers {es.layers()}")
        with timed(steps, f"key second moments, other {args.n_layers - 1} layers (not counted)"):
            for layer in es.layers():
                key_stats(layer)
        batch = args.batch or memit.TARGET_BATCH
        results["memit_target_batch"] = batch
        # memit_deltas (the registry's memit) in its two parts: validation, then these
        reqs = validate_requests(reqs, lm.tokenizer)
        with timed(steps, "  residual targets"):
            targets = memit.residual_targets(lm, es.layers(), reqs, prefixes, vs, batch_size=batch)
        results["memit_value_steps"] = steps_log.summary(vs.steps)
        with timed(steps, "  spread over the layers"):
            memit.spread_deltas(lm, reqs, es.layers(), targets, key_stats, prefixes=prefixes,
                                covariance_weight=es.covariance_weight)
        total = {k: round(steps["  residual targets"][k] + steps["  spread over the layers"][k], 2)
                 for k in ("wall_s", "cpu_s")}
        steps[f"MEMIT edit ({len(reqs)} requests)"] = {**total, "load_1min_after": round(os.getloadavg()[0], 2)}
        print(f"  {'MEMIT edit (' + str(len(reqs)) + ' requests)':<44}{total['wall_s']:>9.1f} s wall"
              f"{total['cpu_s']:>9.1f} s CPU")
    for key in ("rome_value_steps", "memit_value_steps"):
        if results.get(key):
            print(f"{key}: {results[key]}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
