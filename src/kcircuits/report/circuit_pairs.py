"""The "Circuits side by side" section: two circuits drawn next to each other, what differs highlighted.

``report["circuit_pairs"]`` is a list of ``{"title", "before", "after", "labels", "caption", "n_prompts"}``
with ``before``/``after`` circuit dicts (:meth:`kcircuits.graph.Circuit.to_json`). Both are drawn with
the same rows (the union of their layers), so a node sits at the same height in both; the edges and
nodes only the left circuit has (lost) are highlighted in the left drawing, those only the right one
has (gained) in the right drawing. ``kcircuits edit-circuits`` fills it with each fact's circuit before
and after an edit; any comparison of two circuits of one graph can.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kcircuits.report.base import Section, escape, figure, sample_note_html
from kcircuits.report.svg import DIFF_COLOUR, circuit_layers, circuit_svg

__all__ = ["CIRCUIT_PAIRS", "PAIR_EDGES", "SECTIONS", "circuit_pair_html", "only_in"]

_ROW = '<div style="display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start">{}</div>'
_CELL = '<div style="flex:1 1 420px;min-width:0">{}</div>'


def _edge_keys(circuit: Mapping[str, Any]) -> set[str]:
    return {f"{e.get('src', '')}->{e.get('dst', '')}" for e in circuit.get("edges") or []}


def only_in(one: Mapping[str, Any], other: Mapping[str, Any]) -> set[str]:
    """The edges (``"src->dst"``) and nodes of circuit dict ``one`` that ``other`` lacks."""
    return (_edge_keys(one) - _edge_keys(other)) | (set(one.get("nodes") or []) - set(other.get("nodes") or []))


#: the most edges drawn per circuit of a pair: two 600-edge drawings with half their edges highlighted are a
#: green blot; the strongest 150 of each still show where the two differ (the counts cover every edge)
PAIR_EDGES = 150


def circuit_pair_html(before: Mapping[str, Any], after: Mapping[str, Any], labels: Sequence[str] = ("before", "after"),
                      max_edges: int = PAIR_EDGES) -> str:
    """Both drawings in one row (wrapping to two on a narrow screen), each titled by its label.

    Args:
        before: the left circuit dict (:meth:`kcircuits.graph.Circuit.to_json`); what only it has is highlighted.
        after: the right circuit dict; what only it has is highlighted.
        labels: the two drawings' captions.
        max_edges: each drawing shows this many of its strongest edges (the caption's counts cover all).
    """
    rows = circuit_layers(before) | circuit_layers(after)
    cells = []
    for circuit, other, label, word in ((before, after, labels[0], "lost"), (after, before, labels[1], "gained")):
        marked = only_in(circuit, other)
        svg, note = circuit_svg(circuit, max_edges, highlight=marked, rows=rows)
        n_edges = len(circuit.get("edges") or [])
        n_marked = len(_edge_keys(circuit) - _edge_keys(other))
        cap = f"<b>{escape(label)}</b>: {n_edges} edges, {n_marked} of them {word} (highlighted)"
        if note:
            cap += f' <span class="note">({escape(note)})</span>'
        cells.append(_CELL.format(figure(svg, cap)))
    return _ROW.format("".join(cells))


def _circuit_pairs(report: Mapping[str, Any]) -> str:
    pairs = report.get("circuit_pairs")
    if not pairs:
        return ""
    intro = (f'<p>Each pair is drawn with the same rows; <span style="color:{DIFF_COLOUR};font-weight:600">green'
             "</span> marks the edges and nodes (ringed) that only one side has: lost on the left, gained on the "
             "right.</p>")
    parts = [intro]
    for item in pairs:
        parts.append(f"<h3>{escape(str(item.get('title', '')))}</h3>")
        parts.append(circuit_pair_html(item["before"], item["after"], item.get("labels") or ("before", "after")))
        if item.get("caption"):
            parts.append(f"<p>{escape(str(item['caption']))}{sample_note_html(item.get('n_prompts'))}</p>")
    return "\n".join(parts)


CIRCUIT_PAIRS = Section("circuit-pairs", "Circuits side by side", _circuit_pairs,
                        title="Circuits side by side, differences highlighted")

#: this module's sections (the page order is :data:`kcircuits.report.html.PAGE`)
SECTIONS: tuple[Section, ...] = (CIRCUIT_PAIRS,)
