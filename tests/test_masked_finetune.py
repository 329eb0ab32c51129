"""Fine-tuning inside vs outside a circuit on tiny models: nothing outside the allowed entries ever changes
(weight circuit, complement, all weights, edge circuit and rest; four families), one MLP output matrix
reproduces FT-M, the curve starts at the unedited model's metrics, and the old-fact check nests the circuit
inside the edit."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kcircuits.data import answer_token_ids
from kcircuits.edit import masked_finetune as mf
from kcircuits.edit.finetune import FinetuneSettings, ft_m
from kcircuits.edit.masked_finetune import (CURVE_METRICS, MaskedFinetuneSettings, edge_component_masks,
                                            inside_outside, masked_finetune, old_fact_scores)
from kcircuits.edit.metrics import edit_metrics
from kcircuits.edit.requests import EditRequest
from kcircuits.edit.stats import mlp_output
from kcircuits.errors import KcircuitsError
from kcircuits.models import from_hf
from kcircuits.models.edits import edited
from kcircuits.models.masking import complement, masked
from kcircuits.steps import StepCache
from tests.model_helpers import crash_on_call, tiny_hf

REQUESTS = [
    EditRequest("The capital of {} is", "France", "Berlin", "Paris",
                paraphrase_prompts=("France's capital city is",),
                neighborhood_prompts=(("The capital of Spain is", "Madrid"),)),
    EditRequest("{} is located in the continent of", "Brazil", "Buenos Aires", "South America",
                paraphrase_prompts=("Brazil is a country in",),
                neighborhood_prompts=(("Chile is located in the continent of", "South America"),)),
]
QUICK = MaskedFinetuneSettings(steps=2, lr=1e-2, eval_every=2)


@pytest.fixture(scope="module")
def models(smollm2_tokenizer):
    """Tiny random models with SmolLM2's vocabulary (so the requests tokenise), built once per family."""
    built = {}

    def get(family: str):
        if family not in built:
            hf = tiny_hf(family, vocab_size=49152, initializer_range=0.1)
            built[family] = from_hf(hf, smollm2_tokenizer, name=f"tiny-{family}")
        return built[family]

    return get


def params_of(lm) -> dict[str, torch.Tensor]:
    return dict(lm.hf_model.named_parameters())


def random_mask(lm, share: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    """An entry-level weight circuit over every parameter (as Ge et al.'s masks are)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) < share for n, p in params_of(lm).items()}


def all_weights(lm) -> dict[str, torch.Tensor]:
    return {n: torch.ones(p.shape, dtype=torch.bool) for n, p in params_of(lm).items()}


def one_matrix(lm, layer: int) -> dict[str, torch.Tensor]:
    name = mlp_output(lm, layer).weight.param_name
    return {name: torch.ones(params_of(lm)[name].shape, dtype=torch.bool)}


def true_target_logprob(lm, text: str, target: str) -> float:
    """log P(" " + target | text) from one plain forward pass (no kcircuits code in between)."""
    prompt = lm.tokenizer(text, add_special_tokens=False).input_ids
    tgt = answer_token_ids(lm.tokenizer, text, target)
    with torch.no_grad():
        logp = torch.log_softmax(lm.hf_model(input_ids=torch.tensor([prompt + tgt])).logits[0].float(), -1)
    return float(sum(logp[len(prompt) + j - 1, t] for j, t in enumerate(tgt)))


def ft_m_loss(lm, requests) -> float:
    """FT-M's objective computed directly: mean over requests of the new target's mean token NLL."""
    nlls = []
    for r in requests:
        n = len(answer_token_ids(lm.tokenizer, r.prompt_text, r.target_new))
        nlls.append(-true_target_logprob(lm, r.prompt_text, r.target_new) / n)
    return sum(nlls) / len(nlls)


def variants(lm) -> dict[str, dict[str, torch.Tensor]]:
    circuit = random_mask(lm)
    edge = edge_component_masks(lm.layout, ["a0.h1", "a1.h0", "m1", "input"])
    return {"circuit": circuit, "complement": complement(circuit), "all": all_weights(lm), **edge}


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen2"])
def test_nothing_outside_the_allowed_entries_changes(models, family):
    lm = models(family)
    original = {n: p.detach().clone() for n, p in params_of(lm).items()}
    flags = {n: p.requires_grad for n, p in params_of(lm).items()}
    fingerprint = lm.fingerprint
    for name, allowed in variants(lm).items():
        result = masked_finetune(lm, REQUESTS, allowed, QUICK)
        # the model itself is bit-identical, with its flags, no gradients and its fingerprint
        assert all(torch.equal(p, original[n]) for n, p in params_of(lm).items()), name
        assert {n: p.requires_grad for n, p in params_of(lm).items()} == flags
        assert all(p.grad is None for p in params_of(lm).values())
        assert lm.fingerprint == fingerprint
        # one delta per parameter with an allowed entry, exactly zero outside, and something trained inside
        assert set(result.deltas) == {n for n, m in allowed.items() if m.any()}, name
        assert result.n_trainable == sum(int(m.sum()) for m in allowed.values())
        assert all(torch.count_nonzero(d[~allowed[n]]) == 0 for n, d in result.deltas.items()), name
        assert any(torch.count_nonzero(d) > 0 for d in result.deltas.values()), name
        with edited(lm, result.deltas):
            after = params_of(lm)
            for n, before in original.items():
                keep = ~allowed[n] if n in allowed else torch.ones_like(before, dtype=torch.bool)
                assert torch.equal(after[n][keep], before[keep]), (name, n)
            assert any(not torch.equal(after[n], original[n]) for n in result.deltas), name
        assert all(torch.equal(p, original[n]) for n, p in params_of(lm).items())


@pytest.mark.parametrize(("family", "loss", "batch_size"), [("gpt2", "sum", 1), ("llama", "mean", 16)])
def test_one_mlp_output_matrix_is_ft_m(models, family, loss, batch_size):
    lm = models(family)
    steps, lr = 5, 1e-2
    ours = masked_finetune(lm, REQUESTS, one_matrix(lm, 1),
                           MaskedFinetuneSettings(steps=steps, lr=lr, loss=loss, batch_size=batch_size,
                                                  eval_every=steps))
    theirs = ft_m(lm, REQUESTS, FinetuneSettings(layers=(1,), steps=steps, lr=lr, loss=loss), batch_size=batch_size)
    assert set(ours.deltas) == set(theirs)  # GPT-2's Conv1D: both in the stored (transposed) orientation
    for name, delta in theirs.items():
        assert delta.abs().max() > 3 * lr  # several Adam steps of ~lr each, all of them matched below
        torch.testing.assert_close(ours.deltas[name], delta, atol=1e-5, rtol=1e-4)


def test_the_curve_starts_at_the_unedited_models_metrics(models):
    lm = models("llama")
    result = masked_finetune(lm, REQUESTS, all_weights(lm), MaskedFinetuneSettings(steps=3, lr=1e-2, eval_every=2))
    reference = edit_metrics(lm.hf_model, lm.tokenizer, REQUESTS, generation_tokens=0)["summary"]
    first = result.curve[0]
    assert first["step"] == 0
    for key in CURVE_METRICS:
        assert first[key] == pytest.approx(reference[key]["mean"], rel=1e-6, abs=1e-12, nan_ok=True), key
    assert first["loss"] == pytest.approx(ft_m_loss(lm, REQUESTS), rel=1e-4)
    assert [p["step"] for p in result.curve] == [0, 2, 3]  # every eval_every steps, and the last
    json.dumps(result.to_dict())  # JSON-ready as it is


def test_training_lowers_the_loss_and_raises_efficacy(models):
    lm = models("gpt2")
    result = masked_finetune(lm, REQUESTS, all_weights(lm), MaskedFinetuneSettings(steps=10, lr=1e-2, eval_every=5))
    first, last = result.curve[0], result.curve[-1]
    assert last["step"] == 10
    assert last["loss"] < 0.8 * first["loss"]
    assert last["efficacy_margin"] > first["efficacy_margin"]
    with edited(lm, result.deltas):  # the curve's last point is the returned deltas' model
        assert last["loss"] == pytest.approx(ft_m_loss(lm, REQUESTS), rel=1e-4)


class Drift(torch.optim.Optimizer):
    """An optimiser that moves every entry by +1 per step whatever its gradient, and records the gradients:
    only the explicit masking can keep the entries outside the allowed set at zero."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.grads.append(p.grad.clone())
                p.data.add_(1.0)


def test_the_gradient_and_the_change_are_masked_explicitly(models, monkeypatch):
    lm = models("qwen2")
    seen = []
    monkeypatch.setattr(mf, "_optimizer", lambda changes, lr: seen.append(Drift(changes, lr)) or seen[-1])
    allowed = random_mask(lm, share=0.5, seed=3)
    result = masked_finetune(lm, REQUESTS, allowed, MaskedFinetuneSettings(steps=2, lr=1e-2, eval_every=2))
    (opt,) = seen
    names = list(result.deltas)
    for k, grad in enumerate(opt.grads):
        assert torch.count_nonzero(grad[~allowed[names[k % len(names)]].to(grad.device)]) == 0
    for name, delta in result.deltas.items():
        assert torch.count_nonzero(delta[~allowed[name]]) == 0
        assert torch.all(delta[allowed[name]] == 2.0)  # the drift itself went through where allowed


def test_edge_component_masks_partition_the_heads_and_mlps(models):
    lm = models("llama")  # grouped-query attention: heads 0..2 share kv group 0
    layout = lm.layout
    masks = edge_component_masks(layout, ["a0.h1", "m1", "input", "logits"])
    inside, rest = masks["edge circuit"], masks["rest"]
    covered = set(layout.mask_for(layout.nodes(("head", "mlp"))))
    assert set(inside) == set(rest) == covered  # the embeddings of input/logits are outside 'over'
    for name in covered:
        assert torch.equal(inside[name], ~rest[name])
    q = next(b for b in layout.blocks("a0.h1") if b.role == "W_Q")
    k = next(b for b in layout.blocks("a0.h1") if b.role == "W_K")
    assert torch.equal(inside[q.param_name], q.mask(inside[q.param_name].shape))  # its query rows, nothing else
    assert bool(k.select(inside[k.param_name]).all())  # the kv group's rows: the head reads them
    assert bool(masks["edge circuit"][mlp_output(lm, 1).weight.param_name].all())
    assert not bool(masks["edge circuit"][mlp_output(lm, 0).weight.param_name].any())
    only_mlp = edge_component_masks(layout, ["m1"], over=[mlp_output(lm, 1).weight.param_name])
    assert list(only_mlp["edge circuit"]) == [mlp_output(lm, 1).weight.param_name]
    with pytest.raises(KcircuitsError, match="unknown component"):
        edge_component_masks(layout, ["a9.h9"])
    with pytest.raises(KcircuitsError, match="unknown parameter"):
        edge_component_masks(layout, ["m1"], over=["no.such.weight"])


def test_inside_outside_checks_the_old_fact_in_the_circuit_of_the_edited_model(models):
    lm = models("gpt2")
    circuit = random_mask(lm, share=0.6, seed=1)
    settings = MaskedFinetuneSettings(steps=3, lr=2e-2, eval_every=3)
    requests = [*REQUESTS, EditRequest("The capital of {} is", "Italy", "Paris")]  # no true target: NaN
    out = inside_outside(lm, requests, {"circuit": circuit, "complement": complement(circuit)}, settings,
                         circuit=circuit)
    json.dumps(out)
    before = out["old_fact_before"]
    with masked(lm, circuit):
        direct = [math.exp(true_target_logprob(lm, r.prompt_text, r.target_true)) for r in REQUESTS]
    assert before["circuit"]["prob"][:2] == pytest.approx(direct, rel=1e-4)
    assert math.isnan(before["circuit"]["prob"][2]) and math.isnan(before["model"]["rank"][2])
    for side in (before, *(v["old_fact_after"] for v in out["variants"].values())):
        for scores in side.values():
            ranks, hits = scores["rank"][:2], scores["hit_at_1"][:2]
            assert all(1 <= r <= 49152 and h == float(r == 1) for r, h in zip(ranks, hits, strict=True))
    # the complement's edit touches no entry the circuit keeps: with zero ablation the circuit alone is
    # exactly as before (the circuit is applied inside the edit), while the full model did change
    after = out["variants"]["complement"]["old_fact_after"]
    assert after["circuit"]["prob"][:2] == before["circuit"]["prob"][:2]
    assert after["model"]["prob"][:2] != before["model"]["prob"][:2]
    # the same edit reproduced by hand, then the circuit alone on top of it
    deltas = masked_finetune(lm, requests, circuit, settings).deltas
    with edited(lm, deltas), masked(lm, circuit):
        direct = [math.exp(true_target_logprob(lm, r.prompt_text, r.target_true)) for r in REQUESTS]
    assert out["variants"]["circuit"]["old_fact_after"]["circuit"]["prob"][:2] == pytest.approx(direct, rel=1e-4)
    assert out["variants"]["circuit"]["curve"] == masked_finetune(lm, requests, circuit, settings).curve


def test_a_crash_resumes_with_the_finished_variants(models, monkeypatch, tmp_path):
    lm = models("gpt_neox")
    cache = StepCache(tmp_path)
    circuit = random_mask(lm)
    masks = {"circuit": circuit, "complement": complement(circuit)}
    calls = crash_on_call(monkeypatch, mf, "_train", at=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        inside_outside(lm, REQUESTS, masks, QUICK, cache=cache)
    calls["crash"] = False
    resumed = inside_outside(lm, REQUESTS, masks, QUICK, cache=cache)
    assert calls["n"] == 3  # the circuit's fine-tuning was reused, only the complement's ran again
    again = masked_finetune(lm, REQUESTS, circuit, QUICK, cache=cache)
    assert calls["n"] == 3  # a finished fine-tuning comes back from the cache, deltas included
    masked_finetune(lm, REQUESTS, random_mask(lm, seed=5), QUICK, cache=cache)  # another mask is another key
    assert calls["n"] == 4
    fresh = inside_outside(lm, REQUESTS, masks, QUICK)  # no cache: what the resumed run must equal
    assert resumed == fresh
    direct = masked_finetune(lm, REQUESTS, circuit, QUICK)
    assert list(again.deltas) == list(direct.deltas)
    assert all(torch.equal(again.deltas[n], d) for n, d in direct.deltas.items())


def test_bad_masks_requests_and_settings_are_one_line_errors(models):
    lm, other = models("llama"), models("qwen2")
    tied = lm.hf_model.get_parameter("lm_head.weight")
    ok = one_matrix(lm, 0)
    cases = [
        (lambda: masked_finetune(lm, REQUESTS, {}), "keeps no weight entry"),
        (lambda: masked_finetune(lm, REQUESTS, {n: ~m for n, m in ok.items()}), "keeps no weight entry"),
        (lambda: masked_finetune(lm, REQUESTS, {"model.embed_tokens.weight": torch.ones(tied.shape, dtype=torch.bool),
                                                "lm_head.weight": torch.ones(tied.shape, dtype=torch.bool)}),
         "same \\(tied\\) parameter"),
        (lambda: masked_finetune(lm, REQUESTS, one_matrix(other, 0)), "another model"),
        (lambda: masked_finetune(lm, REQUESTS, {n: m.float() for n, m in ok.items()}), "must be a bool tensor"),
        (lambda: masked_finetune(lm, REQUESTS, None), "allowed must be a weight mask"),
        (lambda: masked_finetune(lm, [], ok), "no edit requests"),
        (lambda: masked_finetune(lm, [REQUESTS[0], EditRequest("The capital of {} is", "France", "Rome")], ok),
         "conflicting requests"),
        (lambda: masked_finetune(lm, [EditRequest("The capital of {} is", "France", "Paris", "Paris")], ok),
         "is the true target"),
        (lambda: masked_finetune(lm, [EditRequest("The capital is", "France", "Berlin")], ok), "has no '{}'"),
        (lambda: masked_finetune(from_hf(lm.hf_model), REQUESTS, ok), "no tokenizer"),
        (lambda: masked_finetune(lm, REQUESTS, ok, FinetuneSettings()), "must be MaskedFinetuneSettings"),
        (lambda: inside_outside(lm, REQUESTS, {"x": ok}, QUICK, circuit=ok, ablation="resample"),
         "unknown weight ablation"),
        (lambda: inside_outside(lm, REQUESTS, {"x": ok}, QUICK, circuit=one_matrix(other, 0)), "another model"),
        (lambda: inside_outside(lm, REQUESTS, {"x": ok, "y": {}}, QUICK), "keeps no weight entry"),
        (lambda: inside_outside(lm, REQUESTS, {}, QUICK), "non-empty"),
        (lambda: MaskedFinetuneSettings(steps=-1), "steps must be >= 0"),
        (lambda: MaskedFinetuneSettings(lr=0), "lr must be > 0"),
        (lambda: MaskedFinetuneSettings(lr=float("inf")), "finite"),
        (lambda: MaskedFinetuneSettings(loss="max"), "unknown fine-tuning loss"),
        (lambda: MaskedFinetuneSettings(batch_size=0), "batch_size must be >= 1"),
        (lambda: MaskedFinetuneSettings(eval_every=0), "eval_every must be >= 1"),
        (lambda: MaskedFinetuneSettings(seed=1.5), "seed must be a whole number"),
    ]
    for call, message in cases:
        with pytest.raises(KcircuitsError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_old_fact_scores_rank_the_whole_true_target(models):
    lm = models("llama")
    scores = old_fact_scores(lm, REQUESTS)
    for k, r in enumerate(REQUESTS):
        assert scores["prob"][k] == pytest.approx(math.exp(true_target_logprob(lm, r.prompt_text, r.target_true)),
                                                  rel=1e-4)
        prompt = lm.tokenizer(r.prompt_text, add_special_tokens=False).input_ids
        tgt = answer_token_ids(lm.tokenizer, r.prompt_text, r.target_true)
        with torch.no_grad():
            logits = lm.hf_model(input_ids=torch.tensor([prompt + tgt])).logits[0].float()
        worst = max(int((logits[len(prompt) + j - 1] >= logits[len(prompt) + j - 1, t]).sum())
                    for j, t in enumerate(tgt))
        assert scores["rank"][k] == worst
    assert scores["summary"]["rank"]["n"] == len(REQUESTS)
