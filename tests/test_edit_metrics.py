"""Edit metrics (issue 14, item 4), checked against hand computations on a tiny llama with SmolLM2's tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from kcircuits.edit.metrics import (
    COMPARED_METRICS,
    REQUEST_METRICS,
    compare_metrics,
    edit_metrics,
    generate_greedy,
    log_perplexity,
    ngram_entropy,
    score_targets,
    target_logprob,
)
from kcircuits.edit.requests import EditRequest
from kcircuits.errors import KcircuitsError
from tests.model_helpers import tiny_hf

PROMPTS = ["The capital of France is", "Paris is the capital city of the country called", "Rome is in"]
TARGETS = ["Buenos Aires", "France", "Italy"]


@pytest.fixture(scope="module")
def model():
    return tiny_hf("llama", vocab_size=49152, num_hidden_layers=2)


def manual_logprob(model, tok, prompt: str, target: str) -> float:
    """sum_j log softmax(logits)[target_j] from one unpadded forward of prompt + target."""
    prompt_ids = tok(prompt).input_ids
    full = tok(prompt + " " + target).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
    return sum(float(logp[t - 1, full[t]]) for t in range(len(prompt_ids), len(full)))


def request(new="Berlin", true="Paris", **kw) -> EditRequest:
    return EditRequest("The capital of {} is", "France", new, true,
                       paraphrase_prompts=("The capital city of France is", "France's capital is"),
                       neighborhood_prompts=(("The capital of Italy is", "Rome"),
                                             ("The capital of Spain is", "Madrid")),
                       generation_prompts=("France is",), case_id=kw.pop("case_id", 0), **kw)


def test_target_logprob_sums_every_target_token(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt, target = PROMPTS[0], TARGETS[0]
    n_target = len(tok(prompt + " " + target).input_ids) - len(tok(prompt).input_ids)
    assert n_target == 2  # a multi-token target: both tokens are teacher-forced and summed
    got = target_logprob(model, tok, [prompt], [target])
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(manual_logprob(model, tok, prompt, target), abs=1e-5)
    first_only = manual_logprob(model, tok, prompt, "Buenos")
    assert abs(float(got[0]) - first_only) > 1e-3  # not just the first token


def test_batching_and_padding_side_do_not_change_scores(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    batched = score_targets(model, tok, PROMPTS, TARGETS, batch_size=3)
    singles = [score_targets(model, tok, [p], [t]) for p, t in zip(PROMPTS, TARGETS, strict=True)]
    assert torch.allclose(batched.logprob, torch.cat([s.logprob for s in singles]), atol=1e-5)
    assert torch.equal(batched.top1, torch.cat([s.top1 for s in singles]))
    manual = torch.tensor([manual_logprob(model, tok, p, t) for p, t in zip(PROMPTS, TARGETS, strict=True)])
    assert torch.allclose(batched.logprob, manual, atol=1e-5)
    side = tok.padding_side
    try:
        tok.padding_side = "left"
        assert torch.allclose(target_logprob(model, tok, PROMPTS, TARGETS, batch_size=2), manual, atol=1e-5)
    finally:
        tok.padding_side = side
    # token accuracy and top-1 are what the logits say
    ids = tok(PROMPTS[2]).input_ids
    with torch.no_grad():
        top = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    assert int(batched.top1[2]) == top
    assert batched.n_tokens.tolist()[0] == 2 and 0 <= float(batched.token_accuracy.min())


def test_efficacy_flips_when_targets_swap(model, smollm2_tokenizer):
    a = edit_metrics(model, smollm2_tokenizer, [request("Berlin", "Paris")], generation_tokens=0)["per_request"][0]
    b = edit_metrics(model, smollm2_tokenizer, [request("Paris", "Berlin")], generation_tokens=0)["per_request"][0]
    assert a["logprob_new"] == pytest.approx(b["logprob_true"]) and a["logprob_true"] == pytest.approx(b["logprob_new"])
    assert a["efficacy_success"] + b["efficacy_success"] == 1.0
    assert a["efficacy_margin"] == pytest.approx(-b["efficacy_margin"])
    assert a["efficacy_success"] == float(a["efficacy_margin"] > 0)
    assert a["generalisation_success"] + b["generalisation_success"] == pytest.approx(1.0)
    assert a["generalisation_margin"] == pytest.approx(-b["generalisation_margin"])


def test_metrics_match_hand_computed_scores(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    reqs = [request(), request("Lima", "Paris", case_id=1, relation="other", other_prompts=(("Grass is", "green"),))]
    res = edit_metrics(model, tok, reqs, generation_tokens=0)
    r = res["per_request"][0]
    lp = lambda p, t: manual_logprob(model, tok, p, t)  # noqa: E731
    assert r["logprob_new"] == pytest.approx(lp(PROMPTS[0], "Berlin"), abs=1e-5)
    assert r["efficacy_margin"] == pytest.approx(math.exp(lp(PROMPTS[0], "Berlin")) - math.exp(lp(PROMPTS[0], "Paris")),
                                                 abs=1e-9)
    para = [float(lp(p, "Berlin") > lp(p, "Paris")) for p in reqs[0].paraphrase_prompts]
    assert r["generalisation_success"] == pytest.approx(sum(para) / 2)
    neigh = [float(lp(p, a) > lp(p, "Berlin")) for p, a in reqs[0].neighborhood_prompts]
    assert r["specificity_success"] == pytest.approx(sum(neigh) / 2)
    assert r["neighbourhood_logprob"] == pytest.approx([lp(p, a) for p, a in reqs[0].neighborhood_prompts], abs=1e-5)
    assert math.isnan(r["other_specificity_success"]) and math.isnan(r["fluency"]) and r["generations"] == []
    other = res["per_request"][1]
    assert other["other_specificity_success"] == float(lp("Grass is", "green") > lp("Grass is", "Lima"))
    summ = res["summary"]
    assert set(summ) == set(REQUEST_METRICS) and res["n_requests"] == 2 and res["log_perplexity"] is None
    assert summ["efficacy_margin"]["mean"] == pytest.approx((r["efficacy_margin"] + other["efficacy_margin"]) / 2)
    assert summ["other_specificity_success"]["n"] == 1 and summ["other_specificity_success"]["n_nan"] == 1


def test_request_without_true_target(model, smollm2_tokenizer):
    req = EditRequest("What university did {} attend?", "Watts Humphrey", "University of Michigan")
    res = edit_metrics(model, smollm2_tokenizer, [req], generation_tokens=0)
    r = res["per_request"][0]
    assert math.isnan(r["efficacy_success"]) and math.isnan(r["logprob_true"])
    assert 0 <= r["efficacy_token_accuracy"] <= 1
    assert res["summary"]["efficacy_success"]["n"] == 0 and res["summary"]["efficacy_success"]["n_nan"] == 1


def test_ngram_entropy_matches_rome_by_hand():
    # "a b a b": bigrams ab x2, ba x1 -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit; (2/3 H2 + 4/3 H3) / 2
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy(["a b a b", "x"]) == pytest.approx(ngram_entropy("a b a b") / 2)  # too short: 0
    repeated = "the cat sat. " * 6
    varied = "the cat sat on the mat while a dog barked at two birds flying over the old red barn"
    assert ngram_entropy(repeated) < ngram_entropy(varied)
    assert math.isnan(ngram_entropy([]))


def test_log_perplexity_is_the_mean_token_nll(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France."]
    losses, counts = [], []
    for text in texts:
        ids = torch.tensor([tok(text).input_ids])
        with torch.no_grad():
            losses.append(float(model(ids, labels=ids).loss))  # HF's own mean NLL over the shifted tokens
        counts.append(ids.shape[1] - 1)
    nll = sum(loss * c for loss, c in zip(losses, counts, strict=True))
    count = sum(counts)
    assert log_perplexity(model, tok, texts[:1]) == pytest.approx(losses[0], abs=1e-5)
    assert log_perplexity(model, tok, texts, batch_size=2) == pytest.approx(nll / count, abs=1e-5)
    assert log_perplexity(model, tok, texts, batch_size=1) == pytest.approx(nll / count, abs=1e-5)
    with pytest.raises(KcircuitsError):
        log_perplexity(model, tok, [""])


def test_generation_is_greedy_fixed_length_and_batch_independent(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompts = ["The capital of France is", "Hello"]
    n = 4
    expected = []
    for prompt in prompts:
        ids = tok(prompt).input_ids
        for _ in range(n):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]
            logits[tok.eos_token_id] = -math.inf  # a fixed number of tokens: EOS is never chosen
            ids.append(int(logits.argmax()))
        expected.append(tok.decode(ids[-n:], skip_special_tokens=True))
    assert generate_greedy(model, tok, prompts, max_new_tokens=n, batch_size=2) == expected
    assert [generate_greedy(model, tok, [p], max_new_tokens=n)[0] for p in prompts] == expected
    with pytest.raises(KcircuitsError):
        generate_greedy(model, tok, prompts, max_new_tokens=500)  # beyond the tiny model's 64 positions


def test_edit_metrics_never_modify_the_model(model, smollm2_tokenizer):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        res = edit_metrics(model, smollm2_tokenizer, [request()], generation_tokens=3, perplexity_texts=["Hi there."])
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    r = res["per_request"][0]
    assert len(r["generations"]) == 1
    assert r["fluency"] == pytest.approx(ngram_entropy("France is" + r["generations"][0]))
    assert res["log_perplexity"] == pytest.approx(log_perplexity(model, smollm2_tokenizer, ["Hi there."]))


def fake_result(top1, logprob, margin, lpp) -> dict:
    row = {k: 0.0 for k in REQUEST_METRICS}
    row.update(case_id=0, subject="France", relation="", target_new="Berlin", efficacy_margin=margin,
               neighbourhood_top1=top1, neighbourhood_logprob=logprob, other_top1=[], other_logprob=[])
    return {"per_request": [row], "log_perplexity": lpp}


def test_compare_metrics_derives_changes():
    before = fake_result([5, 6, 7], [-1.0, -2.0, -3.0], -0.25, 2.0)
    after = fake_result([5, 9, 7], [-1.5, -2.0, -4.0], 0.5, 2.5)
    cmp = compare_metrics(before, after)
    row = cmp["per_request"][0]
    assert row["neighbourhood_top1_unchanged"] == pytest.approx(2 / 3)
    assert row["neighbourhood_logprob_change"] == pytest.approx(-0.5)
    assert row["efficacy_margin_change"] == pytest.approx(0.75)
    assert math.isnan(row["other_top1_unchanged"])
    assert cmp["log_perplexity_change"] == pytest.approx(0.5) and set(cmp["summary"]) == set(COMPARED_METRICS)
    assert compare_metrics(before, {**after, "log_perplexity": None})["log_perplexity_change"] is None
    other = fake_result([5, 6, 7], [-1.0, -2.0, -3.0], 0.0, 2.0)
    other["per_request"][0]["subject"] = "Spain"
    with pytest.raises(KcircuitsError, match="same requests"):
        compare_metrics(before, other)


def test_compare_metrics_of_one_model_is_no_change(model, smollm2_tokenizer):
    res = edit_metrics(model, smollm2_tokenizer, [request()], generation_tokens=2)
    cmp = compare_metrics(res, res)["per_request"][0]
    assert cmp["neighbourhood_top1_unchanged"] == 1.0 and cmp["efficacy_margin_change"] == 0.0
    assert cmp["fluency_change"] == 0.0 and cmp["neighbourhood_logprob_change"] == 0.0
