"""Where the demo's time goes: the demo command cold (empty step cache, new folder), the same command
again (nothing changed), and `kcircuits select` of another size from its scores.

Prints each step's wall and CPU seconds (from the run folder's timings.json), the whole command's wall
and CPU time (the process and its children) and the load average, so figures taken on a busy
machine say so. `--load N` runs N busy threads (a matmul loop) beside it, to measure at a known load.

    .venv/bin/python benchmarks/demo_profile.py [--load 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = ["discover", "country_capital", "--model", "smollm2-135m", "--method", "eap-ig", "--steps", "5", "--split",
        "0.5", "--known-only", "--known-k", "10", "--percent", "1", "--quiet"]
LOAD = "import torch\ntorch.set_num_threads({n})\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


def timed(argv: list[str], env: dict) -> dict:
    """Run ``kcircuits argv`` and return its wall and CPU seconds (children's rusage delta) and load."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "kcircuits.cli", *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"kcircuits {' '.join(argv)} failed:\n{out.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_1min_after": round(os.getloadavg()[0], 2),
            "stdout": out.stdout}


def steps(folder: Path) -> dict:
    return json.loads((folder / "timings.json").read_text())["steps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", type=int, default=0, help="busy threads to run beside the demo")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kc_demo_profile_"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               KCIRCUITS_STEP_CACHE=str(work / "steps"))
    loader = (subprocess.Popen([sys.executable, "-c", LOAD.format(n=args.load)]) if args.load else None)
    try:
        if loader:
            time.sleep(10)
        cold = timed([*DEMO, "--out", str(work / "run")], env)
        cold["steps"] = steps(work / "run")
        rerun = timed([*DEMO, "--out", str(work / "run")], env)
        rerun["steps"] = steps(work / "run")
        select = timed(["select", str(work / "run"), "--percent", "2", "--out", str(work / "run2"), "--quiet"], env)
        select["steps"] = steps(work / "run2")
    finally:
        if loader:
            loader.kill()
    results = {"load_threads": args.load, "cpus": os.cpu_count(), "cold": cold, "rerun": rerun, "select": select}
    for name in ("cold", "rerun", "select"):
        r = results[name]
        print(f"\n{name}: wall {r['wall_s']} s, CPU {r['cpu_s']} s ({r['cpu_s'] / 60:.1f} CPU-min), "
              f"load average after {r['load_1min_after']}")
        for step, t in r["steps"].items():
            print(f"  {step:<36}{t['wall_s']:>8.1f} s wall{t['cpu_s']:>8.1f} s CPU")
    print("\n" + cold["stdout"])
    if args.json:
        for r in (cold, rerun, select):
            r.pop("stdout")
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
