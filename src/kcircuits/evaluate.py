"""Evaluate circuits: the metric, faithfulness, Hit@k and the faithfulness curve over circuit sizes.

An :class:`Evaluator` caches, per batch, what every circuit evaluation reuses: the ablated source
outputs (the corrupted run, zeros or the dataset mean), the full model's logits and the empty
circuit's logits. Evaluating one circuit is then one patched forward pass per batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kcircuits.ablation import ablated_acts, check_ablation
from kcircuits.api_module import make_callable
from kcircuits.batching import Batch
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.graph import Circuit
from kcircuits.metrics import (
    Metric,
    answer_rank,
    check_finite,
    curve_areas,
    faithfulness,
    get_metric,
    kl_div,
    MIN_GAP_FRACTION,
    stable_prompts,
    summary,
)
from kcircuits.settings import CURVE_PERCENTS
from kcircuits.selection import RANDOM_KINDS, CircuitShape, random_circuit, random_circuits, select



@dataclass
class _Cached:
    batch: Batch
    ablated: torch.Tensor | None
    full_logits: torch.Tensor  # [b, T, V]
    empty_logits: torch.Tensor


class Evaluator:
    """Evaluates circuits on one prompt set: metric, faithfulness, Hit@k, random baselines and the curve.

    Construction runs the full model and the empty circuit (every edge patched) once per batch and
    caches them; each :meth:`evaluate` is then one patched forward pass per batch.

    Args:
        engine: the :class:`~kcircuits.engine.Engine` of the model, over the circuits' graph.
        batches: the prompt pairs as :class:`~kcircuits.batching.Batch` es (at least one), on the
            engine's device (see :func:`kcircuits.pipeline.model_batches`).
        metric: ``"logit_diff"``, ``"logprob"``, ``"prob"`` (:mod:`kcircuits.metrics`), or a function
            ``metric(logits, batch) -> [b]``.
        ablation: what edges outside the circuit carry: ``"corrupt"`` (the corrupted run), ``"zero"``
            or ``"mean"`` (then ``mean`` is required).
        mean: dataset-mean source outputs ``[n_src, 1, 1, d]`` for ``ablation="mean"``
            (:func:`kcircuits.ablation.mean_activations`).
        progress: show progress bars.
        max_cache_gb: bound on the cached corrupted activations (see ``__init__``).

    Attributes (per prompt, ``[n]``, on the CPU): ``m_full`` and ``m_empty`` the metric of the full
    model and of the empty circuit; ``rank_full`` and ``rank_empty`` the answer's rank in each (the
    empty circuit's is the chance level); ``stable`` the prompts whose full-vs-empty gap is at least
    ``min_gap`` (faithfulness is averaged over them).
    """

    def __init__(self, engine: Engine, batches: Sequence[Batch], *, metric: str | Metric = "logit_diff",
                 ablation: str = "corrupt", mean: torch.Tensor | None = None, progress: bool = True,
                 max_cache_gb: float = 4.0):
        """``max_cache_gb`` bounds the cached corrupted activations (``[n_src, b, p, d]`` per batch);
        past it they are recomputed for every circuit (one more forward pass each) instead."""
        if not batches:
            raise KcircuitsError("nothing to evaluate: the prompt set is empty")
        self.engine, self.graph = engine, engine.graph
        self.metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
        self.metric = get_metric(metric) if isinstance(metric, str) else metric
        self.ablation = check_ablation(ablation)
        self.progress = progress
        self.cache: list[_Cached] = []
        self.edge_exists = self.graph.edge_exists()  # [n_src, n_dst] bool: the graph's edges
        self.mean = mean
        n_tokens = sum(b.clean.numel() for b in batches)
        cache_bytes = self.graph.n_src * n_tokens * engine.w.d_model * engine.w.W_E.element_size()
        self.cache_ablated = ablation != "corrupt" or cache_bytes <= max_cache_gb * 2**30
        with torch.no_grad():
            for batch in tqdm(batches, desc="caching clean/ablated runs", disable=not progress):
                full = engine.run(engine.embed(batch.clean), batch.target_pos).logits
                if ablation == "corrupt":  # one corrupted run gives both what patched edges carry and the
                    rec = engine.run(engine.embed(batch.corrupt), batch.target_pos, record=True)  # empty circuit
                    abl, empty = rec.acts, rec.logits
                else:
                    abl = ablated_acts(engine, batch, ablation, mean)
                    zeros = torch.zeros(self.graph.n_src, self.graph.n_dst, device=batch.clean.device)
                    empty = engine.run(engine.embed(batch.clean), batch.target_pos, mask=zeros, ablated=abl).logits
                self.cache.append(_Cached(batch, abl if self.cache_ablated else None, full, empty))
        self.m_full = check_finite(self._metric_over("full_logits"), "the full model's metric")
        self.m_empty = check_finite(self._metric_over("empty_logits"), "the empty circuit's metric")
        self.rank_full = torch.cat([answer_rank(c.full_logits, c.batch) for c in self.cache]).cpu()
        # the chance level: the fully ablated run (the empty circuit) on the same prompts
        self.rank_empty = torch.cat([answer_rank(c.empty_logits, c.batch) for c in self.cache]).cpu()
        self.stable, self.min_gap = stable_prompts(self.m_full, self.m_empty)

    @property
    def n_prompts(self) -> int:
        """Number of prompts evaluated (over all batches)."""
        return int(self.m_full.numel())

    def _metric_over(self, attr: str) -> torch.Tensor:
        return torch.cat([self.metric(getattr(c, attr), c.batch) for c in self.cache]).cpu()

    @torch.no_grad()
    def circuit_logits(self, circuit: Circuit | torch.Tensor) -> list[torch.Tensor]:
        """Logits of the circuit alone (edges outside it patched), one ``[b, T, V]`` per batch.

        Args:
            circuit: a :class:`~kcircuits.graph.Circuit`, or a patching mask ``[n_src, n_dst]`` (1 keeps an edge).
        """
        mask = circuit.mask() if isinstance(circuit, Circuit) else circuit
        if mask.dim() == 2 and bool((mask[self.edge_exists.to(mask.device)] == 1).all()):
            return [c.full_logits for c in self.cache]  # every edge kept: the circuit is the full model, exactly
        out = []
        eng = self.engine
        for c in self.cache:
            abl = c.ablated if self.cache_ablated else ablated_acts(eng, c.batch, self.ablation, self.mean)
            out.append(eng.run(eng.embed(c.batch.clean), c.batch.target_pos, mask=mask.to(c.batch.clean.device),
                               ablated=abl).logits)
        return out

    def evaluate(self, circuit: Circuit, ks: tuple[int, ...] = (1, 10)) -> dict:
        """Metric, faithfulness, Hit@k and KL of one circuit, per prompt and summarised.

        Args:
            circuit: the :class:`~kcircuits.graph.Circuit` evaluated (of this evaluator's graph).
            ks: the k of each Hit@k reported (``full_hit{k}``, ``circuit_hit{k}``, ``chance_hit{k}``).

        Returns:
            A JSON-ready dict (one prompt set's entry of ``metrics.json``): ``faithfulness`` (per prompt,
            summarised over the stable prompts), ``faithfulness_of_means``, the metric of the full model,
            the empty circuit and the circuit, ``kl_full_to_circuit``, the Hit@k values, and
            ``per_prompt`` lists.
        """
        logits = self.circuit_logits(circuit)
        m_circ = check_finite(
            torch.cat([self.metric(lg, c.batch) for lg, c in zip(logits, self.cache, strict=True)]).cpu(),
            "the circuit's metric")
        rank_circ = torch.cat([answer_rank(lg, c.batch) for lg, c in zip(logits, self.cache, strict=True)]).cpu()
        kl = torch.cat([kl_div(c.full_logits, lg) for lg, c in zip(logits, self.cache, strict=True)]).cpu()
        faith = faithfulness(m_circ, self.m_full, self.m_empty)
        denom_full = float(self.m_full.mean() - self.m_empty.mean())
        result = {
            "n_prompts": self.n_prompts,
            "n_edges": circuit.n_edges,
            "n_nodes": len(circuit.nodes()),
            "metric": self.metric_name,
            "metric_full": summary(self.m_full),
            "metric_empty": summary(self.m_empty),
            "metric_circuit": summary(m_circ),
            # per prompt, over the prompts whose full-vs-empty gap is large enough to divide by
            "faithfulness": summary(faith[self.stable]),
            "faithfulness_all_prompts": summary(faith),
            "unstable_prompts": {"n": int((~self.stable).sum()), "min_gap": self.min_gap,
                                 "rule": f"|m(full) - m(empty)| < {MIN_GAP_FRACTION} x its median over the prompts"},
            # ratio of means: stable even when single prompts have a tiny full-vs-empty gap
            "faithfulness_of_means": (float(m_circ.mean() - self.m_empty.mean()) / denom_full if denom_full
                                      else math.nan),
            "kl_full_to_circuit": summary(kl),
            "per_prompt": {"metric_circuit": m_circ.tolist(), "faithfulness": faith.tolist(),
                           "stable": self.stable.tolist(), "rank_full": self.rank_full.tolist(),
                           "rank_circuit": rank_circ.tolist(), "rank_chance": self.rank_empty.tolist()},
        }
        for k in ks:
            result[f"full_hit{k}"] = float((self.rank_full <= k).float().mean())
            result[f"circuit_hit{k}"] = float((rank_circ <= k).float().mean())
            result[f"chance_hit{k}"] = float((self.rank_empty <= k).float().mean())
        return result

    def random_baselines(self, circuit: Circuit, n_draws: int, seed: int, kinds: Sequence[str] = RANDOM_KINDS) -> dict:
        """Evaluate ``n_draws`` random circuits of each kind (:data:`kcircuits.selection.RANDOM_KINDS`), every
        one with exactly the circuit's number of edges after pruning: per kind each draw's shape and
        values, and their mean and spread.

        Args:
            circuit: the circuit whose :class:`~kcircuits.selection.CircuitShape` the draws copy.
            n_draws: random circuits per kind.
            seed: seed of the first draw (draw ``i`` uses ``seed + i``).
            kinds: which baselines, from ``RANDOM_KINDS`` (``same_size``, ``same_logit_edges``).

        Returns:
            ``{"circuit_shape", "n_draws", "kinds": {kind: entry}}``; each entry holds every draw's
            ``shapes``, ``faithfulness_of_means``, ``circuit_hit1`` and ``circuit_hit10``, and of each
            of those three values a ``<name>_summary`` (mean, spread).
        """
        shape = CircuitShape.of(circuit)
        out: dict = {"circuit_shape": shape.to_json(), "n_draws": n_draws, "kinds": {}}
        for kind in kinds:
            circuits = random_circuits(self.graph, shape, n_draws, seed, kind)
            draws = [self.evaluate(c) for c in circuits]
            entry: dict = {"shapes": [CircuitShape.of(c).to_json() for c in circuits]}
            for key in ("faithfulness_of_means", "circuit_hit1", "circuit_hit10"):
                entry[key] = [d[key] for d in draws]
                entry[f"{key}_summary"] = summary(torch.tensor(entry[key]))
            out["kinds"][kind] = entry
        return out

    def curve(self, scores: torch.Tensor, percents: Sequence[float] = CURVE_PERCENTS, *, selection: str = "topn",
              absolute: bool = True, random_baseline: bool = False, seed: int = 0) -> dict:
        """Faithfulness against circuit size (percent of all edges), with CPR and CMD.

        Args:
            scores: edge scores ``[n_src, n_dst]`` each size's circuit is selected from.
            percents: circuit sizes in percent of all edges (default: MIB's grid, 0.1 to 100).
            selection: ``"topn"`` or ``"greedy"`` (see :func:`kcircuits.selection.select`).
            absolute: rank edges by ``|score|`` (False: by signed score).
            random_baseline: also evaluate, per size, one random circuit of that circuit's exact
                pruned shape, and report its CPR and CMD.
            seed: seed of the random circuits (size ``i`` uses ``seed + i``).

        Returns:
            ``{"points": [...], "cpr", "cmd"}`` (with ``random_baseline`` also ``random_cpr``,
            ``random_cmd``); one point per size: percent, edges selected and kept, faithfulness, Hit@10.
        """
        g = self.graph
        points = []
        for pct in tqdm(percents, desc="faithfulness curve", disable=not self.progress):
            n = max(1, round(g.n_edges * pct / 100))
            circuit = select(g, scores, n, selection=selection, absolute=absolute)
            res = self.evaluate(circuit)
            point = {"percent": pct, "n_selected": n, "n_edges": res["n_edges"],
                     "faithfulness_mean": res["faithfulness"]["mean"], "faithfulness_std": res["faithfulness"]["std"],
                     "faithfulness_of_means": res["faithfulness_of_means"], "circuit_hit10": res["circuit_hit10"],
                     "chance_hit10": res["chance_hit10"]}
            if random_baseline:  # one random circuit of exactly this circuit's pruned size and node count
                rnd = (self.evaluate(random_circuit(g, CircuitShape.of(circuit), seed + len(points)))
                       if circuit.n_edges else res)
                point["random_faithfulness_of_means"] = rnd["faithfulness_of_means"]
                point["random_n_edges"] = rnd["n_edges"]
                point["random_circuit_hit10"] = rnd["circuit_hit10"]
            points.append(point)
        x = [p["percent"] / 100 for p in points]
        out = {"points": points, **curve_areas(x, [p["faithfulness_of_means"] for p in points])}
        if random_baseline:
            rnd = curve_areas(x, [p["random_faithfulness_of_means"] for p in points])
            out["random_cpr"], out["random_cmd"] = rnd["cpr"], rnd["cmd"]
        return out


make_callable(__name__, "evaluate")  # kcircuits.evaluate(...) is kcircuits.api.evaluate
