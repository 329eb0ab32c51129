"""The "Circuits side by side" section: two circuits drawn next to each other, what differs highlighted.

``report["circuit_pairs"]`` is a list of ``{"title", "before", "after", "labels", "caption", "n_prompts",
"viewers"}`` with ``before``/``after`` circuit dicts (:meth:`kcircuits.graph.Circuit.to_json`) and, optionally,
``viewers = {"before": payload, "after": payload}`` (:func:`kcircuits.report.viewer.viewer_payload`);
:func:`circuit_pair` builds one from two :class:`~kcircuits.graph.Circuit`. With viewers, the pair is shown
in two interactive viewers side by side (same graph, so a node sits at the same place in both; each
re-selects from its own scores), the static drawings folded below them. The static drawings use the same
rows (the union of their layers). In both, the edges and nodes only the left circuit has (lost) are
highlighted in the left one, those only the right one has (gained) in the right one.
``kcircuits edit-circuits`` fills it with each fact's circuit before and after an edit; any comparison of
two circuits of one graph can.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kcircuits.errors import KcircuitsError
from kcircuits.graph import Circuit
from kcircuits.report.base import Section, escape, figure, sample_note_html
from kcircuits.report.svg import DIFF_COLOUR, circuit_layers, circuit_svg
from kcircuits.report.viewer import viewer_html, viewer_payload, viewer_script, viewer_style

__all__ = ["CIRCUIT_PAIRS", "PAIR_EDGES", "PAIR_VIEWER_EDGES", "SECTIONS", "circuit_pair", "circuit_pair_html",
           "only_in", "pair_viewers"]

_ROW = '<div style="display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start">{}</div>'
_CELL = '<div style="flex:1 1 420px;min-width:0">{}</div>'


def _edge_keys(circuit: Mapping[str, Any]) -> set[str]:
    return {f"{e.get('src', '')}->{e.get('dst', '')}" for e in circuit.get("edges") or []}


def only_in(one: Mapping[str, Any], other: Mapping[str, Any]) -> set[str]:
    """The edges (``"src->dst"``) and nodes of circuit dict ``one`` that ``other`` lacks."""
    return (_edge_keys(one) - _edge_keys(other)) | (set(one.get("nodes") or []) - set(other.get("nodes") or []))


#: the edges each viewer of a pair stores (the graph's strongest, plus every edge of both circuits): its slider
#: re-selects among them; ten pairs of viewers stay under a megabyte of page
PAIR_VIEWER_EDGES = 3000
_SIDES = (("before", "lost"), ("after", "gained"))


def pair_viewers(before: Circuit, after: Circuit, max_edges: int = PAIR_VIEWER_EDGES) -> dict[str, dict]:
    """Viewer payloads of both circuits, each highlighting the edges and nodes that only it has.

    Args:
        before: the left circuit, with its graph's scores (``Circuit.scores``, ``[n_src, n_dst]``).
        after: the right circuit, of the same graph.
        max_edges: edges stored per viewer (the circuits' own always are).
    """
    if before.graph.describe() != after.graph.describe():
        raise KcircuitsError("the two circuits of a pair belong to different graphs: they cannot be drawn side by side")
    out = {}
    for (side, word), one, other in zip(_SIDES, (before, after), (after, before), strict=True):
        out[side] = viewer_payload(one.graph, one, one.scores, max_edges=max_edges, highlight=one.edges & ~other.edges,
                                   highlight_nodes=set(one.nodes()) - set(other.nodes()),
                                   highlight_label=f"only in this circuit ({word})")
    return out


def circuit_pair(title: str, before: Circuit, after: Circuit, labels: Sequence[str] = ("before", "after"),
                 caption: str = "", n_prompts: int | None = None, viewers: bool = True) -> dict:
    """One item of ``report["circuit_pairs"]``: both circuits' dicts, and their viewers unless ``viewers`` is off.

    Args:
        title: the pair's heading.
        before: the left circuit (what only it has is highlighted as lost).
        after: the right circuit (what only it has is highlighted as gained).
        labels: the two sides' captions.
        caption: a sentence under the pair.
        n_prompts: the prompts behind the circuits (a warning is shown when they are few).
        viewers: add the interactive viewers (needs the circuits' scores for live re-selection).
    """
    item = {"title": title, "before": before.to_json(), "after": after.to_json(), "labels": list(labels),
            "caption": caption, "n_prompts": n_prompts}
    if viewers:
        item["viewers"] = pair_viewers(before, after)
    return item


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


def _viewer_pair_html(viewers: Mapping[str, Any], labels: Sequence[str], index: int) -> str:
    """The two interactive viewers of pair ``index``, side by side (stacked on a narrow screen)."""
    cells = [f'<div class="kcv-cell"><h4>{escape(str(label))}</h4>'
             f'{viewer_html(viewers[side], f"kcv-pair{index}-{side}")}</div>'
             for (side, _), label in zip(_SIDES, labels, strict=True)]
    return f'<div class="kcv-pair">{"".join(cells)}</div>'


def _circuit_pairs(report: Mapping[str, Any]) -> str:
    pairs = report.get("circuit_pairs")
    if not pairs:
        return ""
    interactive = any(item.get("viewers") for item in pairs)
    intro = (f'<p>Each pair is drawn on the same layout; <span style="color:{DIFF_COLOUR};font-weight:600">green'
             "</span> marks the edges and nodes (ringed) that only one side has: lost on the left, gained on the "
             "right." + (" In the viewers, the slider re-selects each side from its own scores; the highlight "
                         "always marks the edges the other side's circuit lacks." if interactive else "") + "</p>")
    parts = [viewer_style(), intro] if interactive else [intro]
    for i, item in enumerate(pairs):
        labels = item.get("labels") or ("before", "after")
        parts.append(f"<h3>{escape(str(item.get('title', '')))}</h3>")
        static = circuit_pair_html(item["before"], item["after"], labels)
        if item.get("viewers"):
            parts.append(_viewer_pair_html(item["viewers"], labels, i))
            static = f"<details><summary>static drawings (without JavaScript, for print)</summary>{static}</details>"
        parts.append(static)
        if item.get("caption"):
            parts.append(f"<p>{escape(str(item['caption']))}{sample_note_html(item.get('n_prompts'))}</p>")
    if interactive:
        parts.append(viewer_script())
    return "\n".join(parts)


CIRCUIT_PAIRS = Section("circuit-pairs", "Circuits side by side", _circuit_pairs,
                        title="Circuits side by side, differences highlighted")

#: this module's sections (the page order is :data:`kcircuits.report.html.PAGE`)
SECTIONS: tuple[Section, ...] = (CIRCUIT_PAIRS,)
