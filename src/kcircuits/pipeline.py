"""The steps every command shares, in the order they run: load the model, bind the run folder, build
the prompt pairs (known-facts filter, split, cap), make batches, attribute with checkpoints, and
record the environment. ``api.discover``/``api.evaluate``, the studies and influence all call
these; nothing here knows about a particular command.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kcircuits import __version__
from kcircuits.batching import Batch, make_batches
from kcircuits.data import build_prompts, cap_pairs, load_dataset, split_samples
from kcircuits.data.prompts import SKIP_ANSWER_COLLISION, SKIP_NO_SAME_LENGTH
from kcircuits.discover.registry import get_method
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.metrics import answer_rank
from kcircuits.models import LoadedModel, load_model
from kcircuits.runs import RunFolder, default_run_dir
from kcircuits.steps import StepCache, pairs_digest, step_key
from kcircuits.settings import (
    AttributionSettings,
    PromptSettings,
    RunSettings,
    ScoringSettings,
    reject_unknown,
    resolve,
    settings_doc,
)


@dataclass
class PromptSplit:
    """The prompt pairs of one relation for one role (discovery or test), with what was skipped.

    Attributes:
        relation: the relation's name.
        role: ``"discover"``, ``"test"`` or ``"all"``.
        pairs: the :class:`~kcircuits.data.prompts.PromptPair` s kept, in order.
        skipped: candidates left out, by reason (no same-length corruption, not known, over the cap, ...).
        n_candidates: prompt pairs built before any was skipped.
    """

    relation: str
    role: str  # "discover" | "test" | "all"
    pairs: list
    skipped: dict[str, int]
    n_candidates: int

    def to_json(self) -> dict:
        """The set as written to ``prompts.json``: counts, skip reasons and every pair's texts."""
        return {"relation": self.relation, "role": self.role, "n_pairs": len(self.pairs), "skipped": self.skipped,
                "n_candidates": self.n_candidates,
                "pairs": [{"clean": p.clean_text, "corrupt": p.corrupt_text, "answer": p.object,
                           "corrupt_answer": p.corrupt_object, "n_tokens": len(p.clean_ids)} for p in self.pairs]}


def load(model: str | LoadedModel, run: RunSettings) -> LoadedModel:
    """The model to run on: a loaded one as it is, or a name/folder loaded with ``run``'s device and dtype."""
    return model if isinstance(model, LoadedModel) else load_model(model, device=run.device, dtype=run.dtype)


def model_name(model: str | LoadedModel) -> str:
    return model.name if isinstance(model, LoadedModel) else str(model)


def open_run(kind: str, parts: Sequence[str], reproduce: dict | Callable[[LoadedModel], dict], out: str | Path | None,
             model: str | LoadedModel, run: RunSettings,
             check: Callable[[LoadedModel], None] | None = None) -> tuple[RunFolder, LoadedModel]:
    """Load the model first (a model that fails to load writes nothing), run ``check`` on it (e.g. that a
    circuit fits it), then bind the run folder, ``out`` or ``runs/<kind>_<parts>_<config hash>``,
    recording ``reproduce`` and the environment.

    ``reproduce`` may be a function of the loaded model, so that it records (and the folder's hash
    covers) the weights' fingerprint: an edited or fine-tuned model never reuses another's results."""
    wall, cpu = time.perf_counter(), time.process_time()
    lm = load(model, run)
    if check is not None:
        check(lm)
    config = reproduce(lm) if callable(reproduce) else reproduce
    loaded = (time.perf_counter() - wall, time.process_time() - cpu)
    folder = Path(out) if out else default_run_dir(kind, list(parts), config)
    run_folder = RunFolder(folder, {"reproduce": config, "environment": environment(), "batch_size": run.batch_size,
                                    "device": str(run.device)})
    run_folder.record_time("load model", *loaded)
    return run_folder, lm


def environment() -> dict:
    """Versions and machine of this run (recorded in config.json, not part of its hash)."""
    return {"kcircuits": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@torch.no_grad()
def answer_ranks(engine: Engine, pairs: list, pad_id: int, batch_size: int, *, mask: torch.Tensor | None = None,
                 ablated: torch.Tensor | None = None,
                 answer_scoring: str = "first_token") -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rank of each pair's answer (1 = top; ties count against it) and its own top token, ``[n]`` each,
    over the prompt pairs ``pairs`` run through ``engine`` in batches of ``batch_size`` (padded with ``pad_id``).

    The rank is the first answer token's, or with ``answer_scoring="full"`` the worst of the answer's
    tokens under teacher forcing (see :func:`kcircuits.metrics.answer_rank`). With ``mask``
    (``[n_src, n_dst]``, 0 = patched) the patched model's, its patched edges carrying ``ablated``
    (batch-independent, e.g. dataset means ``[n_src, 1, 1, d]``, or None for zero).
    """
    ranks, top = [], []
    device = engine.w.W_E.device
    mask = None if mask is None else mask.to(device)
    for batch in make_batches(pairs, pad_id, batch_size, answer_scoring):
        batch = batch.to(device)
        logits = engine.run(engine.embed(batch.clean), batch.target_pos, mask=mask, ablated=ablated).logits
        ranks.append(answer_rank(logits, batch).cpu())
        top.append(logits[:, 0].argmax(-1).cpu())
    return torch.cat(ranks), torch.cat(top)


def known_filter(engine: Engine, pairs: list, pad_id: int, top_k: int, batch_size: int,
                 answer_scoring: str = "first_token", *, ranks: Sequence[int] | None = None) -> tuple[list, int]:
    """Keep the pairs whose answer the model ranks within ``top_k`` on the clean prompt (whole answers:
    every token within ``top_k`` under teacher forcing). ``ranks``: the clean ranks when already known
    (:func:`clean_ranks`), else they are computed with ``engine`` in batches of ``batch_size`` padded
    with ``pad_id``, scoring answers by ``answer_scoring``. Returns the kept pairs and how many were dropped."""
    if ranks is None:
        ranks = answer_ranks(engine, pairs, pad_id, batch_size, answer_scoring=answer_scoring)[0].tolist()
    kept = [p for p, r in zip(pairs, ranks, strict=True) if r <= top_k]
    return kept, len(pairs) - len(kept)


def clean_ranks(model: LoadedModel, engine: Engine, pairs: list, batch_size: int, answer_scoring: str,
                cache: StepCache | None = None) -> list[int]:
    """The model's rank of each pair's answer on its clean prompt, from the step cache when there.

    Keyed by the weights, the dtype, the answer scoring and the clean prompts' and answers' token ids
    (not by ``known_k``: one set of ranks serves every threshold)."""
    cache = cache or StepCache(None)
    key = step_key("clean_ranks", weights=model.fingerprint, dtype=str(model.dtype), answer_scoring=answer_scoring,
                   pairs=pairs_digest(pairs, ("clean_ids", "answer_ids")))
    hit = cache.read_json("clean_ranks", key)
    if isinstance(hit, list) and len(hit) == len(pairs):
        return hit
    ranks = answer_ranks(engine, pairs, model.pad_token_id, batch_size, answer_scoring=answer_scoring)[0].tolist()
    cache.write_json("clean_ranks", key, ranks)
    return ranks


def empty_prompts_hint(skipped: dict[str, int], n_candidates: int, answer_scoring: str) -> str:
    """What to do when filtering left no prompt pair, from the reason that removed the most candidates."""
    if not skipped or not any(skipped.values()):
        return "add samples to the relation"
    reason = max(skipped, key=lambda k: skipped[k])
    if reason == SKIP_ANSWER_COLLISION and answer_scoring == "first_token":
        return ("the answers share their first token with every same-length partner (a tokenizer that splits "
                "numbers such as years into digits does this): score whole answers with --answer-scoring full "
                "--metric logprob (answer_scoring='full', metric='logprob'), or use answers that differ in their "
                "first token")
    if reason == SKIP_ANSWER_COLLISION:
        return "the answers' tokens are the same for every same-length partner; add samples with other answers"
    if reason == SKIP_NO_SAME_LENGTH:
        return ("no other subject gives a prompt of the same token length; add subjects of similar length or "
                "other templates")
    if reason.startswith("not_known_top"):
        return "the model knows too few of these facts: try without --known-only, a larger --known-k, or more samples"
    return "add samples to the relation, or use other templates"


def prepare_prompts(model: LoadedModel, engine: Engine, relation: str, *, settings: PromptSettings | None = None,
                    seed: int = 0, batch_size: int = 8, answer_scoring: str = "first_token",
                    roles: Sequence[str] | None = None, cache: StepCache | None = None,
                    **options) -> dict[str, PromptSplit]:
    """Build the prompt pairs of a relation: one set ("all"), or disjoint "discover"/"test" halves by subject.

    Every set is built the same way: all pairs, then the known-facts filter where it applies
    (``known_only`` on the sets named by ``known_only_on``), then the cap of ``max_pairs``
    (:func:`kcircuits.data.cap_pairs`). ``settings`` (or its fields by name in ``options``) say
    which; ``roles`` limits which sets are built (e.g. only "test"). The known-facts filter's ranks
    come from ``cache`` (:class:`kcircuits.steps.StepCache`) when it holds them.

    Args:
        model: the loaded model (its tokenizer builds the pairs; it ranks the answers for the filter).
        engine: the engine the filter runs (unused without ``known_only``; may then be None).
        relation: a bundled relation name or a .json/.csv file.
        settings: :class:`~kcircuits.settings.PromptSettings` (or its fields by name in ``options``).
        seed: seed of the split and the cap.
        batch_size: prompt pairs per batch of the filter.
        answer_scoring: ``"first_token"`` or ``"full"`` (whole answers, teacher-forced).
        roles: build only these sets.
        cache: the step cache of the filter's ranks.

    Returns:
        ``{role: PromptSplit}``: ``{"all": ...}`` without ``split``, else ``{"discover": ..., "test": ...}``.

    """
    st = resolve(PromptSettings, settings, options)
    reject_unknown(options, "prepare_prompts")
    split, known_only, known_k, known_only_on = st.split, st.known_only, st.known_k, st.known_only_on
    max_pairs, templates = st.max_pairs, st.templates
    ds = load_dataset(relation)
    parts = ({"all": ds} if split is None
             else dict(zip(("discover", "test"), split_samples(ds, split, seed), strict=True)))
    out = {}
    for role, part in parts.items():
        if roles is not None and role not in roles:
            continue
        ps = build_prompts(part, model.tokenizer, templates=templates, seed=seed, answer_scoring=answer_scoring)
        skipped = dict(ps.skipped)
        pairs = list(ps.pairs)
        if known_only and pairs and (known_only_on == "both" or role != "test"):
            ranks = clean_ranks(model, engine, pairs, batch_size, answer_scoring, cache)
            pairs, dropped = known_filter(engine, pairs, model.pad_token_id, known_k, batch_size, answer_scoring,
                                          ranks=ranks)
            skipped[f"not_known_top{known_k}"] = dropped
        capped = cap_pairs(pairs, max_pairs, seed)
        if len(capped) < len(pairs):  # a choice, not a failure, but still counted so nothing disappears silently
            skipped["over_max_pairs"] = len(pairs) - len(capped)
        pairs = capped
        if not pairs:
            reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items() if v) or "none"
            raise KcircuitsError(
                f"relation {ds.name!r} ({role}): no usable prompt pairs after filtering ({ps.n_candidates} candidates; "
                f"skipped {reasons}); {empty_prompts_hint(skipped, ps.n_candidates, answer_scoring)}"
            )
        out[role] = PromptSplit(ds.name, role, pairs, skipped, ps.n_candidates)
    return out


prepare_prompts.__doc__ += settings_doc(PromptSettings, param="settings")


def model_batches(model: LoadedModel, pairs: list, batch_size: int, answer_scoring: str) -> list[Batch]:
    """Prompt pairs as batches on the model's device (one :class:`~kcircuits.batching.Batch` per ``batch_size``)."""
    return [b.to(model.device) for b in make_batches(pairs, model.pad_token_id, batch_size, answer_scoring)]


PARTIAL_SCORES = "scores.partial.safetensors"


def attribute_resumable(run: RunFolder, engine: Engine, batches: list[Batch], *, scoring: ScoringSettings,
                        attribution: AttributionSettings, mean: torch.Tensor | None = None,
                        progress: bool = True) -> torch.Tensor:
    """Edge scores ``[n_src, n_dst]`` of the registered discovery method ``attribution.method``.

    A method that supports it checkpoints its running sums after every batch
    (``scores.partial.safetensors``) and resumes from them after a crash; the checkpoint is
    removed once the scores are final."""
    method = get_method(attribution.method)
    if method.output != "scores":
        raise KcircuitsError(f"discovery method {method.name!r} returns a circuit, not edge scores")
    extra: dict = {}
    if method.resumable:
        resume = None
        if run.has(PARTIAL_SCORES):
            from safetensors import safe_open

            with safe_open(str(run.file(PARTIAL_SCORES)), framework="pt") as fh:
                meta = fh.metadata() or {}
            tensors = run.read_tensors(PARTIAL_SCORES)
            resume = (int(meta.get("done", 0)), tensors["scores"].to(batches[0].clean.device), meta.get("layout", ""))

        def checkpoint(done: int, layout: str, partial: torch.Tensor) -> None:
            if done < len(layout.split(",")):
                run.write_tensors(PARTIAL_SCORES, {"scores": partial}, {"done": done, "layout": layout})

        extra = {"resume": resume, "on_batch": checkpoint}
    scores = method.find(engine, batches, scoring=scoring, attribution=attribution, mean=mean, progress=progress,
                         **extra)
    run.file(PARTIAL_SCORES).unlink(missing_ok=True)
    return scores
