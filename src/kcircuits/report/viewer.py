"""The interactive circuit viewer of ``report.html``: payload (Python side) and HTML section.

:func:`viewer_payload` turns a graph, a circuit and the attribution scores into a JSON-able dict;
:func:`viewer_section` renders it as one HTML fragment with the viewer's CSS, the payload as an
inline ``<script type="application/json">`` and the viewer's JavaScript (``viewer.js``, read from
the package), so the page still needs no network and opens from a file:// URL.

Every edge of the graph is stored, sorted by decreasing |score| (NaN last), as three base64 arrays
(source index, destination index, float32 score). The viewer re-selects from that order exactly as
:func:`kcircuits.graph.select_topn` followed by :func:`kcircuits.graph.prune` do: the top n edges
are a prefix of the stored order, and pruning keeps u -> v only when u is reachable from the input
and v reaches the logits through ``Graph.dst_feeds``. See ``docs/viewer.md``.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterable
from importlib import resources
from typing import Any

import numpy as np
import torch

from kcircuits.errors import KcircuitsError
from kcircuits.graph import Circuit, Graph, prune

FORMAT = "kcircuits-viewer/1"
_SUFFIX = re.compile(r"<[qkv]>$")
#: The most edges the viewer draws when the page opens: a few hundred curves over a 30-layer graph
#: are a hairball, about a hundred can still be followed by eye. The slider reaches every stored edge.
OPEN_EDGES = 100


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii")


def _index_array(values: np.ndarray, limit: int) -> dict:
    """Little-endian uint16 when every index fits (halves the page size), else int32."""
    dtype = "uint16" if limit <= 0xFFFF else "int32"
    return {"dtype": dtype, "data": _b64(values.astype("<u2" if dtype == "uint16" else "<i4"))}


def _clean(v: Any) -> Any:
    """JSON-safe copy: NaN/inf become None (JSON.parse rejects NaN), tensors/arrays become lists."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _clean(v.tolist())
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, (np.floating, np.integer)):
        return _clean(v.item())
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return str(v)


def dst_node_name(name: str) -> str:
    """The drawn node a destination belongs to: ``a3.h2<q>`` -> ``a3.h2``, ``a3.kv1<k>`` -> ``a3.kv1``."""
    return _SUFFIX.sub("", name)


def edge_order(graph: Graph, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) index tensors of every graph edge, by decreasing |score|, NaN last.

    Ties keep the row-major (source, destination) order, so the order is deterministic.
    """
    src, dst = torch.nonzero(graph.edge_exists(), as_tuple=True)
    key = scores[src, dst].double().abs()
    key = torch.where(torch.isnan(key), torch.full_like(key, -1.0), key)
    order = torch.argsort(-key, stable=True)
    return src[order], dst[order]


def _prefix_circuit(graph: Graph, src: torch.Tensor, dst: torch.Tensor, n: int, scores) -> Circuit:
    edges = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    edges[src[:n], dst[:n]] = True
    return Circuit(graph, edges, scores)


def readable_n(graph: Graph, src: torch.Tensor, dst: torch.Tensor, upper: int, scores: torch.Tensor,
               limit: int = OPEN_EDGES) -> tuple[int, int]:
    """The largest n <= ``upper`` whose top-n + prune keeps at most ``limit`` edges, and that count.

    The pruned size never shrinks as n grows (a path through the top n is still one through the top
    n + 1), so a bisection finds it. When even the smallest non-empty selection is bigger than
    ``limit`` (the first path to the logits needs more edges), that selection is returned instead
    of an empty drawing.
    """
    def kept(n: int) -> int:
        return int(prune(_prefix_circuit(graph, src, dst, n, scores)).n_edges)

    lo, hi = 0, upper  # kept(lo) <= limit; find the last such n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kept(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    if kept(lo) == 0 and kept(upper) > 0:  # nothing drawable under the limit: the first n that draws something
        first, last = lo + 1, upper
        while first < last:
            mid = (first + last) // 2
            first, last = (first, mid) if kept(mid) > 0 else (mid + 1, last)
        lo = first
    return lo, kept(lo)


def _initial_view(graph: Graph, src: torch.Tensor, dst: torch.Tensor, scores: torch.Tensor, n_circuit: int,
                  n_init: int | None, n_ordered: int, has_scores: bool, limit: int) -> dict:
    """What the page opens on: the run's circuit when it is small enough to read (or cannot be
    re-selected), else its strongest part, top-n + prune with the n of :func:`readable_n`; for a
    circuit made by top-n + prune that is a subset of it (a path within the top n is one within the
    top n_init)."""
    if not has_scores or n_circuit <= limit:
        return {"mode": "circuit", "n": n_init if n_init is not None else n_circuit, "n_edges": n_circuit,
                "limit": limit}
    n, kept = readable_n(graph, src, dst, n_init if n_init is not None else n_ordered, scores, limit)
    return {"mode": "topn", "n": n, "n_edges": kept, "limit": limit}


def viewer_payload(graph: Graph, circuit: Circuit, scores: torch.Tensor | None, node_details: dict | None = None,
                   max_edges: int = 50000, open_edges: int = OPEN_EDGES, highlight: torch.Tensor | None = None,
                   highlight_nodes: Iterable[str] = (), highlight_label: str = "highlighted") -> dict:
    """Everything the viewer needs, as a JSON-able dict (see ``docs/viewer.md`` for the format).

    ``scores``: ``[n_src, n_dst]`` attribution scores of the whole graph (``circuit.scores`` when
    None). Without any scores only the circuit's edges are stored and live re-selection is off.
    ``max_edges`` caps the stored edges (the strongest ones; the circuit's own edges are always
    kept); the payload then says so and the slider stops at the cap. A circuit of more than
    ``open_edges`` edges opens on its strongest part (``initial``), a note says how to see all of it.
    ``highlight``: ``[n_src, n_dst]`` bool, edges drawn in the highlight colour whenever they are drawn
    (always stored, like the circuit's), and ``highlight_nodes`` the node names ringed in it, with
    ``highlight_label`` in the legend: what only this circuit has beside another (see
    :func:`kcircuits.report.circuit_pairs.pair_viewers`).
    """
    if circuit.graph.describe() != graph.describe():
        raise KcircuitsError("the circuit belongs to a different graph than the one given to the viewer")
    if scores is None:
        scores = circuit.scores
    has_scores = scores is not None
    if has_scores:
        scores = scores.detach().float().cpu()
        if scores.shape != (graph.n_src, graph.n_dst):
            raise KcircuitsError(f"scores have shape {tuple(scores.shape)}, expected {(graph.n_src, graph.n_dst)}")
        src, dst = edge_order(graph, scores)
    else:  # circuit only, in row-major order
        src, dst = torch.nonzero(circuit.edges, as_tuple=True)
        scores = torch.full((graph.n_src, graph.n_dst), float("nan"))
    n_total = int(src.numel())
    if highlight is not None and tuple(highlight.shape) != (graph.n_src, graph.n_dst):
        raise KcircuitsError(f"highlight has shape {tuple(highlight.shape)}, expected {(graph.n_src, graph.n_dst)}")
    in_circ = circuit.edges[src, dst]
    in_hl = highlight.bool().cpu()[src, dst] if highlight is not None else torch.zeros_like(in_circ)
    ranks = torch.nonzero(in_circ).flatten()
    max_edges = max(int(max_edges), 0)
    n_ordered = min(n_total, max_edges)
    capped = n_ordered < n_total
    if capped:  # keep the prefix, plus any circuit or highlighted edge beyond it (appended: the prefix stays exact)
        extra = torch.nonzero(in_circ | in_hl).flatten()
        keep = torch.cat([torch.arange(n_ordered), extra[extra >= n_ordered]])
        src, dst = src[keep], dst[keep]
        in_circ, in_hl = in_circ[keep], in_hl[keep]
        ranks = torch.nonzero(in_circ).flatten()
    n_circuit = int(circuit.n_edges)
    # the smallest n whose top-n + prune gives exactly this circuit (prune is monotone and idempotent,
    # so 1 + the worst circuit rank is the only candidate); None when another rule selected it
    n_init = None
    if has_scores:
        cand = int(ranks.max()) + 1 if ranks.numel() else 0
        if cand <= n_ordered and torch.equal(prune(_prefix_circuit(graph, src, dst, cand, scores)).edges,
                                             circuit.edges):
            n_init = cand
    score_vals = scores[src, dst].numpy().astype("<f4")
    finite = score_vals[np.isfinite(score_vals)]
    notes = []
    initial = _initial_view(graph, src, dst, scores, n_circuit, n_init, n_ordered, has_scores, open_edges)
    if initial["mode"] == "topn":
        notes.append(f"to stay readable the viewer opens on the circuit's strongest part, {initial['n_edges']:,} of "
                     f"its {n_circuit:,} edges (top {initial['n']:,} by |score| + prune): move the slider or press "
                     "\u201crun's circuit\u201d to see all of it")
    if capped:
        notes.append(f"the report stores the {n_ordered:,} strongest of the graph's {n_total:,} edges (and every "
                     "edge of the run's circuit): the slider stops there")
    if not has_scores:
        notes.append("no attribution scores were stored: the viewer shows the run's circuit and cannot re-select")
    elif n_init is None and n_circuit:
        notes.append("the run's circuit was not selected as top-n by |score| + prune (greedy, threshold or signed "
                     "selection): it is shown first; the slider then re-selects by top-n + prune")
    if finite.size < score_vals.size and has_scores:
        notes.append(f"{score_vals.size - finite.size} edge score(s) are NaN: drawn grey and ranked last")
    return {
        "format": FORMAT,
        "graph": graph.describe(),
        "src_names": list(graph.src_names),
        "dst_names": list(graph.dst_names),
        "dst_kind": [graph.dst_kind(d) for d in range(graph.n_dst)],
        "dst_feeds": [graph.dst_feeds(d) for d in range(graph.n_dst)],
        "dst_node": [dst_node_name(n) for n in graph.dst_names],
        "dst_owners": [[graph.src_names[s] for s in graph.dst_feeds(d)] or ["logits"] for d in range(graph.n_dst)],
        "edges": {"n": int(src.numel()), "n_ordered": n_ordered, "n_total": n_total, "capped": capped,
                  "src": _index_array(src.numpy(), graph.n_src), "dst": _index_array(dst.numpy(), graph.n_dst),
                  "score": {"dtype": "float32", "data": _b64(score_vals)},
                  "max_abs": float(np.abs(finite).max()) if finite.size else 0.0},
        "has_scores": has_scores,
        "circuit": {"n_edges": n_circuit, "ranks": {"dtype": "int32", "data": _b64(ranks.numpy().astype("<i4"))},
                    "n_init": n_init},
        "initial": initial,
        "notes": notes,
        "details": _clean(node_details) if node_details else None,
        "highlight": None if highlight is None else {
            "label": highlight_label, "nodes": sorted(set(highlight_nodes)),
            "ranks": {"dtype": "int32", "data": _b64(torch.nonzero(in_hl).flatten().numpy().astype("<i4"))}},
    }


def payload_json(payload: dict) -> str:
    """The payload as JSON that is safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` are
    written as ``\\u003c``-style escapes (they can only occur inside JSON strings), so no string
    from the run can close the element or open a comment."""
    text = json.dumps(_clean(payload), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _asset(name: str) -> str:
    return resources.files("kcircuits.report").joinpath(name).read_text(encoding="utf-8")


# the edge-count control's tooltip and accessible name
_N_TITLE = ("select the n edges with the highest |score| over the whole graph, then prune "
            "(as kcircuits.graph.select_topn + prune)")
_N_LABEL = "number of edges selected before pruning"


def viewer_section(payload: dict) -> str:
    """The viewer's HTML: controls, canvas, side panel, edge table, inline CSS, data and script."""
    return viewer_style() + viewer_html(payload) + viewer_script()


def viewer_style() -> str:
    """The viewers' CSS, once per page."""
    return f"<style>{_asset('viewer.css')}</style>"


def viewer_script() -> str:
    """The viewers' script, after their HTML: it mounts every viewer on the page not yet mounted."""
    js = _asset("viewer.js")
    if "</script" in js.lower():  # would end the inline script early
        raise KcircuitsError("viewer.js must not contain '</script'")
    return f"<script>{js}</script>"


def viewer_html(payload: dict, key: str = "kcv") -> str:
    """One viewer's HTML and data (no script: :func:`viewer_script` after the page's viewers mounts them).

    Args:
        payload: the viewer's data (:func:`viewer_payload`).
        key: the id of the viewer's element, and the prefix of its parts' ids: ``"kcv"`` for the run's own
            viewer; a page with several gives each its own, e.g. ``"kcv-pair0-after"``.
    """
    if not re.fullmatch(r"kcv(-[a-z0-9]+)*", key):
        raise KcircuitsError(f"viewer key {key!r} must be 'kcv' or 'kcv-' followed by lowercase words")
    return f"""<div class="kcv" id="{key}">
<div class="kcv-bar">
 <label class="kcv-nlab" title="{_N_TITLE}">top
  <input type="range" id="{key}-n" min="0" max="0" value="0" aria-label="{_N_LABEL}">
  <input type="number" id="{key}-nbox" min="0" max="0" value="0" aria-label="{_N_LABEL}"></label>
 <span class="kcv-count" id="{key}-count"></span>
 <span class="kcv-btns"><button type="button" data-act="circuit"
  title="back to the run's own circuit">run's circuit</button>
 <button type="button" data-act="fit" title="fit the drawing into the view">fit</button>
 <button type="button" data-act="svg">Download SVG</button>
 <button type="button" data-act="png">Download PNG</button></span>
</div>
<div class="kcv-notes" id="{key}-notes"></div>
<div class="kcv-main">
 <div class="kcv-stage" id="{key}-stage"><canvas id="{key}-canvas"></canvas><canvas id="{key}-over"></canvas>
  <div class="kcv-tip" id="{key}-tip" hidden></div>
  <div class="kcv-help">wheel: zoom &middot; drag: pan &middot; click a node for details</div></div>
 <aside class="kcv-panel" id="{key}-panel"><p class="kcv-muted">Click a node to see its details.</p></aside>
</div>
<div class="kcv-legend" id="{key}-legend"></div>
<details class="kcv-tablebox" id="{key}-tablebox"><summary>Edge table</summary>
 <div class="kcv-tbar"><input type="search" id="{key}-filter" placeholder="filter by node name, e.g. a3.h2 or m5"
  aria-label="filter edges by node name"> <span id="{key}-tcount" class="kcv-muted"></span></div>
 <div class="scroll"><table class="kcv-table" id="{key}-table"><thead><tr>
  <th data-sort="rank">rank</th><th data-sort="src">source</th><th data-sort="dst">destination</th>
  <th data-sort="kind">kind</th><th data-sort="score">score</th><th data-sort="abs">|score|</th></tr></thead>
  <tbody></tbody></table></div>
 <button type="button" id="{key}-more" hidden>show more rows</button>
</details>
<noscript><p class="note">The interactive viewer needs JavaScript; the report's static drawings show the
same circuit without it.</p></noscript>
</div>
<script type="application/json" id="{key}-data">{payload_json(payload)}</script>
"""
