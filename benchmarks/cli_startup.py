"""Start-up time of the commands that run no model, against a bare `python -c pass` in the same run.

    .venv/bin/python benchmarks/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {"python -c pass": [sys.executable, "-c", "pass"],
            "kcircuits --help": [sys.executable, "-m", "kcircuits.cli", "--help"],
            "kcircuits discover --help": [sys.executable, "-m", "kcircuits.cli", "discover", "--help"],
            "kcircuits datasets": [sys.executable, "-m", "kcircuits.cli", "datasets"],
            "kcircuits datasets country_capital": [sys.executable, "-m", "kcircuits.cli", "datasets",
                                                   "country_capital"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    base = None
    for name, argv in COMMANDS.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        base = base or median
        print(f"{name:<36} median {median:6.2f} s  max {max(times):6.2f} s  ({median / base:4.1f}x python -c pass)")
    print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
