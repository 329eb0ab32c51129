"""Compare kcircuits' EK-FAC influence with Kronfluence 1.0.1 on the same model, data and damping.

Kronfluence is not a dependency of kcircuits; run this from its own environment:

    bash benchmarks/setup_kronfluence.sh
    benchmarks/.venv-kronfluence/bin/python benchmarks/kronfluence_compare.py            # tiny llama
    benchmarks/.venv-kronfluence/bin/python benchmarks/kronfluence_compare.py --model smollm2-135m \\
        --include "model.layers.2[6-7].mlp.*" --n-docs 100

Conventions matched on both sides (checked against Kronfluence's source):
* training loss L = token-*summed* cross-entropy per sequence (``reduction="sum"``), padding masked;
  measurement = the summed loss of the query's completion tokens, so both compute
  ``∇L_qᵀ (G + λI)⁻¹ ∇L_m`` (positive = helpful) with no sign flip;
* the same tracked modules (the linear layers inside the blocks; Kronfluence would also take
  ``lm_head`` by default, so the task lists the modules explicitly);
* padding excluded from the activation covariance (``get_attention_mask``);
* damping: ``heuristic`` = 0.1 × mean EK-FAC eigenvalue per module on both sides
  (``ScoreArguments(damping_factor=None)``), or one absolute number;
* Fisher: ``--fisher empirical`` (real labels) makes both fits deterministic and comparable to
  numerical precision; ``true`` samples labels from the model on each side with its own random
  numbers, so the two curvatures differ by sampling noise.

Reports the Pearson correlation of all pairwise scores, the mean per-query correlation, top-10
overlap, and wall times (factors + scores) of each.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from kcircuits.influence.factors import fit_factors
from kcircuits.influence.facts import make_facts_corpus
from kcircuits.influence.modules import tracked_modules
from kcircuits.influence.scores import pairwise_scores
from kcircuits.influence.sequences import Sequences

try:  # imported as benchmarks.<script> (tests, python -m) with the repository root on sys.path
    from benchmarks.facts_setup import WordTokenizer, tiny_llama
except ModuleNotFoundError as exc:  # run as a script: this folder is on sys.path
    if exc.name != "benchmarks":
        raise
    from facts_setup import WordTokenizer, tiny_llama


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' (random llama, word vocabulary) or a kcircuits model name")
    p.add_argument("--n-docs", type=int, default=300)
    p.add_argument("--n-facts", type=int, help="queries (default n_docs // 10)")
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fisher", default="empirical", choices=["empirical", "true"])
    p.add_argument("--damping", default="heuristic", help="'heuristic' or a number")
    p.add_argument("--include", nargs="+", help="fnmatch patterns of tracked modules (default: all in the blocks)")
    p.add_argument("--layers", type=int, default=4, help="tiny model: layers")
    p.add_argument("--hidden", type=int, default=128, help="tiny model: hidden size")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="alternating timed runs of each; the fastest is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="kronfluence_compare.json")
    return p.parse_args(argv)


def build(args):
    if args.model == "tiny":
        fc = make_facts_corpus(args.n_docs, args.n_facts, seed=args.seed)
        tok = WordTokenizer.for_corpus(fc)
        return tiny_llama(len(tok), layers=args.layers, hidden=args.hidden, heads=4, seed=args.seed), tok, fc
    from kcircuits.models import load_model

    lm = load_model(args.model)
    fc = make_facts_corpus(args.n_docs, args.n_facts, seed=args.seed, tokenizer=lm.tokenizer)
    return lm.hf_model, lm.tokenizer, fc


class SeqDataset(torch.utils.data.Dataset):
    """Rows of a :class:`Sequences` (fixed width, right-padded) as dicts for Kronfluence's loaders."""

    def __init__(self, seqs: Sequences):
        self.s = seqs

    def __len__(self) -> int:
        return len(self.s)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.s.input_ids[i], "attention_mask": self.s.attention_mask[i],
                "loss_mask": self.s.loss_mask[i]}


def make_task(tracked: list[str]):
    from kronfluence.task import Task

    class SummedLMTask(Task):
        """Token-summed causal-LM cross-entropy; the measurement is the completion's summed loss."""

        def _nll(self, batch, model, sample: bool) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            logp = logits[:, :-1].log_softmax(-1)
            if sample:  # true Fisher: labels drawn from the model
                with torch.no_grad():
                    labels = torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]), 1).view(logp.shape[:2])
            else:
                labels = batch["input_ids"][:, 1:]
            nll = -logp.gather(-1, labels[..., None])[..., 0]
            return (nll * batch["loss_mask"][:, 1:]).sum()

        def compute_train_loss(self, batch, model, sample=False):
            return self._nll(batch, model, sample)

        def compute_measurement(self, batch, model):
            return self._nll(batch, model, False)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return SummedLMTask()


def run_ours(model, queries, train, args, include):
    damping = args.damping if args.damping == "heuristic" else float(args.damping)
    t0 = time.perf_counter()
    factors = fit_factors(model, train, strategy="ekfac", fisher=args.fisher, batch_size=args.batch_size,
                          seed=args.seed, include=include, progress=False)
    t1 = time.perf_counter()
    scores = pairwise_scores(model, queries, train, strategy="ekfac", factors=factors, damping=damping,
                             batch_size=args.batch_size, progress=False).total
    return scores, {"factors_s": t1 - t0, "scores_s": time.perf_counter() - t1}


def run_kronfluence(model, queries, train, args, tracked: list[str]):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    task = make_task(tracked)
    model = prepare_model(copy.deepcopy(model), task)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("kcircuits_compare", model, task, cpu=True, disable_tqdm=True, output_dir=out)
        factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=args.fisher == "empirical")
        score_args = ScoreArguments(damping_factor=None if args.damping == "heuristic" else float(args.damping))
        t0 = time.perf_counter()
        analyzer.fit_all_factors("f", SeqDataset(train), per_device_batch_size=args.batch_size,
                                 factor_args=factor_args, overwrite_output_dir=True)
        t1 = time.perf_counter()
        analyzer.compute_pairwise_scores("s", "f", SeqDataset(queries), SeqDataset(train),
                                         per_device_query_batch_size=len(queries),
                                         per_device_train_batch_size=args.batch_size, score_args=score_args,
                                         overwrite_output_dir=True)
        t2 = time.perf_counter()
        scores = analyzer.load_pairwise_scores("s")["all_modules"].float()
    return scores, {"factors_s": t1 - t0, "scores_s": t2 - t1}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok, fc = build(args)
    model.eval()
    train = Sequences.from_texts(tok, fc.documents, args.max_length)
    queries = Sequences.from_pairs(tok, fc.prompts, fc.completions, args.max_length)
    width = max(train.input_ids.shape[1], queries.input_ids.shape[1])
    tracked = list(tracked_modules(model, args.include))
    # Kronfluence collates fixed-width rows; padding columns do not change a causal model's scores
    def pad(s: Sequences) -> Sequences:
        return Sequences(*(torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in
                           (s.input_ids, s.attention_mask, s.loss_mask)), s.texts, s.prompt_lengths)

    runs_o, runs_k = [], []
    for _ in range(args.repeats):  # alternate, keep the fastest of each: a shared machine's load varies
        ours, t = run_ours(model, queries, train, args, tracked)
        runs_o.append(t)
        theirs, t = run_kronfluence(model, pad(queries), pad(train), args, tracked)
        runs_k.append(t)
    t_ours = min(runs_o, key=lambda t: sum(t.values()))
    t_kf = min(runs_k, key=lambda t: sum(t.values()))
    k = min(10, ours.shape[1])
    top_o, top_k = ours.topk(k, 1).indices, theirs.topk(k, 1).indices
    shared = sum(len(set(a) & set(b)) for a, b in zip(top_o.tolist(), top_k.tolist(), strict=True))
    overlap = shared / (k * ours.shape[0])
    per_query = [pearson(o, t) for o, t in zip(ours, theirs, strict=True)]
    total_o, total_k = sum(t_ours.values()), sum(t_kf.values())
    out = {"model": args.model, "n_train": len(train), "n_queries": len(queries), "tracked_modules": len(tracked),
           "fisher": args.fisher, "damping": args.damping, "pearson": pearson(ours, theirs),
           "pearson_per_query_mean": sum(per_query) / len(per_query), "pearson_per_query_min": min(per_query),
           "top10_overlap": overlap, "kcircuits": t_ours, "kronfluence": t_kf, "kcircuits_total_s": total_o,
           "kronfluence_total_s": total_k, "all_runs": {"kcircuits": runs_o, "kronfluence": runs_k},
           "time_ratio_ours_over_kronfluence": total_o / total_k,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "torch": torch.__version__}
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"{args.model}: {len(train)} training sequences x {len(queries)} queries, {len(tracked)} modules, "
          f"EK-FAC, {args.fisher} Fisher, damping {args.damping}")
    print(f"Pearson r = {out['pearson']:.5f} (per query mean {out['pearson_per_query_mean']:.5f}, "
          f"min {out['pearson_per_query_min']:.5f}); top-10 overlap {overlap:.3f}")
    print(f"kcircuits   : factors {t_ours['factors_s']:.1f} s + scores {t_ours['scores_s']:.1f} s = {total_o:.1f} s")
    print(f"kronfluence : factors {t_kf['factors_s']:.1f} s + scores {t_kf['scores_s']:.1f} s = {total_k:.1f} s")
    print(f"time ratio (kcircuits / kronfluence) = {out['time_ratio_ours_over_kronfluence']:.2f}")


if __name__ == "__main__":
    main()
