"""FT-L and FT-M on tiny models: FT-L's L∞ bound holds, FT-M stops when the target is already the answer,
only the chosen layers change, and the model is left bit for bit as it was."""

from __future__ import annotations

import pytest
import torch

from kcircuits.data import answer_token_ids, load_dataset
from kcircuits.edit.finetune import FinetuneSettings, finetune_deltas, ft_l, ft_m
from kcircuits.edit.requests import EditRequest
from kcircuits.edit.stats import mlp_output
from kcircuits.errors import KcircuitsError
from kcircuits.models import from_hf
from kcircuits.models.edits import edited
from tests.model_helpers import tiny_hf

REQUESTS = [EditRequest("The capital of {} is", "France", "Berlin"),
            EditRequest("{} is located in the continent of", "Brazil", "Buenos Aires")]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, smollm2_tokenizer):
    # initializer_range 0.1 (not 0.02): logits spread enough that a target can become the top-1 answer,
    # and both families' greedy continuations include words read back as " " + target
    hf = tiny_hf(request.param, vocab_size=49152, initializer_range=0.1)
    return from_hf(hf, smollm2_tokenizer, name=f"tiny-{request.param}")


def token_logprobs(lm, text: str, target: str) -> torch.Tensor:
    """Teacher-forced ``log p(y_j | x, y_<j)`` of the target's tokens after ``text`` (computed independently)."""
    prompt = lm.tokenizer(text, add_special_tokens=False).input_ids
    tgt = answer_token_ids(lm.tokenizer, text, target)
    with torch.no_grad():
        logp = torch.log_softmax(lm.hf_model(input_ids=torch.tensor([prompt + tgt])).logits[0].float(), -1)
    return torch.stack([logp[len(prompt) + j - 1, t] for j, t in enumerate(tgt)])


def masked_nll(lm, requests) -> float:
    """Mean over requests of the target's mean token NLL (FT-M's loss)."""
    return sum(-token_logprobs(lm, r.prompt_text, r.target_new).mean().item() for r in requests) / len(requests)


def snapshot(lm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.hf_model.named_parameters()}


def test_ft_l_never_exceeds_its_bound_and_raises_the_target(lm):
    bound = 1e-2  # Adam's first steps are ~lr = 0.1 per entry: the clamp is what limits the change
    settings = FinetuneSettings(layers=(2,), steps=5, lr=0.1, bound=bound)
    before = [token_logprobs(lm, r.prompt_text, r.target_new)[0].item() for r in REQUESTS]
    deltas = ft_l(lm, REQUESTS, settings)
    (delta,) = deltas.values()
    assert delta.abs().max().item() <= bound + 1e-7
    assert delta.abs().max().item() == pytest.approx(bound)  # the bound is reached, so it was enforced
    with edited(lm, deltas):
        after = [token_logprobs(lm, r.prompt_text, r.target_new)[0].item() for r in REQUESTS]
    assert all(a > b for a, b in zip(after, before, strict=True))  # FT-L's loss: the first token at the prompt's end


def test_ft_m_lowers_the_masked_target_nll(lm):
    before = masked_nll(lm, REQUESTS)
    deltas = ft_m(lm, REQUESTS, FinetuneSettings(layers=(1,), steps=5, lr=1e-2), batch_size=1)
    with edited(lm, deltas):
        assert masked_nll(lm, REQUESTS) < before


def test_ft_m_changes_nothing_once_its_edit_made_the_target_the_answer(lm):
    # first make the target the model's greedy answer (every token, teacher-forced) with FT-M itself
    requests = REQUESTS[1:]  # " Buenos Aires": two tokens
    first = ft_m(lm, requests, FinetuneSettings(layers=(1, 2), steps=30, lr=0.03, loss_margin=0.3))
    with edited(lm, first):
        for r in requests:
            prompt = lm.tokenizer(r.prompt_text, add_special_tokens=False).input_ids
            tgt = answer_token_ids(lm.tokenizer, r.prompt_text, r.target_new)
            with torch.no_grad():
                greedy = lm.hf_model(input_ids=torch.tensor([prompt + tgt])).logits[0, len(prompt) - 1:-1].argmax(-1)
            assert greedy.tolist() == tgt
        again = ft_m(lm, requests, FinetuneSettings(layers=(1, 2), steps=5, lr=1e-2, loss_margin=0.0))
    assert set(again) == set(first)
    assert all(torch.count_nonzero(d) == 0 for d in again.values())


def greedy_request(lm, n_tokens: int = 2) -> EditRequest | None:
    """A country_capital request whose new target is the model's own greedy continuation (``n_tokens``
    tokens that read back as ``" " + target``), or None if no prompt gives one."""
    ds = load_dataset("country_capital")
    for s in ds.samples:
        text = ds.prompt_templates[0].format(s["subject"])
        ids = lm.tokenizer(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            for _ in range(n_tokens):
                ids = ids + [int(lm.hf_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
        words = lm.tokenizer.decode(ids[-n_tokens:])
        if words.startswith(" ") and answer_token_ids(lm.tokenizer, text, words.strip()) == ids[-n_tokens:]:
            return EditRequest(ds.prompt_templates[0], s["subject"], words.strip())
    return None


def test_ft_m_changes_nothing_for_the_models_own_greedy_answer(lm):
    req = greedy_request(lm)
    assert req is not None
    deltas = ft_m(lm, [req], FinetuneSettings(layers=(0, 2), steps=5, lr=1e-2, loss_margin=0.0))
    assert all(torch.count_nonzero(d) == 0 for d in deltas.values())
    moved = ft_m(lm, [req], FinetuneSettings(layers=(0, 2), steps=5, lr=1e-2))  # no margin: it trains anyway
    assert any(torch.count_nonzero(d) > 0 for d in moved.values())


@pytest.mark.parametrize("masked", [False, True])
def test_only_the_chosen_layers_change_and_the_model_is_left_as_it_was(lm, masked):
    original = snapshot(lm)
    flags = {n: p.requires_grad for n, p in lm.hf_model.named_parameters()}
    fingerprint = lm.fingerprint
    deltas = finetune_deltas(lm, REQUESTS, FinetuneSettings(layers=(0, 2), steps=3, lr=1e-2, bound=0.5),
                             masked=masked, batch_size=1)
    params = dict(lm.hf_model.named_parameters())
    # the model is bit-identical, with the same flags, no gradients and the same fingerprint
    assert all(torch.equal(params[n], p) for n, p in original.items())
    assert {n: p.requires_grad for n, p in params.items()} == flags
    assert all(p.grad is None for p in params.values())
    assert lm.fingerprint == fingerprint
    # only layers 0 and 2's output matrices, in their stored shape (GPT-2's Conv1D: transposed)
    chosen = {mlp_output(lm, layer).weight.param_name for layer in (0, 2)}
    assert set(deltas) == chosen
    assert all(d.shape == params[n].shape and torch.count_nonzero(d) > 0 for n, d in deltas.items())
    with edited(lm, deltas):
        changed = {n for n, p in lm.hf_model.named_parameters() if not torch.equal(p, original[n])}
    assert changed == chosen


def test_bad_layers_requests_and_settings_are_one_line_errors(lm):
    cases = [
        (lambda: ft_m(lm, REQUESTS, FinetuneSettings(layers=(99,))), "out of range"),
        (lambda: FinetuneSettings(layers=()), "layers is empty"),
        (lambda: FinetuneSettings(layers=(-1,)), "must be >= 0"),
        (lambda: FinetuneSettings(layers="0"), "list of layer indices"),
        (lambda: ft_m(lm, [], FinetuneSettings()), "no edit requests"),
        (lambda: ft_l(lm, REQUESTS, FinetuneSettings(bound=None)), "L∞ bound"),
        (lambda: FinetuneSettings(bound=0), "bound must be > 0"),
        (lambda: FinetuneSettings(lr=float("nan")), "finite"),
        (lambda: FinetuneSettings(loss="max"), "unknown fine-tuning loss"),
        (lambda: FinetuneSettings(loss_margin=-1), "loss_margin must be >= 0"),
        (lambda: ft_m(lm, REQUESTS, FinetuneSettings(), batch_size=0), "batch_size must be >= 1"),
    ]
    for call, message in cases:
        with pytest.raises(KcircuitsError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_the_batch_size_changes_rounding_not_results(lm):
    settings = FinetuneSettings(layers=(1,), steps=3, lr=1e-2, loss="sum")
    one_by_one = ft_m(lm, REQUESTS, settings, batch_size=1)
    together = ft_m(lm, REQUESTS, settings, batch_size=2)
    assert all(torch.allclose(one_by_one[n], together[n], atol=1e-5) for n in together)
