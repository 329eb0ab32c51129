"""Weights as the model's identity: from_hf leaves the caller's model alone, edits are deltas applied
and restored exactly, and the fingerprint follows the bytes actually used."""

from __future__ import annotations

import time

import pytest
import torch

from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.graph import Graph
from kcircuits.models import (delta_metadata, edited, eval_mode, from_hf, load_delta, save_delta,
                              weights_fingerprint)
from kcircuits.models import fingerprint as fp_module
from tests.model_helpers import FAMILIES, tiny_hf, tiny_model

IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(5))


def engine_logits(lm) -> torch.Tensor:
    eng = Engine(lm.weights, Graph.from_model(lm.weights))
    b, p = IDS.shape
    with torch.no_grad():
        return eng.run(eng.embed(IDS), torch.arange(p).expand(b, p)).logits


def hf_logits(lm) -> torch.Tensor:
    with torch.no_grad():
        return lm.hf_model(IDS).logits


def head_and_mlp_deltas(lm, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random deltas on one head's blocks (q/k/v rows, W_O columns, biases) and a whole MLP, from the layout."""
    gen = torch.Generator().manual_seed(seed)
    masks = lm.layout.mask_for(["a1.h1", "m0"])
    params = dict(lm.hf_model.named_parameters())
    return {n: torch.randn(params[n].shape, generator=gen) * m for n, m in masks.items()}


# ----------------------------------------------------------------------------- from_hf leaves the model alone
def test_from_hf_keeps_requires_grad_and_training_mode():
    hf = tiny_hf("gpt2").train()
    hf.transformer.h[0].attn.eval()  # a mixed state must survive too
    hf.transformer.wpe.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in hf.named_parameters()}
    modes = {n: m.training for n, m in hf.named_modules()}
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    lm = from_hf(hf)
    assert {n: p.requires_grad for n, p in hf.named_parameters()} == flags
    assert {n: m.training for n, m in hf.named_modules()} == modes
    assert all(torch.equal(p, before[n]) for n, p in hf.named_parameters())
    assert not any(t.requires_grad for t in lm.weights.parameters())


def test_engine_gradients_never_reach_the_hf_parameters():
    """The weights are detached views: a backward pass through the engine from the embeddings leaves
    every HF parameter without a gradient even though they all require grad."""
    lm = tiny_model("llama")
    assert all(p.requires_grad for p in lm.hf_model.parameters())
    eng = Engine(lm.weights)
    embeds = eng.embed(IDS).detach().requires_grad_(True)
    eng.run(embeds, torch.zeros(2, 1, dtype=torch.long)).logits.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.hf_model.parameters())


def test_eval_mode_restores_each_modules_mode():
    hf = tiny_hf("gpt2").train()
    hf.transformer.h[1].eval()
    modes = {n: m.training for n, m in hf.named_modules()}
    with eval_mode(hf):
        assert not any(m.training for m in hf.modules())
    assert {n: m.training for n, m in hf.named_modules()} == modes


# ----------------------------------------------------------------------------- edits
@pytest.mark.parametrize("family", FAMILIES)
def test_edit_changes_logits_inside_and_restores_bit_identical(family):
    """Inside: the HF forward and the engine (views, plus GPT-NeoX's refreshed copies) both see the
    edit and still agree. After: bit-identical logits and parameters."""
    lm = tiny_model(family)
    ref_hf, ref_eng = hf_logits(lm), engine_logits(lm)
    params = {n: p.detach().clone() for n, p in lm.hf_model.named_parameters()}
    with edited(lm, head_and_mlp_deltas(lm)) as same:
        assert same is lm
        in_hf, in_eng = hf_logits(lm), engine_logits(lm)
        assert (in_hf - ref_hf).abs().max() > 1e-3
        assert (in_eng - in_hf).abs().max() <= 1e-4
    assert torch.equal(hf_logits(lm), ref_hf) and torch.equal(engine_logits(lm), ref_eng)
    assert all(torch.equal(p, params[n]) for n, p in lm.hf_model.named_parameters())


def test_every_weights_tensor_is_a_view_or_a_refreshed_copy(family):
    lm = tiny_model(family)
    storages = {p.untyped_storage().data_ptr() for p in lm.hf_model.parameters()}
    copies = {id(t) for t, _ in lm.weights.copies}
    for t in lm.weights.parameters():
        assert t.untyped_storage().data_ptr() in storages or id(t) in copies
    assert bool(copies) == family.startswith("gpt_neox")  # only NeoX interleaves q/k/v per head


def test_edit_restores_after_an_exception_inside():
    lm = tiny_model("gpt2")  # fused c_attn, Conv1D storage
    ref = engine_logits(lm)
    fingerprint = lm.fingerprint
    deltas = {"transformer.h.0.attn.c_attn.weight": torch.ones(32, 96)}
    with pytest.raises(RuntimeError, match="boom"):
        with edited(lm, deltas):
            assert not torch.equal(engine_logits(lm), ref)
            raise RuntimeError("boom")
    assert torch.equal(engine_logits(lm), ref)
    assert lm.fingerprint == fingerprint == weights_fingerprint(lm, refresh=True)


def test_nested_edits_restore_in_order():
    lm = tiny_model("llama")
    name = "model.layers.0.mlp.down_proj.weight"
    p = lm.hf_model.get_parameter(name)
    orig = p.detach().clone()
    d1, d2 = torch.full(p.shape, 0.5), torch.full(p.shape, 0.25)
    with edited(lm, {name: d1}):
        with edited(lm, {name: d2}):
            assert torch.allclose(p, orig + 0.75)
        assert torch.equal(p, orig + d1)
    assert torch.equal(p, orig)


def test_edit_rejects_bad_deltas_without_changing_anything():
    lm = tiny_model("llama")  # tied embeddings
    before = {n: p.detach().clone() for n, p in lm.hf_model.named_parameters()}
    V, d = lm.hf_model.get_input_embeddings().weight.shape
    bad = [({"nope.weight": torch.zeros(1)}, "unknown parameter 'nope.weight'"),
           ({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}, "has shape"),
           ({"model.embed_tokens.weight": torch.zeros(V, d), "lm_head.weight": torch.zeros(V, d)}, "tied")]
    for deltas, msg in bad:
        with pytest.raises(KcircuitsError, match=msg):
            with edited(lm, deltas):
                pass
    assert all(torch.equal(p, before[n]) for n, p in lm.hf_model.named_parameters())


def test_delta_files_round_trip(tmp_path):
    lm = tiny_model("qwen2")
    deltas = head_and_mlp_deltas(lm)
    save_delta(tmp_path / "edit.safetensors", deltas, base_fingerprint=lm.fingerprint, metadata={"method": "test"})
    loaded = load_delta(tmp_path / "edit.safetensors")
    assert set(loaded) == set(deltas) and all(torch.equal(loaded[n], deltas[n]) for n in deltas)
    meta = delta_metadata(tmp_path / "edit.safetensors")
    assert meta["base_fingerprint"] == lm.fingerprint and meta["method"] == "test"
    assert meta["format"].startswith("kcircuits-delta")
    with edited(lm, deltas):
        direct = engine_logits(lm)
    with edited(lm, loaded):
        assert torch.equal(engine_logits(lm), direct)


# ----------------------------------------------------------------------------- fingerprints
def test_fingerprint_same_weights_same_hash_one_element_changes_it(family):
    a, b = tiny_model(family, seed=0), tiny_model(family, seed=0)  # built separately
    assert a.fingerprint == b.fingerprint == weights_fingerprint(a.hf_model)
    assert len(a.fingerprint) == fp_module.LENGTH and int(a.fingerprint, 16) >= 0
    name, p = next(iter(b.hf_model.named_parameters()))
    with torch.no_grad():
        p.view(-1)[7] += 1e-3  # in place: the cache sees the version bump
    assert b.fingerprint != a.fingerprint
    with torch.no_grad():
        p.view(-1)[7] -= 1e-3
    assert tiny_model(family, seed=1).fingerprint != a.fingerprint


def test_fingerprint_covers_dtype_and_computation_config_not_names():
    base = tiny_hf("llama")
    fp = weights_fingerprint(base)
    renamed = tiny_hf("llama")
    renamed.config._name_or_path = "somewhere/else"
    assert weights_fingerprint(renamed) == fp
    eps = tiny_hf("llama")
    eps.config.rms_norm_eps = 1e-3  # changes the computation with the same tensors
    assert weights_fingerprint(eps) != fp
    assert weights_fingerprint(tiny_hf("llama").to(torch.bfloat16)) != fp


def test_fingerprint_is_cached_and_follows_the_edit_context(monkeypatch):
    lm = tiny_model("gpt_neox")
    calls = {"n": 0}
    real = fp_module._compute

    def counting(hf):
        calls["n"] += 1
        return real(hf)

    monkeypatch.setattr(fp_module, "_compute", counting)
    original = lm.fingerprint
    assert lm.fingerprint == original and calls["n"] == 1  # cached
    with edited(lm, head_and_mlp_deltas(lm)):
        inside = lm.fingerprint
        assert inside != original and calls["n"] == 2
    assert lm.fingerprint == original and calls["n"] == 2  # restored bytes: known, not rehashed
    assert weights_fingerprint(lm, refresh=True) == original
    with edited(lm, head_and_mlp_deltas(lm)):
        assert lm.fingerprint == inside  # the same edit, the same fingerprint


def test_fingerprint_of_a_bf16_model_hashes_raw_bytes():
    hf = tiny_hf("qwen2").to(torch.bfloat16)
    fp = weights_fingerprint(hf)
    p = hf.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        p.view(torch.int16).view(-1)[0] ^= 1  # flip the lowest bit of one bf16 value
    assert weights_fingerprint(hf) != fp


def test_fingerprint_is_fast_enough_per_megabyte():
    """A 96 MB float32 model hashes well under a second here (SmolLM2's 540 MB: see the report)."""
    hf = tiny_hf("llama", vocab_size=50000, hidden_size=480, num_attention_heads=6, num_key_value_heads=2,
                 intermediate_size=64)
    size = sum(p.numel() * p.element_size() for p in hf.parameters())
    start = time.perf_counter()
    weights_fingerprint(hf)
    elapsed = time.perf_counter() - start
    assert size > 90e6 and elapsed < 2.0
