"""ROME on tiny models of every family: the edited matrix maps the subject's key to the optimised value."""

from __future__ import annotations

import pytest
import torch

from kcircuits.edit.rome import ValueSettings, rome_edit, subject_key, target_value
from kcircuits.edit.stats import capture_keys, key_second_moment, mlp_output
from kcircuits.errors import KcircuitsError
from kcircuits.models import from_hf
from kcircuits.models.edits import edited
from kcircuits.steps import StepCache
from tests.edit_helpers import answer_logprob, statistics_corpus
from tests.model_helpers import tiny_hf

PROMPT, SUBJECT, NEW = "The capital of {} is", "France", "Berlin"


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox", "llama", "qwen2"])
def lm(request, smollm2_tokenizer):
    hf = tiny_hf(request.param, vocab_size=49152)
    return from_hf(hf, smollm2_tokenizer, name=f"tiny-{request.param}")


def test_the_edit_maps_the_key_to_the_value_with_rank_one(lm, tmp_path):
    layer = 0  # an edit at the subject reaches the answer through a later layer's attention
    C = key_second_moment(lm, layer, statistics_corpus(), cache=StepCache(tmp_path))
    before = answer_logprob(lm, PROMPT.format(SUBJECT), NEW)
    # plain likelihood ascent (no KL, no decay): the tiny random models' scales are not GPT-2 XL's
    edit = rome_edit(lm, PROMPT, SUBJECT, NEW, layer, C, settings=ValueSettings(steps=8, lr=0.1, kl_factor=0.0,
                                                                                  weight_decay=0.0))
    (name, delta), = edit.delta.items()
    assert torch.linalg.matrix_rank(delta.double(), rtol=1e-5).item() == 1  # rank one up to float32 rounding
    target = mlp_output(lm, layer)
    pos = len(lm.tokenizer("The capital of France", add_special_tokens=False).input_ids) - 1
    ids = torch.tensor([lm.tokenizer(PROMPT.format(SUBJECT), add_special_tokens=False).input_ids])
    original = dict(lm.hf_model.named_parameters())[name].detach().clone()
    with edited(lm, edit.delta), capture_keys(target) as seen, torch.no_grad():
        lm.hf_model(input_ids=ids)
        after = answer_logprob(lm, PROMPT.format(SUBJECT), NEW)
    assert torch.allclose(seen["keys"][0, pos], edit.key, rtol=1e-5, atol=1e-6)  # earlier layers: same key
    rel = (seen["values"][0, pos] - edit.value).norm() / edit.value.norm()
    assert rel < 1e-5  # W' k* (+ b) = v*
    assert after > before  # the new target became more likely
    assert torch.equal(dict(lm.hf_model.named_parameters())[name], original)  # restored exactly


def test_the_value_optimisation_respects_its_norm_clamp(lm):
    target = mlp_output(lm, 0)
    key = subject_key(lm, target, PROMPT, SUBJECT)
    v0 = key @ target.matrix(lm).T.detach()
    bias = target.bias_vector(lm)
    v0 = v0 + bias.detach() if bias is not None else v0
    value = target_value(lm, target, key, PROMPT, SUBJECT, NEW,
                         settings=ValueSettings(steps=5, lr=10.0, clamp_norm=0.1, weight_decay=0.0))
    assert (value - v0).norm() <= 0.1 * v0.norm() * (1 + 1e-4)


def test_key_statistics_are_cached_by_weights_layer_and_corpus(lm, tmp_path):
    cache = StepCache(tmp_path)
    texts = statistics_corpus()[:40]
    C = key_second_moment(lm, 0, texts, cache=cache)
    assert torch.allclose(C, C.T) and torch.linalg.eigvalsh(C).min() > -1e-9  # a second moment
    assert torch.equal(key_second_moment(lm, 0, texts, cache=cache), C)
    assert not torch.equal(key_second_moment(lm, 0, texts[:20], cache=cache), C)
    assert len(list((tmp_path / "key_second_moment").iterdir())) == 2


def test_bad_requests_are_refused(lm):
    C = torch.eye(mlp_output(lm, 0).matrix(lm).shape[1], dtype=torch.float64)
    with pytest.raises(KcircuitsError, match="out of range"):
        rome_edit(lm, PROMPT, SUBJECT, NEW, 99, C)
    with pytest.raises(KcircuitsError, match="exactly once"):
        rome_edit(lm, "The capital of France is", SUBJECT, NEW, 0, C)
    with pytest.raises(KcircuitsError, match="non-empty"):
        rome_edit(lm, PROMPT, SUBJECT, "  ", 0, C)
    with pytest.raises(KcircuitsError, match="empty"):
        key_second_moment(lm, 0, [])
