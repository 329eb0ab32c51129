"""Every adapter's engine forward equals the Hugging Face forward (fp32, max abs diff <= 1e-4)."""

import math

import pytest
import torch

from kcircuits.engine import Engine
from kcircuits.errors import KcircuitsError
from kcircuits.graph import Graph
from kcircuits.models.adapters import adapt
from tests.model_helpers import FAMILIES, VARIANTS, tiny_hf, tiny_model

TOL = 1e-4


def engine_logits(model, ids, grouped=True):
    eng = Engine(model.weights, Graph.from_model(model.weights, grouped=grouped))
    b, p = ids.shape
    target = torch.arange(p).expand(b, p)
    return eng.run(eng.embed(ids), target).logits


@pytest.mark.parametrize("family", FAMILIES + VARIANTS)
@pytest.mark.parametrize("grouped", [True, False])
def test_engine_matches_hf(family, grouped):
    model = tiny_model(family)
    # longer than rope's original window
    ids = torch.randint(0, 97, (3, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.hf_model(ids).logits
        ours = engine_logits(model, ids, grouped)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_sources_sum_to_residual(family):
    """The cached source outputs plus the attention output biases rebuild the final residual stream."""
    model = tiny_model(family)
    eng = Engine(model.weights)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        res = eng.run(eng.embed(ids), torch.zeros(2, 1, dtype=torch.long), record=True)
    bias = sum((blk.attn.b_O for blk in model.weights.blocks if blk.attn.b_O is not None), torch.zeros(()))
    assert torch.allclose(res.acts.sum(0) + bias, res.resid_final, atol=1e-5)


def test_unsupported_architecture_is_named():
    from transformers import BertConfig, BertForMaskedLM

    hf = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=16))
    with pytest.raises(KcircuitsError, match="unsupported architecture 'bert'.*gpt2.*gpt_neox.*llama"):
        adapt(hf)


def test_shared_weights_are_views():
    """Adapters view the HF parameters (an edit to the HF model is seen by the engine) for llama and gpt2."""
    for family in ("llama", "gpt2"):
        hf = tiny_hf(family)
        w = adapt(hf)
        first = (hf.model.layers[0].self_attn.q_proj.weight if family == "llama"
                 else hf.transformer.h[0].attn.c_attn.weight)
        with torch.no_grad():
            first.mul_(2)
        ref = w.blocks[0].attn.W_Q
        assert ref.data_ptr() >= first.data_ptr() and ref.data_ptr() < first.data_ptr() + first.numel() * 4


def test_bfloat16_runs_close_to_float32():
    """bf16 is optional and unverified to 1e-4; it must run end to end and stay near fp32."""
    from kcircuits.discover.eap import attribute
    from kcircuits.models import from_hf
    from tests.helpers import random_batch

    hf = tiny_hf("llama")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    ref = engine_logits(from_hf(hf), ids)
    low = from_hf(hf.to(torch.bfloat16))
    out = engine_logits(low, ids).float()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    eng = Engine(low.weights)
    scores = attribute(eng, [random_batch(2)], method="eap-ig", steps=2, progress=False)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all() and scores.abs().max() > 0
    from kcircuits.evaluate import Evaluator
    from kcircuits.selection import select

    res = Evaluator(eng, [random_batch(2)], progress=False).evaluate(select(eng.graph, scores, 40))
    assert math.isfinite(res["faithfulness_of_means"])


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_hidden_is_what_the_down_projection_receives(family):
    """``MLP.hidden(x)`` (the key ROME edits) equals the input of HF's down_proj / c_proj /
    dense_4h_to_h, found through the layout's W_out block; ``out_from_hidden`` gives the MLP output."""
    model = tiny_model(family)
    hf, lay = model.hf_model, model.layout
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    for layer, blk in enumerate(model.weights.blocks):
        (w_out,) = lay.role_blocks([f"m{layer}"], "W_out")
        down = hf.get_submodule(w_out.param_name.rsplit(".", 1)[0])
        mlp_module = hf.get_submodule(w_out.param_name.rsplit(".", 2)[0])
        seen = {}
        hooks = [down.register_forward_pre_hook(lambda m, args, seen=seen: seen.__setitem__("key", args[0])),
                 mlp_module.register_forward_hook(lambda m, args, out, seen=seen: seen.update(x=args[0], out=out))]
        try:
            with torch.no_grad():
                hf(ids)
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            key = blk.mlp.hidden(seen["x"])
            assert key.shape == seen["key"].shape and key.shape[-1] == blk.mlp.W_out.shape[1]
            torch.testing.assert_close(key, seen["key"], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(blk.mlp.out_from_hidden(key), seen["out"], atol=1e-6, rtol=1e-5)
