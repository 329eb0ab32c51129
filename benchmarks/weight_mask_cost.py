"""What one weight mask costs: `train_weight_mask` on one relation's discovery prompts at one density, against
the plain Hugging Face forward+backward of the same batches measured in the same run.

Prints the training's wall and CPU seconds, the seconds per step, the ratio to one HF forward+backward pass
per step (the floor: a step must at least run the model forward and backward once), the thresholding and
evaluation time, the peak resident memory (``ru_maxrss``), the final expected and relaxed densities, and the
load average before and after, so figures taken on a busy machine say so.

    .venv/bin/python benchmarks/weight_mask_cost.py [--relation country_capital] [--density 0.1] [--steps 500]
        [--prompts 16] [--batch-size 8] [--threads N] [--json figures.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--relation", default="country_capital")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--prompts", type=int, default=16, help="prompt pairs (max_pairs per split half)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json")
    args = ap.parse_args()
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    import torch

    from kcircuits.discover.weight_masks import evaluate_weight_circuit, train_weight_mask
    from kcircuits.models import load_model
    from kcircuits.pipeline import model_batches, prepare_prompts
    from kcircuits.runtime import tune_allocator
    from kcircuits.settings import PromptSettings
    from kcircuits.weight_circuits.settings import WeightMaskSettings

    tune_allocator()  # as the CLI does
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    lm = load_model(args.model)
    split = prepare_prompts(lm, None, args.relation, settings=PromptSettings(split=0.5, max_pairs=args.prompts),
                            batch_size=args.batch_size)
    train = model_batches(lm, split["discover"].pairs, args.batch_size, "first_token")
    test = model_batches(lm, split["test"].pairs, args.batch_size, "first_token")

    def hf_steps(n: int) -> None:
        for i in range(n):
            b = train[i % len(train)]
            lm.hf_model.zero_grad(set_to_none=True)
            lm.hf_model(input_ids=b.clean).logits[:, -1].float().logsumexp(-1).sum().backward()
        lm.hf_model.zero_grad(set_to_none=True)

    hf_steps(2)  # warm-up
    _, hf_wall, hf_cpu = timed(lambda: hf_steps(20))
    settings = WeightMaskSettings(density=args.density, steps=args.steps, batch_size=args.batch_size)
    result, wall, cpu = timed(lambda: train_weight_mask(lm, train, settings, progress=True))
    ev, ev_wall, _ = timed(lambda: evaluate_weight_circuit(lm, test, result.mask, settings.ablation))
    figures = {
        "model": args.model, "relation": args.relation, "density": args.density, "steps": args.steps,
        "prompts": sum(len(b) for b in train), "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
        "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1), "s_per_step": round(wall / args.steps, 3),
        "hf_forward_backward_s": round(hf_wall / 20, 3), "ratio_to_hf": round(wall / args.steps / (hf_wall / 20), 1),
        "evaluate_wall_s": round(ev_wall, 1), "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                                    / 2**20, 2),
        "expected_density": result.expected_density, "relaxed_density": result.relaxed_density,
        "final_kl": result.history[-1]["objective"], "held_out_hit10": {k: ev[k]["hit@10"] for k in
                                                                          ("full", "circuit", "complement", "random")},
        "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2), "hf_cpu_s": round(hf_cpu, 1)}
    print(json.dumps(figures, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1)


if __name__ == "__main__":
    main()
