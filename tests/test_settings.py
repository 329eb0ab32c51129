"""Typed settings: validation in one place, normalised values, CLI options generated from the fields."""

from dataclasses import fields

import pytest

from kcircuits import api
from kcircuits.cli import DISCOVER_SETTINGS, build_parser, main
from kcircuits.errors import KcircuitsError
from kcircuits import settings as S

SMALL = dict(max_pairs=4, batch_size=4, curve=False, n_random=0, progress=False, steps=2, explain_prompts=0,
             percent=30)


@pytest.mark.parametrize("cls, kwargs, message", [
    (S.CircuitSize, {"percent": 0}, "--percent must be in"),
    (S.CircuitSize, {"percent": 150}, "--percent must be in"),
    (S.CircuitSize, {"n_edges": 0}, "--edges must be >= 1"),
    (S.CircuitSize, {"n_edges": 5, "percent": 1.0}, "give one circuit size"),
    (S.PromptSettings, {"known_k": 0}, "--known-k must be >= 1"),
    (S.PromptSettings, {"split": 1.0}, "--split must be"),
    (S.PromptSettings, {"templates": ["zz"]}, "not understood"),
    (S.ScoringSettings, {"metric": "accuracy"}, "unknown metric"),
    (S.ScoringSettings, {"answer_scoring": "full"}, "logit difference compares single tokens"),
    (S.AttributionSettings, {"method": "magic"}, "unknown discovery method"),
    (S.AttributionSettings, {"steps": 0}, "--steps must be >= 1"),
    (S.RunSettings, {"batch_size": 0}, "--batch-size must be >= 1"),
    (S.EvaluationSettings, {"n_random": -1}, "--random-draws must be >= 0"),
])
def test_bad_values_are_refused_with_the_allowed_range(cls, kwargs, message):
    with pytest.raises(KcircuitsError, match=message):
        cls(**kwargs)


def test_values_are_normalised_so_one_configuration_hashes_once():
    assert S.hashed_dict(S.CircuitSize(percent=1)) == S.hashed_dict(S.CircuitSize(percent=1.0))
    assert S.PromptSettings(templates=["0", "zs1"]).templates == S.PromptSettings(templates=[0, "zs1"]).templates
    assert "device" not in S.hashed_dict(S.RunSettings()) and "batch_size" not in S.hashed_dict(S.RunSettings())


def test_every_settings_field_is_a_discover_option_with_its_default():
    args = build_parser().parse_args(["discover", "country_capital"])
    for name in DISCOVER_SETTINGS:
        cls = getattr(S, name)
        for f in fields(cls):
            if f.metadata.get("cli", True):
                assert hasattr(args, f.name), f.name
        assert S.from_args(cls, args) == cls()  # the command line's defaults are the dataclass's


def test_command_line_values_reach_the_settings():
    args = build_parser().parse_args(["discover", "r", "--percent", "2", "--signed", "--ungrouped", "--max-pairs", "0",
                                      "--templates", "zs0", "1", "--known-only-on", "discover", "--no-curve"])
    assert S.from_args(S.CircuitSize, args) == S.CircuitSize(percent=2.0, absolute=False)
    assert S.from_args(S.AttributionSettings, args).grouped is False
    pr = S.from_args(S.PromptSettings, args)
    assert pr.max_pairs is None and pr.templates == ("zs0", 1) and pr.known_only_on == "discover"
    assert S.from_args(S.EvaluationSettings, args).curve is False


def test_unknown_api_option_is_an_error():
    with pytest.raises(KcircuitsError, match="unknown option"):
        api.discover("country_capital", "smollm2-135m", percentage=1)


def test_api_and_cli_give_one_folder_for_one_configuration(tiny_smol_dir, tmp_path, monkeypatch):
    from kcircuits.models import load_model

    monkeypatch.chdir(tmp_path)
    res = api.discover("country_capital", load_model(tiny_smol_dir), **SMALL)
    before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    code = main(["discover", "country_capital", "--model", str(tiny_smol_dir), "--percent", "30.0", "--max-pairs", "4",
                 "--batch-size", "2", "--steps", "2", "--no-curve", "--random-draws", "0", "--explain-prompts", "0",
                 "--quiet"])
    assert code == 0 and sorted(p.name for p in (tmp_path / "runs").iterdir()) == before == [res.folder.name]


def test_the_settings_choices_are_what_the_code_implements():
    from kcircuits.discover.registry import load_all
    from kcircuits.metrics import METRICS

    assert tuple(METRICS) == S.METRIC_NAMES  # a metric named in the settings exists, and every metric is offered
    assert S.discovery_method_names() == tuple(load_all())
