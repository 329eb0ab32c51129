"""Composition and overlap of weight circuits: counts that add up, modules found where the mask puts them
(GPT-2's fused c_attn split by hand, independently of the layout), Jaccard against a brute-force
flatten-and-compare, chance levels against independent random masks, the edge circuit's blocks against
``layout.mask_for``, and one-line errors for bad input."""

from __future__ import annotations

import inspect
import json
import math
import re

import pytest
import torch

from kcircuits.analyze import weight_composition as wc
from kcircuits.analyze.weight_composition import (ROLE_TYPES, chance_jaccard, composition, edge_circuit_mask,
                                                   edge_weight_overlap, overlap_matrix, weight_jaccard)
from kcircuits.errors import KcircuitsError
from kcircuits.graph import Graph
from kcircuits.models.masking import complement
from kcircuits.selection import random_circuit
from tests.model_helpers import tiny_model

FAMILIES = ["gpt2", "gpt_neox", "llama", "qwen2"]
_MODELS: dict[str, object] = {}


def _model(family: str):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


def _layout(family: str):
    return _model(family).layout


def _random_mask(layout, density: float, seed: int, params=None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    names = list(layout.param_shapes) if params is None else params
    return {n: torch.rand(layout.param_shapes[n], generator=gen) < density for n in names}


def _empty_mask(layout) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(s, dtype=torch.bool) for n, s in layout.param_shapes.items()}


def _kept_rows(rows: list[dict]) -> dict[str, dict]:
    return {r["module"]: r for r in rows if r["kept"] > 0}


# ----------------------------------------------------------------------------- composition
@pytest.mark.parametrize("family", FAMILIES)
def test_counts_add_up(family):
    lay = _layout(family)
    mask = _random_mask(lay, 0.3, seed=1)
    c = composition(lay, mask, random_draws=0)
    total_kept = sum(int(m.sum()) for m in mask.values())
    total_n = sum(m.numel() for m in mask.values())
    assert c["n_kept"] == total_kept and c["n_weights"] == total_n
    for rows in (c["modules"], c["parameters"], c["by_type"]):
        assert sum(r["kept"] for r in rows) == total_kept
        assert sum(r["n"] for r in rows) == total_n
    assert math.isclose(sum(r["share_of_circuit"] for r in c["by_type"]), 1.0, rel_tol=1e-9)
    assert math.isclose(sum(r["share_of_weights"] for r in c["by_type"]), 1.0, rel_tol=1e-9)
    # the parameter definition's rows are the parameters themselves
    assert {r["module"]: (r["n"], r["kept"]) for r in c["parameters"]} == {
        n: (m.numel(), int(m.sum())) for n, m in mask.items()}
    # the layers hold everything but the embeddings, the final norm and the unembedding
    outside = sum(r["kept"] for r in c["modules"] if r["layer"] is None)
    assert sum(r["kept"] for r in c["by_layer"]) == total_kept - outside
    assert [r["layer"] for r in c["by_layer"]] == list(range(lay.n_layers))
    json.dumps(c, allow_nan=False)  # JSON-ready: plain values, no NaN


def test_tied_embeddings_are_counted_once():
    lay = _layout("llama")  # tiny llama ties the unembedding to the embedding
    mask = _random_mask(lay, 0.5, seed=2)
    c = composition(lay, mask, random_draws=0)
    types = {r["type"]: r for r in c["by_type"]}
    assert "unembed" not in types
    assert types["embed"]["n"] == math.prod(lay.param_shapes["model.embed_tokens.weight"])


def _has_qkv_bias(lay) -> bool:
    return any(b.role == "b_Q" for b in lay.blocks("a0.h0"))


@pytest.mark.parametrize("family", FAMILIES)
def test_one_head_yields_exactly_its_layers_qkvo(family):
    lay = _layout(family)
    e, d_model = lay.head_dim, _model(family).hf_model.config.hidden_size
    mask = lay.mask_for("a1.h1", all_params=True)
    c = composition(lay, mask, random_draws=0)
    kept = _kept_rows(c["modules"])
    bias = e if _has_qkv_bias(lay) else 0
    assert {m: r["kept"] for m, r in kept.items()} == {
        "a1.q": e * d_model + bias, "a1.k": e * d_model + bias, "a1.v": e * d_model + bias, "a1.o": d_model * e}
    assert {r["type"] for r in c["by_type"] if r["kept"]} == {"q", "k", "v", "o"}
    assert [r["layer"] for r in c["by_layer"] if r["kept"]] == [1]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_mlp_yields_exactly_its_matrices(family):
    lay = _layout(family)
    last = lay.n_layers - 1
    mask = lay.mask_for(f"m{last}", all_params=True)
    c = composition(lay, mask, random_draws=0)
    kept = _kept_rows(c["modules"])
    expected = {f"m{last}.in", f"m{last}.out"} | ({f"m{last}.gate"} if family in ("llama", "qwen2") else set())
    assert set(kept) == expected
    assert all(r["share_kept"] == 1.0 and r["in_circuit"] for r in kept.values())
    assert sum(r["kept"] for r in kept.values()) == sum(int(m.sum()) for m in mask.values())


def test_gpt2_fused_c_attn_splits_into_q_k_v():
    lay = _layout("gpt2")
    d, H = 32, 4
    e = d // H
    name_w, name_b = "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"
    assert lay.param_shapes[name_w] == (d, 3 * d)  # Conv1D: [d_in, q | k | v]
    # head 1's key columns, cut by hand from GPT-2's storage (not through the layout)
    mask = {name_w: torch.zeros(d, 3 * d, dtype=torch.bool), name_b: torch.zeros(3 * d, dtype=torch.bool)}
    mask[name_w][:, d + e:d + 2 * e] = True
    mask[name_b][d + e:d + 2 * e] = True
    c = composition(lay, mask, random_draws=0)
    rows = {r["module"]: r for r in c["modules"]}
    assert set(rows) == {"a0.q", "a0.k", "a0.v"}
    assert all(r["n"] == d * d + d for r in rows.values())
    assert rows["a0.k"]["kept"] == d * e + e and rows["a0.q"]["kept"] == rows["a0.v"]["kept"] == 0
    assert math.isclose(rows["a0.k"]["share_kept"], 1 / H)
    params = {r["module"]: r for r in c["parameters"]}
    assert params[name_w]["type"] == params[name_b]["type"] == "q+k+v"
    assert params[name_w]["kept"] == d * e
    # the whole fused matrix: three fully kept modules of equal size
    whole = composition(lay, {name_w: torch.ones(d, 3 * d, dtype=torch.bool)}, random_draws=0)
    assert [(r["module"], r["n"], r["share_kept"]) for r in whole["modules"]] == [
        ("a0.q", d * d, 1.0), ("a0.k", d * d, 1.0), ("a0.v", d * d, 1.0)]


def test_module_level_norm_fraction_under_both_definitions():
    """GPT-2 (3 layers): keep every norm, layer 0's c_attn bias and c_fc bias, layer 1's c_fc weight.

    Component modules in (threshold 0.5): the 2·3 + 1 = 7 norms and m1.in (its weight is 4096 of its
    4224 entries); the biases alone are a small share of their q/k/v and mlp_in modules. Parameter
    modules in: the 2·7 = 14 norm weights and biases, the two biases and the c_fc weight."""
    lay = _layout("gpt2")
    L = lay.n_layers
    mask = _empty_mask(lay)
    for name in mask:
        if re.search(r"(ln_1|ln_2|ln_f)\.(weight|bias)$", name) or name in (
                "transformer.h.0.attn.c_attn.bias", "transformer.h.0.mlp.c_fc.bias", "transformer.h.1.mlp.c_fc.weight"):
            mask[name].fill_(True)
    c = composition(lay, mask, module_threshold=0.5, random_draws=0)
    comp, param = c["module_level"]["component"], c["module_level"]["parameter"]
    n_norms = 2 * L + 1
    assert comp["n_in"] == n_norms + 1 and "m1.in" in comp["in_modules"]
    assert comp["norm_fraction"] == n_norms / (n_norms + 1)
    assert param["n_in"] == 2 * n_norms + 3
    assert param["norm_fraction"] == 2 * n_norms / (2 * n_norms + 3)
    assert comp["n_norm_modules"] == n_norms and param["n_norm_modules"] == 2 * n_norms
    assert param["norm_share_of_modules"] == 2 * n_norms / len(lay.param_shapes)
    # a threshold of 1 keeps only fully kept modules: the same sets here
    strict = composition(lay, mask, module_threshold=1.0, random_draws=0)["module_level"]
    assert strict["parameter"]["n_in"] == param["n_in"]
    assert strict["component"]["n_in"] == n_norms


def test_random_baseline_at_threshold_zero_is_the_norm_share_of_modules():
    lay = _layout("gpt2")
    c = composition(lay, _random_mask(lay, 0.2, seed=3), module_threshold=0.0, random_draws=20)
    for level in c["module_level"].values():
        assert level["n_in"] == level["n_modules"]
        assert level["random"]["mean"] == pytest.approx(level["norm_share_of_modules"], abs=1e-12)
        assert level["random"]["std"] == pytest.approx(0.0, abs=1e-12)


def test_random_baseline_matches_entry_level_random_masks():
    """The baseline draws one binomial per module; drawing every entry instead must give the same mean.

    Brute force over parameters (the parameter definition): a parameter is in when the mean of its
    random mask is >= the threshold. 400 draws each side; the per-draw fraction's spread is about 0.13,
    so the two means differ by about 0.01 (one standard error); tolerance 0.05."""
    lay = _layout("gpt2")
    density, threshold, draws = 0.5, 0.53, 400
    mask = _random_mask(lay, density, seed=4)
    c = composition(lay, mask, module_threshold=threshold, random_draws=draws, seed=5)
    baseline = c["module_level"]["parameter"]["random"]
    gen = torch.Generator().manual_seed(6)
    is_norm = [bool(re.search(r"(ln_1|ln_2|ln_f)\.", n)) for n in lay.param_shapes]
    fractions = []
    for _ in range(draws):
        inside = [float((torch.rand(s, generator=gen) < c["density"]).double().mean()) >= threshold
                  for s in lay.param_shapes.values()]
        if any(inside):
            fractions.append(sum(i and n for i, n in zip(inside, is_norm, strict=True)) / sum(inside))
    assert baseline["draws"] == draws and len(fractions) > draws // 2
    assert baseline["mean"] == pytest.approx(sum(fractions) / len(fractions), abs=0.05)
    # and the norms are "in" by chance far more often than their share of the weights says
    norm_weight_share = next(r["share_of_weights"] for r in c["by_type"] if r["type"] == "norm")
    assert baseline["mean"] > 10 * norm_weight_share


# ----------------------------------------------------------------------------- overlap
def _brute_jaccard(a: dict, b: dict, region: dict | None = None) -> float:
    """Flatten-and-compare over every parameter (``region``: only where it is True)."""
    fa = torch.cat([a[n].flatten() for n in a])
    fb = torch.cat([b[n].flatten() for n in a])
    if region is not None:
        keep = torch.cat([region[n].flatten() for n in a])
        fa, fb = fa[keep], fb[keep]
    union = int((fa | fb).sum())
    return int((fa & fb).sum()) / union if union else 1.0


def _type_regions(lay) -> dict[str, dict[str, torch.Tensor]]:
    """Per type, the entries of that type, built from whole-parameter block masks."""
    regions: dict[str, dict[str, torch.Tensor]] = {}
    for node in lay.nodes():
        for b in lay.blocks(node):
            t = ROLE_TYPES[b.role]
            r = regions.setdefault(t, {n: torch.zeros(s, dtype=torch.bool) for n, s in lay.param_shapes.items()})
            r[b.param_name] |= b.mask(lay.param_shapes[b.param_name])
    return regions


@pytest.mark.parametrize("family", ["gpt_neox", "qwen2"])  # untied: every entry has one type
def test_jaccard_properties_and_brute_force(family):
    lay = _layout(family)
    a, b = _random_mask(lay, 0.3, seed=7), _random_mask(lay, 0.5, seed=8)
    ja = weight_jaccard(lay, a, b)
    assert weight_jaccard(lay, a, a)["overall"] == 1.0
    assert all(v == 1.0 for v in weight_jaccard(lay, a, a)["by_type"].values())
    assert weight_jaccard(lay, a, complement(a))["overall"] == 0.0
    assert weight_jaccard(lay, b, a) == ja
    assert ja["overall"] == pytest.approx(_brute_jaccard(a, b), abs=1e-12)
    regions = _type_regions(lay)
    assert set(ja["by_type"]) == set(regions)
    for t, region in regions.items():
        assert ja["by_type"][t] == pytest.approx(_brute_jaccard(a, b, region), abs=1e-12), t


def test_jaccard_of_two_empty_circuits_is_one_not_nan():
    lay = _layout("qwen2")
    j = weight_jaccard(lay, _empty_mask(lay), _empty_mask(lay))
    assert j["overall"] == 1.0 and all(v == 1.0 for v in j["by_type"].values())
    assert j["chance"]["overall"] == 1.0
    json.dumps(j, allow_nan=False)


def test_overlap_matrix_diagonal_symmetry_and_entries():
    lay = _layout("llama")
    masks = {f"r{i}": _random_mask(lay, d, seed=10 + i) for i, d in enumerate((0.2, 0.4, 0.7))}
    om = overlap_matrix(lay, masks)
    assert om["names"] == ["r0", "r1", "r2"]
    mats = [om["overall"]] + list(om["by_type"].values())
    for m in mats:
        for i in range(3):
            assert m["jaccard"][i][i] == 1.0
            for j in range(3):
                assert m["jaccard"][i][j] == m["jaccard"][j][i]
                assert m["chance"][i][j] == m["chance"][j][i]
    for i, a in enumerate(om["names"]):
        d = om["density"][a]
        assert om["overall"]["chance"][i][i] == pytest.approx(d / (2 - d), abs=1e-12)
        for j, b in enumerate(om["names"]):
            pair = weight_jaccard(lay, masks[a], masks[b])
            assert om["overall"]["jaccard"][i][j] == pair["overall"]
            assert {t: om["by_type"][t]["jaccard"][i][j] for t in om["by_type"]} == pair["by_type"]
    json.dumps(om, allow_nan=False)


def test_chance_levels_match_independent_random_masks():
    """Two independent random masks' observed Jaccard is the reported chance level, overall and per type.

    The analytic value d_a·d_b/(d_a+d_b−d_a·d_b) is exact for the expected counts; on ~40k entries the
    observed value is within 0.02 of it; per type (>= 2,000 entries, a few hundred kept) within 0.04."""
    lay = _layout("gpt_neox")
    a, b = _random_mask(lay, 0.3, seed=20), _random_mask(lay, 0.6, seed=21)
    j = weight_jaccard(lay, a, b)
    n = sum(m.numel() for m in a.values())
    da, db = sum(int(m.sum()) for m in a.values()) / n, sum(int(m.sum()) for m in b.values()) / n
    assert j["chance"]["overall"] == pytest.approx(da * db / (da + db - da * db), abs=1e-12)
    assert j["overall"] == pytest.approx(j["chance"]["overall"], abs=0.02)
    sizes = {r["type"]: r["n"] for r in composition(lay, a, random_draws=0)["by_type"]}
    checked = [t for t, size in sizes.items() if size >= 2000]
    assert len(checked) >= 5
    for t in checked:
        assert j["by_type"][t] == pytest.approx(j["chance"]["by_type"][t], abs=0.04), t
    assert chance_jaccard(0.0, 0.0) == 1.0 and chance_jaccard(1.0, 1.0) == 1.0 and chance_jaccard(0.0, 0.5) == 0.0


# ----------------------------------------------------------------------------- edge vs weight circuit
def _edge_nodes(family: str, n_edges: int = 12, seed: int = 0) -> list[str]:
    m = _model(family)
    return random_circuit(Graph.from_model(m.weights), n_edges, seed=seed).nodes()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edge_circuit_mask_is_layout_mask_for_restricted_to_masked_params(family):
    lay = _layout(family)
    nodes = _edge_nodes(family)
    assert any(n.startswith("a") for n in nodes) and "logits" in nodes
    params = [n for n in lay.param_shapes if ".layers." in n or ".h." in n]  # embeddings not masked
    em = edge_circuit_mask(lay, nodes, params)
    full = lay.mask_for(nodes)
    assert list(em) == params
    for p in params:
        expected = full.get(p, torch.zeros(lay.param_shapes[p], dtype=torch.bool))
        assert torch.equal(em[p], expected), p
    assert set(edge_circuit_mask(lay, nodes)) == set(lay.param_shapes)


def test_edge_weight_overlap_of_the_edge_blocks_themselves_and_their_complement():
    lay = _layout("llama")
    nodes = ["input", "a0.h1", "a2.h4", "m1", "logits"]
    edge = edge_circuit_mask(lay, nodes)
    same = edge_weight_overlap(lay, edge, nodes)
    assert same["jaccard"] == 1.0 and same["weight_in_edge_share"] == 1.0 and same["edge_kept_share"] == 1.0
    assert all(r["share_kept"] == 1.0 for r in same["nodes"])
    n = sum(math.prod(s) for s in lay.param_shapes.values())
    e = sum(int(m.sum()) for m in edge.values())
    assert same["edge_blocks_share"] == e / n
    other = edge_weight_overlap(lay, complement(edge), nodes)
    assert other["jaccard"] == 0.0 and other["weight_in_edge_share"] == 0.0
    assert all(r["share_kept"] == 0.0 for r in other["nodes"])
    # the complement keeps every norm: uncovered by any edge-circuit node, reported on its own
    norms = sum(math.prod(lay.param_shapes[b.param_name]) for nd in lay.nodes("norm") for b in lay.blocks(nd))
    assert other["uncovered"] == {"n": norms, "kept": norms, "share_of_circuit": norms / (n - e)}
    json.dumps(other, allow_nan=False)


def test_edge_weight_overlap_per_node_shares_sorted_and_brute_force():
    lay = _layout("gpt2")
    nodes = _edge_nodes("gpt2", n_edges=20, seed=3)
    weight = _random_mask(lay, 0.4, seed=30)
    weight["transformer.h.1.mlp.c_fc.weight"].fill_(True)  # make m1 stand out
    ov = edge_weight_overlap(lay, weight, nodes + ["m1"])
    shares = [r["share_kept"] for r in ov["nodes"]]
    assert shares == sorted(shares, reverse=True)
    assert len(ov["nodes"]) == len(set(nodes + ["m1"]))
    edge = lay.mask_for(nodes + ["m1"], all_params=True)
    assert ov["jaccard"] == pytest.approx(_brute_jaccard(weight, edge), abs=1e-12)
    for r in ov["nodes"]:
        own = lay.mask_for(r["node"], all_params=True)
        assert r["kept"] == sum(int((own[p] & weight[p]).sum()) for p in weight)
        assert r["n"] == sum(int(own[p].sum()) for p in weight)
    assert ov["chance_jaccard"] == pytest.approx(chance_jaccard(ov["density"], ov["edge_blocks_share"]))


# ----------------------------------------------------------------------------- bad input
def test_bad_input_gives_one_line_errors():
    lay, other = _layout("llama"), _layout("gpt2")
    gpt2_mask = _random_mask(other, 0.5, seed=40)
    mask = _random_mask(lay, 0.5, seed=41)
    with pytest.raises(KcircuitsError, match="another model"):
        composition(lay, gpt2_mask)
    wrong_shape = dict(mask)
    wrong_shape["model.norm.weight"] = torch.ones(7, dtype=torch.bool)
    with pytest.raises(KcircuitsError, match="another model"):
        weight_jaccard(lay, mask, wrong_shape)
    with pytest.raises(KcircuitsError, match="bool tensor"):
        composition(lay, {"model.norm.weight": torch.ones(48)})
    with pytest.raises(KcircuitsError, match="empty"):
        composition(lay, {})
    for bad in (-0.1, 1.5, float("nan"), "half"):
        with pytest.raises(KcircuitsError, match="module_threshold"):
            composition(lay, mask, module_threshold=bad)
    with pytest.raises(KcircuitsError, match="random_draws"):
        composition(lay, mask, random_draws=-1)
    with pytest.raises(KcircuitsError, match="unknown circuit node"):
        edge_circuit_mask(lay, ["input", "a9.h0"])
    with pytest.raises(KcircuitsError, match="unknown circuit node"):
        edge_weight_overlap(lay, mask, ["m0", "mlp0"])
    with pytest.raises(KcircuitsError, match="unknown parameter"):
        edge_circuit_mask(lay, ["m0"], ["transformer.h.0.mlp.c_fc.weight"])
    with pytest.raises(KcircuitsError, match="different parameters"):
        overlap_matrix(lay, {"a": mask, "b": {k: v for k, v in mask.items() if k != "model.norm.weight"}})
    with pytest.raises(KcircuitsError, match="at least one"):
        overlap_matrix(lay, {})
    with pytest.raises(KcircuitsError) as err:
        composition(lay, gpt2_mask)
    assert "\n" not in str(err.value)


def test_public_api_documents_every_parameter_and_field():
    for name in wc.__all__:
        obj = getattr(wc, name)
        if inspect.isfunction(obj):
            doc = inspect.getdoc(obj) or ""
            for p in inspect.signature(obj).parameters:
                assert re.search(rf"(?<![A-Za-z0-9_]){p}(?![A-Za-z0-9_])", doc), f"{name}: {p} undocumented"
    doc = inspect.getdoc(wc.CompositionSettings)
    for f in ("module_threshold", "random_draws", "seed"):
        assert f in doc
