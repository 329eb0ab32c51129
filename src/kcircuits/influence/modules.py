"""Which weight matrices influence functions track, and how graph components map onto them.

Influence is computed per *linear module* inside the transformer blocks (Grosse et al. 2023 track
the MLP and attention matrices; embeddings and the unembedding are excluded by default). Every
module's gradient is handled in one convention, whatever the module stores:

    grad[d_out, d_in (+1)]  with the last column the bias gradient when the module has a bias,

so that the gradient of a token-summed loss is ``Σ_t g_t ā_tᵀ`` with ``g_t`` ``[d_out]`` the
gradient wrt the module's output and ``ā_t = [a_t, 1]`` its (homogeneous) input. HF's ``Conv1D``
(GPT-2) stores its weight as ``[d_in, d_out]``; :func:`param_to_matrix` and :func:`matrix_to_params`
convert.
"""

from __future__ import annotations

import fnmatch
import re

import torch
from transformers.pytorch_utils import Conv1D

from kcircuits.errors import KcircuitsError

#: a block index inside a qualified module name: ``transformer.h.3.attn`` / ``model.layers.3.mlp``
_BLOCK = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)\.")

#: row/column selector of a gradient matrix: ``None`` = all, a slice, or a 1-D LongTensor of indices
Index = slice | torch.Tensor | None


def tracked_modules(model: torch.nn.Module, include: list[str] | None = None) -> dict[str, torch.nn.Module]:
    """Every ``nn.Linear`` / ``Conv1D`` inside the transformer blocks, keyed by qualified name.

    ``include``: fnmatch patterns on the qualified name (e.g. ``["*.mlp.*"]``) restricting the set.
    Raises when nothing matches (so a typo in a pattern is not silently an empty influence).
    """
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, Conv1D)) and _BLOCK.search(name)}
    if include:
        found = {n: m for n, m in found.items() if any(fnmatch.fnmatchcase(n, p) for p in include)}
    if not found:
        raise KcircuitsError(
            f"no linear module inside the transformer blocks matches {include or 'anything'}; "
            "check the --include patterns against the model's module names (e.g. '*.mlp.*', '*.attn.*')")
    return found


def module_layer(name: str) -> int:
    """Block index of a tracked module (``transformer.h.3.mlp.c_fc`` -> 3)."""
    match = _BLOCK.search(name)
    if match is None:
        raise KcircuitsError(f"module {name!r} is not inside a numbered transformer block")
    return int(match.group(1))


def matrix_shape(module: torch.nn.Module) -> tuple[int, int]:
    """``(d_out, d_in + has_bias)`` of the gradient-matrix convention."""
    weight = module.weight
    d_out, d_in = (weight.shape[1], weight.shape[0]) if isinstance(module, Conv1D) else tuple(weight.shape)
    return d_out, d_in + (module.bias is not None)


def module_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [module.weight] + ([module.bias] if module.bias is not None else [])


def param_to_matrix(module: torch.nn.Module, tensors: list[torch.Tensor]) -> torch.Tensor:
    """(weight-shaped, bias-shaped) tensors -> one ``[..., d_out, d_in(+1)]`` matrix."""
    weight = tensors[0].transpose(-1, -2) if isinstance(module, Conv1D) else tensors[0]
    if module.bias is None:
        return weight
    return torch.cat([weight, tensors[1].unsqueeze(-1)], dim=-1)


def matrix_to_params(module: torch.nn.Module, matrix: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of :func:`param_to_matrix` (shapes as the module stores its parameters)."""
    weight = matrix[..., :-1] if module.bias is not None else matrix
    out = [weight.transpose(-1, -2).contiguous() if isinstance(module, Conv1D) else weight.contiguous()]
    if module.bias is not None:
        out.append(matrix[..., -1].contiguous())
    return out


def select(x: torch.Tensor, rows: Index, cols: Index) -> torch.Tensor:
    """The ``[..., rows, cols]`` block of a gradient matrix (slices or index tensors)."""
    if rows is not None:
        x = x[..., rows, :] if isinstance(rows, slice) else x.index_select(-2, rows.to(x.device))
    if cols is not None:
        x = x[..., cols] if isinstance(cols, slice) else x.index_select(-1, cols.to(x.device))
    return x


def block_mask(shape: tuple[int, int], rows: Index, cols: Index) -> torch.Tensor:
    """Boolean ``[d_out, d_in]`` mask of the block that :func:`select` picks."""
    r = torch.zeros(shape[0], dtype=torch.bool)
    c = torch.zeros(shape[1], dtype=torch.bool)
    r[slice(None) if rows is None else rows] = True
    c[slice(None) if cols is None else cols] = True
    return r[:, None] & c[None, :]


# ----------------------------------------------------------------------------- components
def component_blocks(model: torch.nn.Module) -> dict[str, dict[str, tuple[Index, Index]]]:
    """Graph node -> {module name: (rows of d_out, columns of d_in)} selecting its parameters.

    Naming follows :class:`kcircuits.graph.Graph`: ``a{l}.h{h}`` is head h of layer l (its W_Q rows,
    its kv group's W_K and W_V rows under grouped-query attention, its W_O columns); ``m{l}`` is the
    whole MLP of layer l. Bias entries follow their rows (q/k/v biases belong to the head; the
    output projection's bias is shared and belongs to no head). The blocks come from the model's
    :class:`~kcircuits.models.layout.ParameterLayout` (the one description of each family's
    layout), translated into the gradient-matrix convention ``[d_out, d_in (+1)]`` of the tracked
    modules: e.g. GPT-2's ``c_attn`` rows of one head are ``q|k|v`` ranges ``d`` apart (an index
    tensor), GPT-NeoX's are one contiguous range.
    """
    from kcircuits.models.layout import parameter_layout

    layout = parameter_layout(model)
    modules = tracked_modules(model)
    out: dict[str, dict[str, tuple[Index, Index]]] = {}
    for node in layout.nodes(("head", "mlp")):
        per_module: dict[str, list] = {}
        for b in layout.blocks(node):
            per_module.setdefault(b.param_name.rsplit(".", 1)[0], []).append(b)
        sel = {name: _matrix_selection(modules[name], per_module[name]) for name in modules if name in per_module}
        if sel:
            out[node] = sel
    return out


def _matrix_selection(module: torch.nn.Module, blocks: list) -> tuple[Index, Index]:
    """One module's (rows, cols) in the ``[d_out, d_in (+1)]`` convention from a node's layout blocks.

    The weight blocks give the rows (their out-ranges, in order) and the input columns; the bias
    column is included exactly when the node owns the bias entries of those rows."""
    d_out, d_cols = matrix_shape(module)
    weights = [b.matrix_index() for b in blocks if b.role.startswith("W")]
    owns_bias = any(b.role.startswith("b") for b in blocks)
    if not weights:
        raise KcircuitsError(f"a component owns bias entries of {module} but none of its weights")
    ins = {None if i is None else (i.start, i.stop) for _, i in weights}
    if len(ins) != 1:
        raise KcircuitsError("a component's weight blocks of one module must share their input columns")
    cols = weights[0][1]
    rows = _join([o for o, _ in weights], d_out)
    has_bias = module.bias is not None
    if has_bias and cols is None and not owns_bias:
        cols = slice(0, d_cols - 1)  # every input column but not the bias column
    elif has_bias and cols is not None and owns_bias:
        start, stop, _ = cols.indices(d_cols - 1)
        cols = torch.cat([torch.arange(start, stop), torch.tensor([d_cols - 1])])
    return rows, cols


def _join(ranges: list, size: int) -> Index:
    """Concatenate row ranges: one slice (None for everything) when adjacent, else an index tensor."""
    bounds = [slice(None).indices(size)[:2] if r is None else r.indices(size)[:2] for r in ranges]
    # consecutive pairs: the shifted copy is one shorter by design
    if all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False)):
        start, stop = bounds[0][0], bounds[-1][1]
        return None if (start, stop) == (0, size) else slice(start, stop)
    return torch.cat([torch.arange(start, stop) for start, stop in bounds])
