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
    kinds = m["random_baseline"]["kinds"]
    for kind in ("same_size", "same_logit_edges"):  # random circuits of exactly the circuit's pruned size
        assert [s["n_edges"] for s in kinds[kind]["shapes"]] == [res.circuit.n_edges] * 2
    rnd = kinds["same_size"]["faithfulness_of_means"] + kinds["same_logit_edges"]["faithfulness_of_means"]
    # a 2% circuit found by EAP-IG keeps far more of the logit difference than random circuits of its size
    assert m["faithfulness_of_means"] > 0.3 and m["faithfulness_of_means"] > max(rnd) + 0.2


def test_smollm2_attention_and_head_roles(smol):
    """Recomputed attention equals HF's eager attention on the real GQA model, and the role numbers
    are consistent: masses add to 1 and the heads' direct effects on the answer add up, with the
    MLPs' and the input's, to the model's centred answer logit."""
    from kcircuits.analyze.head_roles import _unembed_centred, head_roles, token_roles
    from kcircuits.data import build_prompts, load_dataset
    from kcircuits.batching import make_batch

    pairs = build_prompts(load_dataset("country_capital"), smol.tokenizer, templates=[0], max_pairs=4).pairs
    batch = make_batch(pairs, smol.pad_token_id)
    eng = Engine(smol.weights)
    hf = smol.hf_model
    old = hf.config._attn_implementation
    hf.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            ref = hf(batch.clean, output_attentions=True).attentions
            res = eng.run(eng.embed(batch.clean), batch.target_pos, capture=True, record=True)
    finally:
        hf.config._attn_implementation = old
    for layer in (0, 14, 29):
        got = eng.attention_pattern(layer, res.layers[layer])
        for i, p in enumerate(pairs):  # real positions only
            n = len(p.clean_ids)
            torch.testing.assert_close(got[i, :, :n, :n], ref[layer][i, :, :n, :n].float(), atol=1e-5, rtol=1e-4)
    kinds = token_roles(smol.tokenizer, pairs, batch.clean.shape[1])
    table = head_roles(eng, batch, kinds, sorted({p.answer_ids[0] for p in pairs}))
    masses = table.per_prompt["subject_mass"] + table.per_prompt["relation_mass"] + table.per_prompt["other_mass"]
    torch.testing.assert_close(masses, torch.ones_like(masses), atol=1e-5, rtol=0)
    rows, pos = torch.arange(len(pairs)), batch.target_pos[:, 0]
    u = _unembed_centred(eng, res.acts[:, rows, pos], res.resid_final[rows, pos])
    answer_u = u.gather(-1, batch.target_ids[None, :, :1].expand(u.shape[0], -1, 1))[..., 0]  # [n_src, b]
    logits = res.logits[:, 0]
    centred = (logits - logits.mean(-1, keepdim=True)).gather(-1, batch.target_ids[:, :1])[:, 0]
    torch.testing.assert_close(answer_u.sum(0), centred, atol=1e-3, rtol=1e-4)  # fp32, 70k-dim sums
    heads = [eng.graph.src_index(h) for h in table.heads]
    torch.testing.assert_close(table.per_prompt["direct_effect"], answer_u[heads])
