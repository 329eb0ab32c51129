"""Ground-truth benchmark for influence functions: do they find the documents a fact was learned from?

1. Invent facts (``kcircuits.influence.facts``): each stated in 3 paraphrased source documents, mixed
   with distractors (same person without the fact, the answer without the person, the person with
   another fact's answer, generic filler).
2. Fine-tune the model on the corpus until it knows the facts (first-token accuracy of the queries
   before/after is reported). To stay affordable on a CPU only the MLPs of a few upper layers are
   trained (``--train-only``); influence tracks the same modules (``--include``): the parameters
   that learned the facts.
3. For each method, rank all training documents per query and measure recall@k of the 3 sources,
   with wall time: EK-FAC, KFAC, LiSSA, gradient dot product (identity) and BM25 (lexical).

    python benchmarks/influence_facts.py                      # SmolLM2-135M, 1000 documents
    python benchmarks/influence_facts.py --tiny               # tiny random llama, word vocabulary, ~1 min
    python benchmarks/influence_facts.py --n-docs 200 --methods ekfac,identity,bm25 --json out.json

Prints a Markdown table and writes the results as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from kcircuits.errors import KcircuitsError
from kcircuits.influence.analysis import recall_at_k
from kcircuits.influence.bm25 import BM25
from kcircuits.influence.factors import fit_factors
from kcircuits.influence.facts import (
    WordTokenizer,
    completion_accuracy,
    finetune,
    make_facts_corpus,
    tiny_llama,
)
from kcircuits.influence.scores import pairwise_scores
from kcircuits.influence.sequences import Sequences

METHODS = ("ekfac", "kfac", "lissa", "identity", "bm25", "bm25_prompt")
LABELS = {"ekfac": "EK-FAC", "kfac": "KFAC", "lissa": "LiSSA", "identity": "gradient dot product",
          "bm25": "BM25 (prompt + completion)", "bm25_prompt": "BM25 (prompt only)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tiny", action="store_true", help="tiny random llama over the corpus' own word vocabulary")
    p.add_argument("--n-docs", type=int, default=1000)
    p.add_argument("--n-facts", type=int, help="default n_docs // 10")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--target-accuracy", type=float, default=0.95,
                   help="stop fine-tuning once this fraction of queries is answered (--epochs is the maximum)")
    p.add_argument("--train-only", nargs="+", default=["model.layers.2[4-7].mlp.*"],
                   help="fnmatch patterns of the parameters fine-tuned ('all' for every parameter)")
    p.add_argument("--include", nargs="+", help="modules influence tracks (default: the --train-only modules)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--query-rank", type=int, default=0, help="low-rank query gradients (0: full rank)")
    p.add_argument("--lissa-depth", type=int, default=100)
    p.add_argument("--lissa-scale", type=float, help="LiSSA scale (default: the core's 2 x estimated top eigenvalue)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="influence_facts.json", help="where to write the results")
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.train_only = "tiny", ["all"]
        if args.n_docs == 1000:
            args.n_docs = 120
        if args.lr == 1e-3:
            args.lr = 3e-3
        if args.epochs == 4:
            args.epochs = 80
    return args


def build(args):
    """(hf model, tokenizer, facts corpus)."""
    if args.tiny:
        fc = make_facts_corpus(args.n_docs, args.n_facts, seed=args.seed)
        tok = WordTokenizer.for_corpus(fc)
        return tiny_llama(len(tok), layers=2, hidden=64, heads=4, seed=args.seed), tok, fc
    from kcircuits.models import load_model

    lm = load_model(args.model)
    fc = make_facts_corpus(args.n_docs, args.n_facts, seed=args.seed, tokenizer=lm.tokenizer)
    return lm.hf_model, lm.tokenizer, fc


def influence_method(method: str, model, queries: Sequences, train: Sequences, args, include, cache: dict):
    """Score matrix ``[n_q, n_train]`` and the timing breakdown of one influence method."""
    t0 = time.perf_counter()
    factors = None
    if method in ("ekfac", "kfac") or (method == "lissa" and "factors" not in cache):
        # LiSSA uses factors only for its damping (the same heuristic λ as EK-FAC/KFAC)
        factors = fit_factors(model, train, strategy="kfac" if method == "lissa" else method,
                              batch_size=args.batch_size, seed=args.seed, include=include, progress=False)
        cache.setdefault("factors", factors)
    elif method == "lissa":
        factors = cache["factors"]
    t1 = time.perf_counter()
    res = pairwise_scores(model, queries, train, strategy=method, factors=factors, batch_size=args.batch_size,
                          query_rank=args.query_rank or None, include=include, progress=False,
                          lissa=lissa_options(args) if method == "lissa" else None)
    t2 = time.perf_counter()
    return res.total, {"fit_s": t1 - t0, "score_s": t2 - t1, "total_s": t2 - t0}


def lissa_options(args) -> dict:
    opts = {"depth": args.lissa_depth}
    if args.lissa_scale:
        opts["scale"] = args.lissa_scale
    return opts


def precision_at_1(scores: torch.Tensor, sources: list[list[int]]) -> float:
    """Fraction of queries whose single best-ranked document is one of its sources."""
    best = scores.argmax(1).tolist()
    return sum(b in s for b, s in zip(best, sources)) / len(sources)


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok, fc = build(args)
    train = Sequences.from_texts(tok, fc.documents, args.max_length)
    queries = Sequences.from_pairs(tok, fc.prompts, fc.completions, args.max_length)
    train_only = None if args.train_only == ["all"] else args.train_only
    include = args.include or train_only  # module names match the parameter patterns ("...mlp.*")
    out = {"model": args.model, "n_docs": len(fc.documents), "n_facts": len(fc.facts), "k": args.k,
           "train_only": train_only, "include": include, "epochs": args.epochs, "lr": args.lr,
           "tokens_per_doc": float(train.attention_mask.sum(1).float().mean()),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "torch": torch.__version__}
    out["accuracy_before"] = float(completion_accuracy(model, queries).float().mean())
    t0 = time.perf_counter()
    out["loss_per_epoch"], out["accuracy_per_epoch"] = [], []
    for epoch in range(args.epochs):  # one epoch at a time: stop as soon as the facts are known
        out["loss_per_epoch"] += finetune(model, train, epochs=1, lr=args.lr, batch_size=args.batch_size,
                                          train_only=train_only, seed=args.seed + epoch, progress=False)
        known = completion_accuracy(model, queries)
        out["accuracy_per_epoch"].append(float(known.float().mean()))
        print(f"epoch {epoch + 1}: loss {out['loss_per_epoch'][-1]:.3f}, query accuracy "
              f"{out['accuracy_per_epoch'][-1]:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if out["accuracy_per_epoch"][-1] >= args.target_accuracy:
            break
    out["epochs"] = len(out["loss_per_epoch"])
    out["finetune_s"] = time.perf_counter() - t0
    out["accuracy_after"] = float(known.float().mean())
    print(f"query accuracy {out['accuracy_before']:.2f} -> {out['accuracy_after']:.2f} after "
          f"{out['epochs']} epochs ({out['finetune_s']:.0f} s)", flush=True)
    results, cache = {}, {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method in ("bm25", "bm25_prompt"):  # the completion names the answer: only sources also name the person
            t = time.perf_counter()
            texts = fc.prompts if method == "bm25_prompt" else [p + c for p, c in zip(fc.prompts, fc.completions)]
            scores = BM25(fc.documents).score_matrix(texts)
            timing = {"fit_s": 0.0, "score_s": time.perf_counter() - t, "total_s": time.perf_counter() - t}
        else:
            try:
                scores, timing = influence_method(method, model, queries, train, args, include, cache)
            except KcircuitsError as exc:  # e.g. LiSSA diverging: report it, keep the other methods
                results[method] = {"error": str(exc)}
                print(f"{LABELS.get(method, method):>22}: failed: {exc}", flush=True)
                continue
        recall = recall_at_k(scores, fc.sources, args.k)
        results[method] = {**timing, f"recall@{args.k}": float(recall.mean()),
                           f"recall@{args.k}_known": float(recall[known].mean()) if known.any() else None,
                           "precision@1": precision_at_1(scores, fc.sources)}
        print(f"{LABELS.get(method, method):>22}: recall@{args.k} {results[method][f'recall@{args.k}']:.3f}  "
              f"({timing['total_s']:.1f} s)", flush=True)
        Path(args.json).write_text(json.dumps({**out, "methods": results}, indent=1))
    out["methods"] = results
    return out


def markdown(out: dict) -> str:
    k = out["k"]
    lines = [f"| method | recall@{k} | recall@{k} (learned facts) | precision@1 | fit (s) | score (s) |",
             "|---|---|---|---|---|---|"]
    for m, r in out["methods"].items():
        if "error" in r:
            lines.append(f"| {LABELS.get(m, m)} | failed: {r['error']} | | | | |")
            continue
        known = r[f"recall@{k}_known"]
        lines.append(f"| {LABELS.get(m, m)} | {r[f'recall@{k}']:.3f} | {'n/a' if known is None else f'{known:.3f}'} | "
                     f"{r['precision@1']:.3f} | {r['fit_s']:.1f} | {r['score_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = run(args)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\n{out['model']}: {out['n_docs']} documents, {out['n_facts']} facts x 3 sources, "
          f"{out['tokens_per_doc']:.1f} tokens/document; fine-tuned {out['train_only'] or 'all parameters'} for "
          f"{out['epochs']} epochs ({out['finetune_s']:.0f} s), query accuracy {out['accuracy_before']:.2f} -> "
          f"{out['accuracy_after']:.2f}; influence tracks {out['include'] or 'every linear module in the blocks'}; "
          f"{out['machine']}\n")
    print(markdown(out))
    print(f"\nresults: {args.json}")


if __name__ == "__main__":
    main()
