"""The parameter layout: every parameter entry placed, sharing only where the architecture shares,
and each head's blocks checked against the HF forward itself (not against the adapters, which are
built from the layout): perturbing a block changes exactly that head's share of the computation."""

from __future__ import annotations

import pytest
import torch

from kcircuits.errors import KcircuitsError
from kcircuits.models import from_hf, parameter_layout
from kcircuits.models.adapters import adapt
from tests.model_helpers import FAMILIES, tiny_hf


def _attn_modules(hf, layer: int):
    """(attention module, its output projection) of one layer, per family (independent of the layout)."""
    mt = hf.config.model_type
    if mt == "gpt2":
        attn = hf.transformer.h[layer].attn
        return attn, attn.c_proj
    if mt == "gpt_neox":
        attn = hf.gpt_neox.layers[layer].attention
        return attn, attn.dense
    attn = hf.model.layers[layer].self_attn
    return attn, attn.o_proj


def _z_and_out(hf, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-head attention result ``z`` ``[b, p, H*e]`` (input of the output projection) and the
    projection's output ``[b, p, d]`` in one HF forward."""
    _, proj = _attn_modules(hf, layer)
    seen = {}
    h1 = proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("z", args[0].detach().clone()))
    h2 = proj.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out.detach().clone()))
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        h1.remove()
        h2.remove()
    return seen["z"], seen["out"]


def _perturb(hf, blocks, seed: int = 0) -> None:
    """Add noise to exactly the given blocks of the HF parameters (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in blocks:
            view = b.select(hf.get_parameter(b.param_name))
            view.add_(torch.randn(view.shape, generator=gen))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_entry_is_placed_and_sharing_is_exact(family):
    hf = tiny_hf(family)
    lay = parameter_layout(hf)
    params = dict(hf.named_parameters())
    assert set(lay.param_shapes) == set(params)
    count = {n: torch.zeros(p.shape, dtype=torch.int64) for n, p in params.items()}
    for node in lay.nodes():
        for b in lay.blocks(node):
            b.select(count[b.param_name]).add_(1)
    for n, c in count.items():
        assert (c >= 1).all(), f"{n} has entries no node owns"
    group = lay.n_heads // lay.n_kv_heads
    tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    for node in lay.nodes():
        for b in lay.blocks(node):
            expected: tuple[str, ...] = ()
            if b.role in ("W_K", "W_V", "b_K", "b_V") and group > 1:
                layer, h = node[1:].split(".h")
                g = int(h) // group
                expected = tuple(f"a{layer}.h{o}" for o in range(g * group, (g + 1) * group) if o != int(h))
            elif b.role in ("W_E", "W_U") and tied:
                expected = ("logits",) if node == "input" else ("input",)
            assert b.shared_with == expected, (node, b)
            # entries of unshared blocks are owned once; of shared blocks, by the block's owners
            assert (b.select(count[b.param_name]) == 1 + len(expected)).all(), (node, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_blocks_drive_exactly_that_heads_computation(family):
    """Perturbing head h's q block changes only z of head h; its kv group's k/v block changes z of
    exactly the group's heads; its W_O columns change the output by z_h · ΔW_O_hᵀ."""
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    lay = parameter_layout(tiny_hf(family))
    e, H, layer = lay.head_dim, lay.n_heads, 1
    group = H // lay.n_kv_heads
    z0, out0 = _z_and_out(tiny_hf(family), layer, ids)
    for h in (1, H - 1):  # head 1: in group 0 under GQA (h // group), not group 1 (h % K)
        heads_of = {"q": [h], "k": list(range(h // group * group, (h // group + 1) * group))}
        heads_of["v"] = heads_of["k"]
        for part in ("q", "k", "v"):
            hf = tiny_hf(family)
            roles = {f"W_{part.upper()}", f"b_{part.upper()}"}
            blocks = [b for b in lay.blocks(f"a{layer}.h{h}") if b.role in roles]
            assert blocks
            _perturb(hf, blocks)
            z, _ = _z_and_out(hf, layer, ids)
            changed = [(z - z0)[..., i * e:(i + 1) * e].abs().max().item() > 1e-4 for i in range(H)]
            assert changed == [i in heads_of[part] for i in range(H)], (h, part)
    h = H - 1
    hf = tiny_hf(family)
    (o_block,) = [b for b in lay.blocks(f"a{layer}.h{h}") if b.role == "W_O"]
    before = o_block.matrix(hf.get_parameter(o_block.param_name)).clone()
    _perturb(hf, [o_block])
    delta = o_block.matrix(hf.get_parameter(o_block.param_name)) - before  # [d, e]
    _, out = _z_and_out(hf, layer, ids)
    torch.testing.assert_close(out - out0, z0[..., h * e:(h + 1) * e] @ delta.T, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_blocks_are_the_adapters_per_head_views(family):
    hf = tiny_hf(family)
    lay, w = parameter_layout(hf), adapt(hf)
    e, group = lay.head_dim, lay.n_heads // lay.n_kv_heads

    def block(node, role):
        (b,) = [b for b in lay.blocks(node) if b.role == role]
        return b.matrix(hf.get_parameter(b.param_name))

    for layer, blk in enumerate(w.blocks):
        a = blk.attn
        for h in range(lay.n_heads):
            node, g = f"a{layer}.h{h}", h // group
            assert torch.equal(block(node, "W_Q"), a.W_Q[h * e:(h + 1) * e])
            assert torch.equal(block(node, "W_K"), a.W_K[g * e:(g + 1) * e])
            assert torch.equal(block(node, "W_V"), a.W_V[g * e:(g + 1) * e])
            assert torch.equal(block(node, "W_O"), a.W_O[:, h * e:(h + 1) * e])
            if a.b_Q is not None:
                assert torch.equal(block(node, "b_Q"), a.b_Q[h * e:(h + 1) * e])
                assert torch.equal(block(node, "b_K"), a.b_K[g * e:(g + 1) * e])
                assert torch.equal(block(node, "b_V"), a.b_V[g * e:(g + 1) * e])
        m = blk.mlp
        mlp_roles = {b.role for b in lay.blocks(f"m{layer}")}
        for role in ("W_in", "b_in", "W_gate", "b_gate", "W_out", "b_out"):
            if getattr(m, role) is None:
                assert role not in mlp_roles
            else:
                assert torch.equal(block(f"m{layer}", role), getattr(m, role))
        assert torch.equal(block(f"a{layer}.ln", "norm_w"), blk.ln1.weight)
        assert torch.equal(block(f"m{layer}.ln", "norm_w"), blk.ln2.weight)
    assert torch.equal(block("input", "W_E"), w.W_E)
    assert torch.equal(block("logits", "W_U"), w.W_U)
    assert torch.equal(block("ln_final", "norm_w"), w.ln_final.weight)


def test_gpt2_heads_are_strided_conv1d_columns():
    """The fused GPT-2 c_attn is stored [d_in, 3d]: a head owns three column ranges d apart."""
    hf = tiny_hf("gpt2")
    lay = parameter_layout(hf)
    d, e = hf.config.n_embd, lay.head_dim
    qkv = [b for b in lay.blocks("a0.h1") if b.role in ("W_Q", "W_K", "W_V")]
    assert all(b.param_name == "transformer.h.0.attn.c_attn.weight" and b.transposed for b in qkv)
    assert [(b.cols.start, b.cols.stop) for b in qkv] == [(e, 2 * e), (d + e, d + 2 * e), (2 * d + e, 2 * d + 2 * e)]
    mask = lay.mask_for("a0.h1")["transformer.h.0.attn.c_attn.weight"]
    assert mask.shape == (d, 3 * d) and mask.sum() == 3 * e * d


def test_mask_for_and_node_kinds():
    hf = tiny_hf("llama")  # 6 heads, 2 kv heads, d = 48, e = 8
    lay = from_hf(hf).layout
    d, e = 48, 8
    assert lay.nodes("head")[:7] == [f"a0.h{h}" for h in range(6)] + ["a1.h0"]
    assert lay.nodes("mlp") == ["m0", "m1", "m2"] and lay.nodes("attn_bias") == []  # Llama: no o_proj bias
    assert lay.nodes()[0] == "input" and lay.nodes()[-2:] == ["ln_final", "logits"]
    masks = lay.mask_for(["a0.h0", "a0.h1"])  # both in kv group 0
    assert masks["model.layers.0.self_attn.q_proj.weight"].sum() == 2 * e * d
    assert masks["model.layers.0.self_attn.k_proj.weight"].sum() == e * d  # one shared group
    assert masks["model.layers.0.self_attn.o_proj.weight"][:, :2 * e].all()
    assert "model.layers.0.mlp.up_proj.weight" not in masks
    full = lay.mask_for(lay.nodes(), all_params=True)
    assert set(full) == set(lay.param_shapes) and all(m.all() for m in full.values())
    assert lay.owners("model.layers.0.self_attn.k_proj.weight") == [f"a0.h{h}" for h in range(6)]
    assert lay.kind("m1.ln") == "norm" and lay.kv_group(5) == 1
    with pytest.raises(KcircuitsError, match="unknown component 'a0.h9'"):
        lay.blocks("a0.h9")
    with pytest.raises(KcircuitsError, match="unknown node kind"):
        lay.nodes("heads")


def test_unsupported_architecture_has_no_layout():
    from transformers import BertConfig, BertForMaskedLM

    hf = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=16))
    with pytest.raises(KcircuitsError, match="unsupported architecture 'bert'"):
        parameter_layout(hf)
