"""Circuit vs random circuits vs chance on SmolLM2: the honest-evaluation table of docs/benchmarks.md.

For each relation this runs (or reuses) the discover run the demo makes, then evaluates on the same
held-out test prompts:

- the circuit; the new random baselines (`same_size`, `same_logit_edges`: exactly the circuit's
  pruned edge count), read from the run's metrics.json;
- the *old* random baseline (greedy growth from the logits to the circuit's edge count under random
  scores, *then* pruned, as kcircuits did before), re-created here only to show how far it fell short;
- the chance level: the fully corrupted run's Hit@k on the same prompts.

    .venv/bin/python benchmarks/random_baselines.py                 # the demo's relation + two more
    .venv/bin/python benchmarks/random_baselines.py --relations fruit_color --no-curve

Results go to benchmarks/results/random_baselines_<model>.json (written atomically).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from kcircuits import api
from kcircuits.engine import Engine
from kcircuits.evaluate import Evaluator
from kcircuits.graph import Graph, prune, select_greedy
from kcircuits.io import atomic_write_text
from kcircuits.models import load_model
from kcircuits.report.data import random_mean

#: The demo's settings (scripts/demo.sh), so the demo's own run folder is reused.
DEMO = dict(method="eap-ig", steps=5, split=0.5, known_only=True, known_k=10, percent=1)


def old_random_circuit(graph: Graph, n_edges: int, seed: int):
    """The random baseline as it was: greedy growth to ``n_edges`` under random scores, then pruned."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(graph.n_src, graph.n_dst, generator=gen) * graph.edge_exists()
    return prune(select_greedy(graph, scores, n_edges, absolute=False))


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def one_relation(relation: str, lm, *, curve: bool, n_random: int, seed: int) -> dict:
    t0 = time.perf_counter()
    run = api.discover(relation, lm, curve=curve, n_random=n_random, seed=seed, **DEMO)
    seconds = time.perf_counter() - t0
    test = run.metrics["sets"]["test"]
    ps = run.prompts["test"]
    ev = Evaluator(Engine(lm.weights, run.circuit.graph), api.model_batches(lm, ps.pairs, 8, "first_token"),
                   progress=False)
    old = [ev.evaluate(old_random_circuit(run.circuit.graph, run.circuit.n_edges, seed + i)) for i in range(n_random)]
    row = {
        "relation": relation, "run": str(run.folder), "seconds": round(seconds, 1), "n_test_prompts": test["n_prompts"],
        "circuit_edges": run.circuit.n_edges,
        "circuit_logit_edges": run.metrics["sets"]["test"]["random_baseline"]["circuit_shape"]["n_logit_edges"],
        "faithfulness": test["faithfulness_of_means"],
        "random_same_size_faithfulness": random_mean(test, "faithfulness_of_means"),
        "random_same_logit_edges_faithfulness": random_mean(test, "faithfulness_of_means", "same_logit_edges"),
        "old_random_edges_after_pruning": [o["n_edges"] for o in old],
        "old_random_faithfulness": mean([o["faithfulness_of_means"] for o in old]),
    }
    for k in (1, 10):
        row[f"full_hit{k}"] = test[f"full_hit{k}"]
        row[f"circuit_hit{k}"] = test[f"circuit_hit{k}"]
        row[f"random_same_size_hit{k}"] = random_mean(test, f"circuit_hit{k}")
        row[f"random_same_logit_edges_hit{k}"] = random_mean(test, f"circuit_hit{k}", "same_logit_edges")
        row[f"old_random_hit{k}"] = mean([o[f"circuit_hit{k}"] for o in old])
        row[f"chance_hit{k}"] = test[f"chance_hit{k}"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--relations", nargs="+", default=["country_capital", "country_language", "fruit_color"])
    ap.add_argument("--no-curve", action="store_true", help="skip the faithfulness curve (the demo draws it)")
    ap.add_argument("--random-draws", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lm = load_model(args.model)
    rows = []
    out = Path(args.out or f"benchmarks/results/random_baselines_{Path(args.model).name}.json")
    for rel in args.relations:
        # the demo's relation with the demo's own configuration (curve included), the others without the curve
        curve = not args.no_curve and rel == args.relations[0]
        rows.append(one_relation(rel, lm, curve=curve, n_random=args.random_draws, seed=args.seed))
        atomic_write_text(out, json.dumps({"model": args.model, "settings": DEMO, "random_draws": args.random_draws,
                                           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                                           "torch": torch.__version__, "rows": rows}, indent=2))
    cols = ["relation", "circuit_edges", "full_hit10", "circuit_hit10", "random_same_size_hit10",
            "random_same_logit_edges_hit10", "old_random_hit10", "chance_hit10", "faithfulness",
            "random_same_size_faithfulness", "old_random_faithfulness"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols),
              "| old random edges after pruning:", r["old_random_edges_after_pruning"])
    print(f"written: {out}")


if __name__ == "__main__":
    main()
