"""Weight circuits (kcircuits.discover.weight_masks): learned hard-concrete masks over weight entries.

What is checked, on tiny random models of every family and on a hand-built model with a planted fact:
an all-ones mask reproduces the model's logits exactly (through the masking context and through the
training forward); a circuit and its complement partition every masked entry; thresholding keeps an
exact count with deterministic ties; the hand-written gradients equal autograd's; the same seed gives
the same mask; the planted fact's MLP is found; training resumes after a crash to the identical mask;
bad settings, foreign checkpoints and wrong-shape masks raise KcircuitsError.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kcircuits.batching import Batch
from kcircuits.discover import weight_masks as wm
from kcircuits.discover.weight_masks import (WeightMaskSettings, add_density_penalty, evaluate_weight_circuit,
                                             expected_density, gated_logits, gated_weight, load_weight_mask,
                                             logistic_noise, maskable_parameters, n_keep_for, random_weight_mask,
                                             sample_gates, save_weight_mask, threshold_logits, train_weight_mask)
from kcircuits.errors import KcircuitsError
from kcircuits.models import from_hf, weights_fingerprint
from kcircuits.models.masking import complement, masked
from tests.model_helpers import crash_on_call, tiny_model


def make_batch(ids: torch.Tensor, answers: torch.Tensor) -> Batch:
    """A batch scoring each prompt's next token at its last position (no padding; corrupt = clean)."""
    b, p = ids.shape
    return Batch(clean=ids, corrupt=ids.clone(), target_pos=torch.full((b, 1), p - 1), target_ids=answers[:, None],
                 target_mask=torch.ones(b, 1, dtype=torch.bool), corrupt_target_ids=answers.clone(),
                 real=torch.ones(b, p, dtype=torch.bool))


def model_batch(lm, n: int = 6, length: int = 5, seed: int = 0) -> Batch:
    """Random prompts answered by the model's own top token."""
    ids = torch.randint(0, lm.hf_model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        answers = lm.hf_model(input_ids=ids).logits[:, -1].argmax(-1)
    return make_batch(ids, answers)


def short(**overrides) -> WeightMaskSettings:
    """Settings for quick runs on tiny models."""
    return WeightMaskSettings(**{"density": 0.2, "steps": 12, "checkpoint_every": 3, **overrides})


def ones_mask(lm, embeddings: bool = False) -> dict[str, torch.Tensor]:
    return {n: torch.ones(s, dtype=torch.bool) for n, s in maskable_parameters(lm, embeddings).items()}


# ----------------------------------------------------------------------------- what is masked
def test_maskable_parameters_follow_the_layout(family):
    lm = tiny_model(family)
    params = dict(lm.hf_model.named_parameters())
    embedding_params = {b.param_name for node in lm.layout.nodes(["input", "unembed"]) for b in lm.layout.blocks(node)}
    with_emb = maskable_parameters(lm, embeddings=True)
    without = maskable_parameters(lm)
    assert list(with_emb) == list(params)  # every parameter once (tied ones under their first name), model order
    assert set(without) == set(params) - embedding_params
    assert embedding_params and not embedding_params & set(without)
    assert all(tuple(params[n].shape) == s for n, s in with_emb.items())


def test_tied_embeddings_are_counted_once():
    lm = tiny_model("llama")  # tie_word_embeddings=True
    assert lm.hf_model.lm_head.weight is lm.hf_model.model.embed_tokens.weight
    names = maskable_parameters(lm, embeddings=True)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    untied = maskable_parameters(tiny_model("qwen2"), embeddings=True)
    assert "model.embed_tokens.weight" in untied and "lm_head.weight" in untied


# ----------------------------------------------------------------------------- exactness of the masked forward
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_all_ones_mask_gives_the_model_logits_exactly(family, ablation):
    lm = tiny_model(family)
    ids = model_batch(lm).clean
    with torch.no_grad():
        full = lm.hf_model(input_ids=ids).logits
        with masked(lm, ones_mask(lm, embeddings=True), ablation):
            kept = lm.hf_model(input_ids=ids).logits
        gates = {n: torch.ones(s) for n, s in maskable_parameters(lm, embeddings=True).items()}
        relaxed = gated_logits(lm, ids, gates, ablation)
    assert torch.equal(kept, full)
    assert torch.equal(relaxed, full)


def test_saturated_logits_sample_gates_of_exactly_one():
    """The training forward's gate with a very high logit is exactly 1, so the sampled weight is exactly W."""
    settings = WeightMaskSettings()
    gen = torch.Generator().manual_seed(0)
    noise = logistic_noise((64, 32), gen)
    weight = torch.randn(64, 32)
    high = torch.full((64, 32), 40.0)
    assert torch.equal(sample_gates(high, noise, settings), torch.ones(64, 32))
    assert torch.equal(gated_weight(high, noise, weight, settings), weight)
    assert torch.equal(sample_gates(-high, noise, settings), torch.zeros(64, 32))


def test_zeroed_mask_changes_the_output(family):
    """The masked forward is not vacuous: keeping nothing of the block parameters changes the logits."""
    lm = tiny_model(family)
    ids = model_batch(lm).clean
    nothing = {n: torch.zeros(s, dtype=torch.bool) for n, s in maskable_parameters(lm).items()}
    with torch.no_grad():
        full = lm.hf_model(input_ids=ids).logits
        with masked(lm, nothing):
            empty = lm.hf_model(input_ids=ids).logits
    assert not torch.allclose(empty, full)


# ----------------------------------------------------------------------------- hand-written gradients
@pytest.mark.parametrize("mean", [False, True])
def test_gated_weight_gradient_equals_autograd(mean):
    settings = WeightMaskSettings()
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(40, 30, generator=gen) * 3).requires_grad_()
    noise = logistic_noise((40, 30), gen)
    weight = torch.randn(40, 30, generator=gen)
    value = weight.mean() if mean else None
    upstream = torch.randn(40, 30, generator=gen)

    out = gated_weight(logits, noise, weight, settings, value)
    (grad,) = torch.autograd.grad((out * upstream).sum(), logits)

    z = sample_gates(logits, noise, settings)
    reference = weight * z + (value * (1 - z) if mean else 0)
    (expected,) = torch.autograd.grad((reference * upstream).sum(), logits)
    assert torch.allclose(out, reference, atol=1e-6)
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7)
    assert (grad == 0).any() and (grad != 0).any()  # both clamped and live gates are exercised


def test_density_penalty_gradient_equals_autograd():
    settings = WeightMaskSettings()
    gen = torch.Generator().manual_seed(2)
    logits = {"a": (torch.randn(30, 20, generator=gen) * 4).requires_grad_(),
              "b": (torch.randn(50, generator=gen) * 4).requires_grad_()}
    lambdas, target = (0.7, 300.0), 0.3
    density, penalty = add_density_penalty(logits, settings, lambdas, target)
    grads = {n: x.grad.clone() for n, x in logits.items()}

    e = expected_density(logits, settings)
    reference = lambdas[0] * (e - target) + lambdas[1] * (e - target) ** 2
    expected = torch.autograd.grad(reference, list(logits.values()))
    assert density == pytest.approx(float(e.detach()), rel=1e-6)
    assert penalty == pytest.approx(float(reference.detach()), rel=1e-5)
    for (name, g), ref in zip(grads.items(), expected, strict=True):
        assert torch.allclose(g, ref.float(), rtol=1e-4, atol=1e-9), name


# ----------------------------------------------------------------------------- thresholding
def test_threshold_keeps_an_exact_count_with_fixed_tie_order():
    scores = {"a": torch.tensor([[0.5, 2.0], [1.0, 1.0]]), "b": torch.tensor([1.0, 3.0, 1.0])}
    mask = threshold_logits(scores, 4)  # 3.0, 2.0, then two of the four 1.0s: the first two in order
    assert mask["a"].tolist() == [[False, True], [True, True]] and mask["b"].tolist() == [False, True, False]
    assert sum(int(m.sum()) for m in threshold_logits(scores, 0).values()) == 0
    assert all(bool(m.all()) for m in threshold_logits(scores, 7).values())
    tied = {"x": torch.zeros(10)}
    assert threshold_logits(tied, 3)["x"].tolist() == [True] * 3 + [False] * 7
    with pytest.raises(KcircuitsError):
        threshold_logits(scores, 8)
    with pytest.raises(KcircuitsError):
        threshold_logits({"x": torch.tensor([1.0, float("nan")])}, 1)


def test_random_mask_has_the_exact_size_and_follows_its_seed():
    shapes = {"a": (20, 30), "b": (7,)}
    first, again, other = (random_weight_mask(shapes, 123, seed) for seed in (0, 0, 1))
    assert sum(int(m.sum()) for m in first.values()) == 123
    assert all(torch.equal(first[n], again[n]) for n in shapes)
    assert not all(torch.equal(first[n], other[n]) for n in shapes)


# ----------------------------------------------------------------------------- training
def test_circuit_and_complement_partition_every_masked_entry(family):
    lm = tiny_model(family)
    before = weights_fingerprint(lm, refresh=True)
    result = train_weight_mask(lm, [model_batch(lm)], short(steps=4))
    shapes = maskable_parameters(lm)
    rest = complement(result.mask)
    assert list(result.mask) == list(shapes) == list(result.logits)
    for name, shape in shapes.items():
        m, c = result.mask[name], rest[name]
        assert m.dtype == torch.bool and tuple(m.shape) == shape and m.device.type == "cpu"
        assert bool((m ^ c).all()) and not bool((m & c).any())
    n = sum(torch.Size(s).numel() for s in shapes.values())
    assert sum(int(m.sum()) for m in result.mask.values()) == n_keep_for(0.2, n)
    # the model is untouched: same bytes, no gradient left on it
    assert weights_fingerprint(lm, refresh=True) == before
    assert all(p.grad is None for p in lm.hf_model.parameters())


def test_same_seed_same_mask_other_seed_other_logits():
    lm = tiny_model("qwen2")
    batches = [model_batch(lm)]
    first = train_weight_mask(lm, batches, short(steps=8))
    again = train_weight_mask(lm, batches, short(steps=8))
    other = train_weight_mask(lm, batches, short(steps=8, seed=1))
    assert all(torch.equal(first.mask[n], again.mask[n]) for n in first.mask)
    assert all(torch.equal(first.logits[n], again.logits[n]) for n in first.logits)
    assert first.history == again.history
    assert not all(torch.equal(first.logits[n], other.logits[n]) for n in first.logits)  # other gate samples


def test_history_records_every_step_and_embeddings_flag():
    lm = tiny_model("gpt2")
    result = train_weight_mask(lm, [model_batch(lm)], short(steps=5, embeddings=True, objective="ce"))
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5]
    assert {"loss", "objective", "expected_density", "target_density", "lambda1", "lambda2"} <= set(result.history[0])
    assert set(result.mask) == set(maskable_parameters(lm, embeddings=True))
    assert "transformer.wte.weight" in result.mask


# ----------------------------------------------------------------------------- the planted fact
SUBJECTS = list(range(10, 18))  # subject i's token; its answer is token 20 + i
PROMPT, ANSWER = slice(0, 8), slice(8, 16)  # the two halves of the residual stream


def planted_model():
    """A 2-layer llama (d_model 16, 2 heads, d_mlp 32, 97 tokens) in which only MLP 1 carries the facts
    "subject 10 + i -> answer 20 + i" (i < 8) and nothing else can affect the answer on these prompts.

    The residual stream has a prompt half (dims 0-7) and an answer half (dims 8-15):

    * every token embedding lies in the prompt half; subject i's is ``3 e_i``;
    * every head's value projection reads only the answer half, which is empty until MLP 1 writes
      into it, so each head outputs 0 on every prompt whatever its (random, non-zero) q/k/o weights:
      the heads cannot move information between positions, and the answer depends only on the
      last token, the subject;
    * MLP 0's gate and up projections read only the answer half too, so it is silent (SiLU(0)·0 = 0)
      on every prompt whatever its other weights;
    * MLP 1 reads the prompt half and writes the answer half: neurons 4i..4i+3 read ``e_i`` through
      gate and up (weight 1) and write ``e_{8+i}`` through down, on top of random weights (std 0.09);
    * the unembedding row of answer ``20 + i`` has ``2 e_{8+i}`` added, so after the final norm the
      answer is the top token.

    So the fact lives in MLP 1 (with the norms in front of it and at the end); the heads, MLP 0 and
    the norms in front of them have exactly zero effect on these prompts (a test checks this).
    """
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, hidden_size=16,
                      intermediate_size=32, vocab_size=97, max_position_embeddings=64, tie_word_embeddings=False)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    eye = torch.eye(8)
    reads = eye.repeat_interleave(4, 0)  # [32, 8]: neuron 4i + j reads subject i
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.copy_(1 + 0.1 * torch.randn_like(p))
        hf.model.embed_tokens.weight[:, ANSWER] = 0
        hf.model.embed_tokens.weight[SUBJECTS, PROMPT] = 3 * eye
        for layer in hf.model.layers:
            layer.self_attn.v_proj.weight[:, PROMPT] = 0
        silent = hf.model.layers[0].mlp
        silent.gate_proj.weight[:, PROMPT] = 0
        silent.up_proj.weight[:, PROMPT] = 0
        fact = hf.model.layers[1].mlp
        for proj in (fact.gate_proj, fact.up_proj):
            proj.weight.mul_(0.3)
            proj.weight[:, PROMPT] += reads
            proj.weight[:, ANSWER] = 0
        fact.down_proj.weight.mul_(0.3)
        fact.down_proj.weight[PROMPT, :] = 0
        fact.down_proj.weight[ANSWER, :] += reads.T
        hf.lm_head.weight[20:28, ANSWER] += 2 * eye
    return from_hf(hf, name="planted")


def planted_batch(seed: int = 1) -> Batch:
    """Each subject once, after two random filler tokens; the answer is subject + 10."""
    gen = torch.Generator().manual_seed(seed)
    subjects = torch.tensor(SUBJECTS)
    fillers = torch.randint(30, 97, (len(SUBJECTS), 2), generator=gen)
    return make_batch(torch.cat([fillers, subjects[:, None]], 1), subjects + 10)


def share_kept(mask, layout, nodes) -> float:
    """The share of the nodes' entries that the mask keeps (entries of masked parameters only)."""
    own = layout.mask_for(nodes)
    kept = sum(int((mask[n] & m).sum()) for n, m in own.items() if n in mask)
    return kept / sum(int(m.sum()) for n, m in own.items() if n in mask)


def test_planted_model_answers_from_mlp1_alone():
    """The construction does what its docstring says: the model answers every fact, and ablating every
    head, MLP 0 and the norms in front of them leaves the logits unchanged."""
    lm, batch = planted_model(), planted_batch()
    unrelated = lm.layout.nodes("head") + ["m0", "a0.ln", "m0.ln", "a1.ln"]
    keep = complement(lm.layout.mask_for(unrelated))
    with torch.no_grad():
        full = lm.hf_model(input_ids=batch.clean).logits[:, -1]
        with masked(lm, keep):
            without = lm.hf_model(input_ids=batch.clean).logits[:, -1]
        with masked(lm, complement(lm.layout.mask_for(["m1"]))):
            no_fact = lm.hf_model(input_ids=batch.clean).logits[:, -1]
    assert torch.equal(full.argmax(-1), batch.target_ids[:, 0])
    assert torch.allclose(without, full, atol=1e-5)
    assert (no_fact.argmax(-1) != batch.target_ids[:, 0]).all()


def test_learned_mask_finds_the_planted_mlp():
    """At density 0.05 (260 of the 5,200 masked entries; MLP 1 has 1,536), the thresholded circuit keeps at
    least 10% of MLP 1 and at most 1% of the heads and MLP 0 (which only the sparsity term acts on); the
    circuit alone answers like the model (Hit@1 >= 0.75 vs the complement's and the random mask's <= 0.25);
    and the expected density ends within 30% of its target."""
    lm, batch = planted_model(), planted_batch()
    settings = WeightMaskSettings(density=0.05, steps=300)
    result = train_weight_mask(lm, [batch], settings)
    layout = lm.layout
    assert share_kept(result.mask, layout, ["m1"]) >= 0.10
    assert share_kept(result.mask, layout, layout.nodes("head") + ["m0"]) <= 0.01
    assert abs(result.expected_density - settings.density) <= 0.3 * settings.density
    assert abs(result.history[-1]["expected_density"] - settings.density) <= 0.3 * settings.density

    report = evaluate_weight_circuit(lm, [batch], result.mask)
    assert report["full"]["hit@1"] == 1.0 and report["full"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert report["circuit"]["hit@1"] >= 0.75
    assert report["complement"]["hit@1"] <= 0.25 and report["random"]["hit@1"] <= 0.25
    assert report["circuit"]["kl"] < report["random"]["kl"] and report["circuit"]["kl"] < report["complement"]["kl"]


# ----------------------------------------------------------------------------- evaluation
def test_evaluation_reports_every_variant_with_spread():
    lm = tiny_model("gpt_neox")
    batches = [model_batch(lm, seed=0), model_batch(lm, seed=1)]
    mask = random_weight_mask(maskable_parameters(lm), 500, seed=3)
    report = evaluate_weight_circuit(lm, batches, mask, seed=4)
    assert report["n_prompts"] == 12 and report["n_kept"] == 500
    assert report["density"] == pytest.approx(500 / report["n_masked"])
    assert report["chance"] == {"hit@1": pytest.approx(1 / 97), "hit@10": pytest.approx(10 / 97)}
    assert report["full"]["hit@1"] == 1.0 and report["full"]["kl"] == pytest.approx(0.0, abs=1e-6)
    for variant in ("full", "circuit", "complement", "random"):
        assert report[variant]["summary"]["hit@10"]["n"] == 12
        assert report[variant]["summary"]["kl"]["mean"] == pytest.approx(report[variant]["kl"])
    # an all-ones circuit is the full model, and its complement removes every masked entry
    whole = evaluate_weight_circuit(lm, batches, ones_mask(lm))
    assert whole["circuit"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert whole["circuit"]["answer_prob"] == pytest.approx(whole["full"]["answer_prob"])
    assert whole["complement"]["kl"] > 0


def test_wrong_mask_is_refused():
    lm = tiny_model("llama")
    batches = [model_batch(lm)]
    good = ones_mask(lm)
    name = next(iter(good))
    with pytest.raises(KcircuitsError, match="shape"):
        evaluate_weight_circuit(lm, batches, {**good, name: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(KcircuitsError, match="does not have"):
        evaluate_weight_circuit(lm, batches, {"no.such.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(KcircuitsError, match="bool"):
        evaluate_weight_circuit(lm, batches, {name: good[name].float()})
    with pytest.raises(KcircuitsError, match="ablation"):
        evaluate_weight_circuit(lm, batches, good, ablation="corrupt")


# ----------------------------------------------------------------------------- resume and checkpoints
def test_resume_after_a_crash_gives_the_identical_mask(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    batches = [model_batch(lm, seed=0), model_batch(lm, seed=1)]
    settings = short()  # 12 steps, a checkpoint every 3
    uninterrupted = train_weight_mask(lm, batches, settings)

    calls = crash_on_call(monkeypatch, wm, "add_density_penalty", at=8)  # once per step: dies in step 8
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_weight_mask(lm, batches, settings, checkpoint_dir=tmp_path)
    calls["crash"] = False
    resumed = train_weight_mask(lm, batches, settings, checkpoint_dir=tmp_path)
    assert calls["n"] == 8 + 6  # the rerun started from the checkpoint of step 6
    assert all(torch.equal(resumed.mask[n], uninterrupted.mask[n]) for n in uninterrupted.mask)
    assert all(torch.equal(resumed.logits[n], uninterrupted.logits[n]) for n in uninterrupted.logits)
    assert resumed.history == uninterrupted.history

    # a finished checkpoint is reused without training again
    again = train_weight_mask(lm, batches, settings, checkpoint_dir=tmp_path)
    assert calls["n"] == 14 and all(torch.equal(again.mask[n], resumed.mask[n]) for n in resumed.mask)


def test_foreign_checkpoints_are_refused(tmp_path):
    lm = tiny_model("llama")
    batches = [model_batch(lm)]
    train_weight_mask(lm, batches, short(steps=3), checkpoint_dir=tmp_path)
    with pytest.raises(KcircuitsError, match="other settings or prompts"):
        train_weight_mask(lm, batches, short(steps=3, density=0.3), checkpoint_dir=tmp_path)
    with pytest.raises(KcircuitsError, match="other settings or prompts"):
        train_weight_mask(lm, [model_batch(lm, seed=5)], short(steps=3), checkpoint_dir=tmp_path)
    with pytest.raises(KcircuitsError, match="other weights"):
        train_weight_mask(tiny_model("llama", seed=1), batches, short(steps=3), checkpoint_dir=tmp_path)
    (tmp_path / wm.CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(KcircuitsError, match="delete it"):
        train_weight_mask(lm, batches, short(steps=3), checkpoint_dir=tmp_path)
    # batch_size and checkpoint_every change how, not what: the checkpoint is still accepted
    other = tmp_path / "other"
    first = train_weight_mask(lm, batches, short(steps=3), checkpoint_dir=other)
    same = train_weight_mask(lm, batches, short(steps=3, batch_size=2, checkpoint_every=1), checkpoint_dir=other)
    assert all(torch.equal(first.mask[n], same.mask[n]) for n in first.mask)


def test_result_round_trips_through_safetensors(tmp_path):
    lm = tiny_model("gpt2")
    result = train_weight_mask(lm, [model_batch(lm)], short(steps=3, ablation="mean"))
    path = tmp_path / "mask.safetensors"
    save_weight_mask(path, result)
    back = load_weight_mask(path)
    assert back.settings == result.settings and back.history == result.history
    assert back.fingerprint == result.fingerprint == weights_fingerprint(lm)
    assert back.expected_density == result.expected_density and back.relaxed_density == result.relaxed_density
    assert list(back.mask) == list(result.mask) and list(back.logits) == list(result.logits)
    assert all(torch.equal(back.mask[n], result.mask[n]) and back.mask[n].dtype == torch.bool for n in result.mask)
    assert all(torch.equal(back.logits[n], result.logits[n]) for n in result.logits)
    n = sum(m.numel() for m in back.mask.values())
    assert sum(int(m.sum()) for m in back.at_density(0.5).values()) == n_keep_for(0.5, n)
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(KcircuitsError):
        load_weight_mask(tmp_path / "bad.safetensors")


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize("bad", [
    {"density": 0}, {"density": 1}, {"density": float("nan")}, {"density": "0.1"}, {"steps": 0}, {"steps": 2.5},
    {"lr": 0}, {"objective": "mse"}, {"ablation": "corrupt"}, {"embeddings": "yes"}, {"batch_size": 0},
    {"checkpoint_every": 0}, {"temperature": 0}, {"stretch_low": 0.0}, {"stretch_high": 1.0}, {"init_keep": 1},
    {"warmup": 1.5}, {"multiplier_lr": -1},
])
def test_bad_settings_raise(bad):
    with pytest.raises(KcircuitsError):
        WeightMaskSettings(**bad)


def test_settings_normalise_and_document_every_field():
    import dataclasses

    s = WeightMaskSettings(steps=5.0, density=1 / 4)
    assert s.steps == 5 and isinstance(s.steps, int)
    doc = WeightMaskSettings.__doc__
    assert all(f.name in doc and f.metadata.get("help") for f in dataclasses.fields(WeightMaskSettings))
    assert all(f.name in wm.WeightMaskResult.__doc__ for f in dataclasses.fields(wm.WeightMaskResult))
    with pytest.raises(KcircuitsError):
        train_weight_mask(tiny_model("llama"), [], s)
