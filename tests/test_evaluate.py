"""Evaluator: cached vs recomputed ablations, faithfulness identities, curve areas."""

import math

import torch

from kcircuits.engine import Engine
from kcircuits.evaluate import Evaluator
from kcircuits.selection import random_circuit, select
from kcircuits.graph import Circuit
from kcircuits.metrics import curve_areas, faithfulness
from tests.model_helpers import tiny_model
from tests.helpers import random_batch


def setup():
    eng = Engine(tiny_model("llama").weights)
    return eng, [random_batch(3, seed=0), random_batch(2, seed=1)]


def test_full_and_empty_circuits_have_faithfulness_one_and_zero():
    eng, batches = setup()
    ev = Evaluator(eng, batches, progress=False)
    g = eng.graph
    full = ev.evaluate(Circuit(g, g.edge_exists()))
    empty = ev.evaluate(Circuit(g, torch.zeros_like(g.edge_exists())))
    assert abs(full["faithfulness_of_means"] - 1) < 1e-5 and abs(empty["faithfulness_of_means"]) < 1e-5
    assert full["circuit_hit10"] == full["full_hit10"]
    assert full["kl_full_to_circuit"]["mean"] < 1e-6 < empty["kl_full_to_circuit"]["mean"]


def test_uncached_ablations_give_the_same_numbers():
    eng, batches = setup()
    scores = torch.randn(eng.graph.n_src, eng.graph.n_dst) * eng.graph.edge_exists()
    circuit = select(eng.graph, scores, 60)
    cached = Evaluator(eng, batches, progress=False).evaluate(circuit)
    lean = Evaluator(eng, batches, progress=False, max_cache_gb=0)
    assert not lean.cache_ablated
    assert lean.evaluate(circuit)["per_prompt"] == cached["per_prompt"]


def test_random_circuit_is_connected_and_reproducible():
    eng, _ = setup()
    a, b = random_circuit(eng.graph, 40, seed=3), random_circuit(eng.graph, 40, seed=3)
    assert torch.equal(a.edges, b.edges) and a.n_edges == 40  # exactly the size asked for
    assert not torch.equal(a.edges, random_circuit(eng.graph, 40, seed=4).edges)


def test_faithfulness_and_areas():
    f = faithfulness(torch.tensor([1.0, 2.0, 5.0]), torch.tensor([2.0, 2.0, 5.0]), torch.tensor([0.0, 1.0, 5.0]))
    assert f[:2].tolist() == [0.5, 1.0] and math.isnan(f[2])  # zero denominator: NaN, not inf
    areas = curve_areas([0.5, 1.0], [1.0, 1.0])
    assert abs(areas["cpr"] - 0.75) < 1e-12 and abs(areas["cmd"] - 0.25) < 1e-12  # starts at (0, 0)
