"""Small inline-SVG charts for the analysis sections: line charts and heat-map tables.

Same rules as :mod:`kcircuits.report.svg`: everything inline, every string escaped, NaN/None
points skipped (lines break there) rather than drawn at zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from kcircuits.report.svg import (
    _nice_step,
    _polyline,
    _segments,
    _svg_open,
    as_float,
    fmt,
)

PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#4b5563")
_STYLE = (".kc-line text{fill:#374151}.kc-line .lbl{font-size:11.5px}.kc-line .sm{font-size:10.5px;fill:#4b5563}"
          ".kc-line .grid{stroke:#eef0f3;stroke-width:1}.kc-line .ax{stroke:#6b7280;stroke-width:1}")


def _ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    step = _nice_step(hi - lo or 1.0)
    lo_t, hi_t = math.floor(lo / step) * step, math.ceil(hi / step) * step
    if hi_t == lo_t:
        hi_t = lo_t + step
    return lo_t, hi_t, [round(lo_t + i * step, 10) for i in range(int(round((hi_t - lo_t) / step)) + 1)]


def line_svg(chart: Mapping[str, Any], w: float = 720.0, h: float = 320.0) -> str:
    """``{"x": [...], "series": {label: [y, ...]}, "x_label", "y_label", "log_y": bool}`` as a line chart."""
    xs = [as_float(x) for x in chart.get("x") or []]
    log_y = bool(chart.get("log_y"))
    series = {}
    for label, ys in (chart.get("series") or {}).items():
        pts = []
        for x, y in zip(xs, ys or []):
            y = as_float(y)
            if y is not None and log_y:
                y = math.log10(y) if y > 0 else None
            pts.append((x, y) if x is not None else (0.0, None))
        series[str(label)] = pts
    values = [y for pts in series.values() for _, y in pts if y is not None]
    valid_x = [x for x in xs if x is not None]
    if not values or not valid_x:
        return (_svg_open("kc-line", w, 60, escape(str(chart.get("title", "chart")))) + f"<style>{_STYLE}</style>"
                '<text class="lbl" x="20" y="34">no data</text></svg>')
    left, right, top, bottom = 60.0, 18.0, 34.0, 46.0
    x0, x1 = min(valid_x), max(valid_x)
    x1 = x1 if x1 > x0 else x0 + 1
    y0, y1, yt = _ticks(min(values), max(values))
    if log_y and math.ceil(max(values)) - math.floor(min(values)) >= 1:  # decades: 1, 10, 100, ...
        y0, y1 = math.floor(min(values)), math.ceil(max(values))
        yt = list(range(y0, y1 + 1))

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def sy(y: float) -> float:
        return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    out = [_svg_open("kc-line", w, h, escape(str(chart.get("title", "chart")))), f"<style>{_STYLE}</style>"]
    for t in yt:
        label = f"{10 ** t:.3g}" if log_y else f"{t:g}"
        out.append(f'<line class="grid" x1="{fmt(left)}" y1="{fmt(sy(t))}" x2="{fmt(w - right)}" y2="{fmt(sy(t))}"/>')
        out.append(f'<text class="sm" x="{fmt(left - 6)}" y="{fmt(sy(t) + 3.5)}" text-anchor="end">{escape(label)}</text>')
    _, _, xt = _ticks(x0, x1)
    if all(float(x).is_integer() for x in valid_x):  # layers, k: integer ticks only
        xt = [t for t in xt if float(t).is_integer()] or [x0, x1]
    for t in xt:
        if x0 <= t <= x1:
            out.append(f'<text class="sm" x="{fmt(sx(t))}" y="{fmt(h - bottom + 16)}" text-anchor="middle">{t:g}</text>')
    out.append(f'<path class="ax" d="M{fmt(left)} {fmt(top)}V{fmt(h - bottom)}H{fmt(w - right)}" fill="none"/>')
    out.append(f'<text class="lbl" x="{fmt((left + w - right) / 2)}" y="{fmt(h - 8)}" text-anchor="middle">'
               f'{escape(str(chart.get("x_label", "")))}</text>')
    y_label = str(chart.get("y_label", "")) + (" (log scale)" if log_y else "")
    out.append(f'<text class="lbl" transform="translate(14 {fmt((top + h - bottom) / 2)}) rotate(-90)" '
               f'text-anchor="middle">{escape(y_label)}</text>')
    lx = left + 4
    for i, (label, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        for seg in _segments(pts):
            out.append(f'<path d="{_polyline(seg, sx, sy)}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in pts:
            if y is not None:
                shown = 10 ** y if log_y else y
                out.append(f'<circle cx="{fmt(sx(x))}" cy="{fmt(sy(y))}" r="2.5" fill="{colour}">'
                           f"<title>{escape(f'{label}: x={x:g}, y={shown:.4g}')}</title></circle>")
        out.append(f'<line x1="{fmt(lx)}" y1="14" x2="{fmt(lx + 18)}" y2="14" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text class="lbl" x="{fmt(lx + 22)}" y="18">{escape(label)}</text>')
        lx += 34 + 6.4 * len(label)
    out.append("</svg>")
    return "\n".join(out)


def heat_table(labels_rows: Sequence[str], labels_cols: Sequence[str], values: Sequence[Sequence[Any]],
               lo: float = 0.0, hi: float = 1.0) -> str:
    """A matrix as an HTML table whose cells are shaded by value (``lo`` white ... ``hi`` deep blue)."""
    head = "".join(f"<th>{escape(str(c))}</th>" for c in labels_cols)
    body = []
    for label, row in zip(labels_rows, values):
        cells = []
        for v in row:
            f = as_float(v)
            if f is None:
                cells.append('<td class="num">n/a</td>')
                continue
            t = min(max((f - lo) / (hi - lo) if hi > lo else 0.0, 0.0), 1.0)
            bg = f"rgba(37,99,235,{0.08 + 0.72 * t:.2f})"
            colour = "#fff" if t > 0.6 else "#111827"
            cells.append(f'<td class="num" style="background:{bg};color:{colour}">{f:.3f}</td>')
        body.append(f"<tr><th>{escape(str(label))}</th>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
