"""Which parameter blocks belong to which component: the one place that knows each family's layout.

Influence per component, weight masks, editing, circuit-restricted fine-tuning and the adapters
themselves (:mod:`kcircuits.models.adapters` gathers ``W_Q`` etc. from these blocks) all read this
description, so a head's rows are known once per family (DESIGN decision 11).

Components ("nodes") are named like :class:`kcircuits.graph.Graph`'s nodes, plus the parameters
the graph has no node for:

=================  ============  ===========================================================
node               kind          parameters
=================  ============  ===========================================================
``input``          input         token embedding ``W_E`` (and learned positions ``W_pos``)
``a{l}.ln``        norm          the norm in front of layer l's attention
``a{l}.h{h}``      head          its ``W_Q`` rows, its kv group's ``W_K``/``W_V`` rows, the
                                 matching q/k/v bias entries, its ``W_O`` columns
``a{l}.b_O``       attn_bias     the attention output bias (shared by all heads, so no head's)
``m{l}.ln``        norm          the norm in front of layer l's MLP
``m{l}``           mlp           every MLP matrix and bias (gate/up/down, c_fc/c_proj, ...)
``ln_final``       norm          the final norm
``logits``         unembed       the unembedding ``W_U`` (and its bias ``b_U``)
=================  ============  ===========================================================

Every entry of every parameter belongs to at least one node. Entries that belong to several nodes
carry the others in :attr:`ParamBlock.shared_with`: the k/v rows of a kv group under grouped-query
attention (shared by the group's query heads) and tied embeddings (``input`` and ``logits``).

Indices are given in the parameter's *stored* orientation (``param[rows, cols]``), so a mask or
a delta can be applied to ``model.get_parameter(name)`` directly. GPT-2's ``Conv1D`` stores
``[d_in, d_out]``; its blocks say ``transposed=True`` and :meth:`ParamBlock.matrix_index` gives
the ``[d_out, d_in]`` (``torch.nn.functional.linear``) view.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from transformers.pytorch_utils import Conv1D

from kcircuits.errors import KcircuitsError
from kcircuits.models.families import check_supported

#: a contiguous range along one dim, or None for the whole dim
Index = slice | None

#: every node kind, in the order :meth:`ParameterLayout.nodes` lists a layer's nodes
KINDS = ("input", "norm", "head", "attn_bias", "mlp", "unembed")


@dataclass(frozen=True)
class ParamBlock:
    """One block of one HF parameter: ``param[rows, cols]`` (``rows`` only for 1-D parameters).

    ``role`` names what the block is in :mod:`kcircuits.models.weights` terms (``W_Q``, ``b_K``,
    ``W_in``, ``W_gate``, ``W_E``, ``norm_w`` ...). ``transposed`` is True when the parameter is
    stored ``[d_in, d_out]`` (GPT-2 ``Conv1D``). ``shared_with`` lists the other nodes that own
    (some of) the same entries.
    """

    param_name: str
    role: str
    rows: Index = None
    cols: Index = None
    transposed: bool = False
    shared_with: tuple[str, ...] = ()

    def select(self, param: torch.Tensor) -> torch.Tensor:
        """The block as a view of ``param`` (stored orientation)."""
        if param.dim() == 1:
            return param[_full(self.rows)]
        return param[_full(self.rows), _full(self.cols)]

    def mask(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Boolean mask of the parameter's shape, True on the block."""
        m = torch.zeros(tuple(shape), dtype=torch.bool)
        self.select(m).fill_(True)
        return m

    def matrix_index(self) -> tuple[Index, Index]:
        """``(out, in)`` selection in the ``[d_out, d_in]`` convention; ``(rows, None)`` for a bias."""
        return (self.cols, self.rows) if self.transposed else (self.rows, self.cols)

    def matrix(self, param: torch.Tensor) -> torch.Tensor:
        """The block as a view in ``[d_out, d_in]`` orientation (a bias stays 1-D)."""
        block = self.select(param)
        return block.T if self.transposed else block


def _full(index: Index) -> slice:
    return slice(None) if index is None else index


def _bounds(index: Index, size: int) -> tuple[int, int]:
    start, stop, step = _full(index).indices(size)
    if step != 1:
        raise KcircuitsError(f"layout blocks are contiguous ranges; got step {step}")
    return start, stop


@dataclass
class ParameterLayout:
    """Node -> parameter blocks for one loaded model (see the module docstring for the node names).

    Built by :func:`parameter_layout`; ``param_shapes`` holds the shape of every parameter the
    blocks name (the names of ``model.named_parameters()``, tied weights under their first name).
    """

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    param_shapes: dict[str, tuple[int, ...]]
    _blocks: dict[str, list[ParamBlock]] = field(repr=False)
    _kinds: dict[str, str] = field(repr=False)

    def nodes(self, kinds: str | Iterable[str] | None = None) -> list[str]:
        """Every node (model order: input, then per layer a.ln, heads, a.b_O, m.ln, m; ln_final, logits),
        or only those of the given kind(s) (see :data:`KINDS`)."""
        if kinds is None:
            return list(self._blocks)
        wanted = {kinds} if isinstance(kinds, str) else set(kinds)
        unknown = wanted - set(KINDS)
        if unknown:
            raise KcircuitsError(f"unknown node kind(s) {sorted(unknown)}; use {', '.join(KINDS)}")
        return [n for n in self._blocks if self._kinds[n] in wanted]

    def __contains__(self, node: object) -> bool:
        return node in self._blocks

    def kind(self, node: str) -> str:
        self._check(node)
        return self._kinds[node]

    def blocks(self, node: str) -> list[ParamBlock]:
        """The parameter blocks of one node (empty list never: every node owns something)."""
        self._check(node)
        return list(self._blocks[node])

    def heads(self, layer: int) -> list[str]:
        return [f"a{layer}.h{h}" for h in range(self.n_heads)]

    def kv_group(self, head: int) -> int:
        """The kv head (group) a query head reads its keys and values from."""
        return head // (self.n_heads // self.n_kv_heads)

    def role_blocks(self, nodes: Iterable[str], role: str) -> list[ParamBlock]:
        """The blocks with ``role`` across ``nodes``, in node order, each distinct block once
        (so the W_K blocks of a layer's heads come once per kv group)."""
        out: list[ParamBlock] = []
        seen: set[tuple] = set()
        for node in nodes:
            for b in self.blocks(node):
                key = (b.param_name, _key(b.rows), _key(b.cols))
                if b.role == role and key not in seen:
                    seen.add(key)
                    out.append(b)
        return out

    def owners(self, param_name: str) -> list[str]:
        """The nodes owning (some of) a parameter's entries."""
        if param_name not in self.param_shapes:
            examples = ", ".join(list(self.param_shapes)[:3])
            raise KcircuitsError(f"unknown parameter {param_name!r} (examples: {examples})")
        return [n for n, bs in self._blocks.items() if any(b.param_name == param_name for b in bs)]

    def mask_for(self, nodes: str | Iterable[str], all_params: bool = False) -> dict[str, torch.Tensor]:
        """``{param_name: bool mask of the parameter's shape}``, True on the entries of ``nodes``.

        Only parameters the nodes touch are returned unless ``all_params`` (then every parameter,
        all-False for the untouched ones)."""
        names = [nodes] if isinstance(nodes, str) else list(nodes)
        masks: dict[str, torch.Tensor] = {}
        if all_params:
            masks = {p: torch.zeros(s, dtype=torch.bool) for p, s in self.param_shapes.items()}
        for node in names:
            for b in self.blocks(node):
                if b.param_name not in masks:
                    masks[b.param_name] = torch.zeros(self.param_shapes[b.param_name], dtype=torch.bool)
                b.select(masks[b.param_name]).fill_(True)
        return masks

    def _check(self, node: str) -> None:
        if node not in self._blocks:
            raise KcircuitsError(f"unknown component {node!r}; use names such as input, a0.h0, a0.ln, a0.b_O, "
                                 "m0, m0.ln, ln_final, logits")


def _key(index: Index) -> tuple | None:
    return None if index is None else (index.start, index.stop, index.step)


# ----------------------------------------------------------------------------- gathering
def gather(blocks: list[ParamBlock], params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Concatenate blocks of one parameter in ``[d_out, d_in]`` orientation (biases: 1-D).

    The blocks must differ along one axis (out or in) and agree on the other. Returns the tensor
    and whether it is a *view* of ``params[name]`` (True when the blocks are adjacent ranges, as
    for GPT-2, Llama, every output projection) or a copy (GPT-NeoX's per-head interleaved q/k/v:
    callers that must follow later in-place edits refresh it, see ``ModelWeights.refresh``).
    """
    names = {b.param_name for b in blocks}
    if len(names) != 1:
        raise KcircuitsError(f"cannot gather blocks of several parameters {sorted(names)}")
    param = params[names.pop()]
    if param.dim() == 1:
        merged = _merge([b.rows for b in blocks], param.shape[0])
        if merged is not False:
            return param[_full(merged)], True
        return torch.cat([b.select(param) for b in blocks]), False
    matrix = param.T if blocks[0].transposed else param
    outs, ins = zip(*(b.matrix_index() for b in blocks), strict=True)
    if all(_key(i) == _key(ins[0]) for i in ins):  # blocks stack along the output axis
        merged = _merge(list(outs), matrix.shape[0])
        if merged is not False:
            return matrix[_full(merged), _full(ins[0])], True
        return torch.cat([matrix[_full(o), _full(ins[0])] for o in outs], dim=0), False
    if all(_key(o) == _key(outs[0]) for o in outs):  # blocks sit side by side along the input axis
        merged = _merge(list(ins), matrix.shape[1])
        if merged is not False:
            return matrix[_full(outs[0]), _full(merged)], True
        return torch.cat([matrix[_full(outs[0]), _full(i)] for i in ins], dim=1), False
    raise KcircuitsError("cannot gather blocks that differ along both axes")


def _merge(indices: list[Index], size: int) -> Index | bool:
    """One range equal to the concatenation of ``indices`` (None = whole dim), or False if they
    are not adjacent in order."""
    bounds = [_bounds(i, size) for i in indices]
    for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False):  # consecutive ranges
        if start != stop:
            return False
    start, stop = bounds[0][0], bounds[-1][1]
    return None if (start, stop) == (0, size) else slice(start, stop)


# ----------------------------------------------------------------------------- building
class _Builder:
    """Collects blocks by parameter *object*, so tied weights get one (the first) name."""

    def __init__(self, model: torch.nn.Module):
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.blocks: dict[str, list[ParamBlock]] = {}
        self.kinds: dict[str, str] = {}

    def add(self, node: str, kind: str, role: str, param: torch.Tensor | None, rows: Index = None,
            cols: Index = None, transposed: bool = False) -> None:
        """Add ``param[rows, cols]`` (stored orientation) to ``node``; a missing bias (None) adds nothing."""
        if param is None:
            return
        self.kinds.setdefault(node, kind)
        self.blocks.setdefault(node, []).append(ParamBlock(self.names[id(param)], role, rows, cols, transposed))

    def linear(self, node: str, kind: str, module: torch.nn.Module, role: str, out: Index = None,
               inp: Index = None, bias: bool = True) -> None:
        """A linear module's weight block ``[out, inp]`` in the ``[d_out, d_in]`` convention, and its
        bias entries ``[out]`` (role ``b_...`` from ``W_...``) unless ``bias=False``."""
        if isinstance(module, Conv1D):
            self.add(node, kind, role, module.weight, rows=inp, cols=out, transposed=True)
        else:
            self.add(node, kind, role, module.weight, rows=out, cols=inp)
        if bias:
            self.add(node, kind, "b" + role[1:], module.bias, rows=out)

    def norm(self, node: str, module: torch.nn.Module) -> None:
        self.add(node, "norm", "norm_w", module.weight)
        self.add(node, "norm", "norm_b", getattr(module, "bias", None))

    def build(self, family: str, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int) -> ParameterLayout:
        blocks = _mark_shared(self.blocks, self.shapes)
        used = {b.param_name for bs in blocks.values() for b in bs}
        missing = [n for n in self.shapes if n not in used]
        if missing:  # a parameter no node owns would silently escape masks, edits and influence
            raise KcircuitsError(f"the {family} layout does not place the parameters {missing[:3]}")
        return ParameterLayout(family, n_layers, n_heads, n_kv_heads, head_dim, dict(self.shapes), blocks, self.kinds)


def _mark_shared(blocks: dict[str, list[ParamBlock]],
                 shapes: dict[str, tuple[int, ...]]) -> dict[str, list[ParamBlock]]:
    """Fill ``shared_with``: for each block, the other nodes with an overlapping block of the same parameter."""
    by_param: dict[str, list[tuple[str, ParamBlock]]] = {}
    for node, bs in blocks.items():
        for b in bs:
            by_param.setdefault(b.param_name, []).append((node, b))

    def overlaps(a: ParamBlock, b: ParamBlock, shape: tuple[int, ...]) -> bool:
        for dim, (ia, ib) in enumerate(((a.rows, b.rows), (a.cols, b.cols))[: len(shape)]):
            (sa, ea), (sb, eb) = _bounds(ia, shape[dim]), _bounds(ib, shape[dim])
            if max(sa, sb) >= min(ea, eb):
                return False
        return True

    out: dict[str, list[ParamBlock]] = {}
    for node, bs in blocks.items():
        marked = []
        for b in bs:
            shape = shapes[b.param_name]
            others = tuple(dict.fromkeys(n for n, o in by_param[b.param_name]
                                         if n != node and overlaps(b, o, shape)))
            marked.append(replace(b, shared_with=others))
        out[node] = marked
    return out


def _attention_out(b: _Builder, layer: int, module: torch.nn.Module, n_heads: int, e: int) -> None:
    """Each head's ``W_O`` columns; the output bias as its own node (it belongs to no head)."""
    for h in range(n_heads):
        b.linear(f"a{layer}.h{h}", "head", module, "W_O", inp=slice(h * e, (h + 1) * e), bias=False)
    b.add(f"a{layer}.b_O", "attn_bias", "b_O", module.bias)


def _gpt2(hf) -> ParameterLayout:
    """GPT-2: ``c_attn`` is ``[q | k | v]`` along d_out (each ``d`` wide, heads contiguous inside)."""
    cfg, tr = hf.config, hf.transformer
    d, H = cfg.n_embd, cfg.n_head
    e = d // H
    b = _Builder(hf)
    b.add("input", "input", "W_E", tr.wte.weight)
    b.add("input", "input", "W_pos", tr.wpe.weight)
    for layer, blk in enumerate(tr.h):
        b.norm(f"a{layer}.ln", blk.ln_1)
        for h in range(H):
            for i, role in enumerate(("W_Q", "W_K", "W_V")):
                b.linear(f"a{layer}.h{h}", "head", blk.attn.c_attn, role, out=slice(i * d + h * e, i * d + (h + 1) * e))
        _attention_out(b, layer, blk.attn.c_proj, H, e)
        b.norm(f"m{layer}.ln", blk.ln_2)
        b.linear(f"m{layer}", "mlp", blk.mlp.c_fc, "W_in")
        b.linear(f"m{layer}", "mlp", blk.mlp.c_proj, "W_out")
    b.norm("ln_final", tr.ln_f)
    b.linear("logits", "unembed", hf.lm_head, "W_U")
    return b.build("gpt2", len(tr.h), H, H, e)


def _gpt_neox(hf) -> ParameterLayout:
    """GPT-NeoX: ``query_key_value`` rows are ``[H, 3, e]``: head h's q, k, v rows are adjacent."""
    cfg, base = hf.config, hf.gpt_neox
    d, H = cfg.hidden_size, cfg.num_attention_heads
    e = d // H
    b = _Builder(hf)
    b.add("input", "input", "W_E", base.embed_in.weight)
    for layer, blk in enumerate(base.layers):
        b.norm(f"a{layer}.ln", blk.input_layernorm)
        for h in range(H):
            for i, role in enumerate(("W_Q", "W_K", "W_V")):
                start = (3 * h + i) * e
                b.linear(f"a{layer}.h{h}", "head", blk.attention.query_key_value, role, out=slice(start, start + e))
        _attention_out(b, layer, blk.attention.dense, H, e)
        b.norm(f"m{layer}.ln", blk.post_attention_layernorm)
        b.linear(f"m{layer}", "mlp", blk.mlp.dense_h_to_4h, "W_in")
        b.linear(f"m{layer}", "mlp", blk.mlp.dense_4h_to_h, "W_out")
    b.norm("ln_final", base.final_layer_norm)
    b.linear("logits", "unembed", hf.get_output_embeddings(), "W_U")
    return b.build("gpt_neox", len(base.layers), H, H, e)


def _llama(hf) -> ParameterLayout:
    """Llama-like (Llama, Mistral, Qwen2, SmolLM): separate projections; head h reads kv group
    ``h // (H / K)``, whose k/v rows it shares with the group's other query heads."""
    cfg, base = hf.config, hf.model
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    e = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    group = H // K
    b = _Builder(hf)
    b.add("input", "input", "W_E", base.embed_tokens.weight)
    for layer, blk in enumerate(base.layers):
        a = blk.self_attn
        b.norm(f"a{layer}.ln", blk.input_layernorm)
        for h in range(H):
            g = h // group
            b.linear(f"a{layer}.h{h}", "head", a.q_proj, "W_Q", out=slice(h * e, (h + 1) * e))
            b.linear(f"a{layer}.h{h}", "head", a.k_proj, "W_K", out=slice(g * e, (g + 1) * e))
            b.linear(f"a{layer}.h{h}", "head", a.v_proj, "W_V", out=slice(g * e, (g + 1) * e))
        _attention_out(b, layer, a.o_proj, H, e)
        b.norm(f"m{layer}.ln", blk.post_attention_layernorm)
        b.linear(f"m{layer}", "mlp", blk.mlp.gate_proj, "W_gate")
        b.linear(f"m{layer}", "mlp", blk.mlp.up_proj, "W_in")
        b.linear(f"m{layer}", "mlp", blk.mlp.down_proj, "W_out")
    b.norm("ln_final", base.norm)
    b.linear("logits", "unembed", hf.lm_head, "W_U")
    return b.build("llama", len(base.layers), H, K, e)


_LAYOUTS = {"gpt2": _gpt2, "gpt_neox": _gpt_neox, "llama": _llama}


def parameter_layout(hf_model: torch.nn.Module) -> ParameterLayout:
    """The :class:`ParameterLayout` of a supported HF causal LM (raises for other architectures).

    Cheap (no tensor is touched); a :class:`~kcircuits.models.LoadedModel` keeps its own as ``.layout``.
    """
    family = check_supported(hf_model.config)
    return _LAYOUTS[family](hf_model)
