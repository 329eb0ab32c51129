"""Ground-truth benchmark for influence functions: do they find the documents a fact was learned from?

1. Invent facts (``kcircuits.influence.facts``): each stated in 3 paraphrased source documents, mixed
   with distractors (same person without the fact, the answer without the person, the person with
   another fact's answer, generic filler). Fine-tuning and the tiny model: ``facts_setup.py``.
2. Fine-tune the model on the corpus until it knows the facts (first-token accuracy of the queries
   before/after is reported). To stay affordable on a CPU only the MLPs of a few upper layers are
   trained (``--train-only``); influence tracks the same modules (``--include``): the parameters
   that learned the facts.
3. For each method, rank all training documents per query and measure recall@k of the 3 sources,
   with wall time: EK-FAC, KFAC, LiSSA, gradient dot product (identity) and BM25 (lexical).
   Variants: ``<method>_relative`` (RelatIF), ``<method>_margin`` (log-odds f) and
   ``<method>_checkpoints`` (the method's scores at the end of every fine-tuning epoch, summed; the
   per-epoch weights are kept in the ``--finetuned`` file).

    python benchmarks/influence_facts.py                      # SmolLM2-135M, 1000 documents (docs/benchmarks.md)
    python benchmarks/influence_facts.py --tiny               # tiny random llama, word vocabulary, ~1 min
    python benchmarks/influence_facts.py --n-docs 200 --methods ekfac,identity,bm25 --json out.json

Prints a Markdown table and writes the results as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import platform
import time
from pathlib import Path

import torch

from kcircuits.errors import KcircuitsError
from kcircuits.io import atomic_torch_save, atomic_write_json
from kcircuits.influence.analysis import recall_at_k
from kcircuits.influence.bm25 import BM25
from kcircuits.influence.factors import Factors, fit_factors
from kcircuits.influence.facts import make_facts_corpus
from kcircuits.influence.scores import pairwise_scores
from kcircuits.influence.sequences import Sequences
from kcircuits.models import weights_fingerprint

try:  # imported as benchmarks.<script> (tests, python -m) with the repository root on sys.path
    from benchmarks.facts_setup import WordTokenizer, completion_accuracy, finetune, tiny_llama
except ModuleNotFoundError as exc:  # run as a script: this folder is on sys.path
    if exc.name != "benchmarks":
        raise
    from facts_setup import WordTokenizer, completion_accuracy, finetune, tiny_llama

METHODS = ("ekfac", "kfac", "lissa", "identity", "ekfac_relative", "identity_relative", "ekfac_margin",
           "ekfac_relative_margin", "identity_margin", "bm25", "bm25_prompt")
LABELS = {"ekfac": "EK-FAC", "kfac": "KFAC", "lissa": "LiSSA", "identity": "gradient dot product",
          "bm25": "BM25 (prompt + completion)", "bm25_prompt": "BM25 (prompt only)"}
OPTIONS = {"relative": "relative (RelatIF)", "margin": "margin f", "checkpoints": "summed over epoch checkpoints"}


def split_method(method: str) -> tuple[str, dict]:
    """``"ekfac_relative_margin"`` -> ``("ekfac", {"normalize": "relative", "measurement": "margin"})``;
    the ``checkpoints`` option is not a scoring option: see :func:`influence_method`."""
    strategy, *options = method.split("_")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise KcircuitsError(f"unknown method option(s) {sorted(unknown)} in {method!r}; options: {', '.join(OPTIONS)}")
    return strategy, {"normalize": "relative" if "relative" in options else None,
                      "measurement": "margin" if "margin" in options else "logprob"}


def label(method: str) -> str:
    if method in LABELS:
        return LABELS[method]
    strategy, *options = method.split("_")
    return ", ".join([LABELS.get(strategy, strategy)] + [OPTIONS.get(o, o) for o in options])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tiny", action="store_true", help="tiny random llama over the corpus' own word vocabulary")
    p.add_argument("--n-docs", type=int, help="training documents (default 1000; --tiny 120)")
    p.add_argument("--n-facts", type=int, help="default n_docs // 10")
    p.add_argument("--statement", choices=["verbatim", "paraphrase"], default="verbatim",
                   help="sources repeat the query's sentence in differing documents, or paraphrase it")
    p.add_argument("--epochs", type=int, help="at most this many epochs (default 8; --tiny 80)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 2e-3; --tiny 3e-3)")
    p.add_argument("--target-accuracy", type=float,
                   help="stop fine-tuning once this fraction of queries is answered (default 0.9; --tiny 0.95)")
    p.add_argument("--train-only", nargs="+",
                   help="fnmatch patterns of the parameters fine-tuned ('all' for every parameter; default the "
                        "MLPs of layers 22-29, 'model.layers.2[2-9].mlp.*'; --tiny all)")
    p.add_argument("--include", nargs="+", help="modules influence tracks (default: the --train-only modules)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--query-rank", type=int, default=0, help="low-rank query gradients (0: full rank)")
    p.add_argument("--lissa-depth", type=int, default=100)
    p.add_argument("--lissa-batch-size", type=int, default=8, help="training sequences per Gauss-Newton product")
    p.add_argument("--lissa-queries", type=int, default=0,
                   help="score LiSSA on the first N queries only (0: all); its recall is then over those")
    p.add_argument("--lissa-scale", type=float, help="LiSSA scale (default: the core's 2 x estimated top eigenvalue)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="influence_facts.json", help="where to write the results")
    p.add_argument("--finetuned", help="file to save the fine-tuned weights to, or to load them from if it exists "
                                       "(same configuration only): rerun methods without fine-tuning again")
    args = p.parse_args(argv)
    defaults = ({"n_docs": 120, "epochs": 80, "lr": 3e-3, "target_accuracy": 0.95, "train_only": ["all"]} if args.tiny
                else {"n_docs": 1000, "epochs": 8, "lr": 2e-3, "target_accuracy": 0.9,
                      "train_only": ["model.layers.2[2-9].mlp.*"]})
    if args.tiny:
        args.model = "tiny"
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build(args):
    """(hf model, tokenizer, facts corpus)."""
    if args.tiny:
        fc = make_facts_corpus(args.n_docs, args.n_facts, statement=args.statement, seed=args.seed)
        tok = WordTokenizer.for_corpus(fc)
        return tiny_llama(len(tok), layers=2, hidden=64, heads=4, seed=args.seed), tok, fc
    from kcircuits.models import load_model

    lm = load_model(args.model)
    fc = make_facts_corpus(args.n_docs, args.n_facts, statement=args.statement, seed=args.seed, tokenizer=lm.tokenizer)
    return lm.hf_model, lm.tokenizer, fc


def influence_method(method: str, model, queries: Sequences, train: Sequences, args, include, cache: dict,
                     checkpoints: list[dict] | None = None, epoch: int | None = None):
    """Score matrix ``[n_q, n_train]`` and the timing breakdown of one influence method
    (``<strategy>[_relative][_margin][_checkpoints]``: see :func:`split_method`).

    Factors are fitted once per strategy and reused (``cache``); a method reusing them reports the
    original fit time, so each row's total is what that method costs on its own. LiSSA uses
    factors only for its damping (the same heuristic λ as EK-FAC/KFAC). ``epoch`` names the
    checkpoint the model holds (None: the final weights), for the factor cache."""
    if "checkpoints" in method.split("_")[1:]:
        return summed_over_checkpoints(method, model, queries, train, args, include, cache, checkpoints)
    strategy, options = split_method(method)
    needs = strategy if strategy in ("ekfac", "kfac") else ("kfac" if strategy == "lissa" else None)
    factors, fit_s = None, 0.0
    if needs is not None:
        have = cache.get(needs) or (cache.get("ekfac") if strategy == "lissa" else None)
        if have is None:
            have = cached_factors(needs, model, train, args, include, epoch)
            cache[needs] = have
        factors, fit_s = have
    queries_used = (queries if strategy != "lissa" or not args.lissa_queries
                    else queries.subset(range(args.lissa_queries)))
    t1 = time.perf_counter()
    res = pairwise_scores(model, queries_used, train, strategy=strategy, factors=factors, batch_size=args.batch_size,
                          query_rank=args.query_rank or None, include=include, progress=False, **options,
                          lissa=lissa_options(args) if strategy == "lissa" else None)
    score_s = time.perf_counter() - t1
    return res.total, {"fit_s": fit_s, "score_s": score_s, "total_s": fit_s + score_s, **res.solver}


def summed_over_checkpoints(method: str, model, queries: Sequences, train: Sequences, args, include, cache: dict,
                            checkpoints: list[dict] | None):
    """The method's scores at the end of every fine-tuning epoch, summed (TracIn-CP's sum over
    checkpoints, with each checkpoint's own curvature: Bae et al. 2024's SOURCE in its simplest
    form). Equal weights: the learning rate is constant.

    Why: a source the final model has memorised has a vanishing loss gradient at the answer, so
    it is invisible at the final parameters; at the earlier checkpoints, while the fact was being
    learned, it is not. Each checkpoint's factors are fitted on its own weights (cached per epoch)."""
    if not checkpoints:
        raise KcircuitsError("no per-epoch checkpoints: this fine-tune was saved without them; delete the "
                             "--finetuned file and fine-tune again")
    base = method.replace("_checkpoints", "")
    final = {n: p.detach().clone() for n, p in model.named_parameters() if n in checkpoints[-1]}
    timing: dict = {"fit_s": 0.0, "score_s": 0.0, "total_s": 0.0}
    per_epoch = []
    try:
        for epoch, weights in enumerate(checkpoints, 1):
            last = epoch == len(checkpoints)
            model.load_state_dict(weights, strict=False)
            scores, t = influence_method(base, model, queries, train, args, include,
                                         cache if last else cache.setdefault(f"epoch {epoch}", {}),
                                         epoch=None if last else epoch)
            per_epoch.append(scores)
            timing = {k: timing[k] + t[k] for k in timing}
    finally:
        model.load_state_dict(final, strict=False)
    return sum(per_epoch[1:], per_epoch[0].clone()), {**timing, "per_checkpoint": per_epoch}


PROBABILITY_BINS = (0.0, 0.9, 0.99, 0.999, 1.0)


@torch.no_grad()
def completion_probability(model, queries: Sequences) -> torch.Tensor:
    """p(completion | prompt) per query ``[n_q]`` after fine-tuning."""
    from kcircuits.influence.gradients import LMObjective

    objective = LMObjective()
    return torch.cat([(-objective.losses(objective.output(model, b), b)).exp() for _, b in queries.batches(32)])


def by_probability(recall: torch.Tensor, prob: torch.Tensor) -> list[dict]:
    """Mean recall of the queries in each band of p(completion): why memorised facts are hard to
    trace (their sources' own loss gradients vanish at the answer)."""
    rows = []
    for lo, hi in zip(PROBABILITY_BINS[:-1], PROBABILITY_BINS[1:], strict=True):
        inside = (prob >= lo) & ((prob < hi) if hi < 1.0 else (prob <= hi))
        if inside.any():
            rows.append({"p_from": lo, "p_to": hi, "queries": int(inside.sum()),
                         "recall": float(recall[inside].mean())})
    return rows


def top_kinds(scores: torch.Tensor, fc, k: int) -> dict[str, int]:
    """What fills the queries' top-k slots: ``own source``, or the kind of another document
    (another fact's ``source``, ``subject``, ``object``, ``cross``, ``generic``)."""
    counts: dict[str, int] = {}
    for q, row in enumerate(scores.topk(min(k, scores.shape[1]), dim=1).indices.tolist()):
        for i in row:
            kind = "own source" if i in fc.facts[q].sources else fc.kinds[i]
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def finetune_config(args) -> dict:
    """What determines the fine-tuned weights (a saved fine-tune is reused only for the same)."""
    return {k: getattr(args, k) for k in ("model", "tiny", "n_docs", "n_facts", "statement", "epochs", "lr",
                                          "target_accuracy", "train_only", "max_length", "batch_size", "seed")}


def cached_factors(strategy: str, model, train: Sequences, args, include, epoch: int | None = None) -> tuple:
    """``(factors, fit seconds)``: fitted here, or loaded from ``--finetuned``'s companion folder
    when an earlier run of the same configuration and the same weights saved them (the fit time is
    the original one). ``epoch``: the model holds that epoch's checkpoint, not the final weights."""
    suffix = "" if epoch is None else f"-epoch{epoch}"
    folder = Path(f"{args.finetuned}.{strategy}-factors{suffix}") if args.finetuned else None
    config = {**finetune_config(args), "include": include, "weights": weights_fingerprint(model),
              **({} if epoch is None else {"epoch": epoch})}
    if folder is not None and (folder / "fit_seconds.json").exists():
        info = json.loads((folder / "fit_seconds.json").read_text())
        if info["config"] == config:
            return Factors.load(folder), info["fit_s"]
    t0 = time.perf_counter()
    factors = fit_factors(model, train, strategy=strategy, batch_size=args.batch_size, seed=args.seed,
                          include=include, progress=False)
    fit_s = time.perf_counter() - t0
    if folder is not None:
        factors.save(folder)
        atomic_write_json(folder / "fit_seconds.json", {"fit_s": fit_s, "config": config})
    return factors, fit_s


def lissa_options(args) -> dict:
    opts = {"depth": args.lissa_depth, "batch_size": args.lissa_batch_size}
    if args.lissa_scale:
        opts["scale"] = args.lissa_scale
    return opts


def precision_at_1(scores: torch.Tensor, sources: list[list[int]]) -> float:
    """Fraction of queries whose single best-ranked document is one of its sources."""
    best = scores.argmax(1).tolist()
    return sum(b in s for b, s in zip(best, sources, strict=True)) / len(sources)


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
    saved = Path(args.finetuned) if args.finetuned else None
    trained = {n for n, p in model.named_parameters()
               if train_only is None or any(fnmatch.fnmatchcase(n, pat) for pat in train_only)}
    checkpoints: list[dict] = []  # the trained weights at the end of each epoch (the last: the final weights)
    if saved is not None and saved.exists():  # a finished fine-tune of this configuration: reuse it
        state = torch.load(saved)
        if state.get("config") != finetune_config(args):
            raise KcircuitsError(f"{saved} holds a fine-tune of another configuration; delete it or pass another path")
        model.load_state_dict(state["weights"], strict=False)
        out.update(state["log"])
        checkpoints = state.get("epoch_weights", [])
    for epoch in range(args.epochs if "finetune_s" not in out else 0):  # stop as soon as the facts are known
        out["loss_per_epoch"] += finetune(model, train, epochs=1, lr=args.lr, batch_size=args.batch_size,
                                          train_only=train_only, seed=args.seed + epoch, progress=False)
        checkpoints.append({n: t.detach().clone() for n, t in model.state_dict().items() if n in trained})
        known = completion_accuracy(model, queries)
        out["accuracy_per_epoch"].append(float(known.float().mean()))
        print(f"epoch {epoch + 1}: loss {out['loss_per_epoch'][-1]:.3f}, query accuracy "
              f"{out['accuracy_per_epoch'][-1]:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if out["accuracy_per_epoch"][-1] >= args.target_accuracy:
            break
    out["epochs"] = len(out["loss_per_epoch"])
    out.setdefault("finetune_s", time.perf_counter() - t0)
    known = completion_accuracy(model, queries)
    out["accuracy_after"] = float(known.float().mean())
    prob = completion_probability(model, queries)
    out["completion_probability"] = prob.tolist()
    if saved is not None and not saved.exists():
        log = {k: out[k] for k in ("loss_per_epoch", "accuracy_per_epoch", "finetune_s")}
        weights = {n: t for n, t in model.state_dict().items() if n in trained}
        atomic_torch_save(saved, {"config": finetune_config(args), "weights": weights, "log": log,
                                  "epoch_weights": checkpoints})
    print(f"query accuracy {out['accuracy_before']:.2f} -> {out['accuracy_after']:.2f} after "
          f"{out['epochs']} epochs ({out['finetune_s']:.0f} s)", flush=True)
    results, cache = {}, {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method in ("bm25", "bm25_prompt"):  # the completion names the answer: only sources also name the person
            t = time.perf_counter()
            full = [p + c for p, c in zip(fc.prompts, fc.completions, strict=True)]
            texts = fc.prompts if method == "bm25_prompt" else full
            scores = BM25(fc.documents).score_matrix(texts)
            timing = {"fit_s": 0.0, "score_s": time.perf_counter() - t, "total_s": time.perf_counter() - t}
            scores = torch.as_tensor(scores)
        else:
            try:
                scores, timing = influence_method(method, model, queries, train, args, include, cache, checkpoints)
            except KcircuitsError as exc:  # e.g. LiSSA diverging: report it, keep the other methods
                results[method] = {"error": str(exc)}
                print(f"{label(method):>22}: failed: {exc}", flush=True)
                continue
        n_q = scores.shape[0]  # LiSSA may score only the first --lissa-queries
        recall, learned = recall_at_k(scores, fc.sources[:n_q], args.k), known[:n_q]
        if "per_checkpoint" in timing:  # what each epoch's scores find alone
            timing[f"recall@{args.k}_per_checkpoint"] = [float(recall_at_k(s, fc.sources[:n_q], args.k).mean())
                                                         for s in timing.pop("per_checkpoint")]
        results[method] = {**timing, "queries": n_q, f"recall@{args.k}": float(recall.mean()),
                           f"recall@{args.k}_known": float(recall[learned].mean()) if learned.any() else None,
                           "precision@1": precision_at_1(scores, fc.sources[:n_q]),
                           f"recall@{args.k}_per_query": recall.tolist(),
                           f"top{args.k}_kinds": top_kinds(scores, fc, args.k),
                           f"recall@{args.k}_by_probability": by_probability(recall, prob[:n_q])}
        print(f"{label(method):>22}: recall@{args.k} {results[method][f'recall@{args.k}']:.3f}  "
              f"({timing['total_s']:.1f} s)", flush=True)
        Path(args.json).write_text(json.dumps({**out, "methods": results}, indent=1))
    out["methods"] = results
    return out


def markdown(out: dict) -> str:
    k = out["k"]
    lines = [f"| method | queries | recall@{k} | recall@{k} (learned facts) | precision@1 | fit (s) | score (s) |",
             "|---|---|---|---|---|---|---|"]
    for m, r in out["methods"].items():
        if "error" in r:
            lines.append(f"| {label(m)} | | failed: {r['error']} | | | | |")
            continue
        known = r[f"recall@{k}_known"]
        known_s = "n/a" if known is None else f"{known:.3f}"
        lines.append(f"| {label(m)} | {r['queries']} | {r[f'recall@{k}']:.3f} | {known_s} | "
                     f"{r['precision@1']:.3f} | {r['fit_s']:.1f} | {r['score_s']:.1f} |")
    bands = next((r[f"recall@{k}_by_probability"] for r in out["methods"].values() if "error" not in r), [])
    if bands:
        head = " | ".join(f"p in [{b['p_from']}, {b['p_to']}{']' if b['p_to'] == 1.0 else ')'} ({b['queries']} queries)"
                          for b in bands)
        lines += ["", f"recall@{k} by the fine-tuned model's p(completion):", "",
                  f"| method | {head} |", "|---" * (len(bands) + 1) + "|"]
        for m, r in out["methods"].items():
            if "error" not in r and r["queries"] == out["n_facts"]:
                cells = " | ".join(f"{b['recall']:.2f}" for b in r[f"recall@{k}_by_probability"])
                lines.append(f"| {label(m)} | {cells} |")
    for m, r in out["methods"].items():
        if f"recall@{k}_per_checkpoint" in r:
            alone = ", ".join(f"epoch {e}: {v:.3f}" for e, v in enumerate(r[f"recall@{k}_per_checkpoint"], 1))
            lines += ["", f"{label(m)}, recall@{k} of each checkpoint alone: {alone}"]
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
