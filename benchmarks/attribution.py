"""Benchmark: EAP-IG attribution and circuit evaluation against the plain Hugging Face model.

Ratios, all measured in this run on the same batch:

* attribution = time(EAP-IG, m steps, incl. the clean and corrupted caching runs)
                / time(m HF forward+backward passes + 2 HF forward passes)
  The HF backward is frozen (parameters need no gradient; the gradient w.r.t. the input embeddings
  only), which is the same work attribution needs and the strictest baseline. ``--param-grads``
  also times it with parameter gradients (an ordinary training step).
* evaluation  = time(one patched forward of a 1% circuit, corrupted cache already built) / time(one HF forward)

Usage: python benchmarks/attribution.py [--models smollm2 gpt2-small] [--batch 8] [--steps 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, GPT2Config

from kcircuits.batching import make_batch
from kcircuits.discover.eap import attribute
from kcircuits.engine import Engine
from kcircuits.evaluate import Evaluator
from kcircuits.selection import select
from kcircuits.models import from_hf, load_model


class _Pair:
    def __init__(self, clean, corrupt, answer, corrupt_answer):
        self.clean_ids, self.corrupt_ids = clean, corrupt
        self.answer_ids, self.corrupt_answer_ids = [answer], [corrupt_answer]


def make_pairs(n: int, vocab: int, length: int, seed: int = 0) -> list[_Pair]:
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        clean = torch.randint(100, vocab, (length,), generator=gen).tolist()
        corrupt = list(clean)
        corrupt[2] = int(torch.randint(100, vocab, (1,), generator=gen))
        pairs.append(_Pair(clean, corrupt, *torch.randint(100, vocab, (2,), generator=gen).tolist()))
    return pairs


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_pass(hf, batch, backward: bool, param_grads: bool) -> None:
    embeds = hf.get_input_embeddings()(batch.clean).detach().requires_grad_(backward and not param_grads)
    with torch.set_grad_enabled(backward):
        logits = hf(inputs_embeds=embeds).logits
        rows = torch.arange(len(batch))
        pos = batch.target_pos[:, 0]
        value = (logits[rows, pos, batch.target_ids[:, 0]] - logits[rows, pos, batch.corrupt_target_ids]).sum()
        if backward:
            value.backward()
    hf.zero_grad(set_to_none=True)


def bench(name: str, model, batch_size: int, length: int, steps: int, repeats: int, param_grads: bool) -> dict:
    hf, w = model.hf_model, model.weights
    batch = make_batch(make_pairs(batch_size, w.W_E.shape[0], length), pad_id=0)
    eng = Engine(w)

    def baseline(param_grads: bool):
        for p in hf.parameters():
            p.requires_grad_(param_grads)
        for _ in range(steps):
            hf_pass(hf, batch, True, param_grads)
        for _ in range(2):
            hf_pass(hf, batch, False, False)

    t_base_params = timed(lambda: baseline(True), repeats) if param_grads else float("nan")
    t_base_frozen = timed(lambda: baseline(False), repeats)
    for p in hf.parameters():
        p.requires_grad_(False)
    scores = None

    def ours():
        nonlocal scores
        scores = attribute(eng, [batch], method="eap-ig", steps=steps, progress=False)

    t_attr = timed(ours, repeats)
    ev = Evaluator(eng, [batch], progress=False)
    circuit = select(eng.graph, scores, max(1, eng.graph.n_edges // 100))
    mask = circuit.mask()
    t_eval = timed(lambda: ev.circuit_logits(mask), repeats)
    t_fwd = timed(lambda: hf_pass(hf, batch, False, False), repeats)
    return {"model": name, "batch": f"{batch_size}x{length}", "edges": eng.graph.n_edges,
            "eap_ig_s": t_attr, "hf_params_s": t_base_params, "hf_frozen_s": t_base_frozen,
            "ratio_attr_vs_params": t_attr / t_base_params, "ratio_attr_vs_frozen": t_attr / t_base_frozen,
            "eval_s": t_eval, "hf_fwd_s": t_fwd, "ratio_eval": t_eval / t_fwd}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2", "gpt2-small"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--param-grads", action="store_true",
                    help="also time the HF baseline with parameter gradients "
                         "(slow on CPU: the tied 49k x 576 embedding)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    rows = []
    for name in args.models:
        if name == "smollm2":
            model = load_model("smollm2-135m", device=args.device)
        elif name == "gpt2-small":
            torch.manual_seed(0)
            hf = AutoModelForCausalLM.from_config(GPT2Config(), attn_implementation="sdpa").to(args.device).eval()
            model = from_hf(hf, name="gpt2-small-random")
        else:
            model = load_model(name, device=args.device)
        rows.append(bench(name, model, args.batch, args.length, args.steps, args.repeats, args.param_grads))
        r = rows[-1]
        print(f"{r['model']:<12} batch {r['batch']:<6} edges {r['edges']:>7}  "
              f"EAP-IG(m={args.steps}) {r['eap_ig_s']:.3f}s  "
              f"HF {args.steps}xfwd+bwd+2xfwd: {r['hf_params_s']:.3f}s (param grads) / "
              f"{r['hf_frozen_s']:.3f}s (frozen)  "
              f"ratio {r['ratio_attr_vs_params']:.2f} / {r['ratio_attr_vs_frozen']:.2f}  |  "
              f"eval 1% circuit {r['eval_s'] * 1000:.0f}ms vs HF fwd {r['hf_fwd_s'] * 1000:.0f}ms  "
              f"ratio {r['ratio_eval']:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
