"""Explain a circuit on a prompt set: logit lens (clean and circuit-only), head roles, composition.

This is the layer between the analyses (:mod:`kcircuits.analyze`) and the commands: it runs them
over batches of prompt pairs, joins the results, and shapes them for the run folder
(``lens.json``, ``roles.json``, ``composition.json``), the report sections and the viewer's
per-node panel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kcircuits.ablation import ablated_acts, check_ablation, mean_activations
from kcircuits.analyze.compare import composition
from kcircuits.analyze.head_roles import (
    RoleTable,
    RoleThresholds,
    answer_range_of,
    head_roles,
    token_roles,
)
from kcircuits.analyze.logit_lens import LensResult, logit_lens
from kcircuits.batching import Batch, make_batches
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.graph import Circuit


@dataclass
class Explanation:
    """Everything :func:`explain` measured; ``pairs`` are the prompts, in the order of every ``[b, ...]`` tensor.

    Attributes:
        pairs: the prompt pairs explained.
        lens: the logit lens of the clean model (per layer and per node).
        lens_circuit: the lens of the circuit alone (edges outside it patched), or None without a circuit.
        lens_chance: the lens of the fully ablated run (every edge patched): the chance level, or None.
        roles: the head-role table (:class:`~kcircuits.analyze.head_roles.RoleTable`), or None when skipped.
        composition: the circuit's nodes and edges by component type, or None without a circuit.
        tokens: the decoded clean tokens of every prompt.
    """

    pairs: list
    lens: LensResult
    lens_circuit: LensResult | None
    lens_chance: LensResult | None  # the fully ablated run (every edge patched): the chance level
    roles: RoleTable | None
    composition: dict | None
    tokens: list[list[str]]  # decoded clean tokens of every prompt

    def lens_json(self, tokenizer) -> dict:
        """``lens.json``: the prompts and answers, the clean and circuit-only lens per prompt (tokens
        decoded with ``tokenizer``) and their rank-by-layer summaries (with the chance level)."""
        out = {"prompts": [p.clean_text for p in self.pairs], "answers": [p.object for p in self.pairs],
               "clean": self.lens.to_json(tokenizer), "summary": {"clean": layer_trace(self.lens)}}
        if self.lens_circuit is not None:
            out["circuit"] = self.lens_circuit.to_json(tokenizer)
            out["summary"]["circuit"] = layer_trace(self.lens_circuit)
        if self.lens_chance is not None:
            out["summary"]["chance"] = layer_trace(self.lens_chance)
        return out

    def report_view(self, circuit: Circuit | None = None) -> dict:
        """The report's "lens", "roles" and "composition" entries (plain lists and numbers, so the
        dict can be cached as JSON); "lens" and "roles" carry ``n_prompts``, which the report states
        next to them (they usually run on fewer prompts than the Hit@k evaluation). ``circuit``
        marks each head of the roles table as in it or not (None: unknown)."""
        trace = {"layers": list(range(self.lens.layer_rank.shape[1])), "clean": layer_trace(self.lens)}
        if self.lens_circuit is not None:
            trace["circuit"] = layer_trace(self.lens_circuit)
        if self.lens_chance is not None:
            trace["chance"] = layer_trace(self.lens_chance)
        trace["n_prompts"] = len(self.pairs)
        view = {"lens": trace, "composition": self.composition}
        if self.roles is not None:
            in_circuit = set(circuit.nodes()) if circuit is not None else None
            rows = [dict(r, in_circuit=(r["head"] in in_circuit) if in_circuit is not None else None)
                    for r in self.roles.rows]
            shown = [r for r in rows if r["role"] != "none" or r["in_circuit"]]
            shown.sort(key=lambda r: -abs(r["direct_effect"]))
            view["roles"] = {"thresholds": self.roles.to_json()["thresholds"], "counts": self.roles.counts(),
                             "rows": shown[:60], "n_heads": len(rows), "n_prompts": len(self.pairs)}
        return view

    def node_details(self, tokenizer, example: int = 0) -> dict:
        """The viewer's per-node panel for one example prompt (schema in docs/viewer.md), plain JSON.

        The example's ``answer`` is the answer's first token as decoded (``" Lisbon"``, leading space
        kept), the token whose rank and probability the lens entries give; ``answer_text`` is the
        answer as the dataset writes it. ``n_prompts`` is how many prompts the roles were measured on.
        ``tokenizer`` decodes the tokens; ``example`` is the index of the prompt shown.
        """
        lens, pair = self.lens_circuit or self.lens, self.pairs[example]
        nodes: dict[str, dict] = {}
        for i, name in enumerate(lens.node_names):
            top = [[tokenizer.decode([int(t)]), float(p)] for t, p in
                   zip(lens.node_top[example, i].tolist(), lens.node_top_prob[example, i].tolist(), strict=True)]
            nodes[name] = {"lens": {"top": top, "answer_rank": int(lens.node_rank[example, i]),
                                    "answer_prob": float(lens.node_prob[example, i])}}
        nodes["logits"] = {"lens": {"answer_rank": int(lens.layer_rank[example, -1]),
                                    "answer_prob": float(lens.layer_prob[example, -1])}}
        n_tok = len(self.tokens[example])
        for i, row in enumerate(self.roles.rows if self.roles is not None else []):
            nodes[row["head"]]["attention"] = {"weights": self.roles.attention[i, example, :n_tok].tolist()}
            nodes[row["head"]]["role"] = {k: row[k] for k in ("role", "subject_mass", "relation_mass", "other_mass",
                                                             "direct_effect", "answer_z", "range_z", "specificity")}
        return {"example": {"prompt": pair.clean_text, "tokens": self.tokens[example],
                            "answer": tokenizer.decode([int(pair.answer_ids[0])]), "answer_text": pair.object,
                            "lens_of": "circuit" if self.lens_circuit is not None else "clean model"},
                "nodes": nodes, "n_prompts": len(self.pairs)}


def layer_trace(lens: LensResult) -> dict:
    """Rank-by-layer summary over prompts: median rank, mean probability, share at rank 1 and within
    10 after the embeddings (index 0) and every layer, and where the answer settles at rank 1."""
    r, p = lens.layer_rank.float(), lens.layer_prob
    first = lens.first_layer_at_rank(1)
    return {"median_rank": r.median(0).values.tolist(), "mean_prob": p.mean(0).tolist(),
            "hit1": (r <= 1).float().mean(0).tolist(), "hit10": (r <= 10).float().mean(0).tolist(),
            "first_layer_at_rank1": first.tolist(),
            "share_settled": float((first >= 0).float().mean())}


def decode_tokens(tokenizer, pairs: list) -> list[list[str]]:
    return [[tokenizer.decode([i]) for i in p.clean_ids] for p in pairs]


@torch.no_grad()
def explain(engine: Engine, tokenizer, pairs: list, pad_id: int, *, circuit: Circuit | None = None,
            ablation: str = "corrupt", batch_size: int = 8, thresholds: RoleThresholds | None = None,
            answer_range: list[int] | None = None, top_k: int = 10, device: torch.device | str = "cpu",
            node_lens: bool = True, roles: bool = True) -> Explanation:
    """Logit lens (clean, and circuit-only when ``circuit`` is given), head roles and composition over ``pairs``.

    ``node_lens=False`` keeps only the rank-by-layer trace of the lens, ``roles=False`` skips head
    roles: the studies use this where they need only part of the picture (the node lens
    unembeds every source, the dominant cost on a large vocabulary).

    The answer range for the relation-head criterion defaults to every answer of ``pairs`` (see
    :func:`answer_range_of`); pass the relation's full range when ``pairs`` is a small sample.

    Args:
        engine: the engine of the model, over the circuit's graph.
        tokenizer: decodes the tokens and finds the subject and relation tokens of each prompt.
        pairs: the prompt pairs explained.
        pad_id: the padding token id.
        circuit: the circuit whose circuit-only lens and composition are measured (None: clean model only).
        ablation: what edges outside the circuit carry: ``"corrupt"``, ``"zero"`` or ``"mean"``.
        batch_size: prompt pairs per batch.
        thresholds: head-role thresholds (None: the defaults).
        answer_range: token ids of the relation's answers (the relation-head criterion).
        top_k: tokens kept per node and layer in the lens.
        device: where the batches run (the model's device).
        node_lens: unembed every node's output (else only the per-layer trace).
        roles: measure head roles.

    Returns:
        An :class:`Explanation`.
    """
    if not pairs:
        raise KcircuitsError("no prompts to explain")
    check_ablation(ablation)
    batches: list[Batch] = [b.to(device) for b in make_batches(pairs, pad_id, batch_size)]
    mean = mean_activations(engine, batches) if (circuit is not None and ablation == "mean") else None
    lens, lens_circ, lens_chance, kinds = [], [], [], []
    empty = Circuit(circuit.graph, torch.zeros_like(circuit.edges)) if circuit is not None else None
    start = 0
    for batch in batches:
        chunk = pairs[start : start + len(batch)]
        start += len(batch)
        lens.append(logit_lens(engine, batch, top_k=top_k, nodes=node_lens))
        if circuit is not None:
            abl = ablated_acts(engine, batch, ablation, mean)
            lens_circ.append(logit_lens(engine, batch, circuit=circuit, ablated=abl, top_k=top_k, nodes=node_lens))
            lens_chance.append(logit_lens(engine, batch, circuit=empty, ablated=abl, top_k=1, nodes=False))
        kinds.append(token_roles(tokenizer, chunk, batch.clean.shape[1]))
    table = (head_roles(engine, batches, kinds, answer_range or answer_range_of(pairs), thresholds=thresholds)
             if roles else None)
    return Explanation(list(pairs), LensResult.cat(lens), LensResult.cat(lens_circ) if lens_circ else None,
                       LensResult.cat(lens_chance) if lens_chance else None, table,
                       composition(circuit) if circuit is not None else None, decode_tokens(tokenizer, pairs))
