"""``kcircuits weight-circuit`` and ``kcircuits edit-inside`` end to end on a tiny model with SmolLM2's tokenizer.

What is checked: every relation gets one mask per density, of exactly that density, trained on the discovery
half and scored on the held-out half (full, circuit, complement, random); the overlap matrix of several
relations and the overlap with an edge circuit; a rerun reads the masks back instead of training; the report
is written; ``edit-inside`` fine-tunes inside the circuit, its complement, all weights and an edge circuit's
components vs the rest, from the run's circuit, and leaves weights outside each allowed set untouched; bad
input fails with one clear error and no folder.
"""

from __future__ import annotations

import json

import pytest
import torch

from kcircuits.cli import main
from kcircuits.discover import weight_masks
from kcircuits.discover.weight_masks import load_weight_mask
from kcircuits.errors import KcircuitsError
from kcircuits.graph import Graph, prune, select_topn
from kcircuits.models import load_model
from kcircuits.models.masking import density
from kcircuits.weight_circuits import api
from kcircuits.weight_circuits.api import edit_inside, mask_file, weight_circuit

RELATIONS = ["country_capital", "country_language"]
FAST = dict(densities=(0.1, 0.5), steps=6, checkpoint_every=3, max_pairs=8, random_draws=5, progress=False)


@pytest.fixture(scope="module")
def tiny(tiny_smol_dir):
    return load_model(tiny_smol_dir)


@pytest.fixture(scope="module")
def edge_run(tiny, tmp_path_factory):
    """A discover-style folder holding an edge circuit of country_capital (random scores: only its nodes matter)."""
    folder = tmp_path_factory.mktemp("edge")
    graph = Graph.from_model(tiny.weights)
    gen = torch.Generator().manual_seed(0)
    circuit = prune(select_topn(graph, torch.randn(graph.n_src, graph.n_dst, generator=gen) * graph.edge_exists(), 30))
    (folder / "circuit.json").write_text(json.dumps(circuit.to_json({"relation": "country_capital"})))
    return folder, circuit.nodes()


@pytest.fixture(scope="module")
def wc_run(tiny, edge_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("wc") / "run"
    return weight_circuit(RELATIONS, tiny, out=out, edge_circuits=[edge_run[0]], **FAST)


def test_one_mask_per_relation_and_density_scored_on_held_out_prompts(wc_run, tiny):
    assert set(wc_run["relations"]) == set(RELATIONS)
    for relation, rel in wc_run["relations"].items():
        assert rel["n_train"] > 0 and rel["n_test"] > 0
        assert [r["density"] for r in rel["sweep"]] == [0.1, 0.5]
        for row in rel["sweep"]:
            saved = load_weight_mask(f"{wc_run['folder']}/{mask_file(relation, row['density'])}")
            assert abs(density(saved.mask) - row["density"]) < 1e-6  # exactly the asked size
            assert saved.fingerprint == tiny.fingerprint and len(saved.history) == 6
            ev = row["evaluation"]
            assert set(ev) >= {"full", "circuit", "complement", "random", "chance"}
            assert ev["n_prompts"] == rel["n_test"] and abs(ev["density"] - row["density"]) < 1e-6
            assert ev["full"]["kl"] == pytest.approx(0.0, abs=1e-6)
            comp = row["composition"]
            assert comp["n_kept"] == sum(int(m.sum()) for m in saved.mask.values())
            assert row["circuit_keeps"] == (ev["circuit"]["hit@10"] >= 0.7 * ev["full"]["hit@10"])
        keeps = [r["density"] for r in rel["sweep"] if r["circuit_keeps"]]
        assert rel["circuit_keeps_from"] == (keeps[0] if keeps else None)
    # the two relations' masks cover the same parameters: their overlap matrix, symmetric with a unit diagonal
    for ov in wc_run["overlap"].values():
        jac = ov["overall"]["jaccard"]
        assert ov["names"] == RELATIONS and jac[0][0] == 1.0 and jac[1][1] == 1.0 and jac[0][1] == jac[1][0]
        assert 0.0 <= jac[0][1] <= 1.0


def test_edge_circuit_overlap_only_for_its_relation(wc_run, edge_run):
    rows = wc_run["relations"]["country_capital"]["sweep"]
    assert all("edge_overlap" in r for r in rows)
    assert {n["node"] for n in rows[0]["edge_overlap"]["nodes"]} <= set(edge_run[1])
    assert all("edge_overlap" not in r for r in wc_run["relations"]["country_language"]["sweep"])


def test_report_and_json_are_written(wc_run):
    page = open(f"{wc_run['folder']}/report.html").read()
    for text in ("Hit@10 on held-out prompts vs circuit density", "composition by module type",
                 "modules in the circuit", "Jaccard of the relations", "weight circuit vs edge circuit"):
        assert text in page
    saved = json.load(open(f"{wc_run['folder']}/{api.WEIGHT_CIRCUIT_FILE}"))
    assert saved["densities"] == [0.1, 0.5]


def test_rerun_reads_the_masks_back(wc_run, tiny, edge_run, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a finished mask was trained again")

    monkeypatch.setattr(weight_masks, "train_weight_mask", no_training)
    again = weight_circuit(RELATIONS, tiny, out=wc_run["folder"], edge_circuits=[edge_run[0]], **FAST)
    for relation in RELATIONS:
        for a, b in zip(again["relations"][relation]["sweep"], wc_run["relations"][relation]["sweep"], strict=True):
            assert a["evaluation"]["circuit"]["hit@10"] == b["evaluation"]["circuit"]["hit@10"]


def test_edit_inside_circuit_complement_all_and_edge_components(wc_run, tiny, edge_run, tmp_path):
    res = edit_inside("country_capital", wc_run["folder"], tiny, out=tmp_path / "inside", edge_circuit=edge_run[0],
                      n=3, steps=2, progress=False)
    assert set(res["variants"]) == {"circuit", "complement", "all", api.RANDOM_VARIANT, "edge circuit", "rest"}
    assert res["density"] == wc_run["relations"]["country_capital"]["circuit_keeps_from"] or res["density"] == 0.5
    mask = load_weight_mask(f"{wc_run['folder']}/{mask_file('country_capital', res['density'])}").mask
    n_masked = sum(m.numel() for m in mask.values())
    n_circuit = sum(int(m.sum()) for m in mask.values())
    v = res["variants"]
    assert v["circuit"]["n_trainable"] == n_circuit and v["complement"]["n_trainable"] == n_masked - n_circuit
    assert v["all"]["n_trainable"] == n_masked and v[api.RANDOM_VARIANT]["n_trainable"] == n_circuit
    assert v["edge circuit"]["n_trainable"] + v["rest"]["n_trainable"] == n_masked
    for variant in v.values():
        assert [p["step"] for p in variant["curve"]] == [0, 1, 2]
    # the same starting point for every variant: the unedited model
    starts = {name: variant["curve"][0]["efficacy_margin"] for name, variant in v.items()}
    assert len(set(starts.values())) == 1
    page = open(f"{res['folder']}/report.html").read()
    assert "during fine-tuning" in page and "Is the old fact still held?" in page


def test_edit_inside_picks_an_asked_density_and_refuses_what_the_run_lacks(wc_run, tiny, tmp_path):
    res = edit_inside("country_language", wc_run["folder"], tiny, out=tmp_path / "a", n=2, steps=1, density=0.1,
                      progress=False)
    assert res["density"] == 0.1 and set(res["variants"]) == {"circuit", "complement", "all", api.RANDOM_VARIANT}
    cases = [
        (lambda: edit_inside("country_capital", wc_run["folder"], tiny, out=tmp_path / "b", density=0.3, n=2,
                             progress=False), "no circuit of density 0.3"),
        (lambda: edit_inside("fruit_color", wc_run["folder"], tiny, out=tmp_path / "c", n=2, progress=False),
         "has no circuit of 'fruit_color'"),
        (lambda: edit_inside("country_capital", tmp_path, tiny, out=tmp_path / "d", progress=False),
         "not a finished weight-circuit run"),
        (lambda: edit_inside("country_capital", wc_run["folder"], tiny, out=tmp_path / "e", n=0, progress=False),
         "--n must be"),
    ]
    for call, message in cases:
        with pytest.raises(KcircuitsError, match=message):
            call()
    assert not any((tmp_path / x).exists() for x in "bcde")


def test_edit_inside_refuses_other_weights(wc_run, tmp_path, tiny_smol_dir):
    other = load_model(tiny_smol_dir)
    with torch.no_grad():
        next(other.hf_model.parameters()).add_(1.0)
    from kcircuits.models.fingerprint import weights_fingerprint

    weights_fingerprint(other, refresh=True)
    with pytest.raises(KcircuitsError, match="was trained on weights"):
        edit_inside("country_capital", wc_run["folder"], other, out=tmp_path / "x", n=2, progress=False)
    assert not (tmp_path / "x").exists()


def test_weight_circuit_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, edge_run):
    edge = edge_run[0]
    cases = [
        (dict(relations=[]), "at least one relation"),
        (dict(relations=RELATIONS, densities=(0.1, 1.5)), "each density must be strictly between 0 and 1"),
        (dict(relations=RELATIONS, densities=()), "densities is empty"),
        (dict(relations=RELATIONS, keep_share=0), "--keep-share"),
        (dict(relations=RELATIONS, steps=0), "--steps"),
        (dict(relations=["country_capital", "country_capital"]), "repeat a name"),
        (dict(relations=RELATIONS, no_such_option=1), "unknown option"),
        (dict(relations=RELATIONS, edge_circuits=[edge, edge]), "two edge circuits of 'country_capital'"),
        (dict(relations=["country_language"], edge_circuits=[edge]), "not among the relations"),
    ]
    for i, (kwargs, message) in enumerate(cases):
        relations = kwargs.pop("relations")
        with pytest.raises(KcircuitsError, match=message) as info:
            weight_circuit(relations, tiny, out=tmp_path / str(i), progress=False, **kwargs)
        assert "\n" not in str(info.value)
        assert not (tmp_path / str(i)).exists()


def test_cli(tiny_smol_dir, tmp_path, capsys):
    out = tmp_path / "wc"
    assert main(["weight-circuit", "country_capital", "--model", tiny_smol_dir, "--out", str(out), "--densities",
                 "0.2", "--steps", "3", "--max-pairs", "6", "--random-draws", "0", "--quiet"]) == 0
    assert "held-out Hit@10" in capsys.readouterr().out
    assert (out / mask_file("country_capital", 0.2)).is_file()
    assert main(["edit-inside", "country_capital", "--circuit", str(out), "--model", tiny_smol_dir, "--out",
                 str(tmp_path / "in"), "--n", "2", "--steps", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "complement" in printed and "efficacy" in printed
    assert main(["edit-inside", "country_capital", "--circuit", str(tmp_path), "--model", tiny_smol_dir,
                 "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "not a finished weight-circuit run" in capsys.readouterr().err


def test_torch_free_settings_name_what_the_modules_use():
    from kcircuits.models.masking import ABLATIONS
    from kcircuits.weight_circuits.settings import OBJECTIVES, WEIGHT_ABLATIONS

    assert WEIGHT_ABLATIONS == ABLATIONS and OBJECTIVES == weight_masks.OBJECTIVES


def test_nested_schedule_continues_from_the_larger_circuit(wc_run, tiny, tmp_path):
    """Nested (the default): the 0.1 mask's training starts where the 0.5 mask ended; independent: from the
    full model (every gate open)."""
    folder = wc_run["folder"]
    big = load_weight_mask(f"{folder}/{mask_file('country_capital', 0.5)}")
    small = load_weight_mask(f"{folder}/{mask_file('country_capital', 0.1)}")
    assert small.history[0]["target_density"] == pytest.approx(big.expected_density, rel=1e-5)
    res = weight_circuit(["country_capital"], tiny, out=tmp_path / "ind", schedule="independent",
                         **{**FAST, "densities": (0.1,)})
    alone = load_weight_mask(f"{res['folder']}/{mask_file('country_capital', 0.1)}")
    assert alone.history[0]["target_density"] > 0.99
    with pytest.raises(KcircuitsError, match="unknown density schedule"):
        weight_circuit(["country_capital"], tiny, out=tmp_path / "bad", schedule="random", **FAST)


def test_allocator_tuning_is_accepted_once():
    from kcircuits.runtime import tune_allocator

    assert tune_allocator() is True and tune_allocator() is True
