"""Assemble ``report.html``: one self-contained page for one discovery/evaluation run.

Everything is inline (CSS, SVG, and the circuit viewer's script and data), nothing is fetched, so
the page opens from a file:// URL, can be mailed or archived as one file, and shows the same thing
years later. Every string that comes from the run (titles, node names, config values) goes through
:func:`html.escape`. The only scripts are the interactive circuit viewer's (present when the report
dict has a ``"viewer"`` key, see :mod:`kcircuits.report.viewer`); its data is inline JSON with ``<``
escaped, and it writes run strings into the page with ``textContent`` only. Without JavaScript the
static SVG of the Circuit section still shows the circuit. Sections whose key is absent from the
report dict are left out.

This module only orders and assembles: the sections live in :mod:`~kcircuits.report.core_sections`,
:mod:`~kcircuits.report.explain_sections`, :mod:`~kcircuits.report.heatmap` (causal tracing) and
:mod:`~kcircuits.report.influence_section`, which
build on :mod:`~kcircuits.report.base` and never import this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from kcircuits.io import atomic_write_text
from kcircuits.report import circuit_pairs
from kcircuits.report import core_sections as core
from kcircuits.report import explain_sections as explain
from kcircuits.report import heatmap
from kcircuits.report import influence_section as influence
from kcircuits.report.base import PAGE_CSS, Section, escape
from kcircuits.report.base import fmt_value, kv_table, records_table  # noqa: F401  (re-exported: their old home)

__all__ = ["DEFAULT_TITLE", "PAGE", "fmt_value", "kv_table", "records_table", "render_report", "write_report"]

DEFAULT_TITLE = "kcircuits report"

#: Every section of the page, top to bottom: the one place that decides the order. The summary, the
#: circuit's key components and the analyses' findings come first, then the circuit and how well it
#: holds up, then the analyses' detail, the causal trace, the influence scores, and the configuration last.
#: (tests/test_report.py checks that every section the section modules define appears here exactly once.)
PAGE: tuple[Section, ...] = (
    core.SUMMARY,
    core.KEY_COMPONENTS,
    explain.FINDINGS,
    core.CIRCUIT,
    core.VIEWER,
    circuit_pairs.CIRCUIT_PAIRS,
    core.CURVE,
    core.HITS,
    core.TOP_EDGES,
    core.SKIPPED,
    explain.LENS,
    explain.ROLES,
    explain.COMPOSITION,
    explain.MATRICES,
    explain.CHARTS,
    explain.TABLES,
    heatmap.TRACE,
    influence.INFLUENCE,
    core.CONFIG,
)


# --------------------------------------------------------------------------- public API
def render_report(report: Mapping[str, Any]) -> str:
    """Return the report page as HTML text. Only ``title`` is expected; absent sections are skipped."""
    title = escape(str(report.get("title") or DEFAULT_TITLE))
    present = [(s, html) for s in PAGE if (html := s.render(report))]
    nav = " ".join(f'<a href="#{escape(s.anchor)}">{escape(s.label)}</a>' for s, _ in present)
    nav_html = f"<nav>{nav}</nav>" if len(present) > 1 else ""
    body = "\n".join(html for _, html in present)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{title}</title>\n<style>{PAGE_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n<h1>{title}</h1>\n{nav_html}\n{body}\n</main>\n</body>\n</html>\n"
    )


def write_report(path: str | os.PathLike[str], report: Mapping[str, Any]) -> None:
    """Render and write the page atomically, so a crash or a reader polling the run folder never
    sees a half-written report. Rendering happens first: a rendering error leaves no file behind."""
    atomic_write_text(path, render_report(report))
