"""The Python API behind ``kcircuits influence fit|score``: influence functions end to end, into run folders.

``fit``   = corpus -> curvature factors (EK-FAC by default) in ``<run>/factors/``; checkpointed after
            every batch, so a rerun with the same folder resumes.
``score`` = queries x corpus -> pairwise influence ``[n_query, n_train]`` -> ``scores.safetensors``,
            ``influence.json`` (top sequences with their most influential tokens, the power-law tail,
            influence by layer / circuit component, recall of known sources) and ``report.html``.

Each takes its settings object (:class:`~kcircuits.influence.settings.FitSettings`,
:class:`~kcircuits.influence.settings.ScoreSettings`) or any of its fields by name. The run folder is
keyed by those settings, the data's fingerprints and the weights' fingerprint (DESIGN.md decision
12): an edited or fine-tuned model never reuses another model's factors or scores.

Scores follow the core's sign convention: positive = upweighting the training sequence makes the
completion more likely (it *supports* the answer).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from kcircuits.errors import KcircuitsError
from kcircuits.influence import analysis
from kcircuits.influence.bm25 import BM25
from kcircuits.influence.corpus import (
    Document,
    documents_to_sequences,
    read_documents,
    read_queries,
)
from kcircuits.influence.sequences import Sequences
from kcircuits.influence.settings import (
    FACTOR_STRATEGIES,
    SCORE_STRATEGIES,
    FitSettings,
    ScoreSettings,
    fields_doc,
    lissa_fields,
)
from kcircuits.io import read_json
from kcircuits.models import LoadedModel, eval_mode, load_model
from kcircuits.report import write_report
from kcircuits.runs import RunFolder, default_run_dir
from kcircuits.settings import hashed_dict, reject_unknown, resolve

__all__ = ["FACTOR_STRATEGIES", "SCORE_STRATEGIES", "FitOutput", "FitSettings", "ScoreOutput", "ScoreSettings",
           "circuit_components", "fit", "score"]

SCORES_FILE = "scores.safetensors"
RESULTS_FILE = "influence.json"


@dataclass
class Data:
    """Sequences plus the documents they came from (``None`` when the caller passed Sequences)."""

    seqs: Sequences
    docs: list[Document] | None
    origin: str  # file path, or "<Sequences>"

    @property
    def stem(self) -> str:
        """Short name for default run folders."""
        return "sequences" if self.docs is None else Path(self.origin).stem

    @property
    def ids(self) -> list[str]:
        return [d.id for d in self.docs] if self.docs else [str(i) for i in range(len(self.seqs))]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.seqs.input_ids, self.seqs.loss_mask):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass
class FitOutput:
    """What :func:`fit` produced; everything is also in ``folder``.

    Attributes:
        folder: the fit run folder (``config.json``, ``fit.json``, ``factors/``, ``report.html``);
            pass it as ``factors=`` to :func:`score`.
        factors: the fitted :class:`~kcircuits.influence.factors.Factors`.
        info: the contents of ``fit.json``: ``strategy``, ``fisher``, ``n_sequences``, ``n_tokens``,
            ``modules``, ``fit_s`` (seconds).
        report: (property) the path of ``report.html``.
    """

    folder: Path
    factors: Any  # kcircuits.influence.factors.Factors
    info: dict

    @property
    def report(self) -> Path:
        """The path of the run's ``report.html``."""
        return self.folder / "report.html"


@dataclass
class ScoreOutput:
    """What :func:`score` produced; everything is also in ``folder``.

    Positive scores: upweighting the training sequence makes the completion more likely.

    Attributes:
        folder: the score run folder (``scores.safetensors``, ``influence.json``, ``report.html``).
        total: influence ``[n_query, n_candidates]``, columns aligned with ``train_index``.
        train_index: ``[n_candidates]`` indices into the corpus of the scored sequences (all of it
            unless a BM25 pre-filter, ``bm25_candidates``, was used).
        results: the contents of ``influence.json``: per query its top sequences (with their most
            influential tokens), the power-law tail, recall of known sources; ``by_layer`` and
            ``by_component`` when computed.
        parts: every tensor of ``scores.safetensors`` by name: ``total``, ``layer.<l>`` and
            ``component.<node>`` ``[n_query, n_candidates]``, ``per_token`` ``[n_query, n_candidates, T]``
            when kept, ``train_self`` ``[n_candidates]`` with ``normalize="relative"``, ``train_index``.
        report: (property) the path of ``report.html``.
    """

    folder: Path
    total: torch.Tensor
    train_index: torch.Tensor
    results: dict
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def report(self) -> Path:
        """The path of the run's ``report.html``."""
        return self.folder / "report.html"


# --------------------------------------------------------------------------- inputs
def _model(model: str | LoadedModel, device, dtype) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)


def _read(data: str | Path | Sequences | None, queries: bool) -> tuple[list[Document] | None, Sequences | None, str]:
    """Read (not yet tokenise) a path so a bad file fails before the model loads."""
    if data is None or (isinstance(data, str) and not data):
        what = "queries file (.jsonl)" if queries else "training corpus (.txt/.jsonl file or folder)"
        raise KcircuitsError(f"no {what} given")
    if isinstance(data, Sequences):
        return None, data, "<Sequences>"
    docs = read_queries(data) if queries else read_documents(data)
    return docs, None, str(data)


def _tokenise(read: tuple, lm: LoadedModel, max_length: int) -> Data:
    docs, seqs, origin = read
    if seqs is None:
        seqs = documents_to_sequences(docs, lm.tokenizer, max_length)
    return Data(seqs, docs, origin)


def circuit_components(circuit: str | Path) -> list[str]:
    """The head and MLP nodes (``"a3.h2"``, ``"m5"``) of a ``circuit.json`` or a discover run folder.

    Args:
        circuit: the ``circuit.json`` path, or a discover run folder holding one.
    """
    path = Path(circuit)
    path = path / "circuit.json" if path.is_dir() else path
    if not path.exists():
        raise KcircuitsError(f"no circuit at {path}; pass a circuit.json or a discover run folder")
    try:
        nodes = read_json(path)["nodes"]
    except (ValueError, KeyError, TypeError):
        raise KcircuitsError(f"{path} is not a kcircuits circuit.json (no 'nodes' list)") from None
    comps = [n for n in nodes if isinstance(n, str) and n not in ("input", "logits")]
    if not comps:
        raise KcircuitsError(f"{path} has no head or MLP node to attribute influence to")
    return comps


def _factor_folder(factors: str | Path) -> Path:
    """A fit run folder (holding ``factors/``) or a factors folder itself."""
    p = Path(factors)
    if (p / "factors" / "factors.json").exists():
        return p / "factors"
    if (p / "factors.json").exists():
        return p
    raise KcircuitsError(f"no fitted factors in {p}; pass the folder written by `kcircuits influence fit`")


def _check_factor_weights(factor_dir: Path, lm: LoadedModel) -> None:
    """Refuse factors fitted on other weights than ``lm``'s (their ``factors.json`` records the
    fingerprint of the weights they were fitted on)."""
    try:
        fitted = (read_json(factor_dir / "factors.json").get("config") or {}).get("weights")
    except (ValueError, OSError, AttributeError):
        raise KcircuitsError(f"{factor_dir / 'factors.json'} cannot be read; fit the factors again") from None
    if fitted is None:
        raise KcircuitsError(f"the factors in {factor_dir} do not record which weights they were fitted on (an older "
                             "kcircuits fitted them); fit them again with `kcircuits influence fit`")
    if fitted != lm.fingerprint:
        raise KcircuitsError(f"the factors in {factor_dir} were fitted on other weights (fingerprint {fitted}) than "
                             f"the model's ({lm.fingerprint}); fit factors on this model")


def _checkpoint_weights(checkpoint: str | LoadedModel, settings: ScoreSettings) -> str:
    """The fingerprint of a checkpoint's weights; a checkpoint given by name is loaded for it and
    released again (it is loaded once more while it is scored, so only one extra model is in memory)."""
    if isinstance(checkpoint, LoadedModel):
        return checkpoint.fingerprint
    return _model(checkpoint, settings.device, settings.dtype).fingerprint


def _environment() -> dict:
    from kcircuits.pipeline import environment as env

    return env()


def _model_name(model: str | LoadedModel) -> str:
    return model.name if isinstance(model, LoadedModel) else str(model)


def _list(names: tuple | None) -> list | None:
    return None if names is None else list(names)


# --------------------------------------------------------------------------- fit
def fit(model: str | LoadedModel = "smollm2-135m", corpus: str | Path | Sequences | None = None, *,
        out: str | Path | None = None, settings: FitSettings | None = None, progress: bool = True,
        **options) -> FitOutput:
    """Fit curvature factors of ``model`` on ``corpus`` into ``<out>/factors/``.

    The fit checkpoints its running sums at the end of a batch once ``checkpoint_seconds`` have
    passed (0: every batch) and after every pass; calling ``fit`` again with the same ``out``
    continues from the last checkpoint (a finished fit is just loaded). The folder is ``out`` or
    ``runs/influence-fit_<corpus>_<model>_<strategy>_<hash>``, the hash covering the settings, the
    corpus' fingerprint and the weights' fingerprint.

    Args:
        model: ``"smollm2-135m"``, a local HF folder, a hub id or a :class:`~kcircuits.models.LoadedModel`.
        corpus: the training corpus: a ``.txt`` file (documents separated by blank lines), a ``.jsonl``
            file (``{"text": ..., "id"?: ...}`` per line), a folder of those, or
            :class:`~kcircuits.influence.sequences.Sequences`.
        out: the run folder (default as above).
        settings: a :class:`~kcircuits.influence.settings.FitSettings` (fields listed below), or pass
            its fields by name.
        progress: show progress bars.

    Returns:
        :class:`FitOutput`: the folder, the factors and the fit's summary.

    Settings (each also accepted by field name, e.g. ``fit(..., strategy="kfac", max_length=128)``):

    """
    from kcircuits.influence.factors import fit_factors

    st = resolve(FitSettings, settings, options)
    reject_unknown(options, "influence fit")
    read = _read(corpus, queries=False)
    lm = _model(model, st.device, st.dtype)  # before the folder: a model that fails to load writes nothing
    train = _tokenise(read, lm, st.max_length)
    reproduce = {"command": "influence-fit", "model": _model_name(model), "weights": lm.fingerprint,
                 "corpus": train.origin, "corpus_fingerprint": train.fingerprint(), "fit": hashed_dict(st)}
    folder = Path(out) if out else default_run_dir("influence-fit", [train.stem, Path(reproduce["model"]).name,
                                                                     st.strategy], reproduce)
    run = RunFolder(folder, {"reproduce": reproduce, "settings": asdict(st), "environment": _environment(),
                             "device": str(st.device)})
    start = time.perf_counter()
    torch.manual_seed(st.seed)
    with eval_mode(lm.hf_model):  # the HF forward must not see dropout; the caller's mode is restored
        factors = fit_factors(lm.hf_model, train.seqs.to(lm.device), strategy=st.strategy, fisher=st.fisher,
                              batch_size=st.batch_size, seed=st.seed, include=_list(st.include),
                              folder=run.file("factors"), checkpoint_seconds=st.checkpoint_seconds, progress=progress)
    info = {"strategy": st.strategy, "fisher": st.fisher, "n_sequences": len(train.seqs),
            "n_tokens": int(train.seqs.attention_mask.sum()), "modules": list(factors.modules),
            "fit_s": time.perf_counter() - start}
    if run.has("fit.json"):  # a rerun of a finished fit: keep the original timing
        info = run.read_json("fit.json")
    run.write_json("fit.json", info)
    write_report(run.file("report.html"), {
        "title": f"Influence factors: {reproduce['model']} on {Path(train.origin).name}",
        "summary": {"model": reproduce["model"], "weights": reproduce["weights"], "corpus": train.origin,
                    "strategy": st.strategy, "fisher": st.fisher, "sequences": info["n_sequences"],
                    "tokens": info["n_tokens"], "modules": len(info["modules"]),
                    "fit time (s)": round(info["fit_s"], 2)},
        "config": run.config})
    return FitOutput(run.path, factors, info)


fit.__doc__ += fields_doc(FitSettings, "settings")


# --------------------------------------------------------------------------- score
def score(model: str | LoadedModel = "smollm2-135m", queries: str | Path | Sequences | None = None,
          corpus: str | Path | Sequences | None = None, *, factors: str | Path | None = None,
          out: str | Path | None = None, circuit: str | Path | None = None,
          checkpoints: list[str | LoadedModel] | None = None, settings: ScoreSettings | None = None,
          progress: bool = True, **options) -> ScoreOutput:
    """Score every query against every (candidate) training sequence and write a run folder.

    The folder is ``out`` or ``runs/influence_<queries>_<model>_<strategy>_<hash>``, the hash covering
    the hashed settings, the data's fingerprints, the factors folder and the weights' fingerprints
    (the model's and each checkpoint's); a rerun reuses the scores.

    Args:
        model: ``"smollm2-135m"``, a local HF folder, a hub id or a :class:`~kcircuits.models.LoadedModel`.
        queries: a ``.jsonl`` file of ``{"prompt": ..., "completion": ..., "id"?: ..., "sources"?: [...]}``
            (``sources``: corpus ids known to teach the fact, for recall), or
            :class:`~kcircuits.influence.sequences.Sequences` built with ``Sequences.from_pairs``.
        corpus: the training corpus, as for :func:`fit`.
        factors: a ``fit`` run folder (or its ``factors/``), fitted on these very weights (else an
            error); None fits them here on the whole corpus (``ekfac``/``kfac``/``diagonal``), into
            ``<out>/factors/`` (resumable).
        circuit: add the heads and MLPs of a ``circuit.json`` or discover run folder to ``components``.
        checkpoints: earlier training checkpoints of ``model`` (folders or loaded models, same
            tokenizer). The scores become the sum of ``model``'s and each checkpoint's, each with its
            own curvature (fitted into ``<out>/checkpoint-<i>/factors/``; ``factors`` is ``model``'s
            only): TracIn-CP's sum over checkpoints. Why: a fact the final model has memorised
            gives its sources a vanishing loss gradient, so they are invisible at the final
            parameters but not at the checkpoints where the fact was being learned.
        out: the run folder (default as above).
        settings: a :class:`~kcircuits.influence.settings.ScoreSettings` (fields listed below), or pass
            its fields by name.
        progress: show progress bars.
        lissa: the older form of the ``lissa_*`` settings, e.g. ``lissa={"depth": 10}``.

    Returns:
        :class:`ScoreOutput`: the folder, the scores and the contents of ``influence.json``.

    Settings (each also accepted by field name, e.g. ``score(..., strategy="identity", top_k=5)``). In
    short: ``damping`` a float (absolute λ) or ``"heuristic"``; ``query_rank`` the rank of the
    low-rank query gradients (None or 0: exact); ``bm25_candidates`` scores only the union of each
    query's BM25 top-N documents; ``normalize="relative"`` divides each training sequence's scores by
    the square root of its self-influence (RelatIF); ``measurement="margin"`` takes the completion's
    log-odds, which does not saturate on facts the model is already certain of; ``highlight``
    rescores each query's top-k sequences per token for the report (``per_token`` keeps every
    sequence's per-token scores instead); ``power_law_bootstrap`` goodness-of-fit draws per query.

    """
    if "lissa" in options:
        given = lissa_fields(options.pop("lissa"))
        clash = sorted(set(given) & set(options))
        if clash:
            raise KcircuitsError(f"give each LiSSA option once: lissa= and {', '.join(clash)} both set it")
        options.update(given)
    st = resolve(ScoreSettings, settings, options)
    reject_unknown(options, "influence score")
    if circuit is not None:
        st = replace(st, components=tuple(sorted(set(st.components or ()) | set(circuit_components(circuit)))))
    factor_dir = _factor_folder(factors) if factors is not None else None
    q_read, c_read = _read(queries, queries=True), _read(corpus, queries=False)
    # every model loads before the folder is chosen: its name is keyed by the weights, and a model
    # that fails to load writes nothing
    lm = _model(model, st.device, st.dtype)
    if factor_dir is not None:
        _check_factor_weights(factor_dir, lm)
    checkpoint_weights = [_checkpoint_weights(c, st) for c in checkpoints or ()]
    q, train = _tokenise(q_read, lm, st.max_length), _tokenise(c_read, lm, st.max_length)
    reproduce = {"command": "influence-score", "model": _model_name(model), "weights": lm.fingerprint,
                 "queries": q.origin, "queries_fingerprint": q.fingerprint(), "corpus": train.origin,
                 "corpus_fingerprint": train.fingerprint(), "factors": str(factor_dir) if factor_dir else None,
                 "score": hashed_dict(st)}
    if checkpoints:
        reproduce["checkpoints"] = [_model_name(c) for c in checkpoints]
        reproduce["checkpoint_weights"] = checkpoint_weights
    folder = Path(out) if out else default_run_dir("influence", [q.stem, Path(reproduce["model"]).name, st.strategy],
                                                   reproduce)
    run = RunFolder(folder, {"reproduce": reproduce, "settings": asdict(st), "environment": _environment(),
                             "device": str(st.device)})
    timings: dict[str, float] = {}
    torch.manual_seed(st.seed)

    t0 = time.perf_counter()
    cand = _candidates(q, train, st.bm25_candidates)
    timings["bm25_s"] = time.perf_counter() - t0
    stages = [Stage(lm, factor_dir, run)]
    if checkpoints:  # each model in its own sub-folder, so the run's scores file only ever holds the sum
        sub = [("model", lm)] + [(f"checkpoint-{i}", c) for i, c in enumerate(checkpoints, start=1)]
        stages = [Stage(m, factor_dir if m is lm else None,
                        RunFolder(run.file(name), {"reproduce": {**reproduce, "stage": _model_name(m)}}))
                  for name, m in sub]
    if run.has(SCORES_FILE):  # finished earlier: reuse
        parts = run.read_tensors(SCORES_FILE)
        timings.update(run.read_json(RESULTS_FILE).get("timings", {}) if run.has(RESULTS_FILE) else {})
    else:
        parts = _summed([_stage_scores(stage, lm, q, train, cand, st, timings, progress) for stage in stages])
        run.write_tensors(SCORES_FILE, parts, {"strategy": st.strategy})
    total = parts["total"]
    t0 = time.perf_counter()
    tokens = _token_scores(stages, lm, q, train, parts, cand, st, progress)
    timings["highlight_s"] = time.perf_counter() - t0
    model_run = stages[0].run
    results = _results(lm, q, train, parts, cand, tokens, st.top_k, st.power_law_bootstrap, st.seed,
                       model_run.read_json("damping.json") if model_run.has("damping.json") else {}, st.strategy,
                       timings)
    if model_run.has("solver.json"):
        results["solver"] = model_run.read_json("solver.json")
    if checkpoints:
        ck_stages = zip(reproduce["checkpoints"], checkpoint_weights, stages[1:], strict=True)
        results["checkpoints"] = [{"model": name, "weights": fp, "folder": str(stage.run.path),
                                   "damping": stage.run.read_json("damping.json") if stage.run.has("damping.json")
                                   else {}}
                                  for name, fp, stage in ck_stages]
    run.write_json(RESULTS_FILE, results)
    write_report(run.file("report.html"), _report(run, results, reproduce))
    return ScoreOutput(run.path, total, cand, results, parts)


score.__doc__ += fields_doc(ScoreSettings, "settings")


@dataclass
class Stage:
    """One model whose scores enter the sum: the model itself, or one of its earlier checkpoints
    (loaded only while it is scored), with its factor folder (None: fit into ``run``) and the run
    folder its own scores, factors and damping go to (resumable per checkpoint)."""

    model: str | LoadedModel
    factor_dir: Path | None
    run: RunFolder


def _core_kwargs(st: ScoreSettings, progress: bool) -> dict:
    """The keyword arguments of :func:`~kcircuits.influence.scores.pairwise_scores` every call shares."""
    return {"strategy": st.strategy, "damping": st.damping, "query_rank": st.query_rank, "normalize": st.normalize,
            "measurement": st.measurement, "batch_size": st.batch_size, "lissa": st.lissa,
            "include": _list(st.include), "progress": progress}


def _stage_model(stage: Stage, lm: LoadedModel, q: Data, train: Data, st: ScoreSettings) -> LoadedModel:
    """The stage's model; a checkpoint must tokenise the data exactly as the model does."""
    if stage.model is lm:
        return lm
    ck = _model(stage.model, st.device, st.dtype)
    for data in (q, train):
        if data.docs and not torch.equal(documents_to_sequences(data.docs, ck.tokenizer, st.max_length).input_ids,
                                         data.seqs.input_ids):
            raise KcircuitsError(f"checkpoint {_model_name(stage.model)!r} tokenises the data differently from the "
                                 "model; checkpoints must be earlier states of the same model, with its tokenizer")
    return ck


def _stage_scores(stage: Stage, lm: LoadedModel, q: Data, train: Data, cand: torch.Tensor, st: ScoreSettings,
                  timings: dict, progress: bool) -> dict[str, torch.Tensor]:
    """One stage's flat score tensors (see :func:`_to_tensors`), read from its run folder when an
    earlier run finished them; factor and score times are added to ``timings``."""
    if stage.run.has(SCORES_FILE):
        return stage.run.read_tensors(SCORES_FILE)
    slm = _stage_model(stage, lm, q, train, st)
    t: dict[str, float] = {}
    fac = _factors(slm, train, st, stage.factor_dir, stage.run, progress, t)
    t0 = time.perf_counter()
    res = _pairwise(slm, q.seqs, train.seqs.subset(cand), factors=fac, per_layer=st.per_layer,
                    per_token=st.per_token, components=_list(st.components), rescore_top_k=st.rescore_top_k,
                    **_core_kwargs(st, progress))
    t["score_s"] = time.perf_counter() - t0
    for k, v in t.items():
        timings[k] = timings.get(k, 0.0) + v
    parts = _to_tensors(res)
    parts["train_index"] = cand
    stage.run.write_tensors(SCORES_FILE, parts, {"strategy": st.strategy, "damping": _json_damping(res.damping)})
    stage.run.write_json("damping.json", _json_damping(res.damping))
    if res.solver:  # LiSSA's scale after any divergence retries
        stage.run.write_json("solver.json", res.solver)
    return parts


def _summed(stage_parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The stages' scores added key by key (``train_index`` is shared; ``train_self``, a
    per-model normaliser, is kept only for a single stage)."""
    if len(stage_parts) == 1:
        return stage_parts[0]
    out = {}
    for key, first in stage_parts[0].items():
        if key == "train_index":
            out[key] = first
        elif key != "train_self":
            out[key] = sum((p[key] for p in stage_parts[1:]), first.clone())
    return out


def _candidates(q: Data, train: Data, n: int | None) -> torch.Tensor:
    """Corpus indices to score ``[n_candidates]``: everything, or the union of BM25 top-n per query."""
    if n is None or n >= len(train.seqs):
        return torch.arange(len(train.seqs))
    return BM25(train.seqs.texts).candidates(q.seqs.texts, n)


def _factors(lm, train: Data, st: ScoreSettings, factor_dir: Path | None, run: RunFolder, progress: bool,
             timings: dict):
    """Curvature factors for ``st.strategy``: loaded from ``factor_dir`` or fitted into ``<run>/factors/``.

    LiSSA needs them only for the heuristic damping (0.1 × mean eigenvalue, as for EK-FAC): then KFAC
    factors (one covariance pass) are enough. identity/exact and numeric-damping LiSSA need none."""
    lissa_heuristic = st.strategy == "lissa" and st.damping == "heuristic"
    if st.strategy not in FACTOR_STRATEGIES and not lissa_heuristic:
        return None
    from kcircuits.influence.factors import Factors, fit_factors

    t0 = time.perf_counter()
    if factor_dir is not None:
        fac = Factors.load(factor_dir)
    else:
        with eval_mode(lm.hf_model):
            fac = fit_factors(lm.hf_model, train.seqs.to(lm.device),
                              strategy="kfac" if lissa_heuristic else st.strategy, fisher=st.fisher,
                              batch_size=st.batch_size, seed=st.seed, include=_list(st.include),
                              folder=run.file("factors"), checkpoint_seconds=st.checkpoint_seconds, progress=progress)
    timings["factors_s"] = time.perf_counter() - t0
    return fac


def _pairwise(lm: LoadedModel, queries: Sequences, train: Sequences, **kwargs):
    from kcircuits.influence.scores import pairwise_scores

    with eval_mode(lm.hf_model):
        return pairwise_scores(lm.hf_model, queries.to(lm.device), train.to(lm.device), **kwargs)


def _json_damping(damping) -> dict:
    return {str(k): float(v) for k, v in (damping or {}).items()}


def _to_tensors(res) -> dict[str, torch.Tensor]:
    """InfluenceScores -> flat safetensors dict: ``total``, ``layer.<l>``, ``component.<name>``, ``per_token``."""
    out = {"total": res.total.detach().float().cpu()}
    for layer, t in (res.per_layer or {}).items():
        out[f"layer.{int(layer)}"] = t.detach().float().cpu()
    for name, t in (res.per_component or {}).items():
        out[f"component.{name}"] = t.detach().float().cpu()
    if res.per_token is not None:
        out["per_token"] = res.per_token.detach().float().cpu()
    if res.train_self is not None:
        out["train_self"] = res.train_self.detach().float().cpu()
    return out


def _prefixed(parts: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in parts.items() if k.startswith(prefix)}


def _token_scores(stages: list[Stage], lm, q: Data, train: Data, parts: dict, cand: torch.Tensor, st: ScoreSettings,
                  progress: bool) -> dict[tuple[int, int], torch.Tensor]:
    """Per-token scores ``[T]`` of each (query, corpus index) pair in the top-k; from ``per_token`` when it
    was computed, else by rescoring only the union of top-k sequences per token (with every stage,
    summed, so the tokens add up to the scores they explain)."""
    _, top = analysis.top_influential(parts["total"], st.top_k)  # positions among candidates
    if "per_token" in parts:
        pt = parts["per_token"]
        return {(qi, int(cand[j])): pt[qi, j] for qi in range(top.shape[0]) for j in top[qi].tolist()}
    if not st.highlight:
        return {}
    union = torch.unique(cand[top.flatten()])
    per_token = None
    for stage in stages:
        slm = _stage_model(stage, lm, q, train, st)
        fac = _factors(slm, train, st, stage.factor_dir, stage.run, progress, {})
        res = _pairwise(slm, q.seqs, train.seqs.subset(union), factors=fac, per_layer=False, per_token=True,
                        components=None, rescore_top_k=None, **_core_kwargs(st, progress))
        pt = res.per_token.detach().float().cpu()
        per_token = pt if per_token is None else per_token + pt
    pos = {int(c): i for i, c in enumerate(union.tolist())}
    return {(qi, int(cand[j])): per_token[qi, pos[int(cand[j])]]
            for qi in range(top.shape[0]) for j in top[qi].tolist()}


def _tokens_json(lm, seqs: Sequences, index: int, token_scores: torch.Tensor | None, n_top: int = 5) -> dict:
    """The sequence's tokens as text pieces with highlight weights, and its top tokens."""
    n = int(seqs.attention_mask[index].sum())
    ids = seqs.input_ids[index, :n].tolist()
    pieces = [lm.tokenizer.decode([t]) for t in ids]
    if token_scores is None:
        return {"pieces": pieces}
    s = token_scores[:n].float()
    mask = seqs.loss_mask[index, :n]
    weights = analysis.token_weights(s, mask)
    top = analysis.top_tokens(s, n_top, mask)
    return {"pieces": pieces, "weights": [round(w, 4) for w in weights],
            "top_tokens": [{"position": p, "token": pieces[p], "score": float(s[p])} for p in top]}


def _sources(doc: Document | None) -> list[int] | None:
    if doc is None:
        return None
    src = doc.meta.get("source_indices")
    return [int(i) for i in src] if isinstance(src, list) else None


def _query_sources(q: Data, train: Data) -> list[list[int]] | None:
    """Ground-truth source documents per query: ``source_indices``, or ``sources`` given as corpus ids."""
    if not q.docs:
        return None
    ids = {d: i for i, d in enumerate(train.ids)}
    out = []
    for doc in q.docs:
        src = _sources(doc)
        if src is None and isinstance(doc.meta.get("sources"), list):
            src = [ids[s] for s in doc.meta["sources"] if s in ids]
        out.append(src or [])
    return out if any(out) else None


def _power_law(values: torch.Tensor, n_bootstrap: int, seed: int) -> dict | None:
    try:
        return analysis.power_law_tail(values, n_bootstrap=n_bootstrap, seed=seed).to_json()
    except KcircuitsError:
        return None  # too few non-zero scores (tiny corpora): no tail to speak of


def _results(lm, q: Data, train: Data, parts: dict, cand: torch.Tensor, tokens: dict, top_k: int,
             n_bootstrap: int, seed: int, damping: dict, strategy: str, timings: dict) -> dict:
    total = parts["total"]
    vals, top = analysis.top_influential(total, top_k)
    sources = _query_sources(q, train)
    recall = None
    if sources is not None:
        full_rank = cand[top]  # corpus indices, best first
        recall = analysis.recall_at_k(full_rank, sources, top_k)
    queries = []
    for qi in range(total.shape[0]):
        rows = []
        for rank, (j, v) in enumerate(zip(top[qi].tolist(), vals[qi].tolist(), strict=True), start=1):
            ci = int(cand[j])
            rows.append({"rank": rank, "train_index": ci, "id": train.ids[ci], "score": v,
                         "text": train.seqs.texts[ci], **_tokens_json(lm, train.seqs, ci, tokens.get((qi, ci)))})
        prompt, completion = _prompt_completion(lm, q, qi)
        entry = {"index": qi, "id": q.ids[qi], "prompt": prompt, "completion": completion, "top": rows,
                 "power_law": _power_law(total[qi], n_bootstrap, seed + qi)}
        if sources is not None:
            entry["sources"] = sources[qi]
            entry[f"recall@{top_k}"] = float(recall[qi])
        queries.append(entry)
    out = {"strategy": strategy, "n_queries": total.shape[0], "n_train": len(train.seqs), "n_scored": int(cand.numel()),
           "top_k": top_k, "damping": damping, "timings": timings, "queries": queries}
    layers = _prefixed(parts, "layer.")
    if layers:
        out["by_layer"] = analysis.influence_by_layer({int(k): v for k, v in layers.items()})
    comps = _prefixed(parts, "component.")
    if comps:
        out["by_component"] = analysis.influence_by_component(comps)
    if recall is not None:
        out[f"mean_recall@{top_k}"] = float(recall.nanmean())
    return out


def _prompt_completion(lm, q: Data, qi: int) -> tuple[str, str]:
    """The query's prompt and completion text (decoded from tokens when Sequences were passed)."""
    if q.docs:
        return q.docs[qi].text, q.docs[qi].completion or ""
    n, p = int(q.seqs.attention_mask[qi].sum()), q.seqs.prompt_lengths[qi]
    ids = q.seqs.input_ids[qi].tolist()
    return lm.tokenizer.decode(ids[:p]), lm.tokenizer.decode(ids[p:n])


# --------------------------------------------------------------------------- report
def _report(run: RunFolder, results: dict, reproduce: dict) -> dict:
    summary = {"model": reproduce["model"], "weights": reproduce["weights"], "strategy": results["strategy"],
               "queries": results["n_queries"],
               "training sequences": results["n_train"], "scored (after pre-filter)": results["n_scored"]}
    for key in ("factors_s", "score_s", "highlight_s"):
        if key in results["timings"]:
            summary[key.replace("_s", " time (s)")] = round(results["timings"][key], 2)
    if reproduce.get("checkpoints"):
        summary["models summed (with checkpoints)"] = 1 + len(reproduce["checkpoints"])
    if f"mean_recall@{results['top_k']}" in results:
        summary[f"mean recall@{results['top_k']} of known sources"] = results[f"mean_recall@{results['top_k']}"]
    return {"title": f"Influence: {reproduce['model']} ({results['strategy']})", "summary": summary,
            "influence": results, "config": run.config}
