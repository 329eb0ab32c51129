"""What one relation's causal trace costs: `kcircuits.edit.api.trace("country_capital", "smollm2-135m")` with
the defaults (32 known facts, 10 noise samples, hidden + MLP + attention, window 10), in a new run folder with
an empty step cache, so nothing earlier is reused.

Prints the whole call's wall and CPU seconds (CPU: every thread of this process), each step's from the run
folder's timings.json, and the load average before and after, so figures taken on a busy machine say so.
`--prompts N` traces at most N prompts (quick runs); `--threads N` sets torch's threads (on a machine shared
with other jobs one thread can be much faster than two); `--compare trace.json` checks that the numbers equal
an earlier run's (e.g. one made before a change to kcircuits.edit.trace), `--keep PATH` saves this run's
trace.json for such a comparison.

    .venv/bin/python benchmarks/trace_cost.py [--prompts 32] [--batch-size 128] [--threads N] [--keep t.json]
        [--compare t.json] [--json figures.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two trace.json's probabilities (p_clean, p_corrupt and
    every restored probability of every prompt and kind); inf when their prompts or shapes differ."""
    if [p["prompt"] for p in a["prompts"]] != [p["prompt"] for p in b["prompts"]]:
        return float("inf")
    import torch

    worst = 0.0
    for pa, pb in zip(a["prompts"], b["prompts"], strict=True):
        worst = max(worst, abs(pa["p_clean"] - pb["p_clean"]), abs(pa["p_corrupt"] - pb["p_corrupt"]))
        for kind, scores in pa["scores"].items():
            x, y = torch.tensor(scores), torch.tensor(pb["scores"][kind])
            if x.shape != y.shape:
                return float("inf")
            worst = max(worst, float((x - y).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--relation", default="country_capital")
    ap.add_argument("--prompts", type=int, default=32, help="at most this many prompts (max_prompts)")
    ap.add_argument("--batch-size", type=int, default=128, help="rows per forward pass")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--keep", help="copy the run's trace.json here")
    ap.add_argument("--compare", help="an earlier trace.json whose numbers this run must equal")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kc_trace_cost_"))
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      KCIRCUITS_STEP_CACHE=str(work / "steps"))
    import torch

    from kcircuits.edit.api import read_timings, trace

    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    out = trace(args.relation, "smollm2-135m", out=work / "run", max_prompts=args.prompts,
                batch_size=args.batch_size, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    figures = {"relation": args.relation, "prompts": len(out.result.prompts), "batch_size": args.batch_size,
               "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "wall_s": round(wall, 1),
               "cpu_s": round(cpu, 1), "load_1min_before": round(load_before, 2),
               "load_1min_after": round(os.getloadavg()[0], 2), "critical_layer": out.critical_layer,
               "steps": read_timings(out.folder)}
    print(f"{args.relation}, {figures['prompts']} prompts, batch {args.batch_size}, {figures['threads']} threads: "
          f"wall {figures['wall_s']} s, CPU {figures['cpu_s']} s, load average {figures['load_1min_before']} before, "
          f"{figures['load_1min_after']} after; critical layer {out.critical_layer}")
    for step, t in figures["steps"].items():
        print(f"  {step:<28}{t['wall_s']:>8.1f} s wall{t['cpu_s']:>8.1f} s CPU")
    traced = json.loads((out.folder / "trace.json").read_text())
    if args.compare:
        figures["max_difference"] = max_difference(traced, json.loads(Path(args.compare).read_text()))
        print(f"largest difference from {args.compare}: {figures['max_difference']:.3g}")
    if args.keep:
        shutil.copyfile(out.folder / "trace.json", args.keep)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
