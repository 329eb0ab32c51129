"""MEMIT on tiny Llama and GPT-2 models: one fact in one layer is ROME's update, several facts over two
layers reach their residual targets and become more likely, only the chosen matrices change, and
the weights come back bit for bit."""

from __future__ import annotations

import pytest
import torch

from kcircuits.edit.memit import (memit_deltas, residual_target, residual_targets, spread_deltas,
                                  subject_residuals)
from kcircuits.edit.requests import EditRequest
from kcircuits.edit.rome import ValueSettings, rome_edit
from kcircuits.edit.stats import key_second_moment, mlp_output
from kcircuits.edit.updates import rank_one_update
from kcircuits.errors import KcircuitsError
from kcircuits.models import from_hf
from kcircuits.models.edits import edited
from kcircuits.steps import StepCache
from tests.edit_helpers import answer_logprob, statistics_corpus
from tests.model_helpers import tiny_hf

PROMPT = "The capital of {} is"
REQUESTS = [EditRequest(PROMPT, "France", "Berlin"), EditRequest(PROMPT, "Japan", "Rome"),
            EditRequest(PROMPT, "Germany", "Paris")]
#: plain likelihood ascent (no KL, no decay): the tiny random models' scales are not GPT-2 XL's
PLAIN = ValueSettings(steps=4, lr=0.1, kl_factor=0.0, weight_decay=0.0)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, smollm2_tokenizer):
    hf = tiny_hf(request.param, vocab_size=49152)
    return from_hf(hf, smollm2_tokenizer, name=f"tiny-{request.param}")


@pytest.fixture(scope="module")
def C_of(lm, tmp_path_factory):
    """Each layer's key second moment on a small corpus (~700 tokens: more than the tiny MLPs' hidden sizes)."""
    texts = statistics_corpus()
    cache = StepCache(tmp_path_factory.mktemp("memit-stats"))
    return lambda layer: key_second_moment(lm, layer, texts, cache=cache)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def targets(lm):
    """The requests' residual targets at the output of layer 1 (the last layer of every range below)."""
    return torch.stack([residual_target(lm, [1], r, settings=PLAIN) for r in REQUESTS])


def test_one_fact_in_one_layer_is_romes_update(lm, C_of):
    layer, req = 0, REQUESTS[0]
    # ROME's KL term kept; no decay and a clamp that never binds (MEMIT measures both against ‖h‖, ROME ‖v0‖)
    st = ValueSettings(steps=4, lr=0.1, kl_factor=0.0625, weight_decay=0.0, clamp_norm=1e4)
    rome = rome_edit(lm, req.prompt, req.subject, req.target_new, layer, C_of(layer), settings=st)
    (name, rome_delta), = rome.delta.items()
    target = mlp_output(lm, layer)
    W, bias = target.matrix(lm).detach(), target.bias_vector(lm)
    r = rome.value - W @ rome.key - (bias.detach() if bias is not None else 0)  # ROME's v* − v0
    # structurally: with the residual target h + r, one key and λ = 0, MEMIT's update is rank_one_update
    z = subject_residuals(lm, layer, [req]) + r
    spread = spread_deltas(lm, [req], [layer], z, C_of)
    assert set(spread) == {name}
    assert rel(spread[name], target.delta(rank_one_update(W, rome.key, W @ rome.key + r, C_of(layer)))[name]) < 1e-6
    assert rel(spread[name], rome_delta) < 1e-6
    # end to end: δ at the block output adds to the residual stream what δ at the MLP output adds, so
    # MEMIT's own residual target is h + ROME's v* − v0 and the whole edit is ROME's
    assert rel(memit_deltas(lm, [req], [layer], C_of, settings=st)[name], rome_delta) < 1e-5


def test_several_facts_over_two_layers_reach_their_targets(lm, C_of, targets):
    layers = [0, 1]
    before = [answer_logprob(lm, r.prompt_text, r.target_new) for r in REQUESTS]
    called_on = []

    def C_seen(layer):
        called_on.append(lm.fingerprint)
        return C_of(layer)

    deltas = spread_deltas(lm, REQUESTS, layers, targets, C_seen)
    assert called_on == [lm.fingerprint] * 2  # every layer's statistics are the unedited model's
    assert set(deltas) == {mlp_output(lm, layer).weight.param_name for layer in layers}  # only these matrices
    with edited(lm, deltas):
        reached = subject_residuals(lm, layers[-1], REQUESTS)
        after = [answer_logprob(lm, r.prompt_text, r.target_new) for r in REQUESTS]
    assert rel(reached, targets) < 1e-4  # λ = 0: the last layer writes whatever the first left missing
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def test_the_covariance_weight_holds_the_change_back(lm, C_of, targets):
    free = spread_deltas(lm, REQUESTS, [1], targets, C_of)
    held = spread_deltas(lm, REQUESTS, [1], targets, C_of, covariance_weight=10.0)
    (name, d_free), = free.items()
    assert 0 < held[name].norm() < d_free.norm()


def test_targets_optimised_together_are_the_targets_one_by_one(lm, targets):
    """Several requests' residual targets in one forward pass (each its own δ): the same as one by one."""
    assert rel(residual_targets(lm, [1], REQUESTS, settings=PLAIN, batch_size=3), targets) < 1e-4
    prefixes = ("", "Some context first. ")
    alone = torch.stack([residual_target(lm, [0, 1], r, prefixes, PLAIN) for r in REQUESTS])
    assert rel(residual_targets(lm, [0, 1], REQUESTS, prefixes, PLAIN, batch_size=2), alone) < 1e-4
    # the residuals they start from: prompts of different lengths in one padded batch, or one at a time
    mixed = [*REQUESTS, EditRequest("In {}, the capital is", "the United Kingdom", "Oslo")]
    assert torch.allclose(subject_residuals(lm, 1, mixed), subject_residuals(lm, 1, mixed, batch_size=1),
                          rtol=1e-5, atol=1e-6)


def test_bad_requests_layers_and_targets_are_refused(lm, C_of, targets):
    conflict = [EditRequest(PROMPT, "France", "Berlin"), EditRequest(PROMPT, "France", "Rome")]
    with pytest.raises(KcircuitsError, match="conflicting requests"):
        memit_deltas(lm, conflict, [0], C_of)
    for layers, message in (([], "at least one layer"), ([99], "out of range"), ([-1], "out of range"),
                            ([1, 0], "strictly increasing"), ([0, 0], "strictly increasing")):
        with pytest.raises(KcircuitsError, match=message):
            memit_deltas(lm, REQUESTS[:1], layers, C_of)
    with pytest.raises(KcircuitsError, match="one row per request"):
        spread_deltas(lm, REQUESTS[:2], [1], targets, C_of)


def test_weights_are_restored_bit_for_bit(lm, C_of):
    original = {n: p.detach().clone() for n, p in lm.hf_model.named_parameters()}
    deltas = memit_deltas(lm, REQUESTS[:2], [0, 1], C_of, settings=ValueSettings(steps=2, lr=0.1))
    assert all(torch.equal(p, original[n]) for n, p in lm.hf_model.named_parameters())  # computing changes nothing
    with edited(lm, deltas):
        assert not all(torch.equal(p, original[n]) for n, p in lm.hf_model.named_parameters())
    assert all(torch.equal(p, original[n]) for n, p in lm.hf_model.named_parameters())
