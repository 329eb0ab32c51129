"""Checks on the real bundled SmolLM2-135M (marked real_model; they still run in CI)."""

import pytest
import torch

from kcircuits import api
from kcircuits.engine import Engine
from kcircuits.graph import Graph
from kcircuits.models import load_model

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


def test_engine_matches_hf_on_smollm2(smol):
    tok = smol.tokenizer
    texts = ["The Eiffel Tower is located in the city of", "The capital of Japan is"]
    ids = [tok(t).input_ids for t in texts]
    p = max(map(len, ids))
    batch = torch.tensor([i + [smol.pad_token_id] * (p - len(i)) for i in ids])
    eng = Engine(smol.weights)
    with torch.no_grad():
        ref = smol.hf_model(batch).logits
        ours = eng.run(eng.embed(batch), torch.arange(p).expand(2, p)).logits
    # fp32; only the real positions of each prompt (right padding: pads come after and change nothing)
    for i, n in enumerate(map(len, ids)):
        assert (ours[i, :n] - ref[i, :n]).abs().max().item() <= 1e-4
    last = ours[0, len(ids[0]) - 1].argmax()
    assert tok.decode(last) == " Paris"


def test_smollm2_graph_sizes(smol):
    assert Graph.from_model(smol.weights).n_edges == 70651
    assert Graph.from_model(smol.weights, grouped=False).n_edges == 123211


def test_smollm2_circuit_beats_random(smol, tmp_path):
    res = api.discover("country_capital", smol, out=tmp_path / "run", method="eap-ig", steps=3, percent=2,
                       max_pairs=12, batch_size=6, known_only=True, known_k=10, curve=False, n_random=2,
                       progress=False)
    m = res.metrics["sets"]["discover"]
    assert m["full_hit10"] == 1.0  # known-only kept only answers within the top 10
    rnd = m["random_baseline"]["faithfulness_of_means"]
    # a 2% circuit found by EAP-IG keeps far more of the logit difference than random connected circuits
    assert m["faithfulness_of_means"] > 0.3 and m["faithfulness_of_means"] > max(rnd) + 0.2
