"""Math core of influence functions: modules, factors, IHVPs, scores (tiny models, CPU, fast)."""

from __future__ import annotations

import pytest
import torch

from kcircuits.errors import KcircuitsError
from kcircuits.influence.factors import Factors, fit_factors
from kcircuits.influence.gradients import LMObjective, flatten, gn_vector_product
from kcircuits.influence.ihvp import make_preconditioner
from kcircuits.influence.modules import (
    matrix_shape,
    component_blocks,
    module_layer,
    module_params,
    param_to_matrix,
    select,
    tracked_modules,
)
from kcircuits.influence.scores import InfluenceScores, pairwise_scores, self_influence
from kcircuits.influence.sequences import Sequences
from kcircuits.models.adapters import adapt
from tests.model_helpers import tiny_hf
from tests.influence_helpers import (
    FeatureModel,
    SquaredErrorObjective,
    rand_seqs,
    tiny_gpt2,
)

# ----------------------------------------------------------------------------- modules


@pytest.mark.parametrize("family,per_layer", [("gpt2", 4), ("gpt_neox", 4), ("llama", 7), ("qwen2", 7)])
def test_tracked_modules_per_layer(family, per_layer):
    model = tiny_hf(family)
    mods = tracked_modules(model)
    n_layers = model.config.num_hidden_layers
    counts = [sum(module_layer(n) == layer for n in mods) for layer in range(n_layers)]
    assert counts == [per_layer] * n_layers
    assert not any("lm_head" in n or "emb" in n or "wte" in n for n in mods)
    assert len(tracked_modules(model, include=["*.mlp.*"])) == n_layers * (3 if per_layer == 7 else 2)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen2"])
def test_component_blocks_match_engine_head_split(family):
    """Selecting a head's block from each module's weight (in the [d_out, d_in] gradient convention)
    gives exactly the adapter's per-head W_Q/W_K/W_V rows and W_O columns."""
    model = tiny_hf(family)
    weights = adapt(model)
    mods = tracked_modules(model)
    blocks = component_blocks(model)
    for layer, blk in enumerate(weights.blocks):
        at = blk.attn
        e, group = at.head_dim, at.n_heads // at.n_kv_heads
        for h in range(at.n_heads):
            sel = blocks[f"a{layer}.h{h}"]
            g = h // group
            rows_q = at.W_Q[h * e:(h + 1) * e]
            rows_k, rows_v = at.W_K[g * e:(g + 1) * e], at.W_V[g * e:(g + 1) * e]
            picked = []
            for name, (rs, cs) in sel.items():
                mat = _weight_matrix(mods[name])
                if cs is not None:  # output projection: the head's columns
                    assert torch.equal(select(mat, rs, cs), at.W_O[:, h * e:(h + 1) * e])
                else:
                    picked.append(select(mat, rs, cs))
            assert torch.equal(torch.cat(picked), torch.cat([rows_q, rows_k, rows_v]))
        mlp = blocks[f"m{layer}"]
        assert len(mlp) == (3 if family in ("llama", "qwen2") else 2) and all(v == (None, None) for v in mlp.values())


def _weight_matrix(module) -> torch.Tensor:
    """The weight in the [d_out, d_in] convention (bias column dropped)."""
    mat = param_to_matrix(module, [p.detach() for p in module_params(module)])
    return mat[:, :-1] if module.bias is not None else mat


def test_component_gradient_through_fused_c_attn():
    """The gradient of one head's query rows (computed through GPT-2's fused c_attn) is what the
    component's row selection picks from the gradient matrix."""
    model = tiny_gpt2()
    seqs = rand_seqs(2, 6)
    mods = tracked_modules(model)
    name = "transformer.h.1.attn.c_attn"
    from kcircuits.influence.gradients import sequence_grads, token_grads

    a, g = token_grads(model, seqs, mods, LMObjective())
    G = sequence_grads(a, g)[name].sum(0)  # [3d, d + 1]
    loss = LMObjective().losses(LMObjective().output(model, seqs), seqs).sum()
    w_grad, b_grad = torch.autograd.grad(loss, [mods[name].weight, mods[name].bias])
    d, e = 8, 4
    rows, _ = component_blocks(model)["a1.h1"][name]
    expected = torch.cat([w_grad.T, b_grad[:, None]], 1)[[*range(e, 2 * e), *range(d + e, d + 2 * e),
                                                          *range(2 * d + e, 2 * d + 2 * e)]]
    torch.testing.assert_close(select(G, rows, None), expected, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- exact Kronecker model
def _kronecker_problem(N=6, M=5, d_in=4, d_out=3, seed=0):
    """Sequences [i, k(i, j)]: input features a_i, targets chosen so the output gradient is g_j for
    every i. Over all N·M pairs the empirical Fisher is exactly E[a aᵀ] ⊗ E[g gᵀ]."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(N, d_in, generator=gen)
    gvec = torch.randn(M, d_out, generator=gen)
    feats = torch.cat([a, torch.zeros(N * M, d_in)])  # target tokens have zero features
    model = FeatureModel(feats, d_out, bias=False, seed=seed)
    W = model.layers[0].proj.weight.detach()
    targets = torch.zeros(N + N * M, d_out)
    ids, vecs = [], []
    for i in range(N):
        for j in range(M):
            k = N + i * M + j
            targets[k] = W @ a[i] - gvec[j]
            ids.append([i, k])
            vecs.append(torch.outer(gvec[j], a[i]).flatten())
    ids = torch.tensor(ids)
    from kcircuits.influence.sequences import Sequences

    seqs = Sequences(ids, torch.ones_like(ids), torch.tensor([[0.0, 1.0]] * len(ids)), [str(r) for r in ids.tolist()])
    X = torch.stack(vecs).double()
    return model, SquaredErrorObjective(targets), seqs, X.T @ X / len(X)


def test_ekfac_equals_exact_damped_inverse_when_kronecker_is_exact():
    model, objective, seqs, G = _kronecker_problem()
    factors = fit_factors(model, seqs, strategy="ekfac", fisher="empirical", batch_size=7, objective=objective,
                          progress=False)
    name = "layers.0.proj"
    damping = 0.1 * float(torch.linalg.eigvalsh(G).mean())
    pre = make_preconditioner("ekfac", factors, damping=damping)
    v = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1))
    got = pre.apply({name: v})[name].double().reshape(5, -1)
    want = torch.linalg.solve(G + damping * torch.eye(G.shape[0], dtype=G.dtype), v.double().reshape(5, -1).T).T
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-6, rel  # float32 gradients (measured ~1e-7); exact up to rounding
    # EK-FAC eigenvalues are the exact eigenvalues of G (sorted comparison)
    torch.testing.assert_close(factors.tensors[name]["lambda"].flatten().sort().values,
                               torch.linalg.eigvalsh(G).sort().values, rtol=1e-5, atol=1e-7)
    # the heuristic damping is 0.1 × mean eigenvalue = 0.1 × trace(G) / size
    auto = make_preconditioner("ekfac", factors).damping[name]
    assert auto == pytest.approx(damping, rel=1e-5)


# ----------------------------------------------------------------------------- LiSSA
def _softmax_regression(n=6, T=5, vocab=7, d=4, seed=0):
    feats = torch.randn(vocab, d, generator=torch.Generator().manual_seed(seed))
    return FeatureModel(feats, vocab, bias=True, seed=seed), rand_seqs(n, T, vocab=vocab, seed=seed)


def test_lissa_converges_to_exact_ihvp_on_convex_problem():
    model, train = _softmax_regression()
    name = "layers.0.proj"
    exact = make_preconditioner("exact", None, model=model, train=train, damping=0.1)
    # G's eigenvalues lie in [0, 0.88]; the default scale (2 × top eigenvalue of G + λ) gives a contraction
    # rate of about 1 − 0.1 / 1.9, so 300 steps reach ~1e-7. batch_size ≥ n: deterministic products.
    lissa = make_preconditioner("lissa", None, model=model, train=train, damping=0.1,
                                lissa={"depth": 300, "batch_size": 64})
    v = torch.randn(1, 7, 5, generator=torch.Generator().manual_seed(3))
    want, got = exact.apply({name: v})[name], lissa.apply({name: v})[name]
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-3, rel
    assert lissa.damping == exact.damping == {name: 0.1}


def test_lissa_minibatches_and_repeats():
    """Stochastic products on random mini-batches: averaging repeats reduces the error (seeded)."""
    model, train = _softmax_regression(n=12)
    name = "layers.0.proj"
    v = {name: torch.randn(7, 5, generator=torch.Generator().manual_seed(3))}
    want = make_preconditioner("exact", None, model=model, train=train, damping=0.1).apply(v)[name]
    errs = []
    for repeats in (1, 4):
        lissa = make_preconditioner("lissa", None, model=model, train=train, damping=0.1,
                                    lissa={"depth": 150, "batch_size": 4, "repeats": repeats, "scale": 2.0})
        errs.append(float((lissa.apply(v)[name] - want).norm() / want.norm()))
    assert errs[1] < 0.03 and errs[1] < errs[0] < 0.2, errs  # measured ~0.05 and ~0.008


def test_lissa_divergence_is_reported():
    model, train = _softmax_regression()
    lissa = make_preconditioner("lissa", None, model=model, train=train, damping=0.05,
                                lissa={"scale": 1e-3, "depth": 200, "batch_size": 64})
    with pytest.raises(KcircuitsError, match="diverged"):
        lissa.apply({"layers.0.proj": torch.ones(7, 5)})


def test_lissa_default_scale_retries_after_divergence():
    """An underestimated default scale (as a mini-batch's top eigenvalue can cause) is raised ×4 and
    the query solved again, with a warning; the answer is still the exact IHVP."""
    model, train = _softmax_regression()
    name = "layers.0.proj"
    exact = make_preconditioner("exact", None, model=model, train=train, damping=0.1)
    lissa = make_preconditioner("lissa", None, model=model, train=train, damping=0.1,
                                lissa={"depth": 400, "batch_size": 64})
    good = lissa.scale  # 2 × top eigenvalue: diverges below about half of that
    lissa.scale = good / 10
    v = torch.randn(1, 7, 5, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="retrying with scale"):
        got = lissa.apply({name: v})[name]
    assert lissa.retries == 1 and lissa.scale == pytest.approx(good * 0.4)
    want = exact.apply({name: v})[name]
    assert float((got - want).norm() / want.norm()) < 1e-3


def test_gn_vector_product_runs_through_sdpa_attention():
    """HF models load with SDPA attention, whose fused CPU kernel has no double backward: the
    Gauss-Newton product (LiSSA) must still work and agree with the eager-attention model."""
    import copy

    eager = tiny_hf("llama", 0)
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    train = rand_seqs(3, 6, vocab=sdpa.config.vocab_size, seed=2)
    mods_s, mods_e = tracked_modules(sdpa), tracked_modules(eager)
    name = next(iter(mods_s))
    v = {n: torch.randn(*matrix_shape(m), generator=torch.Generator().manual_seed(1)) for n, m in mods_s.items()}
    got = gn_vector_product(sdpa, train, mods_s, LMObjective(), v)
    want = gn_vector_product(eager, train, mods_e, LMObjective(), v)
    torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_gn_vector_product_matches_dense_matrix():
    model, train = _softmax_regression()
    mods = tracked_modules(model)
    exact = make_preconditioner("exact", None, model=model, train=train, damping=0.0 + 1e-3)
    G = exact.chol @ exact.chol.T - 1e-3 * torch.eye(35, dtype=torch.float64)
    v = {"layers.0.proj": torch.randn(7, 5, generator=torch.Generator().manual_seed(0))}
    got = flatten(gn_vector_product(model, train, mods, LMObjective(), v), list(mods))
    torch.testing.assert_close(got.double(), G @ flatten(v, list(mods)).double(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- score invariances
@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt2()
    train, queries = rand_seqs(7, 8, seed=0), rand_seqs(3, 6, seed=1)
    factors = fit_factors(model, train, strategy="ekfac", batch_size=3, progress=False)
    return model, train, queries, factors


def _close(a, b, rtol=1e-4):
    """Relative to the largest score: float32 sums in a different order."""
    torch.testing.assert_close(a, b, rtol=0, atol=rtol * float(b.abs().max()))


def test_scores_invariant_to_batch_size_and_order(setup):
    model, train, queries, factors = setup
    base = pairwise_scores(model, queries, train, factors=factors, batch_size=4, progress=False).total
    one = pairwise_scores(model, queries, train, factors=factors, batch_size=1, progress=False).total
    _close(one, base)
    perm = torch.tensor([4, 0, 6, 2, 1, 5, 3])
    shuffled = pairwise_scores(model, queries, train.subset(perm), factors=factors, batch_size=3, progress=False)
    _close(shuffled.total, base[:, perm])


def test_per_token_and_per_layer_sum_to_total(setup):
    model, train, queries, factors = setup
    s = pairwise_scores(model, queries, train, factors=factors, per_layer=True, per_token=True, batch_size=3,
                        progress=False)
    assert s.per_token.shape == (3, 7, 8) and sorted(s.per_layer) == [0, 1]
    _close(s.per_token.sum(-1), s.total)
    _close(sum(s.per_layer.values()), s.total)
    pad = train.attention_mask == 0
    assert (s.per_token[:, pad] == 0).all()  # padding carries no influence


def test_self_influence_is_diagonal_of_pairwise(setup):
    model, train, _, factors = setup
    diag = pairwise_scores(model, train, train, factors=factors, progress=False).total.diagonal()
    si = self_influence(model, train, factors=factors, progress=False)
    _close(si, diag)
    assert (si > 0).all()  # a positive-definite preconditioner


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "identity"])
def test_self_scores_from_token_factors_equal_full_preconditioning(setup, strategy):
    """The per-token rotation shortcut must give the same self-influence (and IHVP) as
    preconditioning the full gradient matrix."""
    from kcircuits.influence.gradients import sequence_grads, token_grads
    from kcircuits.influence.ihvp import Preconditioner

    model, train, _, factors = setup
    fitted = factors if strategy != "diagonal" else fit_factors(model, train, strategy="diagonal", progress=False)
    precond = make_preconditioner(strategy, fitted)
    a, g = token_grads(model, train, tracked_modules(model), LMObjective())
    G = sequence_grads(a, g)
    fast = precond.self_scores(G, (a, g))
    slow = Preconditioner.self_scores(precond, G)
    _close(fast, slow)
    P = precond.apply(G)
    _close(fast, sum((P[n] * G[n]).sum((1, 2)) for n in G))
    P_tok = precond.apply(G, (a, g))  # the IHVP through the same per-token rotation
    for n in G:
        _close(P_tok[n], P[n])


def test_relative_scores_divide_by_root_self_influence(setup, tmp_path):
    """RelatIF: every score of training sequence m is the raw one over sqrt(self-influence of m), in
    every output (so per-token and per-layer still sum to the total); rankings change, not signs."""
    model, train, queries, factors = setup
    raw = pairwise_scores(model, queries, train, factors=factors, per_layer=True, per_token=True, progress=False)
    rel = pairwise_scores(model, queries, train, factors=factors, per_layer=True, per_token=True,
                          normalize="relative", progress=False)
    si = self_influence(model, train, factors=factors, progress=False)
    _close(rel.train_self, si)
    _close(rel.total, raw.total / si.sqrt())
    _close(rel.per_token.sum(-1), rel.total)
    _close(sum(rel.per_layer.values()), rel.total)
    assert not torch.equal(rel.total.argsort(1), raw.total.argsort(1))  # some ranking did change
    low = pairwise_scores(model, queries, train, factors=factors, query_rank=1, normalize="relative",
                          progress=False).total
    lr = pairwise_scores(model, queries, train, factors=factors, query_rank=1, rescore_top_k=2,
                         normalize="relative", progress=False)
    top = low.topk(2, dim=1).indices  # chosen on the rank-1 relative scores
    q = torch.arange(3)[:, None]
    _close(lr.total[q, top], rel.total[q, top])  # rescored entries are full-rank relative scores
    rel.save(tmp_path)
    back = InfluenceScores.load(tmp_path)
    assert back.normalize == "relative" and torch.equal(back.train_self, rel.train_self)
    with pytest.raises(KcircuitsError, match="normalize"):
        pairwise_scores(model, queries, train, factors=factors, normalize="cosine", progress=False)


def test_margin_measurement_rescales_single_token_queries_by_one_over_one_minus_p(setup):
    """For a one-token completion, d logodds/dz = (e_y − p)/(1 − p_y): the margin scores are the
    log-prob scores divided by (1 − p_y), query by query; training sequences are untouched."""
    from kcircuits.influence.gradients import MarginObjective

    model, train, _, factors = setup
    ids = torch.randint(0, 31, (3, 5), generator=torch.Generator().manual_seed(5))
    loss = torch.zeros(3, 5)
    loss[:, -1] = 1.0  # only the last token is the completion
    queries = Sequences(ids, torch.ones_like(ids), loss, ["q0", "q1", "q2"], [4, 4, 4])
    logprob = pairwise_scores(model, queries, train, factors=factors, progress=False)
    margin = pairwise_scores(model, queries, train, factors=factors, measurement="margin", progress=False)
    with torch.no_grad():
        p = model(input_ids=ids).logits[:, -2].softmax(-1).gather(1, ids[:, -1:])[:, 0]
    _close(margin.total, logprob.total / (1 - p)[:, None])
    assert margin.measurement == "margin" and logprob.measurement == "logprob"
    out = LMObjective().output(model, queries)
    odds = -MarginObjective().losses(out, queries)
    torch.testing.assert_close(odds, (p / (1 - p)).log(), rtol=1e-4, atol=1e-5)  # it is the log-odds
    with pytest.raises(KcircuitsError, match="measurement"):
        pairwise_scores(model, queries, train, factors=factors, measurement="prob", progress=False)


def test_low_rank_at_full_rank_equals_full_and_rescoring(setup):
    model, train, queries, factors = setup
    full = pairwise_scores(model, queries, train, factors=factors, per_token=True, per_layer=True, progress=False)
    lr = pairwise_scores(model, queries, train, factors=factors, query_rank=100, per_token=True, per_layer=True,
                         progress=False)
    _close(lr.total, full.total)
    _close(lr.per_token, full.per_token)
    low = pairwise_scores(model, queries, train, factors=factors, query_rank=1, progress=False).total
    assert not torch.allclose(low, full.total, rtol=1e-2)  # rank 1 is an approximation
    res = pairwise_scores(model, queries, train, factors=factors, query_rank=1, rescore_top_k=2, per_layer=True,
                          per_token=True, progress=False)
    top = low.topk(2, dim=1).indices
    q = torch.arange(3)[:, None]
    _close(res.total[q, top], full.total[q, top])
    _close(res.per_token[q, top], full.per_token[q, top])
    _close(sum(res.per_layer.values()), res.total)
    _close(res.per_token.sum(-1), res.total)
    rest = torch.ones_like(low, dtype=torch.bool)
    rest[q, top] = False
    _close(res.total[rest], low[rest])  # the others keep their rank-1 values


def test_components_plus_rest_sum_to_layer_total(setup):
    model, train, queries, factors = setup
    blocks = component_blocks(model)
    comps = {c: blocks[c] for c in ("a0.h0", "a0.h1", "m0")}
    comps["rest0"] = {"transformer.h.0.attn.c_proj": (None, slice(8, 9))}  # the shared output bias
    s = pairwise_scores(model, queries, train, factors=factors, per_layer=True, components=comps, progress=False)
    _close(sum(s.per_component.values()), s.per_layer[0])
    named = pairwise_scores(model, queries, train, factors=factors, components=["a0.h1", "m1"], progress=False)
    _close(named.per_component["a0.h1"], s.per_component["a0.h1"])
    assert set(named.per_component) == {"a0.h1", "m1"}


def test_identity_strategy_is_gradient_dot_product(setup):
    model, train, queries, _ = setup
    s = pairwise_scores(model, queries, train, strategy="identity", progress=False)
    mods = tracked_modules(model)
    from kcircuits.influence.gradients import sequence_grads, token_grads

    gq = sequence_grads(*token_grads(model, queries, mods, LMObjective()))
    gt = sequence_grads(*token_grads(model, train, mods, LMObjective()))
    want = flatten(gq, list(mods)) @ flatten(gt, list(mods)).T
    _close(s.total, want)
    assert s.damping == {} and s.strategy == "identity"


# ----------------------------------------------------------------------------- factors: IO, resume, options
def test_factors_save_load_and_scores_round_trip(setup, tmp_path):
    model, train, queries, factors = setup
    factors.save(tmp_path)
    back = Factors.load(tmp_path)
    assert back.modules == factors.modules and back.n_tokens == factors.n_tokens == int(train.attention_mask.sum())
    assert back.n_sequences == 7 and back.strategy == "ekfac" and back.fisher == "true"
    for n in factors.modules:
        for k, v in factors.tensors[n].items():
            assert torch.equal(back.tensors[n][k], v)
    s = pairwise_scores(model, queries, train, factors=back, per_layer=True, per_token=True, components=["m1"],
                        progress=False)
    s.save(tmp_path)
    s2 = InfluenceScores.load(tmp_path)
    assert torch.equal(s2.total, s.total) and torch.equal(s2.per_token, s.per_token)
    assert s2.per_layer.keys() == s.per_layer.keys() and s2.per_component.keys() == {"m1"}
    assert s2.damping == s.damping and s2.strategy == "ekfac"


class _Crash(Exception):
    pass


def _assert_identical_fits(resumed: Factors, ref: Factors) -> None:
    """Bit-identical factors, and every tensor in the same memory layout. Why the layout: an
    uninterrupted fit once kept eigh's column-major eigenvectors while a resumed one read them back
    row-major from the checkpoint; MKL's gemm rounds the two layouts differently on some CPUs (seen on
    an AVX-512 machine run with MKL_ENABLE_INSTRUCTIONS=SSE4_2), so EK-FAC's Λ differed in the last
    bits only there.
    The stride check catches that on every machine, not only on the CPUs where the bits differ."""
    for n in ref.modules:
        for k in ref.tensors[n]:
            assert torch.equal(resumed.tensors[n][k], ref.tensors[n][k]), (n, k)
            assert resumed.tensors[n][k].stride() == ref.tensors[n][k].stride(), (n, k)


@pytest.mark.parametrize("crash_at", [("covariance", 1), ("eigen", 0)])
def test_resume_after_crash_is_identical(tmp_path, crash_at):
    model = tiny_gpt2()
    train = rand_seqs(7, 8)
    ref = fit_factors(model, train, strategy="ekfac", batch_size=3, progress=False)
    seen = []

    def crash(pass_name, batch):
        seen.append((pass_name, batch))
        if (pass_name, batch) == crash_at:
            raise _Crash

    with pytest.raises(_Crash):
        fit_factors(model, train, strategy="ekfac", batch_size=3, folder=tmp_path, progress=False, callback=crash,
                    checkpoint_seconds=0)
    assert not (tmp_path / "factors.json").exists()
    after = []
    resumed = fit_factors(model, train, strategy="ekfac", batch_size=3, folder=tmp_path, progress=False,
                          callback=lambda p, b: after.append((p, b)), checkpoint_seconds=0)
    assert after[0] == (crash_at[0], crash_at[1] + 1)  # picked up right after the crash
    _assert_identical_fits(resumed, ref)
    assert (tmp_path / "factors.json").exists()
    again = fit_factors(model, train, strategy="ekfac", batch_size=3, folder=tmp_path, progress=False)
    assert torch.equal(again.tensors[ref.modules[0]]["lambda"], ref.tensors[ref.modules[0]]["lambda"])
    with pytest.raises(KcircuitsError, match="another configuration"):
        fit_factors(model, train, strategy="ekfac", batch_size=2, folder=tmp_path, progress=False)


def test_crash_between_timed_checkpoints_resumes_from_the_last_one(tmp_path):
    """With a checkpoint interval longer than the fit, a crash mid-pass loses that pass's batches but
    the rerun (which restarts from the last checkpoint) still gives the identical result."""
    model = tiny_gpt2()
    train = rand_seqs(7, 8)
    ref = fit_factors(model, train, strategy="ekfac", batch_size=3, progress=False)

    def crash(pass_name, batch):
        if (pass_name, batch) == ("eigen", 1):
            raise _Crash

    with pytest.raises(_Crash):
        fit_factors(model, train, strategy="ekfac", batch_size=3, folder=tmp_path, progress=False, callback=crash,
                    checkpoint_seconds=3600)
    after = []
    resumed = fit_factors(model, train, strategy="ekfac", batch_size=3, folder=tmp_path, progress=False,
                          callback=lambda p, b: after.append((p, b)), checkpoint_seconds=3600)
    assert after[0] == ("eigen", 0)  # the covariance pass was checkpointed at its end; the eigen pass restarts
    _assert_identical_fits(resumed, ref)


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_true_and_empirical_fisher_both_run(strategy):
    model = tiny_gpt2()
    train, queries = rand_seqs(5, 6), rand_seqs(2, 5, seed=1)
    out = {}
    for fisher in ("true", "empirical"):
        f = fit_factors(model, train, strategy=strategy, fisher=fisher, batch_size=2, progress=False)
        assert f.fisher == fisher
        out[fisher] = pairwise_scores(model, queries, train, strategy=strategy, factors=f, progress=False).total
        assert torch.isfinite(out[fisher]).all()
    assert not torch.allclose(out["true"], out["empirical"])
    # seeded: the same seed gives the same true-Fisher factors
    a = fit_factors(model, train, strategy=strategy, seed=3, progress=False)
    b = fit_factors(model, train, strategy=strategy, seed=3, progress=False)
    n = a.modules[0]
    assert all(torch.equal(a.tensors[n][k], b.tensors[n][k]) for k in a.tensors[n])


def test_diagonal_factors_are_mean_squared_sequence_gradients():
    model = tiny_gpt2()
    train = rand_seqs(5, 6)
    f = fit_factors(model, train, strategy="diagonal", fisher="empirical", batch_size=2, progress=False)
    from kcircuits.influence.gradients import sequence_grads, token_grads

    G = sequence_grads(*token_grads(model, train, tracked_modules(model), LMObjective()))
    for n, g in G.items():
        torch.testing.assert_close(f.tensors[n]["diag"].float(), (g ** 2).mean(0), rtol=1e-4, atol=1e-9)
    pre = make_preconditioner("diagonal", f, damping=0.5)
    v = {n: torch.ones_like(g[0]) for n, g in G.items()}
    n = f.modules[0]
    torch.testing.assert_close(pre.apply(v)[n], 1 / (f.tensors[n]["diag"].float() + 0.5))


def test_kfac_eigenvalues_are_outer_products(setup):
    _, _, _, factors = setup
    n = factors.modules[0]
    t = factors.tensors[n]
    torch.testing.assert_close(factors.eigenvalues(n, "kfac"), torch.outer(t["eS"], t["eA"]))
    # eigenvalues are clamped at 0 (tiny negative rounding), hence the absolute tolerance
    torch.testing.assert_close(t["QA"] @ torch.diag(t["eA"]) @ t["QA"].T, t["A"], rtol=0,
                               atol=1e-7 * float(t["A"].abs().max()))
    assert t["A"].dtype == torch.float64


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors(setup):
    model, train, queries, factors = setup
    with pytest.raises(KcircuitsError, match="unknown factor strategy"):
        fit_factors(model, train, strategy="kfc", progress=False)
    with pytest.raises(KcircuitsError, match="unknown fisher"):
        fit_factors(model, train, fisher="emp", progress=False)
    with pytest.raises(KcircuitsError, match="matches"):
        fit_factors(model, train, include=["*.nonexistent.*"], progress=False)
    with pytest.raises(KcircuitsError, match="unknown influence strategy"):
        pairwise_scores(model, queries, train, strategy="newton", progress=False)
    with pytest.raises(KcircuitsError, match="needs fitted factors"):
        pairwise_scores(model, queries, train, strategy="ekfac", progress=False)
    with pytest.raises(KcircuitsError, match="query_rank"):
        pairwise_scores(model, queries, train, factors=factors, query_rank=0, progress=False)
    with pytest.raises(KcircuitsError, match="unknown component"):
        pairwise_scores(model, queries, train, factors=factors, components=["a9.h0"], progress=False)
    with pytest.raises(KcircuitsError, match="damping"):
        make_preconditioner("ekfac", factors, damping="auto")
    with pytest.raises(KcircuitsError, match="damping"):
        make_preconditioner("ekfac", factors, damping=-1.0)
    with pytest.raises(KcircuitsError, match="cannot serve"):
        make_preconditioner("diagonal", factors)
    with pytest.raises(KcircuitsError, match="exceeds the cap"):
        make_preconditioner("exact", None, model=model, train=train, max_params=100)
    with pytest.raises(KcircuitsError, match="needs fitted factors"):
        make_preconditioner("lissa", None, model=model, train=train)
    with pytest.raises(KcircuitsError, match="unknown lissa"):
        make_preconditioner("lissa", None, model=model, train=train, damping=0.1, lissa={"iterations": 3})
    with pytest.raises(KcircuitsError, match="needs the model"):
        make_preconditioner("exact", None)
    with pytest.raises(KcircuitsError, match="no fitted factors"):
        Factors.load("/nonexistent/folder")


def test_nan_gradient_names_the_sequence():
    model = tiny_hf("llama", hidden_size=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
                    num_hidden_layers=2, vocab_size=31, tie_word_embeddings=False)  # untied: NaN stays in one input
    train = rand_seqs(4, 6)
    ids = train.input_ids.clone()
    ids[2] = 30  # token 30 only appears in sequence 2
    ids[:2][ids[:2] == 30] = 29
    ids[3][ids[3] == 30] = 29
    from kcircuits.influence.sequences import Sequences

    train = Sequences(ids, train.attention_mask, train.loss_mask, train.texts)
    with torch.no_grad():
        model.model.embed_tokens.weight[30] = float("nan")
    with pytest.raises(KcircuitsError, match="sequence 2"):
        pairwise_scores(model, train.subset([0]), train, strategy="identity", progress=False)
