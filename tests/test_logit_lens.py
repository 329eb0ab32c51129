"""Logit lens: checked against the model's own prediction and a hand-built model."""

import dataclasses

import torch

from kcircuits.analyze import logit_lens
from kcircuits.batching import make_batch
from kcircuits.engine import Engine
from kcircuits.graph import Circuit
from kcircuits.metrics import answer_rank
from kcircuits.models import from_hf
from tests.model_helpers import tiny_model
from tests.helpers import Pair, blank_gpt2, random_batch


def test_last_layer_equals_model_prediction_and_shapes():
    for family in ("gpt2", "llama", "gpt_neox"):
        eng = Engine(tiny_model(family).weights)
        batch = random_batch(3)
        lens = logit_lens(eng, batch, top_k=5)
        with torch.no_grad():
            logits = eng.run(eng.embed(batch.clean), batch.target_pos).logits
        assert torch.equal(lens.layer_rank[:, -1], answer_rank(logits, batch).cpu())
        probs = torch.softmax(logits[:, 0].float(), -1).gather(-1, batch.target_ids[:, :1])[:, 0]
        assert torch.allclose(lens.layer_prob[:, -1], probs, atol=1e-5)
        g = eng.graph
        assert lens.node_rank.shape == (3, g.n_src) and lens.layer_rank.shape == (3, g.n_layers + 1)
        assert lens.node_top.shape == (3, g.n_src, 5)


def test_copying_head_is_found_by_node_lens():
    """A hand-built 1-layer model whose MLP is off and whose single head copies the subject token:
    the node lens must rank the subject first for the head, and not for the input at the last position."""
    V, d = 16, 16
    hf = blank_gpt2(1, 1, d, V)
    with torch.no_grad():
        tr = hf.transformer
        # Conv1D columns: [q | k | v]. Key dim 0 is large only on token 1 (the "subject"); every query
        # has dim 0 = 1 (bias), so every position attends to the subject; the value copies the token.
        W = torch.zeros(d, 3 * d)
        W[1, d + 0] = 10.0
        W[:, 2 * d : 3 * d] = torch.eye(d)
        tr.h[0].attn.c_attn.weight.copy_(W)
        tr.h[0].attn.c_attn.bias.zero_()
        tr.h[0].attn.c_attn.bias[0] = 1.0
        tr.h[0].attn.c_proj.weight.copy_(torch.eye(d) * 4)
    eng = Engine(from_hf(hf).weights)
    # prompt: [5, 1, 7, 9]; token 1 is the "subject", the answer is 1 (what the head copies)
    batch = make_batch([Pair([5, 1, 7, 9], [5, 2, 7, 9], [1], [2])], pad_id=0)
    lens = logit_lens(eng, batch)
    head = eng.graph.src_index("a0.h0")
    assert lens.node_rank[0, head] == 1  # the head's output alone predicts the subject token
    assert lens.node_rank[0, 0] > 1  # the input at the last position (token 9) does not
    assert lens.first_layer_at_rank(1)[0] == 1  # the answer appears after layer 0 (index 1), not before


def test_circuit_lens_full_circuit_equals_clean_and_empty_equals_corrupt():
    eng = Engine(tiny_model("llama").weights)
    batch = random_batch(2)
    g = eng.graph
    with torch.no_grad():
        corrupt = eng.run(eng.embed(batch.corrupt), batch.target_pos, record=True).acts
    clean = logit_lens(eng, batch)
    full = logit_lens(eng, batch, circuit=Circuit(g, g.edge_exists()), ablated=corrupt)
    assert torch.equal(full.node_rank, clean.node_rank) and torch.equal(full.layer_rank, clean.layer_rank)
    empty = logit_lens(eng, batch, circuit=Circuit(g, torch.zeros_like(g.edge_exists())), ablated=corrupt)
    corrupt_batch = dataclasses.replace(batch, clean=batch.corrupt)
    assert torch.equal(empty.layer_rank[:, -1], logit_lens(eng, corrupt_batch).layer_rank[:, -1])


def test_layer_trace_without_node_lens_is_the_same():
    eng = Engine(tiny_model("gpt2").weights)
    batch = random_batch(3)
    full, layers_only = logit_lens(eng, batch), logit_lens(eng, batch, nodes=False)
    assert torch.equal(full.layer_rank, layers_only.layer_rank) and torch.equal(full.layer_prob, layers_only.layer_prob)
    assert layers_only.node_rank.shape == (3, 0)
