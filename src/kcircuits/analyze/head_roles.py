"""Head roles: which attention heads move the subject's attribute, and which read the relation.

Knowledge-circuit analyses name two kinds of heads (Yao et al. 2024, "Knowledge Circuits in
Pretrained Transformers"): *mover heads* attend from the last position to the subject and write
the subject's attribute (the answer) into the residual stream; *relation heads* attend to the
relation's words and push the whole answer range of the relation (every capital, every
language ...) rather than this subject's answer. Here both are numbers, measured per head at the
answer position (the first scored position) of every prompt and averaged over prompts:

* attention mass on subject / relation / other tokens (see :func:`token_roles`);
* the head's direct effect on the logits: its output ``x_h`` read through the final norm frozen at
  the model's own residual stream (``σ`` of the final residual, LayerNorm centring applied to
  ``x_h``) and the unembedding: ``u = W_U (w ⊙ c(x_h) / σ)`` ``[V]``. Its answer entry minus the
  vocabulary mean is the ``direct_effect`` in logits. Softmax ignores a uniform shift, so only
  ``u - mean(u)`` matters; z-scores ``(u[t] - mean(u)) / std(u)`` compare heads of different scale:
  ``answer_z`` (this prompt's answer) and ``range_z`` (mean over the rest of the relation's answer
  range, this prompt's answer excluded); ``specificity = answer_z - range_z``.

Roles, with :class:`RoleThresholds` (docs/analysis.md has the same table):

* moves the subject: ``subject_mass >= subject_mass_min``, ``answer_z >= answer_z_min`` and
  ``specificity >= specificity_min``;
* reads the relation: ``relation_mass >= relation_mass_min`` and ``range_z >= range_z_min``;
* role = ``mover`` (first only), ``relation`` (second only), ``mixture`` (both), ``none``.

Shapes: ``b`` prompts, ``p`` positions, ``L`` layers, ``H`` heads, ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from kcircuits.batching import Batch
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.settings import RoleThresholds  # noqa: F401  (re-exported: defined with the other settings)

OTHER, SUBJECT, RELATION = 0, 1, 2
TOKEN_KINDS = ("other", "subject", "relation")
_SENTENCE_ENDS = (". ", "\n", "? ", "! ", "; ")


# --------------------------------------------------------------------------- token kinds
def _sentence_start(template: str, subject_at: int) -> int:
    """Character where the template's last sentence before the subject starts (after any demonstrations)."""
    ends = [template.rfind(sep, 0, subject_at) + len(sep) for sep in _SENTENCE_ENDS
            if template.rfind(sep, 0, subject_at) >= 0]
    return max(ends, default=0)


def token_offsets(tokenizer, text: str, ids: Sequence[int]) -> list[tuple[int, int]] | None:
    """Character span of every token of ``text`` (``ids`` its tokens), or None when the tokenizer
    cannot give offsets or tokenises ``text`` differently from ``ids``."""
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, KeyError, ValueError):
        return None
    if list(enc["input_ids"]) != list(ids):
        return None
    return [tuple(o) for o in enc["offset_mapping"]]


def token_roles(tokenizer, pairs: Sequence, width: int) -> torch.Tensor:
    """Kind of every clean-prompt token, ``[b, width]`` long: SUBJECT, RELATION or OTHER.

    Subject: tokens overlapping the subject's characters. Relation: the other tokens of the
    template's sentence that holds the subject (so the demonstrations of a few-shot template and
    special tokens such as BOS count as other). Padding is other. Needs the prompt pairs'
    ``template``, ``subject``, ``clean_text`` and ``clean_ids``; character offsets come from a fast
    tokenizer; without one, subject tokens are those that differ between clean and corrupt prompt.
    """
    out = torch.full((len(pairs), width), OTHER, dtype=torch.long)
    for i, pair in enumerate(pairs):
        n = len(pair.clean_ids)
        at = pair.template.find("{}")
        if at < 0:
            raise KcircuitsError(f"template {pair.template!r} has no '{{}}' for the subject")
        s0, s1 = at, at + len(pair.subject)
        start = _sentence_start(pair.template, at)
        offsets = token_offsets(tokenizer, pair.clean_text, pair.clean_ids)
        if offsets is None:  # slow tokenizer: the positions the corruption changed are the subject's
            diff = [a != b for a, b in zip(pair.clean_ids, pair.corrupt_ids, strict=True)]
            out[i, :n] = torch.tensor([SUBJECT if d else RELATION for d in diff])
            continue
        for t, (a, b) in enumerate(offsets[:width]):
            if b <= a:
                continue  # special token: other
            if a < s1 and b > s0:
                out[i, t] = SUBJECT
            elif b > start:
                out[i, t] = RELATION
    return out


# --------------------------------------------------------------------------- the table
@dataclass
class RoleTable:
    """Per-head role numbers, averaged over prompts, and the per-prompt values behind them
    (what :func:`head_roles` returns; ``roles.json`` is :meth:`to_json`).

    Attributes:
        heads: head names in graph order (``a0.h0``, ``a0.h1``, ...).
        rows: one dict per head, in ``heads`` order: ``head``, ``layer``, ``index``,
            ``subject_mass``, ``relation_mass``, ``other_mass``, ``direct_effect``, ``answer_z``,
            ``range_z``, ``specificity``, ``role`` (``mover``, ``relation``, ``mixture`` or ``none``).
        attention: ``[n_heads, b, p]`` attention of each head from the answer position, for the first
            batch's prompts.
        per_prompt: number name -> ``[n_heads, n_prompts]`` tensor (the values ``rows`` average).
        thresholds: the :class:`RoleThresholds` the roles were assigned with.
    """

    heads: list[str]
    rows: list[dict]
    attention: torch.Tensor
    per_prompt: dict[str, torch.Tensor]
    thresholds: RoleThresholds = field(default_factory=RoleThresholds)

    def by_role(self, role: str) -> list[str]:
        """The heads whose role is ``role`` (``"mover"``, ``"relation"``, ``"mixture"`` or ``"none"``)."""
        return [r["head"] for r in self.rows if r["role"] == role]

    def counts(self) -> dict[str, int]:
        """How many heads have each role: ``{"mover": n, "relation": n, "mixture": n, "none": n}``."""
        out = {k: 0 for k in ("mover", "relation", "mixture", "none")}
        for r in self.rows:
            out[r["role"]] += 1
        return out

    def to_json(self) -> dict:
        """``{"thresholds", "counts", "heads": rows}``: the contents of ``roles.json``."""
        return {"thresholds": asdict(self.thresholds), "counts": self.counts(), "heads": self.rows}


def _unembed_centred(engine: Engine, x: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """Logit contributions ``u - mean(u)`` ``[..., V]`` of outputs ``x [..., b, d]`` through the final
    norm frozen at ``resid [b, d]`` (its scale; LayerNorm's centring applied to ``x``)."""
    norm = engine.w.ln_final
    _, scale = norm.stats(resid)  # [b, 1]
    xc = x.float() - x.float().mean(-1, keepdim=True) if norm.kind == "layer" else x.float()
    u = F.linear(xc * scale * norm.weight.float(), engine.w.W_U.float())
    return u - u.mean(-1, keepdim=True)


def answer_attention(engine: Engine, res, batch: Batch, layer: int) -> torch.Tensor:
    """Attention of every head of ``layer`` from each prompt's answer position, ``[b, H, p]``, from a
    run made with ``capture=True``."""
    rows = torch.arange(len(batch), device=batch.clean.device)
    return engine.attention_pattern(layer, res.layers[layer])[rows, :, batch.target_pos[:, 0]]


@torch.no_grad()
def attention_mass(engine: Engine, batch: Batch, token_mask: torch.Tensor) -> torch.Tensor:
    """Attention mass each head puts on some tokens from the answer position: ``[L * H, b]``, heads in
    graph order (``a0.h0, a0.h1, ...``).

    Args:
        engine: the :class:`~kcircuits.engine.Engine` of the model.
        batch: the prompts (:class:`~kcircuits.batching.Batch`), on the engine's device.
        token_mask: ``[b, p]`` bool, the tokens whose attention mass is summed.
    """
    res = engine.run(engine.embed(batch.clean), batch.target_pos, capture=True)
    m = token_mask.to(batch.clean.device).float()
    return torch.cat([torch.einsum("bhp,bp->hb", answer_attention(engine, res, batch, layer), m)
                      for layer in range(engine.graph.n_layers)]).cpu()


def _measure(engine: Engine, batch: Batch, kinds: torch.Tensor, in_range: torch.Tensor, answers: torch.Tensor):
    """Per-prompt numbers of every head for one batch: (name -> ``[n_heads, b]``, attention ``[n_heads, b, p]``)."""
    g = engine.graph
    device = batch.clean.device
    res = engine.run(engine.embed(batch.clean), batch.target_pos, record=True, capture=True)
    pos = batch.target_pos[:, 0]
    rows_idx = torch.arange(len(batch), device=device)
    resid = res.resid_final[rows_idx, pos]  # [b, d]
    onehot = F.one_hot(kinds.to(device)[:, : batch.clean.shape[1]], 3).float()  # [b, p, 3]
    answer_col = answers.to(device)[None, :, None].expand(g.n_heads, -1, 1)  # [H, b, 1]
    stats: dict[str, list[torch.Tensor]] = {k: [] for k in ("subject_mass", "relation_mass", "other_mass",
                                                              "direct_effect", "answer_z", "range_z")}
    attention = []
    for layer in range(g.n_layers):
        pattern = answer_attention(engine, res, batch, layer)  # [b, H, p]
        mass = torch.einsum("bhp,bpk->hbk", pattern, onehot)  # [H, b, 3]
        first = g.src_index_head(layer, 0)
        u = _unembed_centred(engine, res.acts[first : first + g.n_heads, rows_idx, pos], resid)  # [H, b, V]
        std = u.std(-1, unbiased=False).clamp_min(1e-12)
        ans_u = u.gather(-1, answer_col)[..., 0]  # [H, b]
        others = in_range.expand_as(u).clone()
        others.scatter_(-1, answer_col, False)  # the answer range without this prompt's answer
        range_u = (u * others).sum(-1) / others.sum(-1).clamp_min(1)
        for key, val in (("subject_mass", mass[..., SUBJECT]), ("relation_mass", mass[..., RELATION]),
                         ("other_mass", mass[..., OTHER]), ("direct_effect", ans_u), ("answer_z", ans_u / std),
                         ("range_z", range_u / std)):
            stats[key].append(val.cpu())
        attention.append(pattern.transpose(0, 1).cpu())  # [H, b, p]
    return {k: torch.cat(v) for k, v in stats.items()}, torch.cat(attention)


@torch.no_grad()
def head_roles(engine: Engine, batches: Batch | Sequence[Batch], kinds: torch.Tensor | Sequence[torch.Tensor],
               answer_range: Sequence[int] | torch.Tensor, *, thresholds: RoleThresholds | None = None,
               answers: torch.Tensor | Sequence[torch.Tensor] | None = None) -> RoleTable:
    """Measure every head's attention masses and direct effects over the prompts; assign roles.

    Args:
        engine: the :class:`~kcircuits.engine.Engine` of the model.
        batches: one :class:`Batch` or several; ``kinds`` (and ``answers``) match them one to one.
        kinds: ``[b, p]`` token kinds from :func:`token_roles`.
        answer_range: token ids of the relation's answer set (first token of every object).
        thresholds: the role criteria (:class:`RoleThresholds`; None: the defaults).
        answers: ``[b]`` token whose direct effect counts as "the answer" (default the batch's
            first target token; the hallucination study passes the model's wrong prediction).

    Returns:
        The :class:`RoleTable` of every head.
    """
    thresholds = thresholds or RoleThresholds()
    batches = [batches] if isinstance(batches, Batch) else list(batches)
    kinds = [kinds] if torch.is_tensor(kinds) else list(kinds)
    answers = [b.target_ids[:, 0] for b in batches] if answers is None else (
        [answers] if torch.is_tensor(answers) else list(answers))
    if not batches:
        raise KcircuitsError("no prompts to measure head roles on")
    if len(kinds) != len(batches) or len(answers) != len(batches) or any(
            k.shape[0] != len(b) or a.shape[0] != len(b) for k, a, b in zip(kinds, answers, batches, strict=True)):
        raise KcircuitsError("token kinds and answers must match the batches prompt for prompt")
    rng = torch.as_tensor(answer_range, dtype=torch.long).unique()
    if rng.numel() < 2:
        raise KcircuitsError("the answer range needs at least two distinct answer tokens to measure a range effect")
    in_range = torch.zeros(engine.w.W_U.shape[0], dtype=torch.bool, device=batches[0].clean.device)
    in_range[rng.to(in_range.device)] = True
    parts = [_measure(engine, b, k, in_range, a) for b, k, a in zip(batches, kinds, answers, strict=True)]
    per_prompt = {key: torch.cat([p[0][key] for p in parts], 1) for key in parts[0][0]}
    per_prompt["specificity"] = per_prompt["answer_z"] - per_prompt["range_z"]
    g = engine.graph
    names = [f"a{layer}.h{h}" for layer in range(g.n_layers) for h in range(g.n_heads)]
    rows = []
    for i, name in enumerate(names):
        row = {"head": name, "layer": i // g.n_heads, "index": i % g.n_heads}
        row.update({k: float(v[i].mean()) for k, v in per_prompt.items()})
        row["role"] = thresholds.role(row)
        rows.append(row)
    return RoleTable(names, rows, parts[0][1], per_prompt, thresholds)


def answer_range_of(pairs: Sequence) -> list[int]:
    """The relation's answer set as first answer tokens: every clean and corrupt answer seen in ``pairs``
    (sorted token ids; the answer range of :func:`head_roles`)."""
    return sorted({p.answer_ids[0] for p in pairs} | {p.corrupt_answer_ids[0] for p in pairs})
