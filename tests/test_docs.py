"""The Python API documents itself: ``help(kcircuits.discover)`` is enough to use it (issue 13, item 7).

For every public function and method below: a docstring that names each of its parameters; for every
result class: a docstring that names each of its fields; for every function that takes settings by
field name (``**options``): its help text lists every field of those settings classes, and every
settings field has a help text. Names are matched as whole words, anywhere in the docstring.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pydoc
import re

import pytest

#: Public functions: "module:qualname". Methods of the classes in CLASSES are checked with their class.
FUNCTIONS = [
    # the top-level API (kcircuits.discover, kcircuits.evaluate, ... are these objects)
    "kcircuits.api:discover",
    "kcircuits.api:evaluate",
    "kcircuits.api:select",
    "kcircuits.api:load_circuit",
    "kcircuits.api:circuit_of_size",
    "kcircuits.api:evaluate_circuit",
    "kcircuits.api:explain_circuit",
    "kcircuits.pipeline:prepare_prompts",
    "kcircuits.pipeline:known_filter",
    "kcircuits.pipeline:answer_ranks",
    "kcircuits.discover.eap:attribute",
    # models
    "kcircuits.models.loader:load_model",
    "kcircuits.models.loader:from_hf",
    "kcircuits.models.loader:eval_mode",
    "kcircuits.models.loader:cache_root",
    "kcircuits.models.edits:edited",
    "kcircuits.models.edits:save_delta",
    "kcircuits.models.edits:load_delta",
    "kcircuits.models.edits:delta_metadata",
    # choosing circuits
    "kcircuits.graph:prune",
    "kcircuits.graph:circuit_from_edges",
    "kcircuits.selection:select",
    "kcircuits.selection:select_by_threshold",
    "kcircuits.selection:random_circuit",
    "kcircuits.selection:random_circuits",
    # studies
    "kcircuits.studies.compare:compare",
    "kcircuits.studies.hallucination:hallucination",
    "kcircuits.studies.icl:icl",
    # explaining circuits
    "kcircuits.analyze.explain:explain",
    "kcircuits.analyze.logit_lens:logit_lens",
    "kcircuits.analyze.head_roles:head_roles",
    "kcircuits.analyze.head_roles:token_roles",
    "kcircuits.analyze.head_roles:attention_mass",
    "kcircuits.analyze.head_roles:answer_range_of",
    # knowledge editing
    "kcircuits.edit.requests:load_requests",
    "kcircuits.edit.requests:validate_requests",
    "kcircuits.edit.metrics:edit_metrics",
    "kcircuits.edit.trace:causal_trace",
    "kcircuits.edit.api:trace",
    "kcircuits.edit.updates:rank_one_update",
    "kcircuits.edit.updates:least_squares_update",
    "kcircuits.edit.rome:rome_edit",
    "kcircuits.edit.rome:apply_rome",
    "kcircuits.edit.memit:apply_memit",
    "kcircuits.edit.memit:memit_deltas",
    "kcircuits.edit.finetune:apply_ft_l",
    "kcircuits.edit.finetune:apply_ft_m",
    "kcircuits.edit.finetune:finetune_deltas",
    "kcircuits.edit.api:edit",
    "kcircuits.edit.api:edit_bench",
    "kcircuits.edit.stats:key_second_moment",
    "kcircuits.edit.edit_circuits:edit_circuits",
    "kcircuits.edit.edit_circuits:read_edit_run",
    "kcircuits.edit.circuits:compare_fact",
    "kcircuits.edit.circuits:compare_neighbours",
    "kcircuits.edit.circuits:match_probes",
    "kcircuits.edit.circuits:prompt_pairs",
    "kcircuits.edit.circuits:circuit_change",
    "kcircuits.studies.common:evaluate_on",
    "kcircuits.data.prompts:encode_text",
    "kcircuits.report.svg:circuit_svg",
    "kcircuits.report.circuit_pairs:circuit_pair_html",
    "kcircuits.report.circuit_pairs:circuit_pair",
    "kcircuits.report.circuit_pairs:pair_viewers",
    "kcircuits.report.viewer:viewer_html",
    # weight circuits
    "kcircuits.models.masking:check_mask",
    "kcircuits.models.masking:check_mask_shapes",
    "kcircuits.models.masking:complement",
    "kcircuits.models.masking:density",
    "kcircuits.models.masking:ablation_value",
    "kcircuits.models.masking:ablation_deltas",
    "kcircuits.models.masking:masked",
    "kcircuits.discover.weight_masks:train_weight_mask",
    "kcircuits.discover.weight_masks:evaluate_weight_circuit",
    "kcircuits.discover.weight_masks:save_weight_mask",
    "kcircuits.discover.weight_masks:load_weight_mask",
    "kcircuits.discover.weight_masks:maskable_parameters",
    "kcircuits.discover.weight_masks:threshold_logits",
    "kcircuits.discover.weight_masks:random_weight_mask",
    "kcircuits.analyze.weight_composition:composition",
    "kcircuits.analyze.weight_composition:weight_jaccard",
    "kcircuits.analyze.weight_composition:overlap_matrix",
    "kcircuits.analyze.weight_composition:edge_circuit_mask",
    "kcircuits.analyze.weight_composition:edge_weight_overlap",
    "kcircuits.edit.masked_finetune:masked_finetune",
    "kcircuits.edit.masked_finetune:inside_outside",
    "kcircuits.edit.masked_finetune:old_fact_scores",
    "kcircuits.edit.masked_finetune:edge_component_masks",
    "kcircuits.weight_circuits.api:weight_circuit",
    "kcircuits.weight_circuits.api:edit_inside",
    "kcircuits.weight_circuits.api:read_weight_circuit_run",
    "kcircuits.weight_circuits.api:mask_file",
    "kcircuits.weight_circuits.report:weight_circuit_report",
    "kcircuits.weight_circuits.report:edit_inside_report",
    # influence functions
    "kcircuits.influence.api:fit",
    "kcircuits.influence.api:score",
    "kcircuits.influence.api:circuit_components",
]

#: Public classes: the class docstring names every dataclass field (or, for a plain class, every
#: ``__init__`` parameter, in the class or ``__init__`` docstring); each public method, classmethod and
#: property defined in the class has a docstring naming its parameters.
CLASSES = [
    "kcircuits.api:RunOutput",
    "kcircuits.pipeline:PromptSplit",
    "kcircuits.graph:Graph",
    "kcircuits.graph:Circuit",
    "kcircuits.engine:Engine",
    "kcircuits.evaluate:Evaluator",
    "kcircuits.selection:CircuitShape",
    "kcircuits.models.loader:LoadedModel",
    "kcircuits.analyze.explain:Explanation",
    "kcircuits.analyze.logit_lens:LensResult",
    "kcircuits.analyze.head_roles:RoleTable",
    "kcircuits.edit.requests:EditRequest",
    "kcircuits.edit.trace:TraceResult",
    "kcircuits.edit.api:TraceOutput",
    "kcircuits.edit.rome:RomeEdit",
    "kcircuits.edit.api:EditOutput",
    "kcircuits.influence.api:FitOutput",
    "kcircuits.influence.api:ScoreOutput",
    "kcircuits.influence.scores:InfluenceScores",
    "kcircuits.influence.factors:Factors",
    "kcircuits.influence.analysis:PowerLawFit",
    "kcircuits.influence.sequences:Sequences",
    "kcircuits.discover.weight_masks:WeightMaskResult",
    "kcircuits.edit.masked_finetune:MaskedEditResult",
    "kcircuits.weight_circuits.settings:WeightMaskSettings",
    "kcircuits.weight_circuits.settings:CompositionSettings",
    "kcircuits.weight_circuits.settings:WeightCircuitSettings",
    "kcircuits.weight_circuits.settings:EditInsideSettings",
    "kcircuits.edit.settings:MaskedFinetuneSettings",
]


def _settings(*names: str) -> list[type]:
    from kcircuits import settings

    return [getattr(settings, n) for n in names]


def _study_settings() -> list[type]:
    from kcircuits.studies.common import STUDY_SETTINGS

    return list(STUDY_SETTINGS)


def _influence(name: str) -> list[type]:
    from kcircuits.influence import settings

    return [getattr(settings, name)]


def _edit(name: str) -> list[type]:
    from kcircuits.edit import settings

    return [getattr(settings, name)]


#: Functions that take settings fields by name: their help text must list every field of these classes.
SETTINGS_TAKERS = {
    "kcircuits.edit.api:edit_bench": lambda: [getattr(importlib.import_module("kcircuits.edit.settings"), n)
                                              for n in ("EditSettings", "RequestSettings", "ValueSettings",
                                                        "FinetuneOptions")],
    "kcircuits.edit.api:edit": lambda: [getattr(importlib.import_module("kcircuits.edit.settings"), n)
                                        for n in ("EditSettings", "RequestSettings", "ValueSettings",
                                                  "FinetuneOptions")],
    "kcircuits.api:discover": lambda: _settings("ScoringSettings", "AttributionSettings", "CircuitSize",
                                                "PromptSettings", "EvaluationSettings", "RunSettings"),
    "kcircuits.api:evaluate": lambda: _settings("ScoringSettings", "PromptSettings", "EvaluationSettings",
                                                "RunSettings"),
    "kcircuits.api:select": lambda: _settings("CircuitSize"),
    "kcircuits.pipeline:prepare_prompts": lambda: _settings("PromptSettings"),
    "kcircuits.studies.compare:compare": _study_settings,
    "kcircuits.studies.hallucination:hallucination": _study_settings,
    "kcircuits.studies.icl:icl": _study_settings,
    "kcircuits.influence.api:fit": lambda: _influence("FitSettings"),
    "kcircuits.influence.api:score": lambda: _influence("ScoreSettings"),
    "kcircuits.edit.api:trace": lambda: _edit("TraceSettings"),
    "kcircuits.edit.edit_circuits:edit_circuits": lambda: _edit("EditCircuitSettings") + _settings(
        "ScoringSettings", "AttributionSettings", "CircuitSize", "RunSettings"),
}

#: The settings classes whose fields the command line and settings_doc describe.
SETTINGS_CLASSES = [
    "kcircuits.settings:ScoringSettings", "kcircuits.settings:AttributionSettings", "kcircuits.settings:CircuitSize",
    "kcircuits.settings:PromptSettings", "kcircuits.settings:EvaluationSettings", "kcircuits.settings:RunSettings",
    "kcircuits.settings:RoleThresholds", "kcircuits.influence.settings:FitSettings",
    "kcircuits.influence.settings:ScoreSettings", "kcircuits.edit.settings:TraceSettings",
    "kcircuits.edit.settings:EditSettings", "kcircuits.edit.settings:RequestSettings",
    "kcircuits.edit.settings:ValueSettings", "kcircuits.edit.settings:FinetuneOptions",
    "kcircuits.edit.settings:EditCircuitSettings",
]

_SKIP_PARAMS = {"self", "cls"}


def resolve(spec: str):
    module, _, qualname = spec.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def mentions(doc: str, name: str) -> bool:
    """``name`` occurs in ``doc`` as a whole word (``known_k`` is not found inside ``known_k_min``)."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", doc) is not None


def documented_params(func) -> list[str]:
    """The parameters of ``func`` a docstring must name: all but self/cls and ``*args``/``**kwargs``."""
    func = inspect.unwrap(func)
    return [p.name for p in inspect.signature(func).parameters.values()
            if p.name not in _SKIP_PARAMS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def undocumented(func, doc: str | None) -> list[str]:
    return [name for name in documented_params(func) if not mentions(doc or "", name)]


def own_class_doc(cls: type) -> str | None:
    """The class's own docstring; None for none, an inherited one, or the signature dataclass fills in."""
    doc = cls.__dict__.get("__doc__")
    if not doc or (dataclasses.is_dataclass(cls) and doc.startswith(cls.__name__ + "(")):
        return None
    return doc


def public_members(cls: type) -> list[tuple[str, object]]:
    """Public methods, classmethods, staticmethods and properties defined in ``cls`` itself."""
    out = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, (classmethod, staticmethod)):
            out.append((name, member.__func__))
        elif isinstance(member, property):
            out.append((name, member.fget))
        elif inspect.isfunction(member):
            out.append((name, member))
    return out


# --------------------------------------------------------------------------- functions
@pytest.mark.parametrize("spec", FUNCTIONS)
def test_function_documents_every_parameter(spec):
    func = resolve(spec)
    doc = inspect.getdoc(func)
    assert doc and doc.strip(), f"{spec} has no docstring"
    missing = undocumented(func, doc)
    assert not missing, f"{spec}: the docstring does not describe parameter(s) {', '.join(missing)}"


# --------------------------------------------------------------------------- classes
@pytest.mark.parametrize("spec", CLASSES)
def test_class_documents_every_field(spec):
    cls = resolve(spec)
    doc = own_class_doc(cls)
    assert doc, f"{spec} has no docstring of its own"
    if dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if not mentions(doc, n)]
        assert not missing, f"{spec}: the class docstring does not describe field(s) {', '.join(missing)}"
    elif "__init__" in vars(cls):
        init_doc = (vars(cls)["__init__"].__doc__ or "") + "\n" + doc
        missing = undocumented(vars(cls)["__init__"], init_doc)
        assert not missing, f"{spec}: neither the class nor __init__ describes parameter(s) {', '.join(missing)}"


def _method_specs() -> list[str]:
    specs = []
    for spec in CLASSES:
        try:
            cls = resolve(spec)
        except (ImportError, AttributeError):
            continue  # reported by test_class_documents_every_field
        specs += [f"{spec}.{name}" for name, _ in public_members(cls)]
    return specs


@pytest.mark.parametrize("spec", _method_specs())
def test_method_documents_every_parameter(spec):
    cls_spec, _, name = spec.rpartition(".")
    func = dict(public_members(resolve(cls_spec)))[name]
    doc = inspect.getdoc(func)
    assert doc and doc.strip(), f"{spec} has no docstring"
    missing = undocumented(func, doc)
    assert not missing, f"{spec}: the docstring does not describe parameter(s) {', '.join(missing)}"


# --------------------------------------------------------------------------- settings taken by name
@pytest.mark.parametrize("spec", sorted(SETTINGS_TAKERS))
def test_help_lists_every_settings_field(spec):
    """What ``help(func)`` shows names every settings field ``func`` accepts by name."""
    text = pydoc.render_doc(resolve(spec), renderer=pydoc.plaintext)
    missing = [f"{cls.__name__}.{f.name}" for cls in SETTINGS_TAKERS[spec]() for f in dataclasses.fields(cls)
               if not mentions(text, f.name)]
    assert not missing, f"help({spec}) does not list setting(s) {', '.join(missing)}"


def test_help_of_discover_shows_every_option():
    """``help(kcircuits.discover)`` shows its parameters and every setting, the issue's examples included."""
    from kcircuits import api

    text = pydoc.render_doc(api.discover, renderer=pydoc.plaintext)
    for name in documented_params(api.discover):
        assert mentions(text, name), f"help(kcircuits.discover) does not describe {name}"
    for cls in SETTINGS_TAKERS["kcircuits.api:discover"]():
        for f in dataclasses.fields(cls):
            assert mentions(text, f.name), f"help(kcircuits.discover) does not list {cls.__name__}.{f.name}"
    for name in ("method", "metric", "ablation", "known_k", "answer_scoring", "grouped"):
        assert mentions(text, name)


def test_top_level_names_are_the_api_functions(monkeypatch):
    """``kcircuits.discover`` and ``kcircuits.evaluate`` call and document the API functions, also after the
    subpackage ``kcircuits.discover`` and the module ``kcircuits.evaluate`` (same names) were imported,
    and their submodules stay importable in every form."""
    import inspect

    import kcircuits
    import kcircuits.discover.eap as eap  # the dotted form must keep working
    from kcircuits import api
    from kcircuits.evaluate import Evaluator

    assert eap.attribute and Evaluator
    for name in ("discover", "evaluate"):
        obj = getattr(kcircuits, name)
        calls: list = []
        monkeypatch.setattr(api, name, lambda *a, calls=calls, **k: calls.append((a, k)) or "ran")
        assert obj("rel", x=1) == "ran" and calls == [(("rel",), {"x": 1})]
        monkeypatch.undo()
        assert inspect.signature(obj) == inspect.signature(getattr(api, name))
        shown = " ".join(pydoc.render_doc(obj, renderer=pydoc.plaintext).split())
        assert " ".join(inspect.getdoc(getattr(api, name)).split()) in shown  # help() shows the whole docstring
    assert kcircuits.select is api.select


@pytest.mark.parametrize("spec", SETTINGS_CLASSES)
def test_settings_fields_have_help(spec):
    """Every settings field carries the help text that settings_doc and the command line show."""
    cls = resolve(spec)
    assert own_class_doc(cls), f"{spec} has no docstring of its own"
    missing = [f.name for f in dataclasses.fields(cls) if not (f.metadata.get("help") or "").strip()]
    assert not missing, f"{spec}: field(s) without help: {', '.join(missing)}"


# --------------------------------------------------------------------------- the checker itself
def test_checker_catches_an_undocumented_parameter():
    """The check fails for a parameter the docstring leaves out, and matches whole words only."""

    def f(relation, known_k, *, answer_scoring="first_token", **options):
        """Find things in ``relation``; answer_scoring_mode is not the parameter.

        Args:
            known_k: rank within which a fact counts as known (its prefix ``known`` is not enough).
        """

    assert undocumented(f, inspect.getdoc(f)) == ["answer_scoring"]

    @dataclasses.dataclass
    class NoDoc:
        x: int

    assert own_class_doc(NoDoc) is None  # dataclass's generated "NoDoc(x: int)" is not documentation
