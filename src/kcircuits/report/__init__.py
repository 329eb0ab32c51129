"""Self-contained HTML report for one kcircuits run: inline SVG and the interactive circuit viewer's inline script; nothing fetched."""

from kcircuits.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]
