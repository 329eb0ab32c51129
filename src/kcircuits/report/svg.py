"""SVG for the report: the drawing primitives every chart shares, and the circuit as a layered graph.

Every drawing is standalone SVG text (with the xmlns, so each one parses as XML and could be
saved as a ``.svg`` file on its own). The report inlines them, so the page needs no scripts, fonts
or network. Tooltips use SVG ``<title>`` elements, which every browser shows on hover without JS.

Coordinates are printed with one decimal: a circuit with a few thousand edges is one ``<path>`` per
edge, and short numbers keep such a page at a few hundred kilobytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

from kcircuits.report.base import as_float, fmt_number

__all__ = ["DIFF_COLOUR", "SVG_NS", "as_float", "circuit_layers", "circuit_svg", "fmt", "nice_step", "polyline",
           "segments", "svg_open"]

SVG_NS = "http://www.w3.org/2000/svg"
FONT = 'system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif'

KV_STROKE = "#d97706"
NODE_COLOURS = {"input": "#059669", "head": "#f59e0b", "kv": KV_STROKE, "mlp": "#7c3aed", "logits": "#334155"}
POS_COLOUR = "#2563eb"
NEG_COLOUR = "#dc2626"
NAN_COLOUR = "#9ca3af"
KIND_DASH = {"k": "5 3", "v": "1.5 2.5"}  # q, mlp and logits edges are solid
MAX_EDGES_DRAWN = 5000
#: edges and nodes a comparison highlights (only in one of two circuits): green, apart from the score colours
DIFF_COLOUR = "#16a34a"

# Styles are scoped under the svg's class so that, inlined in the page, they touch nothing else.
_CIRCUIT_STYLE = (
    ".kc-circ .edge{fill:none;stroke-linecap:round}"
    f".kc-circ .pos{{stroke:{POS_COLOUR}}}.kc-circ .neg{{stroke:{NEG_COLOUR}}}.kc-circ .nil{{stroke:{NAN_COLOUR}}}"
    + "".join(f".kc-circ .edge.{k}{{stroke-dasharray:{d}}}" for k, d in KIND_DASH.items())
    + ".kc-circ text{fill:#374151}"
    ".kc-circ .lbl{font-size:11px}.kc-circ .sm{font-size:9.5px;fill:#6b7280}"
    ".kc-circ .grid{stroke:#e5e7eb;stroke-width:1}"
    ".kc-circ .nd{stroke:#fff;stroke-width:1}"
    f".kc-circ .kvn{{fill:#fef3c7;stroke:{KV_STROKE};stroke-width:1.5}}"
    f".kc-circ .edge.diff{{stroke:{DIFF_COLOUR};stroke-opacity:.95}}"
    f".kc-circ .ring{{fill:none;stroke:{DIFF_COLOUR};stroke-width:2.5}}"
)


# --------------------------------------------------------------------------- small helpers
def fmt(v: float) -> str:
    """One-decimal coordinate without a trailing ``.0`` (keeps big SVGs small)."""
    s = f"{v:.1f}"
    if s.endswith(".0"):
        s = s[:-2]
    return "0" if s == "-0" else s


def svg_open(cls: str, width: float, height: float, label: str) -> str:
    """Opening tag: fixed viewBox, scales down on narrow screens but never up past its natural size."""
    return (
        f'<svg xmlns="{SVG_NS}" class="{cls}" viewBox="0 0 {fmt(width)} {fmt(height)}" '
        f'width="{fmt(width)}" height="{fmt(height)}" role="img" aria-label="{escape(label)}" '
        f'style="max-width:100%;height:auto" font-family="{escape(FONT)}">'
    )


def nice_step(span: float, target: int = 6) -> float:
    """A 1/2/2.5/5 x 10^k tick step giving about ``target`` ticks over ``span``."""
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def segments(pts: Iterable[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """Split a series at missing values so lines break instead of bridging a gap."""
    segs: list[list[tuple[float, float]]] = [[]]
    for x, y in pts:
        if y is None:
            if segs[-1]:
                segs.append([])
        else:
            segs[-1].append((x, y))
    return [s for s in segs if s]


def polyline(pts: Sequence[tuple[float, float]], sx: Callable[[float], float], sy: Callable[[float], float]) -> str:
    """Path data through the points, mapped to pixels by ``sx``/``sy``."""
    return "M" + "L".join(f"{fmt(sx(x))} {fmt(sy(y))}" for x, y in pts)


# --------------------------------------------------------------------------- circuit: nodes
@dataclass(frozen=True)
class _Node:
    """A drawable node: ``index`` is the head (or kv-group) number, 0 for other types."""

    name: str
    type: str  # input | head | kv | mlp | logits
    layer: int
    index: int = 0


_RE_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_RE_KV = re.compile(r"^a(\d+)\.kv(\d+)$")
_RE_MLP = re.compile(r"^m(\d+)$")
_RE_SUFFIX = re.compile(r"^(.*)<([qkv])>$")


def _parse_name(name: str, n_layers: int) -> _Node | None:
    """Node from a kcircuits name (``input``, ``a3.h2``, ``a3.kv1``, ``m3``, ``logits``), else None."""
    if name == "input":
        return _Node(name, "input", -1)
    if name == "logits":
        return _Node(name, "logits", n_layers)
    if m := _RE_HEAD.match(name):
        return _Node(name, "head", int(m[1]), int(m[2]))
    if m := _RE_KV.match(name):
        return _Node(name, "kv", int(m[1]), int(m[2]))
    if m := _RE_MLP.match(name):
        return _Node(name, "mlp", int(m[1]))
    return None


def _node_from_dict(d: Mapping[str, Any], n_layers: int) -> _Node | None:
    """Node from the report's node dict; missing fields are recovered from the name."""
    name = str(d.get("name", ""))
    parsed = _parse_name(name, n_layers)
    typ = str(d.get("type") or (parsed.type if parsed else ""))
    if typ not in NODE_COLOURS:
        return parsed
    layer = d.get("layer", parsed.layer if parsed else None)
    if layer is None:
        layer = -1 if typ == "input" else n_layers if typ == "logits" else None
    if layer is None:
        return None
    index = d.get("head", d.get("group", parsed.index if parsed else 0))
    return _Node(name, typ, int(layer), int(index or 0))


def _split_dst(dst: str, kind: Any) -> tuple[str, str]:
    """Strip a ``<q>``/``<k>``/``<v>`` destination suffix (kcircuits graph names); it gives the kind."""
    m = _RE_SUFFIX.match(dst)
    if m:
        return m[1], str(kind or m[2])
    return dst, str(kind or "")


@dataclass
class _Edge:
    src: _Node
    dst: _Node
    kind: str
    score: float | None  # None: NaN or missing
    label: str  # "src -> dst (kind): score"
    key: str = ""  # "src->dst" as the circuit names them (dst with its <q>/<k>/<v> suffix)


def _edge_label(src: str, dst: str, kind: str, raw: Any) -> str:
    f = as_float(raw)
    score = fmt_number(f) if f is not None else "nan"
    return f"{src} -> {dst} ({kind}): {score}" if kind else f"{src} -> {dst}: {score}"


def _collect(circuit: Mapping[str, Any]) -> tuple[int, int, int, list[_Edge], int]:
    """Resolve the circuit dict to (n_layers, n_heads, n_kv_heads, edges, n_unresolved).

    Accepts both the report format (node dicts, plain destination names) and kcircuits'
    ``Circuit.to_json()`` (node name strings, ``a3.h2<q>`` destinations, a ``graph`` sub-dict).
    """
    graph = circuit.get("graph") or {}
    n_layers = int(circuit.get("n_layers") or graph.get("n_layers") or 0)
    nodes: dict[str, _Node] = {}
    for raw in circuit.get("nodes") or []:
        node = _node_from_dict(raw, n_layers) if isinstance(raw, Mapping) else _parse_name(str(raw), n_layers)
        if node is not None:
            nodes[node.name] = node
    edges: list[_Edge] = []
    unresolved = 0
    for e in circuit.get("edges") or []:
        src_name = str(e.get("src", ""))
        dst_name, kind = _split_dst(str(e.get("dst", "")), e.get("kind"))
        src = nodes.get(src_name) or _parse_name(src_name, n_layers)
        dst = nodes.get(dst_name) or _parse_name(dst_name, n_layers)
        if src is None or dst is None:
            unresolved += 1
            continue
        if not kind:
            kind = {"mlp": "mlp", "logits": "logits"}.get(dst.type, "")
        raw = e.get("score")
        edges.append(_Edge(src, dst, kind, as_float(raw), _edge_label(src_name, dst_name, kind, raw),
                           f"{src_name}->{e.get('dst', '')}"))
    seen = [n for e in edges for n in (e.src, e.dst)]
    max_layer = max([n.layer for n in seen if n.type not in ("input", "logits")], default=-1)
    n_layers = max(n_layers, max_layer + 1)
    for e in edges:  # logits parsed before n_layers was known sit on the real top row
        if e.dst.type == "logits" and e.dst.layer != n_layers:
            e.dst = _Node(e.dst.name, "logits", n_layers)
    max_head = max([n.index for n in seen if n.type == "head"], default=-1)
    n_heads = max(int(circuit.get("n_heads") or graph.get("n_heads") or 0), max_head + 1, 1)
    max_kv = max([n.index for n in seen if n.type == "kv"], default=-1)
    n_kv = int(circuit.get("n_kv_heads") or graph.get("n_kv_heads") or 0) or max_kv + 1
    return n_layers, n_heads, max(n_kv, max_kv + 1, 1), edges, unresolved


# --------------------------------------------------------------------------- circuit: layout
@dataclass
class _Layout:
    """Where everything goes. Heads sit on a row's baseline, the MLP a bit higher (it reads that
    layer's heads, so those edges point upwards), kv-group inputs a bit lower (they only read)."""

    n_layers: int
    n_heads: int
    n_kv: int
    col: float
    row_h: float
    left: float
    top: float
    width: float = 0.0
    height: float = 0.0
    r: float = 6.0
    row_y: dict[int, float] = field(default_factory=dict)
    gaps: list[tuple[int, int, float]] = field(default_factory=list)

    def x_head(self, h: float) -> float:
        return self.left + self.col * (h + 0.5)

    @property
    def x_mlp(self) -> float:
        return self.left + self.col * (self.n_heads + 0.75)

    @property
    def x_center(self) -> float:
        return (self.x_head(0) + self.x_head(self.n_heads - 1)) / 2

    def pos(self, n: _Node) -> tuple[float, float]:
        y = self.row_y[n.layer]
        if n.type == "head":
            return self.x_head(n.index), y
        if n.type == "mlp":
            return self.x_mlp, y - 0.38 * self.row_h
        if n.type == "kv":
            per = self.n_heads / self.n_kv
            return self.x_head(n.index * per + (per - 1) / 2), y + 0.3 * self.row_h
        return self.x_center, y


LEGEND_H = 54.0
AXIS_H = 30.0
GAP_H = 16.0


def _layout(n_layers: int, n_heads: int, n_kv: int, drawn_layers: set[int]) -> _Layout:
    """Column width from the head count, row height from the number of drawn rows; empty layer
    runs collapse to a thin labelled gap so a 30-layer circuit with 8 busy layers stays compact."""
    col = min(80.0, max(22.0, 840.0 / (n_heads + 1)))
    rows = [lay for lay in range(n_layers, -2, -1) if lay in drawn_layers or lay in (-1, n_layers)]
    row_h = min(70.0, max(36.0, 1100.0 / max(len(rows), 1)))
    lay = _Layout(n_layers, n_heads, n_kv, col, row_h, left=58.0, top=LEGEND_H)
    lay.r = min(7.0, col * 0.2, row_h * 0.14)
    y = lay.top + row_h * 0.5
    prev: int | None = None
    for layer in rows:
        if prev is not None and prev - layer > 1:
            lay.gaps.append((layer + 1, prev - 1, y - row_h * 0.5 + GAP_H * 0.5))
            y += GAP_H
        lay.row_y[layer] = y
        y += row_h
        prev = layer
    lay.width = lay.x_mlp + col * 0.75 + 12
    lay.height = y - row_h * 0.5 + AXIS_H
    return lay


# --------------------------------------------------------------------------- circuit: drawing
def _edge_path(lay: _Layout, e: _Edge, max_abs: float, highlighted: bool = False) -> str:
    """One cubic curve leaving the top of the source and entering the bottom of the destination;
    q/k/v enter a head left/centre/right so they stay apart even where dashes are hard to see."""
    x1, y1 = lay.pos(e.src)
    x2, y2 = lay.pos(e.dst)
    y1 -= lay.r
    y2 += lay.r * (1.3 if e.dst.type == "kv" else 1.0)
    if e.dst.type == "head":
        x2 += {"q": -0.7, "v": 0.7}.get(e.kind, 0.0) * lay.r
    ym = (y1 + y2) / 2
    cx1 = cx2 = 0.0
    if y1 - y2 < lay.row_h * 0.3:  # same row (head -> its own MLP): bow the curve upwards
        ym = min(y1, y2) - lay.row_h * 0.25
    elif abs(x2 - x1) < lay.col * 0.3:  # same column: arc sideways instead of hiding behind nodes
        side = 1.0 if e.src.type == "mlp" or e.dst.type == "mlp" else -1.0
        cx1 = cx2 = side * min(lay.col * 0.6, 0.25 * (y1 - y2))
    if e.score is None:
        width, sign = 0.5, "nil"
    else:
        width = 0.4 + 3.6 * abs(e.score) / max_abs if max_abs > 0 else 0.4
        sign = "pos" if e.score >= 0 else "neg"
    cls = f"edge {sign} {e.kind}" if e.kind in KIND_DASH else f"edge {sign}"
    if highlighted:  # at least a visible width: a weak edge one circuit lacks is still a difference to see
        cls += " diff"
        width = max(width, 1.2)
    d = f"M{fmt(x1)} {fmt(y1)}C{fmt(x1 + cx1)} {fmt(ym)} {fmt(x2 + cx2)} {fmt(ym)} {fmt(x2)} {fmt(y2)}"
    return f'<path class="{cls}" d="{d}" stroke-width="{width:.2g}"><title>{escape(e.label)}</title></path>'


def _node_shape(lay: _Layout, n: _Node, deg_in: int, deg_out: int) -> str:
    """Circle for a head, square for an MLP, diamond for a kv-group input, labelled box for ends."""
    x, y = lay.pos(n)
    r = lay.r * (1.3 if n.type == "kv" else 1.0)
    where = "" if n.type in ("input", "logits") else f", layer {n.layer}"
    tip = escape(f"{n.name} ({n.type}{where}): {deg_in} in, {deg_out} out")
    fill = NODE_COLOURS[n.type]
    if n.type == "head":
        return (f'<circle class="nd" cx="{fmt(x)}" cy="{fmt(y)}" r="{fmt(r)}" fill="{fill}">'
                f'<title>{tip}</title></circle>')
    if n.type == "mlp":
        s = r * 1.8
        return (f'<rect class="nd" x="{fmt(x - s / 2)}" y="{fmt(y - s / 2)}" width="{fmt(s)}" height="{fmt(s)}" '
                f'rx="1.5" fill="{fill}"><title>{tip}</title></rect>')
    if n.type == "kv":
        pts = " ".join(f"{fmt(x + dx)},{fmt(y + dy)}" for dx, dy in ((0, -r), (r, 0), (0, r), (-r, 0)))
        return f'<polygon class="kvn" points="{pts}"><title>{tip}</title></polygon>'
    w, h = 64.0, r * 2.6
    return (f'<g><rect x="{fmt(x - w / 2)}" y="{fmt(y - h / 2)}" width="{fmt(w)}" height="{fmt(h)}" rx="4" '
            f'fill="{fill}"><title>{tip}</title></rect>'
            f'<text x="{fmt(x)}" y="{fmt(y + 4)}" text-anchor="middle" class="lbl" '
            f'style="fill:#fff">{escape(n.name)}</text></g>')


def _ring(lay: _Layout, n: _Node) -> str:
    """A highlight ring around a node (one of :func:`circuit_svg`'s ``highlight``)."""
    x, y = lay.pos(n)
    return f'<circle class="ring" cx="{fmt(x)}" cy="{fmt(y)}" r="{fmt(lay.r * 1.9)}"/>'


def _row_labels(lay: _Layout) -> list[str]:
    """Layer label and a faint guide line for every drawn row; a muted note for collapsed runs."""
    out = []
    x_end = lay.width - 8
    for layer, y in lay.row_y.items():
        name = "input" if layer == -1 else "logits" if layer == lay.n_layers else f"L{layer}"
        out.append(f'<line class="grid" x1="{fmt(lay.left)}" y1="{fmt(y)}" x2="{fmt(x_end)}" y2="{fmt(y)}"/>')
        out.append(f'<text class="lbl" x="{fmt(lay.left - 8)}" y="{fmt(y + 4)}" text-anchor="end">{name}</text>')
    for first, last, y in lay.gaps:
        span = f"layer {first}" if first == last else f"layers {first}\u2013{last}"
        out.append(f'<text class="sm" x="{fmt(lay.left - 8)}" y="{fmt(y + 3)}" text-anchor="end">\u22ee</text>')
        out.append(f'<text class="sm" x="{fmt(lay.left + 2)}" y="{fmt(y + 3)}">{span}: no nodes</text>')
    return out


def _column_labels(lay: _Layout) -> list[str]:
    """Head numbers and "MLP" under the drawing, so positions can be read without hovering."""
    y = lay.height - AXIS_H + 18
    step = max(1, math.ceil(26 / lay.col))  # thin out labels when columns are narrow
    out = [f'<text class="sm" x="{fmt(lay.x_head(h))}" y="{fmt(y)}" text-anchor="middle">h{h}</text>'
           for h in range(0, lay.n_heads, step)]
    out.append(f'<text class="sm" x="{fmt(lay.x_mlp)}" y="{fmt(y)}" text-anchor="middle">MLP</text>')
    return out


def _legend(types: set[str], kinds: set[str], max_abs: float) -> list[str]:
    """Two legend lines at the top: node types present; edge sign, kind and width scale."""
    out: list[str] = []
    x, y = 10.0, 18.0
    order = [("input", "input"), ("head", "attention head"), ("kv", "k/v group input"), ("mlp", "MLP"),
             ("logits", "logits")]
    for typ, label in order:
        if typ not in types and typ not in ("head", "mlp"):
            continue
        fill = NODE_COLOURS[typ]
        if typ == "head":
            out.append(f'<circle cx="{fmt(x + 5)}" cy="{fmt(y - 4)}" r="5" fill="{fill}"/>')
        elif typ == "kv":
            out.append(f'<polygon points="{fmt(x + 5)},{fmt(y - 9)} {fmt(x + 10)},{fmt(y - 4)} '
                       f'{fmt(x + 5)},{fmt(y + 1)} {fmt(x)},{fmt(y - 4)}" class="kvn"/>')
        else:
            rx = "2" if typ in ("input", "logits") else "1.5"
            out.append(f'<rect x="{fmt(x)}" y="{fmt(y - 9)}" width="10" height="10" rx="{rx}" fill="{fill}"/>')
        out.append(f'<text class="lbl" x="{fmt(x + 15)}" y="{fmt(y)}">{label}</text>')
        x += 30 + 6.2 * len(label)
    x, y = 10.0, 40.0
    items: list[tuple[str, str, str]] = [(POS_COLOUR, "", "positive"), (NEG_COLOUR, "", "negative")]
    for k, label in (("q", "q (solid)"), ("k", "k (dashed)"), ("v", "v (dotted)")):
        if k in kinds:
            items.append(("#4b5563", KIND_DASH.get(k, ""), label))
    for colour, dash, label in items:
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line x1="{fmt(x)}" y1="{fmt(y - 4)}" x2="{fmt(x + 22)}" y2="{fmt(y - 4)}" stroke="{colour}" '
                   f'stroke-width="2"{dash_attr}/>')
        out.append(f'<text class="lbl" x="{fmt(x + 27)}" y="{fmt(y)}">{label}</text>')
        x += 36 + 6.2 * len(label)
    scale = f"width \u221d |score| (max {fmt_number(max_abs, '.3g')})" if max_abs > 0 else "width: no finite scores"
    out.append(f'<text class="lbl" x="{fmt(x)}" y="{fmt(y)}">{escape(scale)}</text>')
    return out


def _edge_opacity(n_edges: int) -> str:
    """More edges, more transparent: overlaps then read as density instead of a solid blot."""
    return ".65" if n_edges <= 200 else ".45" if n_edges <= 1000 else ".3"


def circuit_layers(circuit: Mapping[str, Any]) -> set[int]:
    """The layers a circuit dict has nodes in (pass the union of two to :func:`circuit_svg`'s ``rows`` so
    both drawings line up)."""
    return {n.layer for e in _collect(circuit)[3] for n in (e.src, e.dst)}


def circuit_svg(circuit: Mapping[str, Any], max_edges: int = MAX_EDGES_DRAWN, *,
                highlight: Iterable[str] = (), rows: Iterable[int] | None = None) -> tuple[str, str]:
    """Draw the circuit; returns (svg, note) where note says what was left out ("" if nothing).

    Edges are drawn weakest first so the strongest end up on top; above ``max_edges`` only the
    strongest are drawn (a browser copes with a few thousand paths, not with tens of thousands).
    ``highlight``: edges (``"src->dst"``, the circuit's names) and nodes (their names) drawn in
    :data:`DIFF_COLOUR`, on top of the rest, e.g. what one circuit has and another has not.
    ``rows``: draw these layers' rows as well (two circuits drawn with the same rows line up).
    """
    n_layers, n_heads, n_kv, edges, unresolved = _collect(circuit)
    notes = []
    if unresolved:
        notes.append(f"{unresolved} edge(s) with unknown node names not drawn")
    marked = set(highlight)
    edges.sort(key=lambda e: abs(e.score) if e.score is not None else -1.0)
    if len(edges) > max_edges:
        notes.append(f"showing the {max_edges} strongest of {len(edges)} edges")
        edges = edges[-max_edges:]
    edges.sort(key=lambda e: e.key in marked)  # stable: highlighted edges drawn last (on top), each set by score
    nodes: dict[str, _Node] = {}
    deg_in: dict[str, int] = {}
    deg_out: dict[str, int] = {}
    for e in edges:
        nodes[e.src.name] = e.src
        nodes[e.dst.name] = e.dst
        deg_out[e.src.name] = deg_out.get(e.src.name, 0) + 1
        deg_in[e.dst.name] = deg_in.get(e.dst.name, 0) + 1
    lay = _layout(n_layers, n_heads, n_kv, {n.layer for n in nodes.values()} | set(rows or ()))
    max_abs = max((abs(e.score) for e in edges if e.score is not None), default=0.0)
    opacity = _edge_opacity(len(edges))
    style = f"{_CIRCUIT_STYLE}.kc-circ .edge{{stroke-opacity:{opacity}}}.kc-circ .edge:hover{{stroke-opacity:1}}"
    parts = [svg_open("kc-circ", lay.width, lay.height, "circuit graph"), f"<style>{style}</style>"]
    parts += _legend({n.type for n in nodes.values()}, {e.kind for e in edges}, max_abs)
    parts += _row_labels(lay)
    parts += _column_labels(lay)
    parts.append('<g class="edges">')
    parts += [_edge_path(lay, e, max_abs, e.key in marked) for e in edges]
    parts.append('</g><g class="nodes">')
    parts += [_node_shape(lay, n, deg_in.get(n.name, 0), deg_out.get(n.name, 0)) for n in nodes.values()]
    parts += [_ring(lay, n) for n in nodes.values() if n.name in marked]
    parts.append("</g></svg>")
    return "\n".join(parts), "; ".join(notes)
