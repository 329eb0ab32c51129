"""``kcircuits edit-circuits``: each edited fact's circuit before and after the edit, on a tiny model.

What is checked: the prompt pairs (same token length, another subject, no partner answering like
either target, no prompt about an edited subject); the before circuit is the true target's on the
original model and the after circuit the new target's on the edited model (recomputed here
independently of the run); gained/lost nodes and edges are exactly the set differences; the model is
left as it was; an edit run's circuits are never the original's (a zero edit gives the same circuit,
a real one is found on different weights); bad input fails with one clear error and no folder."""

from __future__ import annotations

import json

import pytest
import torch

from kcircuits.cli import main
from kcircuits.data import encode_text
from kcircuits.edit import api
from kcircuits.edit.circuits import Probe, circuit_change, match_probes, neighbour_probes, prompt_pairs
from kcircuits.edit.edit_circuits import edit_circuits
from kcircuits.edit.requests import EditRequest
from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.graph import Circuit, Graph
from kcircuits.io import load_tensors
from kcircuits.models import load_model
from kcircuits.models.edits import edited, load_delta, save_delta
from kcircuits.settings import AttributionSettings, CircuitSize, PromptSettings, RunSettings, ScoringSettings
from kcircuits.studies.common import StudySettings, find_circuit
from kcircuits.runs import RunFolder

EDIT = dict(n=3, n_paraphrases=2, n_neighbours=4, corpus_texts=4, corpus_tokens=24, perplexity_texts=0,
            n_prefixes=0, generation_tokens=0, steps=4, lr=0.5, kl_factor=0.0, weight_decay=0.0, clamp_norm=1e4,
            progress=False)
SMALL = dict(facts=2, pairs=4, neighbours=4, n_edges=40, steps=2, progress=False)


@pytest.fixture(scope="module")
def tiny(tiny_smol_dir):
    return load_model(tiny_smol_dir)


@pytest.fixture(scope="module")
def edit_run(tiny, tmp_path_factory):
    return api.edit("country_capital", tiny, out=tmp_path_factory.mktemp("edit") / "run", layer=0, **EDIT)


def test_fact_pairs_are_same_length_other_subjects_and_never_answer_like_a_target(tiny):
    tok = tiny.tokenizer
    req = EditRequest("The capital of {} is", "France", "Tokyo", "Paris",
                      paraphrase_prompts=("The capital city of France is",))
    pool = [Probe(f"The capital of {s} is", a, s) for s, a in
            [("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("France", "Paris")]]
    pool += [Probe(f"The capital city of {s} is", a, s) for s, a in [("Italy", "Rome"), ("Peru", "Lima")]]
    pool.append(Probe("The capital of Spain is", "Madrid", "Spain"))  # a duplicate text: one partner
    matches = match_probes(tok, [Probe(req.prompt_text, "Paris", "France"),
                                 Probe("The capital city of France is", "Paris", "France")], pool, 10,
                           avoid=("Tokyo",), exclude=("Germany",))
    assert matches
    for clean, corrupt in matches:
        assert len(encode_text(tok, clean.text)) == len(encode_text(tok, corrupt.text))
        assert corrupt.subject not in ("France", "Germany", "Japan")  # own subject, excluded, answers like a target
    # round robin over the clean prompts: both appear among the first two pairs
    assert {m[0].text for m in matches[:2]} == {req.prompt_text, "The capital city of France is"}
    # the closest partner first: the same template, not the other one
    first = [c for c in matches if c[0].text == req.prompt_text][0][1]
    assert first.text.startswith("The capital of ")
    pairs = prompt_pairs(tok, matches[:1], "Tokyo")
    assert pairs[0].object == "Tokyo" and pairs[0].answer_ids == tok(" Tokyo", add_special_tokens=False).input_ids
    assert pairs[0].corrupt_answer_ids[0] != pairs[0].answer_ids[0]


def test_neighbour_probes_skip_every_edited_subject():
    italy, spain, peru = ("The capital of Italy is", "Rome"), ("The capital of Spain is", "Madrid"), \
        ("The capital of Peru is", "Lima")
    reqs = [EditRequest("The capital of {} is", "France", "Tokyo", "Paris", neighborhood_prompts=(italy, spain)),
            EditRequest("The capital of {} is", "Italy", "Lima", "Rome", neighborhood_prompts=(spain, peru))]
    probes = neighbour_probes(reqs, 5, {"France", "Italy"})
    assert [p.text for p in probes] == ["The capital of Spain is", "The capital of Peru is"]
    assert len(neighbour_probes(reqs, 1, {"France", "Italy"})) == 1


def test_circuit_change_is_the_set_difference():
    g = Graph(2, 2, 2, True, False)
    gen = torch.Generator().manual_seed(0)
    a = Circuit(g, (torch.rand(g.n_src, g.n_dst, generator=gen) > 0.6) & g.edge_exists())
    b = Circuit(g, (torch.rand(g.n_src, g.n_dst, generator=gen) > 0.6) & g.edge_exists())
    ch = circuit_change(a, b)
    names = lambda c: {f"{s}->{d}" for s, d, _ in c.edge_list()}  # noqa: E731
    assert set(ch["edges_gained"]) == names(b) - names(a) and set(ch["edges_lost"]) == names(a) - names(b)
    assert set(ch["nodes_gained"]) == set(b.nodes()) - set(a.nodes())
    assert set(ch["nodes_lost"]) == set(a.nodes()) - set(b.nodes())
    same = circuit_change(a, a)
    assert same["edge_jaccard"] == 1.0 and not same["edges_gained"] and not same["nodes_lost"]


def _study(n_edges: int) -> StudySettings:
    return StudySettings(ScoringSettings(), AttributionSettings(steps=2), CircuitSize(n_edges=n_edges),
                         PromptSettings(), RunSettings())


def test_edit_circuits_compares_the_true_circuit_before_with_the_new_circuit_after(tiny, edit_run, tmp_path):
    fingerprint = tiny.fingerprint
    res = edit_circuits(edit_run.folder, tiny, out=tmp_path / "ec", **SMALL)
    folder = tmp_path / "ec"
    assert tiny.fingerprint == fingerprint  # the delta was applied only inside the comparison
    for name in ("edit_circuits.json", "report.html", "circuit_fact0_before.json", "circuit_fact0_after.json",
                 "scores_fact1_after.safetensors", "circuit_neighbours_before.json"):
        assert (folder / name).exists(), name
    assert len(res["facts"]) == 2 and res["edited_layers"] == [0] and res["method"] == "rome"
    fact = res["facts"][0]
    edits = json.loads((edit_run.folder / "edits.json").read_text())["requests"]
    assert (fact["target_true"], fact["target_new"]) == (edits[0]["target_true"], edits[0]["target_new"])

    # recompute both circuits independently: the true target on the original weights, the new one edited
    engine = Engine(tiny.weights, Graph.from_model(tiny.weights))
    st = _study(SMALL["n_edges"])
    pool = [Probe(p["corrupt"], p["corrupt_answer"]) for p in fact["pairs"]]
    matches = [(Probe(p["clean"], fact["target_true"], fact["subject"]), q) for p, q in zip(fact["pairs"], pool,
                                                                                            strict=True)]
    check = RunFolder(tmp_path / "check", {"check": 1})
    before, _ = find_circuit(check, "b", engine, tiny, prompt_pairs(tiny.tokenizer, matches), st, n_edges=40,
                             progress=False)
    with edited(tiny, load_delta(edit_run.folder / "delta.safetensors")):
        after, _ = find_circuit(check, "a", engine, tiny, prompt_pairs(tiny.tokenizer, matches, fact["target_new"]),
                                st, n_edges=40, progress=False)
    stored_b = json.loads((folder / "circuit_fact0_before.json").read_text())
    stored_a = json.loads((folder / "circuit_fact0_after.json").read_text())
    assert {(e["src"], e["dst"]) for e in stored_b["edges"]} == {(s, d) for s, d, _ in before.edge_list()}
    assert {(e["src"], e["dst"]) for e in stored_a["edges"]} == {(s, d) for s, d, _ in after.edge_list()}
    assert fact["change"] == circuit_change(before, after)
    # the lens runs over every layer, for both targets, on both sides
    n_layers = tiny.weights.n_layers
    for target in ("true", "new"):
        for side in ("before", "after"):
            assert len(fact["lens"][target][side]["median_rank"]) == n_layers + 1
    nb = res["neighbours"]
    assert nb["n_pairs"] >= 1 and 0.0 <= nb["after"]["full_hit10"] <= 1.0
    page = (folder / "report.html").read_text()
    assert "Circuits side by side" in page and page.count('class="kc-circ"') >= 2 * 3


def test_a_zero_edit_finds_the_same_circuit_and_a_real_one_uses_the_edited_weights(tiny, edit_run, tmp_path):
    """The after side really runs on the edited weights: with a zero delta it matches the original model's
    circuit of the new target exactly; with the real delta the scores differ."""
    zero_run = tmp_path / "zero"
    zero_run.mkdir()
    for name in ("config.json", "edits.json"):
        (zero_run / name).write_text((edit_run.folder / name).read_text())
    deltas = load_delta(edit_run.folder / "delta.safetensors")
    save_delta(zero_run / "delta.safetensors", {k: torch.zeros_like(v) for k, v in deltas.items()},
               base_fingerprint=tiny.fingerprint)
    options = dict(SMALL, facts=1, neighbours=0)
    zero = edit_circuits(zero_run, tiny, out=tmp_path / "z", **options)
    edit_circuits(edit_run.folder, tiny, out=tmp_path / "r", **options)
    assert zero["neighbours"] is None
    fact = zero["facts"][0]
    engine = Engine(tiny.weights, Graph.from_model(tiny.weights))
    matches = [(Probe(p["clean"], fact["target_true"], fact["subject"]), Probe(p["corrupt"], p["corrupt_answer"]))
               for p in fact["pairs"]]
    same, _ = find_circuit(RunFolder(tmp_path / "c", {"c": 1}), "n", engine, tiny,
                           prompt_pairs(tiny.tokenizer, matches, fact["target_new"]), _study(40), n_edges=40,
                           progress=False)
    zero_after = json.loads((tmp_path / "z" / "circuit_fact0_after.json").read_text())
    assert {(e["src"], e["dst"]) for e in zero_after["edges"]} == {(s, d) for s, d, _ in same.edge_list()}
    zs = load_tensors(tmp_path / "z" / "scores_fact0_after.safetensors")["scores"]
    rs = load_tensors(tmp_path / "r" / "scores_fact0_after.safetensors")["scores"]
    assert not torch.allclose(zs, rs)  # the real edit changed what the after circuit is found on
    assert (tmp_path / "z").resolve() != (tmp_path / "r").resolve()


def test_bad_edit_circuits_input_is_one_clear_error_and_no_folder(tiny, edit_run, tmp_path):
    with pytest.raises(KcircuitsError, match="not a finished edit run"):
        edit_circuits(tmp_path, tiny, out=tmp_path / "x1", **SMALL)
    with pytest.raises(KcircuitsError, match="--facts must be >= 1"):
        edit_circuits(edit_run.folder, tiny, out=tmp_path / "x2", **{**SMALL, "facts": 0})
    with pytest.raises(KcircuitsError, match="threshold"):
        edit_circuits(edit_run.folder, tiny, out=tmp_path / "x3", **{**SMALL, "n_edges": None, "threshold": 0.1})
    with edited(tiny, {n: torch.ones_like(v) * 1e-3 for n, v in
                                        load_delta(edit_run.folder / "delta.safetensors").items()}):
        with pytest.raises(KcircuitsError, match="was made on weights"):
            edit_circuits(edit_run.folder, tiny, out=tmp_path / "x4", **SMALL)
    assert not any((tmp_path / f"x{i}").exists() for i in range(1, 5))


def test_edit_circuits_command_line(tiny_smol_dir, edit_run, tmp_path, capsys):
    argv = ["edit-circuits", str(edit_run.folder), "--model", tiny_smol_dir, "--out", str(tmp_path / "cli"),
            "--facts", "1", "--pairs", "2", "--neighbours", "2", "--edges", "30", "--steps", "2", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "report:" in out and "edge Jaccard" in out
    assert json.loads((tmp_path / "cli" / "edit_circuits.json").read_text())["facts"][0]["n_pairs"] <= 2
