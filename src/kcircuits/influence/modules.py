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
    output projection's bias is shared and belongs to no head). Layouts match
    :mod:`kcircuits.models.adapters`: GPT-2 ``c_attn`` is ``q|k|v`` along d_out (non-contiguous per
    head, so an index tensor), GPT-NeoX ``query_key_value`` rows are ``[H, 3, e]`` (contiguous per
    head), Llama/Qwen2/Mistral have separate projections.
    """
    from kcircuits.models.adapters import check_supported

    family = check_supported(model.config)
    cfg = model.config
    modules = tracked_modules(model)
    blocks: dict[str, dict[str, tuple[Index, Index]]] = {}
    for name in modules:
        layer = module_layer(name)
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2]
        if parent == "mlp":
            blocks.setdefault(f"m{layer}", {})[name] = (None, None)
            continue
        for head, sel in _head_blocks(family, cfg, leaf):
            blocks.setdefault(f"a{layer}.h{head}", {})[name] = sel
    return blocks


def _head_blocks(family: str, cfg, leaf: str) -> list[tuple[int, tuple[Index, Index]]]:
    """(head, (rows, cols)) for one attention module of the given family."""
    if family == "gpt2":
        H, d = cfg.n_head, cfg.n_embd
        e = d // H
        if leaf == "c_attn":
            return [(h, (torch.cat([torch.arange(o + h * e, o + (h + 1) * e) for o in (0, d, 2 * d)]), None))
                    for h in range(H)]
        return [(h, (None, slice(h * e, (h + 1) * e))) for h in range(H)]  # c_proj: columns
    if family == "gpt_neox":
        H = cfg.num_attention_heads
        e = cfg.hidden_size // H
        if leaf == "query_key_value":
            return [(h, (slice(3 * e * h, 3 * e * (h + 1)), None)) for h in range(H)]
        return [(h, (None, slice(h * e, (h + 1) * e))) for h in range(H)]  # dense
    H = cfg.num_attention_heads
    K = cfg.num_key_value_heads or H
    e = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    group = H // K
    if leaf == "q_proj":
        return [(h, (slice(h * e, (h + 1) * e), None)) for h in range(H)]
    if leaf in ("k_proj", "v_proj"):
        return [(h, (slice((h // group) * e, (h // group + 1) * e), None)) for h in range(H)]
    return [(h, (None, slice(h * e, (h + 1) * e))) for h in range(H)]  # o_proj
