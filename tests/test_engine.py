"""The patched forward: all-ones mask = clean, all-zeros = corrupted, any mask = an edge-by-edge reference."""

import pytest
import torch
import torch.nn.functional as F

from kcircuits.engine import Engine
from kcircuits.graph import Graph
from kcircuits.patching import Patcher
from tests.model_helpers import tiny_model
from tests.helpers import random_batch

TOL = 1e-4


def setup(family, grouped=True, n=4):
    model = tiny_model(family)
    eng = Engine(model.weights, Graph.from_model(model.weights, grouped=grouped))
    batch = random_batch(n)
    with torch.no_grad():
        clean = eng.run(eng.embed(batch.clean), batch.target_pos, record=True)
        corrupt = eng.run(eng.embed(batch.corrupt), batch.target_pos, record=True)
    return model, eng, batch, clean, corrupt


def reference_patched_logits(eng: Engine, batch, mask, corrupt_acts):
    """Slow and independent: every destination input is summed source by source, every head projected alone."""
    w, g = eng.w, eng.graph
    emb = eng.embed(batch.clean)
    b, p, d = emb.shape
    H = w.n_heads
    outs = {0: emb}  # source index -> this pass's output
    const = torch.zeros(d)  # attention output biases already in the residual stream

    def dest_input(v):
        x = const.clone().expand(b, p, d).clone()
        for u in range(int(g.n_src_before[v])):
            m = float(mask[u, v])
            x = x + m * outs[u] + (1 - m) * corrupt_acts[u]
        return x

    cos = sin = None
    if w.rotary is not None:
        cos, sin = w.rotary.cos_sin(torch.arange(p))
    for layer, blk in enumerate(w.blocks):
        a = blk.attn
        e = a.head_dim
        sl = g.dst_slice_attn(layer)
        dsts = list(range(sl.start, sl.stop))
        q_dst, k_dst, v_dst = dsts[:H], dsts[H : H + g.n_kv_dst], dsts[H + g.n_kv_dst :]
        for h in range(H):
            kv = h // (H // a.n_kv_heads)
            kd = kv if g.grouped_kv else h
            rows_q, rows_kv = slice(h * e, (h + 1) * e), slice(kv * e, (kv + 1) * e)
            q = F.linear(blk.ln1(dest_input(q_dst[h])), a.W_Q[rows_q], None if a.b_Q is None else a.b_Q[rows_q])
            k = F.linear(blk.ln1(dest_input(k_dst[kd])), a.W_K[rows_kv], None if a.b_K is None else a.b_K[rows_kv])
            v = F.linear(blk.ln1(dest_input(v_dst[kd])), a.W_V[rows_kv], None if a.b_V is None else a.b_V[rows_kv])
            if w.rotary is not None:
                q = w.rotary.apply(q[:, :, None], cos, sin)[:, :, 0]
                k = w.rotary.apply(k[:, :, None], cos, sin)[:, :, 0]
            scores = (q @ k.transpose(1, 2)) * a.scale
            scores = scores.masked_fill(torch.triu(torch.ones(p, p, dtype=torch.bool), 1), float("-inf"))
            z = torch.softmax(scores, -1) @ v
            out = z @ a.W_O[:, h * e : (h + 1) * e].T
            outs[g.src_index_head(layer, h)] = out
        if a.b_O is not None:
            const = const + a.b_O
        outs[g.src_index_mlp(layer)] = blk.mlp(blk.ln2(dest_input(g.dst_index_mlp(layer))))
    x = dest_input(g.dst_index_logits)
    picked = x.gather(1, batch.target_pos[..., None].expand(-1, -1, d))
    return F.linear(w.ln_final(picked), w.W_U, w.b_U)


def few_edges(g, gen, n=12):
    """A mask keeping n random edges: a few destinations per layer have their own input."""
    mask = torch.zeros(g.n_src, g.n_dst)
    exists = torch.nonzero(g.edge_exists())
    mask[tuple(exists[torch.randperm(len(exists), generator=gen)[:n]].T)] = 1
    return mask


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen2"])
def test_mask_ones_is_clean_zeros_is_corrupt(family):
    _, eng, batch, clean, corrupt = setup(family)
    g = eng.graph
    with torch.no_grad():
        ones = eng.run(eng.embed(batch.clean), batch.target_pos, mask=torch.ones(g.n_src, g.n_dst),
                       ablated=corrupt.acts)
        zeros = eng.run(eng.embed(batch.clean), batch.target_pos, mask=torch.zeros(g.n_src, g.n_dst),
                        ablated=corrupt.acts)
    assert (ones.logits - clean.logits).abs().max() <= TOL
    assert (zeros.logits - corrupt.logits).abs().max() <= TOL
    assert (clean.logits - corrupt.logits).abs().max() > 1e-2  # the two runs really differ


@pytest.mark.parametrize("family,grouped", [("gpt2", True), ("gpt_neox", True), ("llama", True), ("llama", False),
                                            ("qwen2", True)])
def test_random_mask_matches_edge_by_edge_reference(family, grouped):
    _, eng, batch, _, corrupt = setup(family, grouped)
    g = eng.graph
    gen = torch.Generator().manual_seed(3)
    for mask in (torch.rand(g.n_src, g.n_dst, generator=gen).round(),  # binary
                 torch.rand(g.n_src, g.n_dst, generator=gen),  # fractional, as learned masks are
                 (torch.rand(g.n_src, g.n_dst, generator=gen) < 0.05).float(),  # sparse: the "kept rows" path
                 (torch.rand(g.n_src, g.n_dst, generator=gen) < 0.95).float(),  # dense: the "patched rows" path
                 few_edges(g, gen)):  # most destinations read the shared, fully patched input
        with torch.no_grad():
            fast = eng.run(eng.embed(batch.clean), batch.target_pos, mask=mask, ablated=corrupt.acts).logits
            slow = reference_patched_logits(eng, batch, mask, corrupt.acts)
        assert (fast - slow).abs().max() <= TOL


def test_per_prompt_masks_equal_separate_runs():
    _, eng, batch, _, corrupt = setup("llama", n=3)
    g = eng.graph
    gen = torch.Generator().manual_seed(5)
    masks = torch.stack([torch.rand(g.n_src, g.n_dst, generator=gen).round(), few_edges(g, gen), few_edges(g, gen, 3)])
    with torch.no_grad():
        together = eng.run(eng.embed(batch.clean), batch.target_pos, mask=masks, ablated=corrupt.acts).logits
        for i in range(3):
            alone = eng.run(eng.embed(batch.clean), batch.target_pos, mask=masks[i], ablated=corrupt.acts).logits
            assert (together[i] - alone[i]).abs().max() <= TOL


def test_zero_ablation_all_zero_mask_ignores_input():
    """With zero ablation and every edge patched, the output no longer depends on the prompt."""
    _, eng, batch, _, _ = setup("gpt2")
    g = eng.graph
    with torch.no_grad():
        a = eng.run(eng.embed(batch.clean), batch.target_pos, mask=torch.zeros(g.n_src, g.n_dst), ablated=None).logits
        b = eng.run(eng.embed(batch.corrupt), batch.target_pos, mask=torch.zeros(g.n_src, g.n_dst), ablated=None).logits
    assert (a - b).abs().max() <= TOL


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_other_ablations_match_reference_for_sparse_and_dense_masks(ablation):
    _, eng, batch, clean, _ = setup("llama")
    g = eng.graph
    if ablation == "zero":
        ablated, reference = None, torch.zeros_like(clean.acts)
    else:
        ablated = clean.acts.mean((1, 2), keepdim=True)  # [n_src, 1, 1, d]
        reference = ablated.expand_as(clean.acts)
    gen = torch.Generator().manual_seed(11)
    for mask in (few_edges(g, gen), (torch.rand(g.n_src, g.n_dst, generator=gen) < 0.9).float()):
        with torch.no_grad():
            fast = eng.run(eng.embed(batch.clean), batch.target_pos, mask=mask, ablated=ablated).logits
            slow = reference_patched_logits(eng, batch, mask, reference)
        assert (fast - slow).abs().max() <= TOL


def test_per_prompt_sparse_masks_equal_separate_runs():
    _, eng, batch, _, corrupt = setup("gpt2", n=3)
    g = eng.graph
    gen = torch.Generator().manual_seed(6)
    masks = torch.stack([few_edges(g, gen, k) for k in (2, 5, 9)])
    with torch.no_grad():
        together = eng.run(eng.embed(batch.clean), batch.target_pos, mask=masks, ablated=corrupt.acts).logits
        for i in range(3):
            alone = eng.run(eng.embed(batch.clean), batch.target_pos, mask=masks[i], ablated=corrupt.acts).logits
            assert (together[i] - alone[i]).abs().max() <= TOL


def test_sparse_product_silences_only_the_csr_beta_warning(monkeypatch):
    """The CSR product ignores torch's "sparse CSR support is in beta" notice and nothing else: another
    warning raised inside the same block still reaches the caller."""
    import warnings

    from kcircuits import patching

    real = torch.Tensor.to_sparse_csr

    def noisy(self, *args, **kwargs):
        warnings.warn("Sparse CSR tensor support is in beta state. (stand-in for torch's notice)", UserWarning,
                      stacklevel=2)
        warnings.warn("something else went wrong", UserWarning, stacklevel=2)
        warnings.warn("a runtime problem", RuntimeWarning, stacklevel=2)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to_sparse_csr", noisy)
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(5, 2, 3, 4, generator=gen)
    weights = (torch.rand(5, 3, generator=gen) < 0.4).float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = patching.sparse_weighted_sum(delta, weights)
    messages = [str(w.message) for w in caught]
    assert "something else went wrong" in messages and "a runtime problem" in messages
    assert not any("beta" in m for m in messages)
    assert torch.allclose(out, patching.weighted_sum(delta, weights), atol=1e-6)


def test_sparse_product_real_beta_warning_is_silenced():
    """torch's real notice (emitted once per process, so checked in a fresh one) matches the filter."""
    import subprocess
    import sys

    code = ("import warnings, torch\n"
            "from kcircuits.patching import sparse_weighted_sum\n"
            "warnings.simplefilter('error')\n"
            "w = (torch.rand(6, 4) < 0.5).float()\n"
            "sparse_weighted_sum(torch.randn(6, 2, 3, 8), w)\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]


def test_emit_needed_equals_emit_all():
    """Handing a sparse patcher only the needed outputs plus their sum gives the same inputs as handing it all."""
    gen = torch.Generator().manual_seed(2)
    n_src, n_dst, shape = 6, 4, (2, 3, 5)
    mask = torch.zeros(n_src, n_dst)
    mask[1, 2] = mask[4, 3] = 1  # sources 1 and 4 keep an edge: sparse mode
    out = torch.randn(n_src, *shape, generator=gen)
    ablated = torch.randn(n_src, *shape, generator=gen)
    full, part = (Patcher(mask, ablated, out[0], n_src, differentiable=False) for _ in range(2))
    assert full.sparse and part.sparse
    full.emit_all(0, out[:3])
    full.emit_all(3, out[3:])
    for start in (0, 3):
        needed = part.needed(start, 3)
        part.emit_needed(start, out[start + needed], n=3, total=out[start : start + 3].sum(0))
    x = torch.randn(shape, generator=gen)
    a, b = full.inputs(x, n_src, slice(0, n_dst)), part.inputs(x, n_src, slice(0, n_dst))
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[2], b[2], atol=1e-6)


def test_emit_needed_refuses_other_modes():
    mask = torch.ones(3, 2)  # every edge kept: dense mode
    patcher = Patcher(mask, None, torch.zeros(1, 2, 4), 3, differentiable=False)
    assert patcher.mode == "dense"
    with pytest.raises(ValueError, match="sparse mode"):
        patcher.emit_needed(0, torch.zeros(1, 1, 2, 4), n=3, total=torch.zeros(1, 2, 4))


@pytest.mark.parametrize("grouped", [True, False])
def test_dest_groups_cover_the_attention_block(grouped):
    """q, k, v groups start at their columns and together hold one row block per attention destination."""
    _, eng, *_ = setup("llama", grouped, n=1)
    g, a = eng.graph, eng.w.blocks[0].attn
    groups = eng.dest_groups(a)
    assert [grp.first for grp in groups] == [0, a.n_heads, a.n_heads + g.n_kv_dst]
    assert sum(grp.weight.shape[0] for grp in groups) == g.n_attn_dst
    assert all(grp.weight.shape[1:] == (a.head_dim, eng.w.d_model) for grp in groups)
