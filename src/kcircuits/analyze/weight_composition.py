"""What a weight circuit is made of, how much two weight circuits share, and how one compares with an edge circuit.

A *weight circuit* is a :data:`~kcircuits.models.masking.WeightMask` (``{param_name: bool tensor}``, True =
kept; Ge et al. 2024). Everything here is bookkeeping over the model's
:class:`~kcircuits.models.layout.ParameterLayout`: each masked parameter is cut into the layout's blocks and
counted with one ``sum`` per block (no forward pass, no loop over entries), so SmolLM2-135M's 135M entries
take well under a second. Only the parameters a mask names are analysed (a parameter left out of the mask
is not part of the circuit question: see :mod:`kcircuits.models.masking`).

**Module types** come from the blocks' roles (:data:`ROLE_TYPES`): ``q``, ``k``, ``v``, ``o`` (a head's
``W_Q``/``W_K``/``W_V`` rows with their bias entries, its ``W_O`` columns), ``attn_bias`` (the attention
output bias, which belongs to no head), ``mlp_in``, ``mlp_gate``, ``mlp_out`` (matrices with their biases),
``norm`` (weight and bias of every norm, the final one included), ``embed`` (token and learned position
embeddings) and ``unembed``. Tied embeddings are one matrix: it is counted once, as ``embed`` (the tied
model has no ``unembed`` entries). With grouped-query attention a kv group's k/v rows are counted once.

**Two definitions of a module** (the module-level view depends on which):

* ``"component"``: a module is one (layer, type) of the model's computation: layer 3's ``q`` is every
  head's ``W_Q`` rows and ``b_Q`` entries of layer 3, wherever they are stored, so GPT-2's fused
  ``c_attn`` splits into the layer's ``q``, ``k`` and ``v`` modules. Norms are the exception: a layer
  has two (``a3.ln`` in front of attention, ``m3.ln`` in front of the MLP), each one module with its
  weight and bias. Names: ``a3.q``, ``a3.k``, ``a3.v``, ``a3.o``, ``a3.b_O``, ``a3.ln``, ``m3.ln``,
  ``m3.in``, ``m3.gate``, ``m3.out``, ``ln_final``, ``embed``, ``pos_embed``, ``unembed``.
* ``"parameter"``: a module is one HF parameter tensor, weight and bias separate
  (``transformer.h.3.ln_1.weight``, ``transformer.h.3.attn.c_attn.bias``): the count Ge et al. use.
  Its type is the ``+``-joined types of its entries (``q+k+v`` for a fused ``c_attn``).

A module is *in the circuit* when the circuit keeps at least ``module_threshold`` of its entries.

**Which definition gives Ge et al.'s "up to 60% of the circuit are layer-norm modules".** It is the
module-level view under the ``"parameter"`` definition: the share of the in-circuit *named parameters*
that are norm weights or biases. It is not a share of weights: GPT-2 small's 25 layer norms hold 38,400
of its 124M weights (0.03%), so even a 5% circuit that kept every one of them would be 0.6% norm by
weight. Two things inflate the module count, and :func:`composition` reports both next to it:
norm parameters are a large share of all named parameters (50 of GPT-2 small's 148, 34%, against 25 of
its 111 component modules, 23%: ``norm_share_of_modules``), and a "kept share >= threshold" rule lets a
768-entry vector in far more easily than a 2.4M-entry matrix when the circuit's density is near the
threshold (the ``random`` baseline: the same fraction for random masks of the circuit's density).

**Overlap** is the Jaccard index ``|A ∩ B| / |A ∪ B|`` over kept entries, overall and per type. Two
empty sets have Jaccard 1.0 (they agree), as in :func:`kcircuits.analyze.compare.jaccard`, so no value
is ever NaN. The chance level next to each value is :func:`chance_jaccard` of the two masks' densities
over the same entries: the Jaccard two independent random masks of those densities have (the ratio of
the expected intersection to the expected union, which it approaches as the number of entries grows).

**Edge circuit vs weight circuit**: an edge circuit's nodes (``input``, heads ``a{l}.h{h}``, MLPs
``m{l}``, ``logits``) own parameter blocks through the layout; see :func:`edge_weight_overlap`.

Undefined ratios (a share of an empty circuit, a norm fraction with no module in) are ``None`` (JSON
``null``); every result is plain ints, floats, strings, lists and dicts, ready for ``report.json``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch

from kcircuits.errors import KcircuitsError
from kcircuits.models.layout import ParamBlock, ParameterLayout
from kcircuits.models.masking import WeightMask, check_mask_shapes
from kcircuits.weight_circuits.settings import CompositionSettings

__all__ = ["DEFINITIONS", "EDGE_KINDS", "MODULE_TYPES", "ROLE_TYPES", "CompositionSettings", "chance_jaccard",
           "composition", "edge_circuit_mask", "edge_weight_overlap", "overlap_matrix", "weight_jaccard"]

#: module types, in the order tables list them
MODULE_TYPES = ("embed", "q", "k", "v", "o", "attn_bias", "mlp_in", "mlp_gate", "mlp_out", "norm", "unembed")

#: layout block role -> module type
ROLE_TYPES = {
    "W_E": "embed", "W_pos": "embed",
    "W_Q": "q", "b_Q": "q", "W_K": "k", "b_K": "k", "W_V": "v", "b_V": "v", "W_O": "o",
    "b_O": "attn_bias",
    "W_in": "mlp_in", "b_in": "mlp_in", "W_gate": "mlp_gate", "b_gate": "mlp_gate", "W_out": "mlp_out",
    "b_out": "mlp_out",
    "norm_w": "norm", "norm_b": "norm",
    "W_U": "unembed", "b_U": "unembed",
}

#: the two definitions of a module (see the module docstring)
DEFINITIONS = ("component", "parameter")

#: the layout node kinds an edge circuit has nodes for (norms and the attention output bias have none)
EDGE_KINDS = ("input", "head", "mlp", "unembed")


# ----------------------------------------------------------------------------- the partition
@dataclass(frozen=True)
class _Part:
    """One distinct block of one masked parameter and where it is counted.

    ``module`` is its module under the ``"component"`` definition, ``kind`` the layout kind of the node
    that owns it first (in model order), ``size`` its number of entries."""

    block: ParamBlock
    type: str
    layer: int | None
    module: str
    kind: str
    size: int


def _layer_of(node: str) -> int | None:
    """The layer of a layout node (``a3.h1``, ``m3``, ``a3.ln`` -> 3); None for input, logits, ln_final."""
    match = re.match(r"[am](\d+)(\.|$)", node)
    return int(match.group(1)) if match else None


def _component_module(node: str, role: str, mtype: str, layer: int | None) -> str:
    """The ``"component"`` module a block belongs to: heads and MLP matrices pool per (layer, type);
    norms and the attention output bias are layout nodes of their own."""
    if mtype in ("q", "k", "v", "o"):
        return f"a{layer}.{mtype}"
    if mtype.startswith("mlp_"):
        return f"m{layer}.{mtype[4:]}"
    if mtype == "embed":
        return "pos_embed" if role == "W_pos" else "embed"
    if mtype == "unembed":
        return "unembed"
    return node


def _block_size(block: ParamBlock, shape: tuple[int, ...]) -> int:
    """Entries of ``block`` in a parameter of ``shape`` (on the meta device: nothing is allocated)."""
    return block.select(torch.empty(shape, device="meta")).numel()


def _partition(layout: ParameterLayout, params: Iterable[str]) -> list[_Part]:
    """The distinct blocks of ``params``, in model order, each entry of each parameter in exactly one.

    Blocks several nodes own (a kv group's k/v rows, tied embeddings) come once, with their first owner.
    Raises if the layout's blocks of a parameter overlap without being identical (they could not be
    counted once)."""
    wanted = set(params)
    parts: list[_Part] = []
    seen: set[tuple] = set()
    for node in layout.nodes():
        for b in layout.blocks(node):
            key = (b.param_name, _index_key(b.rows), _index_key(b.cols))
            if b.param_name not in wanted or key in seen:
                continue
            seen.add(key)
            if b.role not in ROLE_TYPES:
                raise KcircuitsError(f"the layout's block role {b.role!r} has no module type; add it to ROLE_TYPES")
            mtype, layer = ROLE_TYPES[b.role], _layer_of(node)
            parts.append(_Part(b, mtype, layer, _component_module(node, b.role, mtype, layer), layout.kind(node),
                               _block_size(b, layout.param_shapes[b.param_name])))
    _check_partition(layout, parts, wanted)
    return parts


def _index_key(index: slice | None) -> tuple | None:
    return None if index is None else (index.start, index.stop, index.step)


def _check_partition(layout: ParameterLayout, parts: list[_Part], params: set[str]) -> None:
    """Each parameter's distinct blocks must add up to exactly its entries (else counts would not add up)."""
    covered = dict.fromkeys(params, 0)
    for p in parts:
        covered[p.block.param_name] += p.size
    for name, n in covered.items():
        if n != math.prod(layout.param_shapes[name]):
            raise KcircuitsError(f"the {layout.family} layout's blocks of {name!r} cover {n} of its "
                                 f"{math.prod(layout.param_shapes[name])} entries once; its weights cannot be "
                                 "split into modules")


def _kept_counts(parts: list[_Part], mask: Mapping[str, torch.Tensor]) -> list[int]:
    """Kept entries per part: one ``sum`` per block (``[n_parts]`` ints)."""
    if not parts:
        return []
    return torch.stack([p.block.select(mask[p.block.param_name]).sum().cpu() for p in parts]).tolist()


def _shared_counts(parts: list[_Part], a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[int]:
    """Entries kept by both masks, per part (``[n_parts]`` ints)."""
    if not parts:
        return []
    out = []
    for p in parts:
        name = p.block.param_name
        sa = p.block.select(a[name])
        out.append((sa & p.block.select(b[name]).to(sa.device)).sum().cpu())
    return torch.stack(out).tolist()


# ----------------------------------------------------------------------------- input checks
def _check_mask(layout: ParameterLayout, mask: Mapping[str, torch.Tensor], what: str = "weight mask") -> None:
    """Names, shapes and dtypes of ``mask`` against the layout (one-line errors)."""
    check_mask_shapes(layout.param_shapes, mask, what)


def _check_same_params(masks: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """The parameter names all masks cover (they must be the same set, in the first mask's order)."""
    names = list(masks)
    first = list(masks[names[0]])
    for other in names[1:]:
        if set(masks[other]) != set(first):
            raise KcircuitsError(f"weight masks {names[0]!r} and {other!r} cover different parameters; "
                                 "compare weight circuits trained over the same parameters")
    return first


def _check_nodes(layout: ParameterLayout, nodes: str | Iterable[str]) -> list[str]:
    """``nodes`` as a list of layout node names, each known."""
    names = [nodes] if isinstance(nodes, str) else list(nodes)
    unknown = [n for n in names if not isinstance(n, str) or n not in layout]
    if unknown:
        raise KcircuitsError(f"unknown circuit node(s) {unknown[:3]}: use names such as input, a0.h0, m0, logits "
                             f"(this model has {layout.n_layers} layers of {layout.n_heads} heads)")
    return names


# ----------------------------------------------------------------------------- composition
def _ratio(num: int, den: int) -> float | None:
    """``num / den``, None when ``den`` is 0 (an undefined share)."""
    return num / den if den else None


def _module_rows(parts: list[_Part], kept: list[int], definition: str, threshold: float) -> list[dict]:
    """One row per module under ``definition``: module, layer, type, n, kept, share_kept, in_circuit."""
    rows: dict[str, dict] = {}
    for p, k in zip(parts, kept, strict=True):
        name = p.module if definition == "component" else p.block.param_name
        row = rows.setdefault(name, {"module": name, "layer": p.layer, "types": [], "n": 0, "kept": 0})
        if p.type not in row["types"]:
            row["types"].append(p.type)
        row["n"] += p.size
        row["kept"] += k
    out = []
    for row in rows.values():
        share = row["kept"] / row["n"]
        out.append({"module": row["module"], "layer": row["layer"], "type": "+".join(row.pop("types")),
                    "n": row["n"], "kept": row["kept"], "share_kept": share, "in_circuit": share >= threshold})
    return out


def _group_rows(parts: list[_Part], kept: list[int], key: str, keys: Iterable) -> list[dict]:
    """Totals per value of the part attribute ``key`` (``type`` or ``layer``), in the order of ``keys``
    (values without entries are left out): n, kept, share_kept, share_of_weights, share_of_circuit."""
    n_all, kept_all = sum(p.size for p in parts), sum(kept)
    sums: dict = {}
    for p, k in zip(parts, kept, strict=True):
        n, kk = sums.get(getattr(p, key), (0, 0))
        sums[getattr(p, key)] = (n + p.size, kk + k)
    rows = []
    for value in keys:
        if value in sums:
            n, k = sums[value]
            rows.append({key: value, "n": n, "kept": k, "share_kept": k / n, "share_of_weights": n / n_all,
                         "share_of_circuit": _ratio(k, kept_all)})
    return rows


def _random_norm_fraction(sizes: list[int], is_norm: list[bool], threshold: float, density: float,
                          draws: int, seed: int) -> dict:
    """The module-level norm fraction for random masks: each entry kept with probability ``density``.

    A random mask's kept count in a module of n entries is Binomial(n, density), independent across
    modules, so one draw is one binomial per module (no mask is built). Returns the mean and standard
    deviation over the draws in which some module is in, and how many draws had none.

    Args:
        sizes: entries per module, ``[n_modules]``.
        is_norm: whether each module is a norm, ``[n_modules]``.
        threshold: the in-circuit share.
        density: the circuit's density (the random masks' keep probability).
        draws: number of random masks.
        seed: seed of the draws.
    """
    if draws == 0:
        return {"draws": 0, "mean": None, "std": None, "n_without_modules": 0}
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor(sizes, dtype=torch.float64).expand(draws, -1).contiguous()  # [draws, n_modules]
    kept = torch.binomial(counts, torch.full_like(counts, density), generator=gen)
    inside = kept / counts >= threshold
    n_in = inside.sum(1)
    n_norm_in = (inside & torch.tensor(is_norm)).sum(1)
    some = n_in > 0
    fractions = n_norm_in[some].double() / n_in[some]  # [draws with some module in]
    mean = float(fractions.mean()) if len(fractions) else None
    std = float(fractions.std()) if len(fractions) > 1 else (0.0 if len(fractions) else None)
    return {"draws": draws, "mean": mean, "std": std, "n_without_modules": int((~some).sum())}


def _module_level(rows: list[dict], settings: CompositionSettings, density: float) -> dict:
    """Which modules are in the circuit, what share of them are norms, and that share's chance levels."""
    inside = [r for r in rows if r["in_circuit"]]
    in_by_type: dict[str, int] = {}
    for r in inside:
        in_by_type[r["type"]] = in_by_type.get(r["type"], 0) + 1
    is_norm = [r["type"] == "norm" for r in rows]
    n_norm_in = sum(r["type"] == "norm" for r in inside)
    return {"n_modules": len(rows), "n_in": len(inside), "in_modules": [r["module"] for r in inside],
            "in_by_type": in_by_type, "n_norm_modules": sum(is_norm), "n_norm_in": n_norm_in,
            "norm_fraction": _ratio(n_norm_in, len(inside)), "norm_share_of_modules": sum(is_norm) / len(rows),
            "random": _random_norm_fraction([r["n"] for r in rows], is_norm, settings.module_threshold, density,
                                            settings.random_draws, settings.seed)}


def composition(layout: ParameterLayout, mask: Mapping[str, torch.Tensor], module_threshold: float = 0.5,
                random_draws: int = 200, seed: int = 0) -> dict:
    """What a weight circuit is made of: per module, per type, per layer, and the module-level view.

    Counts are over the parameters ``mask`` names (see the module docstring for the types and the two
    module definitions). Every share is a plain float, or None where it is undefined (a share of an empty
    circuit).

    Args:
        layout: the model's :class:`~kcircuits.models.layout.ParameterLayout`.
        mask: the weight circuit, ``{param_name: bool tensor of the parameter's stored shape}``.
        module_threshold: a module is in the circuit when at least this share of its entries is kept ([0, 1]).
        random_draws: random masks of the circuit's density drawn for the module-level chance level (0: none).
        seed: seed of those draws.

    Returns:
        ``{"settings", "n_weights", "n_kept", "density", "modules", "parameters", "by_type", "by_layer",
        "module_level"}``: ``modules`` and ``parameters`` are rows (``module``, ``layer`` (None outside the
        layers), ``type``, ``n``, ``kept``, ``share_kept``, ``in_circuit``) under the ``"component"`` and
        ``"parameter"`` definitions; ``by_type`` and ``by_layer`` rows have ``n``, ``kept``, ``share_kept``
        (of the type's weights), ``share_of_weights`` (the type's share of all masked weights) and
        ``share_of_circuit`` (of the circuit's kept weights; ``by_layer`` covers the transformer layers only,
        so embeddings, the final norm and the unembedding are in ``by_type`` alone); ``module_level`` has one
        entry per definition: ``n_modules``, ``n_in``, ``in_modules``, ``in_by_type``, ``n_norm_modules``,
        ``n_norm_in``, ``norm_fraction`` (None with no module in), ``norm_share_of_modules`` and ``random``
        (``draws``, ``mean``, ``std`` of the norm fraction of random masks of the same density, and
        ``n_without_modules``: draws in which no module was in).
    """
    settings = CompositionSettings(module_threshold, random_draws, seed)
    _check_mask(layout, mask)
    parts = _partition(layout, mask)
    kept = _kept_counts(parts, mask)
    n_weights, n_kept = sum(p.size for p in parts), sum(kept)
    density = n_kept / n_weights
    rows = {d: _module_rows(parts, kept, d, settings.module_threshold) for d in DEFINITIONS}
    return {"settings": asdict(settings), "n_weights": n_weights, "n_kept": n_kept, "density": density,
            "modules": rows["component"], "parameters": rows["parameter"],
            "by_type": _group_rows(parts, kept, "type", MODULE_TYPES),
            "by_layer": _group_rows(parts, kept, "layer", range(layout.n_layers)),
            "module_level": {d: _module_level(rows[d], settings, density) for d in DEFINITIONS}}


# ----------------------------------------------------------------------------- overlap
def chance_jaccard(d_a: float, d_b: float) -> float:
    """The Jaccard index of two independent random masks that keep each entry with probability ``d_a``
    and ``d_b``: ``d_a·d_b / (d_a + d_b − d_a·d_b)`` (expected intersection over expected union; 1.0 when
    both are 0, as for two empty sets).

    Args:
        d_a: the first mask's density, in [0, 1].
        d_b: the second mask's density, in [0, 1].
    """
    union = d_a + d_b - d_a * d_b
    return d_a * d_b / union if union > 0 else 1.0


def _jaccard(shared: int, kept_a: int, kept_b: int) -> float:
    """|A ∩ B| / |A ∪ B| from counts; 1.0 for two empty sets."""
    union = kept_a + kept_b - shared
    return shared / union if union else 1.0


def _pair_values(parts: list[_Part], kept_a: list[int], kept_b: list[int], shared: list[int]) -> dict:
    """Jaccard and chance level, overall and per type, from per-part counts."""
    groups: dict[str, list[int]] = {}
    for p, ka, kb, s in zip(parts, kept_a, kept_b, shared, strict=True):
        g = groups.setdefault(p.type, [0, 0, 0, 0])
        g[0], g[1], g[2], g[3] = g[0] + p.size, g[1] + ka, g[2] + kb, g[3] + s
    n, ka, kb, s = (sum(g[i] for g in groups.values()) for i in range(4))
    by_type = {t: groups[t] for t in MODULE_TYPES if t in groups}
    return {"overall": _jaccard(s, ka, kb),
            "by_type": {t: _jaccard(g[3], g[1], g[2]) for t, g in by_type.items()},
            "chance": {"overall": chance_jaccard(ka / n, kb / n),
                       "by_type": {t: chance_jaccard(g[1] / g[0], g[2] / g[0]) for t, g in by_type.items()}}}


def weight_jaccard(layout: ParameterLayout, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict:
    """How much two weight circuits share: the Jaccard index of their kept entries, overall and per type.

    Both masks must name the same parameters. Two empty sets have Jaccard 1.0 (never NaN).

    Args:
        layout: the model's :class:`~kcircuits.models.layout.ParameterLayout` (it gives each entry's type).
        a: the first weight circuit (a weight mask).
        b: the second weight circuit, over the same parameters.

    Returns:
        ``{"overall": float, "by_type": {type: float}, "chance": {"overall": float, "by_type": {...}}}``:
        ``chance`` is :func:`chance_jaccard` of the two masks' densities over the same entries.
    """
    _check_mask(layout, a, "first weight mask")
    _check_mask(layout, b, "second weight mask")
    parts = _partition(layout, _check_same_params({"a": a, "b": b}))
    return _pair_values(parts, _kept_counts(parts, a), _kept_counts(parts, b), _shared_counts(parts, a, b))


def overlap_matrix(layout: ParameterLayout, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> dict:
    """Pairwise Jaccard of several weight circuits (one per relation, say), overall and per type.

    Each mask's kept counts are taken once and each pair's shared counts once (the matrix is symmetric,
    its diagonal 1).

    Args:
        layout: the model's :class:`~kcircuits.models.layout.ParameterLayout`.
        masks: ``{name: weight mask}``, all over the same parameters; names label rows and columns.

    Returns:
        ``{"names": [...], "density": {name: float}, "overall": {"jaccard": [[...]], "chance": [[...]]},
        "by_type": {type: {"jaccard": [[...]], "chance": [[...]]}}}``: rows and columns in ``names`` order;
        ``chance`` is the Jaccard expected for independent random masks of the same densities.
    """
    if not isinstance(masks, Mapping) or not masks:
        raise KcircuitsError("give at least one named weight mask to compare ({name: weight mask})")
    for name, m in masks.items():
        _check_mask(layout, m, f"weight mask {name!r}")
    names = list(masks)
    parts = _partition(layout, _check_same_params(masks))
    kept = {name: _kept_counts(parts, masks[name]) for name in names}
    values: dict[tuple[int, int], dict] = {}
    for i, a in enumerate(names):
        for j in range(i, len(names)):
            b = names[j]
            shared = kept[a] if i == j else _shared_counts(parts, masks[a], masks[b])
            values[i, j] = values[j, i] = _pair_values(parts, kept[a], kept[b], shared)
    n = sum(p.size for p in parts)
    types = list(values[0, 0]["by_type"])
    size = range(len(names))

    def matrix(get) -> list[list[float]]:
        return [[get(values[i, j]) for j in size] for i in size]

    return {"names": names, "density": {name: sum(kept[name]) / n for name in names},
            "overall": {"jaccard": matrix(lambda v: v["overall"]), "chance": matrix(lambda v: v["chance"]["overall"])},
            "by_type": {t: {"jaccard": matrix(lambda v, t=t: v["by_type"][t]),
                            "chance": matrix(lambda v, t=t: v["chance"]["by_type"][t])} for t in types}}


# ----------------------------------------------------------------------------- edge vs weight circuit
def edge_circuit_mask(layout: ParameterLayout, nodes: str | Iterable[str],
                      params: Iterable[str] | None = None) -> WeightMask:
    """The parameter blocks of an edge circuit's nodes as a weight mask (True on every entry they own).

    A head owns its q/k/v rows (with grouped-query attention, its kv group's k/v rows, shared with the
    group's other heads), their bias entries and its ``W_O`` columns; an MLP all its matrices and biases;
    ``input`` the embeddings; ``logits`` the unembedding (with tied embeddings, the embedding matrix).
    Norms and the attention output bias belong to no edge-circuit node, so they are False (see
    :func:`edge_weight_overlap`).

    Args:
        layout: the model's :class:`~kcircuits.models.layout.ParameterLayout`.
        nodes: the edge circuit's nodes, e.g. ``Circuit.nodes()`` (``input``, ``a{l}.h{h}``, ``m{l}``,
            ``logits``); any layout node name is accepted.
        params: the parameters to return (e.g. a weight circuit's mask, whose keys are its parameters);
            None: every parameter of the model.

    Returns:
        ``{param_name: bool tensor of the parameter's stored shape}`` for exactly ``params`` (all-False for
        a parameter the nodes do not touch).
    """
    names = _check_nodes(layout, nodes)
    wanted = list(layout.param_shapes) if params is None else list(params)
    unknown = [p for p in wanted if p not in layout.param_shapes]
    if unknown:
        raise KcircuitsError(f"unknown parameter(s) {unknown[:3]} for this {layout.family} model: was the weight "
                             "mask made for another model?")
    touched = layout.mask_for(names)
    return {p: touched[p] if p in touched else torch.zeros(layout.param_shapes[p], dtype=torch.bool) for p in wanted}


def _node_rows(layout: ParameterLayout, nodes: list[str], mask: Mapping[str, torch.Tensor]) -> list[dict]:
    """Per node: its entries in the masked parameters and the share the weight circuit keeps, by
    decreasing share (nodes without masked entries last, share None)."""
    rows = []
    for node in dict.fromkeys(nodes):
        blocks = [b for b in layout.blocks(node) if b.param_name in mask]
        n = sum(_block_size(b, layout.param_shapes[b.param_name]) for b in blocks)
        kept = sum(int(b.select(mask[b.param_name]).sum()) for b in blocks)
        rows.append({"node": node, "kind": layout.kind(node), "layer": _layer_of(node), "n": n, "kept": kept,
                     "share_kept": _ratio(kept, n)})
    return sorted(rows, key=lambda r: (r["share_kept"] is None, -(r["share_kept"] or 0.0)))


def edge_weight_overlap(layout: ParameterLayout, weight_mask: Mapping[str, torch.Tensor],
                        nodes: str | Iterable[str]) -> dict:
    """How a weight circuit sits in the edge circuit of the same relation.

    The edge circuit becomes the weight mask of its nodes' parameter blocks (:func:`edge_circuit_mask`),
    over the weight circuit's parameters. What an edge-circuit node does not cover: the norms (the graph
    folds a norm into the inputs it feeds) and the attention output bias (shared by all heads). These
    entries are never inside the edge circuit here, in the counts and in the chance level alike, so the
    comparison stays a comparison of sets of weights; how much of the weight circuit they hold is reported
    on its own (``uncovered``), since a weight circuit may keep norms no edge circuit can name.

    Args:
        layout: the model's :class:`~kcircuits.models.layout.ParameterLayout`.
        weight_mask: the weight circuit.
        nodes: the edge circuit's nodes (``Circuit.nodes()``).

    Returns:
        ``{"n_weights", "n_weight_circuit", "n_edge_blocks", "n_shared", "weight_in_edge_share",
        "edge_blocks_share", "edge_kept_share", "density", "jaccard", "chance_jaccard", "uncovered",
        "nodes"}``: ``weight_in_edge_share`` is the share of the weight circuit inside the edge circuit's
        blocks, to be read against ``edge_blocks_share`` (those blocks' share of all masked weights: the
        chance level); ``edge_kept_share`` the share of the edge blocks the weight circuit keeps, against
        ``density``; ``uncovered`` (``n``, ``kept``, ``share_of_circuit``) the norms and attention output
        biases; ``nodes`` one row per edge-circuit node (``node``, ``kind``, ``layer``, ``n``, ``kept``,
        ``share_kept``), by decreasing ``share_kept``. Shares of an empty set are None.
    """
    _check_mask(layout, weight_mask)
    names = _check_nodes(layout, nodes)
    edge = edge_circuit_mask(layout, names, weight_mask)
    parts = _partition(layout, weight_mask)
    kept_w, kept_e = _kept_counts(parts, weight_mask), _kept_counts(parts, edge)
    shared = _shared_counts(parts, weight_mask, edge)
    n, w, e, s = sum(p.size for p in parts), sum(kept_w), sum(kept_e), sum(shared)
    off = [(p.size, k) for p, k in zip(parts, kept_w, strict=True) if p.kind not in EDGE_KINDS]
    off_n, off_kept = sum(x for x, _ in off), sum(k for _, k in off)
    return {"n_weights": n, "n_weight_circuit": w, "n_edge_blocks": e, "n_shared": s,
            "weight_in_edge_share": _ratio(s, w), "edge_blocks_share": e / n,
            "edge_kept_share": _ratio(s, e), "density": w / n,
            "jaccard": _jaccard(s, w, e), "chance_jaccard": chance_jaccard(w / n, e / n),
            "uncovered": {"n": off_n, "kept": off_kept, "share_of_circuit": _ratio(off_kept, w)},
            "nodes": _node_rows(layout, names, weight_mask)}
