"""Inline-SVG charts of the report: one general line chart, the faithfulness curve drawn with it,
and heat-map tables.

:func:`line_svg` draws every line chart of the page (the logit-lens traces, the studies' figures,
the Hit@10-by-size chart and the faithfulness curve), so they all share axes, ticks, legend and
tooltips, and a fix to one is a fix to all. It takes a plain dict, which is also how the studies
describe their charts in the report dict.

Same rules as :mod:`kcircuits.report.svg`: everything inline, every string escaped, NaN/None
points skipped (lines break there) rather than drawn at zero, and on a log axis values <= 0
(which it cannot place) are skipped the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from kcircuits.report.base import as_float, fmt_number
from kcircuits.report.svg import fmt, nice_step, polyline, segments, svg_open

__all__ = ["PALETTE", "bar_svg", "curve_svg", "heat_table", "line_svg"]

PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#4b5563")
_STYLE = (".kc-line text{fill:#374151}.kc-line .lbl{font-size:11.5px}.kc-line .sm{font-size:10.5px;fill:#4b5563}"
          ".kc-line .grid{stroke:#eef0f3;stroke-width:1}.kc-line .ax{stroke:#6b7280;stroke-width:1}")
_LEFT, _RIGHT, _TOP, _BOTTOM = 60.0, 18.0, 34.0, 46.0
_LEGEND_ROW = 18.0
_CHAR_W = 6.4  # rough width of one legend/tick character, to wrap the legend and thin crowded tick labels


# --------------------------------------------------------------------------- axes
def _linear_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """A range widened to whole nice steps, and its ticks."""
    step = nice_step(hi - lo or 1.0)
    lo_t, hi_t = math.floor(lo / step) * step, math.ceil(hi / step) * step
    if hi_t == lo_t:
        hi_t = lo_t + step
    return lo_t, hi_t, [round(lo_t + i * step, 10) for i in range(int(round((hi_t - lo_t) / step)) + 1)]


def _log_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """A log range widened to whole decades (in log10 units) and its ticks (in data units).

    Decade ticks (0.1, 1, 10, ...) are what a reader of a log axis looks for; when the range spans
    a single decade, 2 and 5 times each decade are added so the axis still has a scale.
    """
    d0, d1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    d1 = max(d1, d0 + 1)
    ticks = [10.0 ** d for d in range(d0, d1 + 1)]
    if d1 - d0 < 2:
        ticks = sorted(ticks + [m * 10.0 ** d for d in range(d0, d1) for m in (2, 5)])
    return float(d0), float(d1), ticks


@dataclass
class _Axis:
    """One axis: its range (log10 units on a log axis), ticks in data units, and the pixel span."""

    lo: float
    hi: float
    ticks: list[float]
    log: bool
    p_lo: float = 0.0  # pixel of ``lo``
    p_hi: float = 1.0  # pixel of ``hi``

    @classmethod
    def fit(cls, values: Sequence[float], log: bool, nice: bool) -> _Axis:
        """The axis over ``values``; a linear axis is widened to nice steps when ``nice`` (y), else
        kept at the data range (x: the first and last point touch the plot's edges)."""
        lo, hi = min(values), max(values)
        if log:
            return cls(*_log_ticks(lo, hi), log=True)
        if nice:
            return cls(*_linear_ticks(lo, hi), log=False)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        return cls(lo, hi, [t for t in _linear_ticks(lo, hi)[2] if lo - 1e-9 <= t <= hi + 1e-9], log=False)

    def px(self, v: float) -> float:
        """Pixel position of the data value ``v`` (positive on a log axis)."""
        t = math.log10(v) if self.log else v
        return self.p_lo + (t - self.lo) / (self.hi - self.lo) * (self.p_hi - self.p_lo)


def _placeable(v: float | None, log: bool) -> float | None:
    """``v`` if an axis (log or not) can place it, else None: a gap in the line."""
    return v if v is not None and (v > 0 or not log) else None


def _tick_text(v: float, unit: str = "") -> str:
    """A tick or tooltip value: shortest exact form (ticks are round numbers), no negative zero."""
    return fmt_number(v, ".6g") + unit


# --------------------------------------------------------------------------- series
@dataclass
class _Series:
    """One line of the chart with its style; ``band`` is the +- half-width around each y."""

    label: str
    ys: list[float | None]
    colour: str
    dash: str = ""
    width: float = 2.0
    markers: bool = True
    band: list[float | None] | None = None
    band_label: str = ""


@dataclass
class _RefLine:
    """A horizontal reference line across the plot (the full model's level, say)."""

    y: float
    label: str = ""
    colour: str = "#111827"
    dash: str = ""


def _parse_series(raw: Mapping[str, Any]) -> list[_Series]:
    """Series from the chart dict: ``{label: [y, ...]}`` or ``{label: {"y": [...], "band": [...],
    "band_label", "dash", "colour", "width", "markers"}}``."""
    out = []
    for i, (label, spec) in enumerate(raw.items()):
        if not isinstance(spec, Mapping):
            spec = {"y": spec}
        band = spec.get("band")
        out.append(_Series(label=str(label), ys=[as_float(y) for y in spec.get("y") or []],
                           colour=str(spec.get("colour") or PALETTE[i % len(PALETTE)]),
                           dash=str(spec.get("dash") or ""), width=float(spec.get("width") or 2.0),
                           markers=bool(spec.get("markers", True)),
                           band=[as_float(b) for b in band] if band else None,
                           band_label=str(spec.get("band_label") or "")))
    return out


def _parse_hlines(raw: Sequence[Mapping[str, Any]], log_y: bool) -> list[_RefLine]:
    """Reference lines the y axis can place (a value <= 0 cannot sit on a log axis)."""
    out = []
    for spec in raw:
        y = _placeable(as_float(spec.get("y")), log_y)
        if y is not None:
            out.append(_RefLine(y, str(spec.get("label") or ""), str(spec.get("colour") or "#111827"),
                                str(spec.get("dash") or "")))
    return out


def _stroke(colour: str, width: float, dash: str) -> str:
    """The stroke attributes of a line: the same in the plot and in its legend sample."""
    dash_attr = f' stroke-dasharray="{escape(dash)}"' if dash else ""
    return f'stroke="{escape(colour)}" stroke-width="{fmt_number(width, "g")}"{dash_attr}'


# --------------------------------------------------------------------------- the chart
def line_svg(chart: Mapping[str, Any], w: float = 720.0, h: float = 320.0) -> str:
    """A line chart as standalone SVG.

    ``chart`` keys (all optional but ``x`` and ``series``):

    - ``x``: the x values, shared by every series; ``series``: ``{label: [y, ...]}``, or per label a
      dict ``{"y": [...], "band": [+-half-width, ...], "band_label": "± std", "dash": "2 2",
      "colour": "#hex", "width": 1.5, "markers": False}``.
    - ``x_label``, ``y_label``; ``log_x``, ``log_y``: log10 axes with decade ticks; ``x_unit``: a
      suffix for the x tick labels and tooltips (``"%"``).
    - ``hlines``: reference lines ``[{"y": 1.0, "label": "full model", "dash": "5 4", "colour"}]``;
      ``y_include``: values the y range must contain (``[0, 1]`` for a share).
    - ``title``: the accessible name of the drawing.

    Every point with a value gets a marker whose tooltip gives the series, x and y (and the band).
    The series listed first is drawn on top.
    """
    title = escape(str(chart.get("title", "chart")))
    log_x, log_y = bool(chart.get("log_x")), bool(chart.get("log_y"))
    unit = str(chart.get("x_unit") or "")
    xs = [_placeable(as_float(x), log_x) for x in chart.get("x") or []]
    series = _parse_series(chart.get("series") or {})
    # A series may be shorter than x (a stored report without it gives []): it is drawn where it has values.
    pts = {s.label: [(x, _placeable(y, log_y) if x is not None else None)
                     for x, y in zip(xs, s.ys, strict=False)]
           for s in series}
    bands = {s.label: _band_runs(xs, s, log_y) for s in series if s.band}
    hlines = _parse_hlines(chart.get("hlines") or [], log_y)
    drawn = [s for s in series if any(y is not None for _, y in pts[s.label])]
    y_values = [y for s in drawn for _, y in pts[s.label] if y is not None]
    if not y_values:
        return (svg_open("kc-line", w, 60, title) + f"<style>{_STYLE}</style>"
                '<text class="lbl" x="20" y="34">no data</text></svg>')
    y_values += [v for runs in bands.values() for run in runs for _, lo, hi in run for v in (lo, hi)]
    y_values += [hl.y for hl in hlines]
    y_values += [v for v in (_placeable(as_float(v), log_y) for v in chart.get("y_include") or []) if v is not None]
    x_axis = _Axis.fit([x for x in xs if x is not None], log_x, nice=False)
    y_axis = _Axis.fit(y_values, log_y, nice=True)

    legend, top = _legend(drawn, bands, hlines, w)
    x_axis.p_lo, x_axis.p_hi = _LEFT, w - _RIGHT
    y_axis.p_lo, y_axis.p_hi = h - _BOTTOM, top
    sx, sy = x_axis.px, y_axis.px

    out = [svg_open("kc-line", w, h, title), f"<style>{_STYLE}</style>"]
    out += _axes(chart, x_axis, y_axis, xs, unit, w, h, top)
    for s in drawn:  # bands under every line
        for seg in bands.get(s.label, []):
            out.append(_band_shape(seg, s.colour, sx, sy))
    for hl in hlines:
        out.append(f'<line x1="{fmt(_LEFT)}" y1="{fmt(sy(hl.y))}" x2="{fmt(w - _RIGHT)}" y2="{fmt(sy(hl.y))}" '
                   f"{_stroke(hl.colour, 1.0, hl.dash)}/>")
    for s in reversed(drawn):
        for seg in segments(pts[s.label]):
            out.append(f'<path d="{polyline(seg, sx, sy)}" fill="none" {_stroke(s.colour, s.width, s.dash)}/>')
    for s in drawn:
        if s.markers:
            out += _markers(s, pts[s.label], unit, sx, sy)
    out += legend
    out.append("</svg>")
    return "\n".join(out)


def _band_runs(xs: Sequence[float | None], s: _Series, log_y: bool) -> list[list[tuple[float, float, float]]]:
    """Runs of (x, y - band, y + band) where all are drawable; a gap in x, y or band splits them."""
    runs: list[list[tuple[float, float, float]]] = [[]]
    for x, y, b in zip(xs, s.ys, s.band or [], strict=False):  # as in line_svg: points past a short list are gaps
        if x is None or y is None or b is None or _placeable(y - b, log_y) is None or _placeable(y, log_y) is None:
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append((x, y - b, y + b))
    return [r for r in runs if r]


def _band_shape(run: list[tuple[float, float, float]], colour: str, sx: Callable[[float], float],
                sy: Callable[[float], float]) -> str:
    """A filled area between the band's edges, or a short bar where the band has a single point."""
    if len(run) == 1:
        x, lo, hi = run[0]
        return (f'<line x1="{fmt(sx(x))}" y1="{fmt(sy(lo))}" x2="{fmt(sx(x))}" y2="{fmt(sy(hi))}" '
                f'stroke="{escape(colour)}" stroke-opacity=".35" stroke-width="3"/>')
    edge = [(x, hi) for x, _, hi in run] + [(x, lo) for x, lo, _ in reversed(run)]
    return f'<path d="{polyline(edge, sx, sy)}Z" fill="{escape(colour)}" fill-opacity=".25" stroke="none"/>'


def _axes(chart: Mapping[str, Any], x_axis: _Axis, y_axis: _Axis, xs: Sequence[float | None], unit: str,
          w: float, h: float, top: float) -> list[str]:
    """Grid, tick labels (x labels thinned where they would collide), axis lines and titles."""
    y_lo = h - _BOTTOM
    out = _y_marks(y_axis, w)
    ticks = x_axis.ticks
    if not x_axis.log and all(x is None or float(x).is_integer() for x in xs):  # layers, k: whole numbers only
        ticks = [t for t in ticks if float(t).is_integer()] or [x_axis.lo, x_axis.hi]
    if x_axis.log:  # log axes get vertical grid lines: the decades are the scale
        out += [f'<line class="grid" x1="{fmt(x_axis.px(t))}" y1="{fmt(top)}" x2="{fmt(x_axis.px(t))}" '
                f'y2="{fmt(y_lo)}"/>' for t in ticks]
    out += _x_labels([(x_axis.px(t), _tick_text(t, unit)) for t in ticks], y_lo)
    out += _frame(chart, x_axis.log, y_axis.log, w, h, top)
    return out


def _y_marks(y_axis: _Axis, w: float) -> list[str]:
    """Horizontal grid lines and their value labels at every y tick."""
    out = []
    for t in y_axis.ticks:
        y = y_axis.px(t)
        out.append(f'<line class="grid" x1="{fmt(_LEFT)}" y1="{fmt(y)}" x2="{fmt(w - _RIGHT)}" y2="{fmt(y)}"/>')
        out.append(f'<text class="sm" x="{fmt(_LEFT - 6)}" y="{fmt(y + 3.5)}" text-anchor="end">'
                   f"{escape(_tick_text(t))}</text>")
    return out


def _x_labels(marks: Sequence[tuple[float, str]], y_lo: float) -> list[str]:
    """Tick marks and labels under the x axis at (pixel, text), left to right; a label that would
    run into the previous one is left out (with its tick), so crowded axes stay legible."""
    out, last = [], -1e9
    for x, label in marks:
        if x - last >= _CHAR_W * len(label) + 6:
            out.append(f'<line class="ax" x1="{fmt(x)}" y1="{fmt(y_lo)}" x2="{fmt(x)}" y2="{fmt(y_lo + 4)}"/>')
            out.append(f'<text class="sm" x="{fmt(x)}" y="{fmt(y_lo + 16)}" text-anchor="middle">'
                       f"{escape(label)}</text>")
            last = x
    return out


def _frame(chart: Mapping[str, Any], log_x: bool, log_y: bool, w: float, h: float, top: float) -> list[str]:
    """The two axis lines and the axis titles."""
    x_lo, x_hi, y_lo = _LEFT, w - _RIGHT, h - _BOTTOM
    x_label = _axis_title(str(chart.get("x_label", "")), log_x)
    y_label = _axis_title(str(chart.get("y_label", "")), log_y)
    return [f'<path class="ax" d="M{fmt(x_lo)} {fmt(top)}V{fmt(y_lo)}H{fmt(x_hi)}" fill="none"/>',
            f'<text class="lbl" x="{fmt((x_lo + x_hi) / 2)}" y="{fmt(h - 8)}" text-anchor="middle">'
            f"{escape(x_label)}</text>",
            f'<text class="lbl" transform="translate(14 {fmt((top + y_lo) / 2)}) rotate(-90)" '
            f'text-anchor="middle">{escape(y_label)}</text>']


def _axis_title(label: str, log: bool) -> str:
    """The axis title, saying so when the axis is logarithmic: "rank (log scale)", or inside a
    closing parenthesis already there: "size (% of edges, log scale)"."""
    if not log:
        return label
    return f"{label[:-1]}, log scale)" if label.endswith(")") else f"{label} (log scale)".lstrip()


def _markers(s: _Series, pts: Sequence[tuple[float | None, float | None]], unit: str,
             sx: Callable[[float], float], sy: Callable[[float], float]) -> list[str]:
    """A dot per point with a tooltip: series, x, y and, with a band, its half-width."""
    out = []
    for i, (x, y) in enumerate(pts):
        if x is None or y is None:
            continue
        b = s.band[i] if s.band and i < len(s.band) else None
        tip = f"{s.label}: x={_tick_text(x, unit)}, y={fmt_number(y)}"
        if b is not None:
            tip += f" \u00b1 {fmt_number(b, '.3g')}"
        out.append(f'<circle cx="{fmt(sx(x))}" cy="{fmt(sy(y))}" r="2.5" fill="{escape(s.colour)}">'
                   f"<title>{escape(tip)}</title></circle>")
    return out


def _legend(drawn: Sequence[_Series], bands: Mapping[str, list], hlines: Sequence[_RefLine],
            w: float) -> tuple[list[str], float]:
    """Legend entries (line samples in each series' style, a swatch per band, the reference lines),
    wrapped into rows across the top; returns the SVG and the plot's top edge below it."""
    items: list[tuple[str, str]] = []  # (sample svg at x=0 y=0, label)
    for s in drawn:
        items.append((f'<line x1="0" y1="-4" x2="20" y2="-4" {_stroke(s.colour, s.width, s.dash)}/>', s.label))
        if bands.get(s.label):
            items.append((_swatch(s.colour, ".25"), s.band_label or f"{s.label} band"))
    for hl in hlines:
        if hl.label:
            items.append((f'<line x1="0" y1="-4" x2="20" y2="-4" {_stroke(hl.colour, 1.0, hl.dash)}/>', hl.label))
    return _legend_rows(items, w)


def _swatch(colour: str, opacity: str = "1") -> str:
    """A filled legend sample: a band's area or a bar series."""
    return f'<rect x="0" y="-9" width="20" height="10" fill="{escape(colour)}" fill-opacity="{opacity}"/>'


def _legend_rows(items: Sequence[tuple[str, str]], w: float) -> tuple[list[str], float]:
    """Lay out (sample, label) legend entries in rows across the top; returns the SVG and the
    plot's top edge below the last row."""
    out, x, row = [], _LEFT + 4, 0
    for sample, label in items:
        width = 40 + _CHAR_W * len(label)
        if x + width > w - _RIGHT and x > _LEFT + 4:
            x, row = _LEFT + 4, row + 1
        out.append(f'<g transform="translate({fmt(x)} {fmt(18 + row * _LEGEND_ROW)})">{sample}'
                   f'<text class="lbl" x="25" y="0">{escape(label)}</text></g>')
        x += width
    return out, _TOP + row * _LEGEND_ROW


# --------------------------------------------------------------------------- bar chart
def bar_svg(chart: Mapping[str, Any], w: float = 720.0, h: float = 300.0) -> str:
    """A bar chart as standalone SVG, for counts over categories (a histogram over layers, say),
    where a line would suggest values between the categories that do not exist.

    ``chart`` takes the keys of :func:`line_svg` that make sense for bars: ``x`` (the categories,
    any values, printed as labels), ``series`` (``{label: [count, ...]}`` or ``{label: {"y": [...],
    "colour": "#hex"}}``; several series are drawn side by side in each category), ``x_label``,
    ``y_label``, ``y_include`` and ``title``. The y axis always starts at 0; a missing value draws
    no bar. Every bar has a tooltip with its series, category and value.
    """
    title = escape(str(chart.get("title", "chart")))
    cats = list(chart.get("x") or [])
    series = _parse_series(chart.get("series") or {})
    values = [y for s in series for y in s.ys[:len(cats)] if y is not None]
    if not cats or not values:
        return (svg_open("kc-line kc-bar", w, 60, title) + f"<style>{_STYLE}</style>"
                '<text class="lbl" x="20" y="34">no data</text></svg>')
    include = [v for v in (as_float(v) for v in chart.get("y_include") or []) if v is not None]
    y_axis = _Axis.fit(values + include + [0.0], log=False, nice=True)
    if all(float(v).is_integer() for v in values):  # counts: no 0.5 prompts on the axis
        y_axis.ticks = [t for t in y_axis.ticks if float(t).is_integer()]
    items = [(_swatch(s.colour), s.label) for s in series] if len(series) > 1 else []
    legend, top = _legend_rows(items, w)
    y_axis.p_lo, y_axis.p_hi = h - _BOTTOM, (top if items else _TOP - _LEGEND_ROW)
    slot = (w - _RIGHT - _LEFT) / len(cats)
    bar_w = slot * 0.8 / len(series)
    out = [svg_open("kc-line kc-bar", w, h, title), f"<style>{_STYLE}</style>"]
    out += _y_marks(y_axis, w)
    base = y_axis.px(0.0)
    labels = [_category_label(c) for c in cats]
    for j, s in enumerate(series):
        for i, (label, y) in enumerate(zip(labels, s.ys, strict=False)):
            if y is None:
                continue
            top_px, bottom_px = sorted((y_axis.px(y), base))
            tip = escape(f"{s.label}: {label} \u2192 {fmt_number(y)}")
            out.append(f'<rect class="bar" x="{fmt(_LEFT + slot * (i + 0.1) + bar_w * j)}" y="{fmt(top_px)}" '
                       f'width="{fmt(bar_w)}" height="{fmt(bottom_px - top_px)}" fill="{escape(s.colour)}">'
                       f"<title>{tip}</title></rect>")
    out += _x_labels([(_LEFT + slot * (i + 0.5), label) for i, label in enumerate(labels)], h - _BOTTOM)
    out += _frame(chart, False, False, w, h, y_axis.p_hi)
    out += legend
    out.append("</svg>")
    return "\n".join(out)


def _category_label(c: Any) -> str:
    """A bar chart's category as text: numbers as tick values (no "-0", no "3.0"), the rest as is."""
    f = as_float(c)
    return _tick_text(f) if f is not None and not isinstance(c, str) else str(c)


# --------------------------------------------------------------------------- the faithfulness curve
def curve_svg(curve: Mapping[str, Any]) -> str:
    """Faithfulness vs % of edges kept, as a :func:`line_svg` chart: log-x percent axis with decade
    ticks, the circuit's mean with a +-std band, the random-edges baseline dashed, and the full
    model's level (1.0) as a reference line. NaN/None points are skipped (lines break there)."""
    rnd = curve.get("random_faithfulness_mean")
    series: dict[str, Any] = {"circuit (mean)": {"y": curve.get("faithfulness_mean") or [],
                                                 "band": curve.get("faithfulness_std"), "band_label": "\u00b1 std",
                                                 "colour": PALETTE[0]}}
    if rnd:
        series["random edges"] = {"y": rnd, "colour": "#6b7280", "width": 1.5, "dash": "2 2", "markers": False}
    return line_svg({"title": "faithfulness curve", "x": curve.get("x_percent") or [], "series": series,
                     "log_x": True, "x_unit": "%", "x_label": "edges kept (% of all edges)",
                     "y_label": "faithfulness", "y_include": [0.0, 1.0],
                     "hlines": [{"y": 1.0, "label": "full model (1.0)", "dash": "5 4"}]}, h=380.0)


# --------------------------------------------------------------------------- heat tables
def heat_table(labels_rows: Sequence[str], labels_cols: Sequence[str], values: Sequence[Sequence[Any]],
               lo: float = 0.0, hi: float = 1.0) -> str:
    """A matrix as an HTML table whose cells are shaded by value (``lo`` white ... ``hi`` deep blue)."""
    head = "".join(f"<th>{escape(str(c))}</th>" for c in labels_cols)
    body = []
    for label, row in zip(labels_rows, values, strict=True):
        cells = []
        for v in row:
            f = as_float(v)
            if f is None:
                cells.append('<td class="num">n/a</td>')
                continue
            t = min(max((f - lo) / (hi - lo) if hi > lo else 0.0, 0.0), 1.0)
            bg = f"rgba(37,99,235,{0.08 + 0.72 * t:.2f})"
            colour = "#fff" if t > 0.6 else "#111827"
            cells.append(f'<td class="num" style="background:{bg};color:{colour}">{fmt_number(f, ".3f")}</td>')
        body.append(f"<tr><th>{escape(str(label))}</th>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table><thead><tr><th></th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')
