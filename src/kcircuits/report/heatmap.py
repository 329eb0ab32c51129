"""Heatmaps: an inline-SVG heatmap, and the "Causal tracing" section that draws ROME-style traces with it.

:func:`heatmap_svg` draws any matrix as one coloured cell per value with a colour scale beside it.
The scale is centred on zero (the report's blue for positive values, red for negative, white for
zero), so an indirect effect of 0 always looks the same whatever else is in the figure, and a
negative effect is never mistaken for a small positive one. Missing values (None, NaN: a ROME
position group that no prompt has) are grey cells marked "n/a" in their tooltip, never drawn as 0.

The section reads ``report["trace"]``, the plain JSON of :meth:`kcircuits.edit.trace.TraceResult.to_json`
(what ``trace.json`` holds; this module never imports the tracing code, which needs torch): the mean
indirect effect of each traced kind over the relation's prompts by ROME's six position groups, and
one prompt's trace token by token, each with the layers across.

Same rules as the rest of the report: everything inline, every string escaped.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from kcircuits.report.base import (
    Section,
    as_float,
    escape,
    figure,
    fmt_fixed,
    fmt_number,
    sample_note_html,
    token_label,
)
from kcircuits.report.svg import NAN_COLOUR, NEG_COLOUR, POS_COLOUR, fmt, svg_open

__all__ = ["SECTIONS", "TRACE", "cell_colour", "heatmap_svg", "trace_example"]

#: steps of the colour scale's bar
SCALE_STEPS = 10
_CHAR_W = 6.6  # rough width of one label character, for the margins
_CELL_H = 20.0
_STYLE = (".kc-heat text{fill:#374151}.kc-heat .lbl{font-size:11px}.kc-heat .sm{font-size:10px;fill:#4b5563}"
          ".kc-heat .cell{stroke:#fff;stroke-width:.5}.kc-heat .hl{fill:none;stroke:#111827;stroke-width:2}")

#: what each traced state is, for the figures' titles
KIND_TITLES = {"hidden": "Residual stream (hidden state after each layer)", "mlp": "MLP outputs",
               "attn": "Attention outputs"}


# --------------------------------------------------------------------------- the heatmap
def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


def cell_colour(value: float | None, scale: float) -> str:
    """The fill of a cell holding ``value`` on a scale whose ends are ``-scale`` and ``+scale``: white at 0,
    deepening to the report's blue (positive) or red (negative) at the ends; grey for a missing value."""
    if value is None:
        return NAN_COLOUR
    t = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    r, g, b = _rgb(POS_COLOUR if value >= 0 else NEG_COLOUR)
    mix = [round(255 + (c - 255) * t) for c in (r, g, b)]
    return "#" + "".join(f"{c:02x}" for c in mix)


def _range(values: Sequence[Sequence[float | None]]) -> tuple[float, float]:
    """The colour scale's ends: ``(-m, m)`` when there are negative values, else ``(0, m)``, with ``m`` the
    largest magnitude (1 when every value is zero or missing, so the scale is still drawn)."""
    finite = [v for row in values for v in row if v is not None]
    biggest = max((abs(v) for v in finite), default=0.0) or 1.0
    return (-biggest if any(v < 0 for v in finite) else 0.0), biggest


def _label_step(n: int, width: float, longest: int) -> int:
    """Label every k-th column so that labels of ``longest`` characters do not overlap in cells ``width`` wide."""
    return max(1, math.ceil((longest * _CHAR_W + 4) / width)) if n else 1


def _cells(values: Sequence[Sequence[float | None]], rows: Sequence[str], cols: Sequence[str], x0: float, y0: float,
           cell_w: float, scale: float, value_label: str) -> list[str]:
    out = []
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            text = fmt_number(v, ".4g") if v is not None else "n/a"
            tip = escape(f"{rows[i]}, {cols[j]}: {value_label + ' ' if value_label else ''}{text}")
            out.append(f'<rect class="cell" x="{fmt(x0 + j * cell_w)}" y="{fmt(y0 + i * _CELL_H)}" '
                       f'width="{fmt(cell_w)}" height="{fmt(_CELL_H)}" fill="{cell_colour(v, scale)}">'
                       f"<title>{tip}</title></rect>")
    return out


def _scale_bar(lo: float, hi: float, x: float, y: float, height: float) -> list[str]:
    """The colour scale: :data:`SCALE_STEPS` swatches from ``hi`` (top) to ``lo`` (bottom), labelled at
    the ends and at zero, plus a grey swatch for missing values."""
    out, step_h = [], height / SCALE_STEPS
    for k in range(SCALE_STEPS):
        v = hi - (hi - lo) * (k + 0.5) / SCALE_STEPS
        out.append(f'<rect class="scale" x="{fmt(x)}" y="{fmt(y + k * step_h)}" width="14" height="{fmt(step_h)}" '
                   f'fill="{cell_colour(v, max(abs(lo), abs(hi)))}"/>')
    ticks = {hi: y, lo: y + height}
    if lo < 0 < hi:
        ticks[0.0] = y + height * hi / (hi - lo)
    out += [f'<text class="sm" x="{fmt(x + 18)}" y="{fmt(ty + 3.5)}">{escape(fmt_number(v, ".3g"))}</text>'
            for v, ty in ticks.items()]
    out.append(f'<rect class="scale nan" x="{fmt(x)}" y="{fmt(y + height + 10)}" width="14" height="10" '
               f'fill="{NAN_COLOUR}"/><text class="sm" x="{fmt(x + 18)}" y="{fmt(y + height + 19)}">n/a</text>')
    return out


def heatmap_svg(values: Sequence[Sequence[Any]], row_labels: Sequence[str], col_labels: Sequence[str], *,
                title: str = "", x_label: str = "", y_label: str = "", value_label: str = "",
                highlight: Collection[tuple[int, int]] = ()) -> str:
    """A matrix as an SVG heatmap: one ``<rect class="cell">`` per value, rows top to bottom, with a colour scale.

    Args:
        values: ``[n_rows][n_cols]`` numbers; None, NaN and inf are missing (grey, "n/a").
        row_labels, col_labels: one label per row (left of the cells) and per column (below them;
            thinned out when the columns are too narrow for every label).
        title: the heading drawn above the cells.
        x_label, y_label: what the columns and the rows are (e.g. "layer", "position").
        value_label: what a value is, in each cell's tooltip ("effect 0.12").
        highlight: ``(row, col)`` cells to outline (e.g. the critical layer).
    """
    cleaned = [[as_float(v) for v in row] for row in values]
    if len(cleaned) != len(row_labels) or any(len(row) != len(col_labels) for row in cleaned):
        raise ValueError(f"heatmap of {len(cleaned)} rows with {len(row_labels)} row and {len(col_labels)} "
                         "column labels: the shapes differ")
    rows, cols = [str(r) for r in row_labels], [str(c) for c in col_labels]
    lo, hi = _range(cleaned)
    cell_w = min(32.0, max(12.0, 640.0 / max(len(cols), 1)))
    left = 16.0 + _CHAR_W * max((len(r) for r in rows), default=0) + (16.0 if y_label else 0.0)
    top = 28.0 if title else 8.0
    grid_w, grid_h = cell_w * len(cols), _CELL_H * len(rows)
    width = max(left + grid_w + 80.0, 16.0 + _CHAR_W * len(title))
    height = top + max(grid_h, 90.0) + 44.0
    parts = [svg_open("kc-heat", width, height, title or "heatmap"), f"<style>{_STYLE}</style>"]
    if title:
        parts.append(f'<text class="lbl" x="8" y="18" font-weight="600">{escape(title)}</text>')
    parts += _cells(cleaned, rows, cols, left, top, cell_w, max(abs(lo), abs(hi)), value_label)
    parts += [f'<rect class="hl" x="{fmt(left + j * cell_w)}" y="{fmt(top + i * _CELL_H)}" width="{fmt(cell_w)}" '
              f'height="{fmt(_CELL_H)}"/>' for i, j in highlight if 0 <= i < len(rows) and 0 <= j < len(cols)]
    parts += [f'<text class="lbl" x="{fmt(left - 6)}" y="{fmt(top + (i + 0.5) * _CELL_H + 4)}" '
              f'text-anchor="end" xml:space="preserve">{escape(r)}</text>' for i, r in enumerate(rows)]
    step = _label_step(len(cols), cell_w, max((len(c) for c in cols), default=0))
    parts += [f'<text class="sm" x="{fmt(left + (j + 0.5) * cell_w)}" y="{fmt(top + grid_h + 14)}" '
              f'text-anchor="middle">{escape(c)}</text>' for j, c in enumerate(cols) if j % step == 0]
    if x_label:
        parts.append(f'<text class="lbl" x="{fmt(left + grid_w / 2)}" y="{fmt(top + grid_h + 32)}" '
                     f'text-anchor="middle">{escape(x_label)}</text>')
    if y_label:
        cy = top + grid_h / 2
        parts.append(f'<text class="lbl" x="12" y="{fmt(cy)}" text-anchor="middle" '
                     f'transform="rotate(-90 12 {fmt(cy)})">{escape(y_label)}</text>')
    parts += _scale_bar(lo, hi, left + grid_w + 14, top, max(min(grid_h, 160.0), 60.0))
    parts.append("</svg>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- the causal tracing section
def _transpose(matrix: Sequence[Sequence[Any]]) -> list[list[Any]]:
    return [list(col) for col in zip(*matrix, strict=True)] if matrix else []


def trace_example(trace: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The prompt to show token by token: the one whose answer the corruption takes away the most
    (largest p_clean - p_corrupt), so its trace has the most to show; None without prompts."""
    prompts = [p for p in trace.get("prompts") or [] if isinstance(p, Mapping) and p.get("scores")]
    if not prompts:
        return None
    return max(prompts, key=lambda p: (as_float(p.get("p_clean")) or 0.0) - (as_float(p.get("p_corrupt")) or 0.0))


def _mean_figure(trace: Mapping[str, Any], kind: str, critical: int | None) -> str:
    """``kind``'s mean indirect effect: ROME's position groups down, layers across."""
    groups = list(trace.get("groups") or [])
    matrix = _transpose(trace["mean_effect"][kind])  # [L, 6] -> [6, L]
    highlight = ([(groups.index("last subject token"), critical)]
                 if kind == "mlp" and critical is not None and "last subject token" in groups else [])
    window = "" if kind == "hidden" else f" (a window of {trace.get('window')} layers restored around each layer)"
    svg = heatmap_svg(matrix, groups, [str(lay) for lay in range(len(matrix[0]) if matrix else 0)],
                      title=f"{KIND_TITLES.get(kind, kind)}{window}", x_label="layer", y_label="position",
                      value_label="mean indirect effect", highlight=highlight)
    cap = (f"Mean indirect effect of restoring the clean {escape(kind)} state(s) at each layer and position "
           "group: p(answer) with the state restored minus p(answer) corrupted. Grey: no prompt has such a position.")
    if highlight:
        cap += f" Outlined: the critical layer {critical} (largest MLP effect at the subject's last token)."
    return figure(svg, cap + sample_note_html(len(trace.get("prompts") or [])))


def _minus(value: float | None, baseline: float) -> float | None:
    return None if value is None else value - baseline


def _example_figure(trace: Mapping[str, Any]) -> str:
    """One prompt's trace of the first traced kind, token by token: what the group means average."""
    example = trace_example(trace)
    kinds = list(trace.get("kinds") or [])
    if example is None or not kinds:
        return ""
    kind, p_corrupt = kinds[0], as_float(example.get("p_corrupt")) or 0.0
    start, end = (int(x) for x in example.get("subject_range") or (0, 0))
    tokens = [token_label(t) + (" *" if start <= i < end else "") for i, t in enumerate(example.get("tokens") or [])]
    effect = [[_minus(as_float(v), p_corrupt) for v in row]
              for row in _transpose(example["scores"][kind])]  # [L, P] -> [P, L]
    svg = heatmap_svg(effect, tokens, [str(lay) for lay in range(len(effect[0]) if effect else 0)],
                      title=f"{KIND_TITLES.get(kind, kind)}: one prompt", x_label="layer", y_label="token",
                      value_label="indirect effect")
    cap = (f"“{escape(str(example.get('prompt', '')))}” → {escape(str(example.get('answer', '')))}: "
           f"p(answer) clean {fmt_fixed(example.get('p_clean'), 'prob')}, corrupted {fmt_fixed(p_corrupt, 'prob')}. "
           "Tokens marked * are the subject's (corrupted); the prompt shown is the one whose answer the corruption "
           "lowers the most. Positions before the subject are not run (their effect is 0).")
    return figure(svg, cap)


def _trace(report: Mapping[str, Any]) -> str:
    """The section: what was done, the critical layer, the mean heatmaps and one prompt's ("" without a trace)."""
    trace = report.get("trace")
    if not isinstance(trace, Mapping) or not isinstance(trace.get("mean_effect"), Mapping):
        return ""
    critical = trace.get("critical_layer")
    critical = int(critical) if isinstance(critical, int) else None
    n_prompts = len(trace.get("prompts") or [])
    intro = (f"<p>Causal tracing (Meng et al. 2022): the subject's token embeddings get Gaussian noise "
             f"({fmt_number(as_float(trace.get('noise')) or 0.0, '.3g')} × the embeddings' standard deviation, "
             f"{escape(str(trace.get('samples')))} draws), then one clean state at a time is restored. Each cell "
             "is the probability of the answer that comes back (the indirect effect), averaged over "
             f"{n_prompts} prompt{'' if n_prompts == 1 else 's'} by ROME's position groups.")
    if critical is not None:
        intro += f" Critical layer (ROME's default edit layer): <b>{critical}</b>."
    figures = [_mean_figure(trace, kind, critical) for kind in trace.get("kinds") or [] if kind in trace["mean_effect"]]
    return intro + "</p>" + "".join(figures) + _example_figure(trace)


TRACE = Section("trace", "Causal tracing", _trace, title="Causal tracing: where the model recalls the fact")

#: this module's sections (the page order is :data:`kcircuits.report.html.PAGE`)
SECTIONS: tuple[Section, ...] = (TRACE,)
