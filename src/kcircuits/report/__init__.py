"""Self-contained HTML report for one kcircuits run: inline SVG and the interactive circuit viewer's
inline script; nothing fetched.

The modules form a one-way stack, each importing only those before it:

- :mod:`~kcircuits.report.base`: numbers, escaping, CSS, tables, figures, :class:`~kcircuits.report.base.Section`
- :mod:`~kcircuits.report.svg`: SVG primitives and the circuit drawing
- :mod:`~kcircuits.report.charts`: the line chart (every chart, the faithfulness curve too) and heat tables
- :mod:`~kcircuits.report.viewer`: the interactive viewer's payload and HTML
- :mod:`~kcircuits.report.core_sections`, :mod:`~kcircuits.report.explain_sections`,
  :mod:`~kcircuits.report.influence_section`: the page's sections
- :mod:`~kcircuits.report.heatmap`: the SVG heatmap and the causal-tracing section drawn with it
- :mod:`~kcircuits.report.html`: the page order (``PAGE``) and the page itself
"""

from kcircuits.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]
