"""Self-contained HTML report (inline SVG, no scripts, no network) for one kcircuits run."""

from kcircuits.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]
