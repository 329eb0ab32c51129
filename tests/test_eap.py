"""EAP scores equal the derivative of the metric with respect to each edge's mask at mask = 1."""

import dataclasses

import pytest
import torch

from kcircuits.ablation import ablated_acts, mean_activations
from kcircuits.discover.eap import attribute
from kcircuits.engine import Engine
from kcircuits.graph import Graph
from kcircuits.metrics import get_metric
from tests.model_helpers import tiny_model
from tests.helpers import random_batch, random_pairs
from kcircuits.batching import make_batch


def mask_gradient(eng, batches, metric, ablation="corrupt", mean=None):
    """d(mean metric)/d(mask) at mask = 1 by autograd through the patched forward."""
    g = eng.graph
    mask = torch.ones(g.n_src, g.n_dst, requires_grad=True)
    n = sum(len(b) for b in batches)
    total = 0
    for batch in batches:
        abl = ablated_acts(eng, batch, ablation, mean)
        out = eng.run(eng.embed(batch.clean), batch.target_pos, mask=mask, ablated=abl)
        total = total + get_metric(metric)(out.logits, batch).sum() / n
    (grad,) = torch.autograd.grad(total, mask)
    return grad * g.edge_exists()


@pytest.mark.parametrize("family,grouped", [("gpt2", True), ("gpt_neox", True), ("gpt_neox_seq", True),
                                            ("llama", True), ("llama", False), ("qwen2", True)])
@pytest.mark.parametrize("metric", ["logit_diff", "logprob", "prob"])
def test_eap_equals_mask_derivative(family, grouped, metric):
    model = tiny_model(family)
    eng = Engine(model.weights, Graph.from_model(model.weights, grouped=grouped))
    batches = [random_batch(3, seed=0), random_batch(2, seed=1)]
    scores = attribute(eng, batches, method="eap", metric=metric, progress=False)
    ref = mask_gradient(eng, batches, metric)
    scale = ref.abs().max()
    assert scale > 1e-6  # the test is not vacuous
    # relative to the largest score: float32 sums over positions and d_model
    assert (scores - ref).abs().max() <= 1e-4 * scale, (scores - ref).abs().max() / scale


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_eap_other_ablations_equal_mask_derivative(ablation):
    model = tiny_model("llama")
    eng = Engine(model.weights)
    batches = [random_batch(3)]
    mean = mean_activations(eng, batches) if ablation == "mean" else None
    scores = attribute(eng, batches, method="eap", ablation=ablation, mean=mean, progress=False)
    ref = mask_gradient(eng, batches, "logit_diff", ablation, mean)
    assert torch.allclose(scores, ref, atol=1e-5, rtol=1e-3)


def test_full_answer_scoring_equals_mask_derivative():
    model = tiny_model("gpt2")
    eng = Engine(model.weights)
    batch = make_batch(random_pairs(3, answer_len=3), pad_id=0, answer_scoring="full")
    assert batch.target_ids.shape[1] == 3
    scores = attribute(eng, [batch], method="eap", metric="logprob", progress=False)
    assert torch.allclose(scores, mask_gradient(eng, [batch], "logprob"), atol=1e-5, rtol=1e-3)


def test_eap_ig_one_step_is_eap_and_steps_integrate():
    model = tiny_model("llama")
    eng = Engine(model.weights)
    batches = [random_batch(4)]
    eap = attribute(eng, batches, method="eap", progress=False)
    assert torch.allclose(attribute(eng, batches, method="eap-ig", steps=1, progress=False), eap, atol=1e-6)
    # EAP-IG with many steps on the *input* edges approximates the true effect of patching the input
    # everywhere at once: summed over the input's edges, the scores approach m(clean) - m(input patched).
    ig = attribute(eng, batches, method="eap-ig", steps=64, progress=False)
    batch = batches[0]
    with torch.no_grad():
        full = get_metric("logit_diff")(eng.run(eng.embed(batch.clean), batch.target_pos).logits, batch).mean()
        corrupt = get_metric("logit_diff")(eng.run(eng.embed(batch.corrupt), batch.target_pos).logits, batch).mean()
    total_effect = float(full - corrupt)
    # completeness of integrated gradients along the input path (Riemann sum, 64 steps)
    assert abs(float(ig[0].sum()) - total_effect) < 0.05 * abs(total_effect) + 1e-3
    assert abs(float(ig[0].sum()) - total_effect) < abs(float(eap[0].sum()) - total_effect) + 1e-6


def test_clean_corrupted_averages_two_gradients():
    """clean-corrupted = (a_clean - a_corr) · (∂m/∂x_v at the clean input + ∂m/∂x_v at the corrupted input) / 2.

    The first half is EAP, the mask derivative at mask = 1. The second is minus the mask derivative of
    the swapped batch (clean and corrupt prompts exchanged, same answers): there the patched forward
    runs on the corrupted prompt and patches towards the clean one, so its derivative is
    (a_corr - a_clean) · ∂m/∂x_v at the corrupted input. Both references use autograd through the
    patched forward, not the attribution code."""
    model = tiny_model("gpt2")
    eng = Engine(model.weights)
    batch = random_batch(3)
    swapped = dataclasses.replace(batch, clean=batch.corrupt, corrupt=batch.clean)
    at_clean = mask_gradient(eng, [batch], "logit_diff")
    at_corrupt = -mask_gradient(eng, [swapped], "logit_diff")
    both = attribute(eng, [batch], method="clean-corrupted", progress=False)
    ref = (at_clean + at_corrupt) / 2
    scale = ref.abs().max()
    assert scale > 1e-6
    # the corrupted-input gradient really differs, so the average is not EAP under another name
    assert (at_clean - at_corrupt).abs().max() > 0.1 * scale
    # relative to the largest score, as for EAP: float32 sums over positions and d_model
    assert (both - ref).abs().max() <= 1e-4 * scale, (both - ref).abs().max() / scale
    # and each half is what plain EAP computes on the batch and on the swapped batch
    eap = attribute(eng, [batch], method="eap", progress=False)
    eap_swapped = attribute(eng, [swapped], method="eap", progress=False)
    assert torch.allclose(both, (eap - eap_swapped) / 2, atol=1e-6 * float(scale), rtol=1e-5)


def test_memory_budget_splits_batches_without_changing_scores():
    model = tiny_model("gpt2")
    eng = Engine(model.weights)
    batches = [random_batch(5)]
    whole = attribute(eng, batches, method="eap-ig", steps=2, progress=False)
    sizes = []
    run = eng.run
    eng.run = lambda embeds, *a, **k: sizes.append(embeds.shape[0]) or run(embeds, *a, **k)
    tiny_budget = attribute(eng, batches, method="eap-ig", steps=2, progress=False, max_buffer_gb=1e-9)
    assert set(sizes) == {1} and len(sizes) == 5 * (2 + 2)  # one prompt per pass: 2 caching runs + 2 steps each
    assert torch.allclose(whole, tiny_budget, atol=1e-6)
