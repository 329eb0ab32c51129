"""What every part of the report shares: number formatting, escaping, the page's CSS, the HTML
building blocks (sections, figures, tables) and :class:`Section`, the unit the page is made of.

This module imports nothing from the rest of :mod:`kcircuits.report`, so the drawing modules
(:mod:`~kcircuits.report.svg`, :mod:`~kcircuits.report.charts`) and the section modules can all
build on it while :mod:`kcircuits.report.html`, which assembles the page, imports them: the
report's modules form a one-way stack (base <- svg <- charts <- sections <- html) without cycles.

Numbers: every number the report prints goes through :func:`fmt_number` (or the helpers built on
it), which never prints a negative zero: ``-0.0``, or ``-0.0001`` shown with three decimals, reads
``0``/``0.000``. A table column of floats is shown with one number of decimals for the whole
column (:func:`column_formatter`), so the values line up and compare at a glance; a number in
running text has the fixed decimals of its kind (:func:`fmt_fixed` with :data:`DECIMALS`).

Tokens: every token the report shows goes through :func:`token_label` (the viewer's script
follows the same rule), so ``' Lisbon'`` reads the same in every table, caption and panel and its
leading space, which is part of the token, stays visible.

Small samples: a finding resting on fewer than :data:`SMALL_SAMPLE` prompts carries the warning
of :func:`sample_warning`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

__all__ = [
    "DECIMALS", "PAGE_CSS", "SMALL_SAMPLE", "Section", "as_float", "cell", "column_formatter", "escape", "figure",
    "fmt_fixed", "fmt_number", "fmt_value", "is_num", "kv_table", "records_table", "sample_note_html",
    "sample_warning", "section_html", "token_label",
]

#: Significant digits of a table value; a float column gets the decimals its largest value needs for these.
SIGNIFICANT = 4
#: Largest number of decimals a fixed-point table column gets; smaller magnitudes switch to scientific notation.
MAX_DECIMALS = 4
#: Decimals of a number in running text, by what it measures: probabilities and attention shares
#: need three to tell 0.004 from 0.0; scores, z-scores and faithfulness are read to two or three.
DECIMALS = {"prob": 3, "share": 2, "score": 3, "z": 1, "faithfulness": 3}
#: Fewer prompts than this under a finding and the report says the sample is small.
SMALL_SAMPLE = 5

PAGE_CSS = """
:root{color-scheme:light}
*{box-sizing:border-box}
body{margin:0;background:#f7f8fa;color:#1f2937;
 font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1100px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:1.55em;margin:.2em 0 .4em;word-break:break-word}
h2{font-size:1.2em;margin:1.8em 0 .5em;padding-bottom:.25em;border-bottom:1px solid #e5e7eb}
nav{font-size:.9em;color:#6b7280}
nav a{color:#2563eb;text-decoration:none;margin-right:1em}
nav a:hover{text-decoration:underline}
table{border-collapse:collapse;font-size:.9em;margin:.4em 0}
th,td{border:1px solid #e5e7eb;padding:4px 10px;text-align:left;vertical-align:top}
thead th{background:#f3f4f6;font-weight:600}
tbody tr:nth-child(even){background:#fafafa}
table.kv th{background:#f9fafb;font-weight:500;color:#4b5563}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto}
figure{margin:.6em 0}
figcaption{font-size:.88em;color:#4b5563;margin-top:.4em}
.note{color:#92400e}
details{margin-top:.5em}
summary{cursor:pointer;color:#2563eb}
pre{background:#f6f8fa;border:1px solid #e5e7eb;border-radius:4px;padding:12px;overflow:auto;font-size:.85em;
 font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.92em}
svg{display:block}
.tok{white-space:pre;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.92em}
"""


# --------------------------------------------------------------------------- numbers
def as_float(v: Any) -> float | None:
    """A finite float, or None for None/NaN/inf/non-numbers: the plots skip such values."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def is_num(v: Any) -> bool:
    """A real number (bools are not: they print as true/false)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt_number(v: float, spec: str = ".4g") -> str:
    """``format(v, spec)`` without a negative zero.

    Python prints ``-0.0`` as ``-0`` and ``-0.0001`` with ``.3f`` as ``-0.000``: a sign on a value
    that reads as zero suggests a direction the data does not have, so the sign is dropped whenever
    every digit of the mantissa is zero.
    """
    s = format(v, spec)
    if s.startswith("-") and not any(c in "123456789" for c in s[1:].split("e")[0]):
        return s[1:]
    return s


def fmt_fixed(v: Any, kind_or_decimals: str | int = 3) -> str:
    """A number in running text with the fixed decimals of its kind (a key of :data:`DECIMALS`) or
    the given count; "n/a" for None, NaN and non-numbers, and never a negative zero."""
    f = as_float(v)
    if f is None:
        return "n/a"
    decimals = DECIMALS[kind_or_decimals] if isinstance(kind_or_decimals, str) else int(kind_or_decimals)
    return fmt_number(f, f".{decimals}f")


def fmt_value(v: Any) -> str:
    """Text (unescaped) of one value on its own: four significant digits, visible NaN, compact JSON."""
    if v is None:
        return "\u2014"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return fmt_number(v, f".{SIGNIFICANT}g" if abs(v) < 1e5 else ".6g")
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str, ensure_ascii=False)
    return str(v)


def column_formatter(values: Sequence[Any]) -> Callable[[Any], str]:
    """How to print the values of one table column so that its floats share one format.

    Per-value significant digits print 0.8, 0.95 and 0.8123 one above the other, which neither lines
    up nor compares easily; a column gets the decimals that give its largest value
    :data:`SIGNIFICANT` digits (at most :data:`MAX_DECIMALS`), or scientific notation throughout when
    its magnitude is too large or too small for that. Whole-valued columns (counts stored as floats)
    print without decimals. Ints, NaN, None and non-numbers keep :func:`fmt_value`.
    """
    floats = [float(v) for v in values if is_num(v) and math.isfinite(v)]
    if not any(isinstance(v, float) for v in values if is_num(v)) or not floats:
        return fmt_value
    biggest = max(abs(f) for f in floats)
    if all(f.is_integer() for f in floats) and biggest < 1e15:
        spec = ".0f"
    elif biggest >= 1e5 or biggest < 10.0 ** -(MAX_DECIMALS - 1):
        spec = f".{SIGNIFICANT - 1}e"
    else:
        decimals = SIGNIFICANT - 1 - math.floor(math.log10(biggest))
        spec = f".{min(max(decimals, 0), MAX_DECIMALS)}f"

    def fmt(v: Any) -> str:
        return fmt_number(float(v), spec) if is_num(v) and math.isfinite(v) else fmt_value(v)

    return fmt


# --------------------------------------------------------------------------- tokens and samples
_VISIBLE_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def token_label(token: Any) -> str:
    """A token as the report shows it: in single quotes with its leading space kept (``' Lisbon'``),
    and a newline or tab written ``\\n``/``\\t`` so it does not vanish or break a table row.

    A tokenizer's " Lisbon" and "Lisbon" are different tokens; stripping the space in one place and
    not in another made the same answer look like two. viewer.js's ``showTok`` applies the same rule.
    """
    return "'" + str(token).translate(_VISIBLE_ESCAPES) + "'"


def sample_warning(n_prompts: Any) -> str:
    """The warning ("small sample: n prompts, ...") for a finding that rests on fewer than
    :data:`SMALL_SAMPLE` prompts, else "": a median over three prompts reads like a result but is
    mostly noise."""
    if not is_num(n_prompts) or n_prompts >= SMALL_SAMPLE:
        return ""
    n = int(n_prompts)
    return f"small sample: {n} prompt{'' if n == 1 else 's'}, read with care"


def sample_note_html(n_prompts: Any) -> str:
    """:func:`sample_warning` as a highlighted note to append to a finding or caption ("" when none)."""
    text = sample_warning(n_prompts)
    return f' <span class="note small-sample">({escape(text)})</span>' if text else ""


# --------------------------------------------------------------------------- HTML building blocks
def cell(v: Any, text: str | None = None) -> str:
    """A ``<td>`` with ``text`` (default :func:`fmt_value`), escaped; numbers right-aligned."""
    cls = ' class="num"' if is_num(v) else ""
    return f"<td{cls}>{escape(fmt_value(v) if text is None else text)}</td>"


def kv_table(d: Mapping[str, Any]) -> str:
    """Two-column key/value table (the summary and the skip counts). Its floats share one format
    (:func:`column_formatter`), so a faithfulness of 0.8548 is not followed by a random baseline of
    "0" (rounded) and one of "0.0001"; ints and text print as they are."""
    fmt = column_formatter([v for v in d.values() if isinstance(v, float)])
    rows = "".join(f"<tr><th>{escape(str(k))}</th>{cell(v, fmt(v) if isinstance(v, float) else None)}</tr>"
                   for k, v in d.items())
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def records_table(rows: Sequence[Mapping[str, Any]], formats: Mapping[str, Callable[[Any], str]] | None = None,
                  token_cols: Collection[str] = ()) -> str:
    """Table from a list of dicts; columns are the union of keys in first-seen order, so rows
    produced by different code paths (a missing metric, say) still line up. Each column's numbers
    share one format (:func:`column_formatter`) unless ``formats`` gives the column its own (a
    probability with :func:`fmt_fixed`, say). Cells of ``token_cols`` hold token labels: they keep
    their spaces and never wrap, so ``' Lisbon'`` cannot break after its opening quote."""
    cols: list[str] = []
    for r in rows:
        cols += [str(k) for k in r if str(k) not in cols]
    table = [[_get(r, c) for c in cols] for r in rows]
    fmts = [_numbers_only(formats[c]) if formats and c in formats else column_formatter([row[j] for row in table])
            for j, c in enumerate(cols)]
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_token_cell(v) if c in token_cols else cell(v, f(v))
                                    for v, f, c in zip(row, fmts, cols, strict=True)) + "</tr>" for row in table)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _numbers_only(fmt: Callable[[Any], str]) -> Callable[[Any], str]:
    """A column's own number format, with the table's usual text for None, NaN and non-numbers."""
    return lambda v: fmt(v) if is_num(v) and math.isfinite(v) else fmt_value(v)


def _token_cell(v: Any) -> str:
    return f'<td class="tok">{escape(fmt_value(v))}</td>'


def _get(r: Mapping[str, Any], col: str) -> Any:
    if col in r:
        return r[col]
    return next((v for k, v in r.items() if str(k) == col), None)


def figure(body: str, caption_html: str = "", fig_id: str = "") -> str:
    """A figure whose drawing scrolls sideways on narrow screens; ``caption_html`` is already escaped."""
    ident = f' id="{escape(fig_id)}"' if fig_id else ""
    cap = f"<figcaption>{caption_html}</figcaption>" if caption_html else ""
    return f'<figure{ident}><div class="scroll">{body}</div>{cap}</figure>'


def section_html(anchor: str, title: str, body: str) -> str:
    """A page section: the anchor is its id (the navigation links to it), the title its heading."""
    return f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2>\n{body}\n</section>'


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class Section:
    """One section of the page.

    ``body`` renders the section's content from the report dict and returns "" when the dict lacks
    its data (the section is then left out of the page and of the navigation). The anchor, the
    navigation label and the heading live here, next to each other, rather than inside each
    renderer, so the page order (:data:`kcircuits.report.html.PAGE`) and the rendered ids cannot
    disagree. ``title`` is the heading when it differs from the short navigation label.
    """

    anchor: str
    label: str
    body: Callable[[Mapping[str, Any]], str]
    title: str = ""

    def render(self, report: Mapping[str, Any]) -> str:
        """The ``<section>`` HTML, or "" when the report has nothing for it."""
        inner = self.body(report)
        return section_html(self.anchor, self.title or self.label, inner) if inner else ""
