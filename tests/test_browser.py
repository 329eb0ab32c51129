"""The interactive circuit viewer in a real browser: headless Chromium driven by Selenium.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/setup.sh`` installs them when run as
root) and the ``selenium`` package (the ``test`` extra). Without them the tests skip, except under
CI (env ``CI`` set), where they fail and say what to install.
"""

from __future__ import annotations

import math
import os
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from kcircuits.graph import Graph, prune, select_topn
from kcircuits.report import write_report
from kcircuits.report.viewer import viewer_payload
from kcircuits.report.data import build_report
from tests.model_helpers import tiny_model

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("KCIRCUITS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("KCIRCUITS_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOT = Path(os.environ.get("KCIRCUITS_VIEWER_SCREENSHOT", "/tmp/viewer.png"))
INSTALL_HINT = ("the browser tests need Chromium and its WebDriver: as root run `apt-get install chromium "
                "chromium-driver` (Debian; scripts/setup.sh does it) and `pip install -e '.[test]'` for selenium")


def _missing() -> str | None:
    problems = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    try:
        import selenium  # noqa: F401
    except ImportError:
        problems.append("the selenium package")
    return ", ".join(problems) if problems else None


@pytest.fixture(scope="module")
def driver():
    missing = _missing()
    if missing:
        msg = f"missing {missing}; {INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1300,1000", "--force-device-scale-factor=1", "--allow-file-access-from-files"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(60)
    drv.set_script_timeout(60)
    yield drv
    drv.quit()


def _open(driver, path: Path) -> None:
    driver.get(path.resolve().as_uri())
    deadline = time.time() + 30
    while not driver.execute_script("return !!window.kcViewer"):
        if time.time() > deadline:
            raise AssertionError(f"viewer did not start; console: {driver.get_log('browser')}")
        time.sleep(0.05)


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def _names(graph: Graph, edges: torch.Tensor) -> set[str]:
    return {graph.edge_name(s, d) for s, d in torch.nonzero(edges).tolist()}


def _wait(driver, script: str, timeout: float = 10.0):
    deadline = time.time() + timeout
    while True:
        value = driver.execute_script(script)
        if value or time.time() > deadline:
            return value
        time.sleep(0.05)


def _report(graph: Graph, circuit, scores, details, path: Path) -> None:
    config = {"reproduce": {"command": "discover", "model": "tiny-llama", "relation": "test<rel>"}}
    write_report(path, build_report(config, circuit, {}, {}, graph, scores=scores, node_details=details))


def test_viewer_in_chromium(driver, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    model = tiny_model("llama")  # 3 layers, 6 heads, 2 kv heads: grouped k/v destinations
    graph = Graph.from_model(model.weights)
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(graph.n_src, graph.n_dst, generator=gen) * graph.edge_exists()
    circuit = prune(select_topn(graph, scores, 40))
    heads = [n for n in circuit.nodes() if n.startswith("a")]
    target = heads[len(heads) // 2]
    tokens = ["The", " capital", " of", " France", " is"]
    details = {"example": {"prompt": "".join(tokens), "tokens": tokens, "answer": " Paris"},
               "nodes": {target: {"lens": {"top": [[" Paris", 0.42], ["</script><b>", 0.11], [" Lyon", float("nan")]],
                                           "answer_rank": 1, "answer_prob": 0.42},
                                  "attention": {"weights": [0.05, 0.1, 0.05, 0.7, 0.1]},
                                  "role": {"role": "mover", "subject_mass": 0.7, "relation_mass": 0.2,
                                           "other_mass": -1e-4, "direct_effect": 1.25}},
                         "logits": {"lens": {"top": [[" Paris", 0.6]], "answer_rank": 1, "answer_prob": 0.6}}}}
    page = tmp_path / "report.html"
    _report(graph, circuit, scores, details, page)
    _open(driver, page)

    # the initial view is the Python circuit, edge for edge
    state = driver.execute_script("return kcViewer.state()")
    assert state["drawn"] == circuit.n_edges > 0
    assert state["mode"] == "circuit"
    assert set(driver.execute_script("return kcViewer.selectedEdges()")) == _names(graph, circuit.edges)
    root = driver.find_element(By.ID, "kcv")
    assert root.get_attribute("data-drawn") == str(circuit.n_edges)
    n_init = int(root.get_attribute("data-n"))
    assert prune(select_topn(graph, scores, n_init)).edges.equal(circuit.edges)
    assert driver.find_element(By.ID, "kcv-nbox").get_attribute("value") == str(n_init)
    # the static drawing (for readers without JavaScript) is folded away, still one click from view
    static = driver.find_element(By.ID, "kc-static-circuit")
    assert not static.is_displayed()
    driver.find_element(By.CSS_SELECTOR, "#kc-static-fold summary").click()
    assert static.is_displayed()

    # hovering an edge or a node shows its name and score
    driver.execute_script("document.getElementById('kcv-stage').scrollIntoView({block: 'center'})")
    over = driver.find_element(By.ID, "kcv-over")
    tip = driver.find_element(By.ID, "kcv-tip")
    for edge in circuit.edge_list():  # an edge whose middle is clear of nodes and other edges
        src, dst, score = edge  # all three are read after the loop
        mid = driver.execute_script("return kcViewer.edgeXY(arguments[0])", f"{src}->{dst}")
        hit = driver.execute_script("return kcViewer.hitAt(arguments[0], arguments[1])", mid["ox"], mid["oy"])
        if hit["edge"] == f"{src}->{dst}":
            break
    else:
        raise AssertionError("no edge can be hovered on its own")
    ActionChains(driver).move_to_element_with_offset(over, round(mid["ox"] - mid["w"] / 2),
                                                     round(mid["oy"] - mid["h"] / 2)).perform()
    assert _wait(driver, "return !document.getElementById('kcv-tip').hidden")
    assert f"{score:.4f}" in tip.text and src in tip.text and dst in tip.text, tip.text
    # a real click on the node's canvas position opens the side panel with its details
    pos = driver.execute_script("return kcViewer.nodeClientXY(arguments[0])", target)
    ActionChains(driver).move_to_element_with_offset(over, round(pos["ox"] - pos["w"] / 2),
                                                     round(pos["oy"] - pos["h"] / 2)).click().perform()
    assert _wait(driver, f"return document.getElementById('kcv-tip').textContent.indexOf('{target} (head') === 0")
    panel = driver.find_element(By.ID, "kcv-panel")
    assert _wait(driver, "return document.getElementById('kcv-panel').getAttribute('data-node')") == target
    text = panel.text
    assert "Paris" in text and "mover" in text and "' France'" in text
    assert "</script><b>" in text  # shown as text, not markup
    assert "1.250" in text  # direct effect
    assert re.search(r"other mass\s+0\.000(?!\d)", text) and "-0.000" not in text  # no negative zero
    assert not driver.find_elements(By.CSS_SELECTOR, "#kcv-panel b")

    # moving the number box re-selects: top n by |score| + prune, exactly as Python does
    n2 = n_init + 30
    want = prune(select_topn(graph, scores, n2))
    assert want.n_edges > circuit.n_edges
    nbox = driver.find_element(By.ID, "kcv-nbox")
    nbox.clear()
    nbox.send_keys(str(n2), Keys.ENTER)
    assert _wait(driver, f"return document.getElementById('kcv').getAttribute('data-n') === '{n2}'")
    assert set(driver.execute_script("return kcViewer.selectedEdges()")) == _names(graph, want.edges)
    assert driver.execute_script("return kcViewer.state().drawn") == want.n_edges
    # ... and the slider, through its input event
    driver.execute_script("var s=document.getElementById('kcv-n'); s.value='60'; s.dispatchEvent(new Event('input'))")
    assert _wait(driver, "return document.getElementById('kcv').getAttribute('data-n') === '60'")
    assert (set(driver.execute_script("return kcViewer.selectedEdges()"))
            == _names(graph, prune(select_topn(graph, scores, 60)).edges))
    for n in [0, 1, 2, 5, 9, 25, 80, 150, graph.n_edges]:
        got = driver.execute_script("kcViewer.selectN(arguments[0]); return kcViewer.selectedEdges()", n)
        assert set(got) == _names(graph, prune(select_topn(graph, scores, n)).edges), n

    # the table lists the drawn edges; the filter keeps rows that name the node
    driver.execute_script("kcViewer.selectN(arguments[0])", n2)
    driver.find_element(By.CSS_SELECTOR, "#kcv-tablebox summary").click()
    rows = driver.execute_script("return kcViewer.tableEdges()")
    assert sorted(rows) == sorted(_names(graph, want.edges))
    driver.find_element(By.CSS_SELECTOR, "#kcv-table th[data-sort=score]").click()
    shown = [float(td.text) for td in driver.find_elements(By.CSS_SELECTOR, "#kcv-table tbody td:nth-child(5)")]
    assert shown == sorted(shown, reverse=True)
    flt = driver.find_element(By.ID, "kcv-filter")
    node = want.edge_list()[0][0]
    flt.send_keys(node)
    rows = driver.execute_script("return kcViewer.tableEdges()")
    assert rows and all(node in r for r in rows)
    assert sorted(rows) == sorted(r for r in _names(graph, want.edges) if node in r)

    # back to the run's circuit; exports work
    driver.find_element(By.CSS_SELECTOR, "#kcv [data-act=circuit]").click()
    assert _wait(driver, "return kcViewer.state().mode === 'circuit'")
    assert set(driver.execute_script("return kcViewer.selectedEdges()")) == _names(graph, circuit.edges)
    svg = driver.execute_script("return kcViewer.exportSVG()")
    ET.fromstring(svg)
    assert svg.count("<path") >= 1 and target in svg
    size = driver.execute_async_script(
        "var done = arguments[0]; kcViewer.pngBlob(2).then(function (b) { done(b.size); });")
    assert size > 1000
    driver.execute_script("kcViewer.clickAt(-100, -100)")  # a miss changes nothing
    driver.set_window_size(1300, 1000)
    driver.save_screenshot(str(SCREENSHOT))
    assert not _console_errors(driver)
    assert driver.execute_script("return kcViewer.state().errors") == []


def _big_grouped_report(tmp_path: Path):
    """A 6-layer grouped-query graph (8 heads in 2 k/v groups) and a circuit of several hundred
    edges, with roles and lens tokens for a few heads: too many edges to draw at once."""
    graph = Graph(6, 8, 2, True, False)
    scores = torch.randn(graph.n_src, graph.n_dst, generator=torch.Generator().manual_seed(4)) * graph.edge_exists()
    circuit = prune(select_topn(graph, scores, 700))
    heads = [n for n in circuit.nodes() if n.startswith("a")]
    details = {"example": {"prompt": "The capital of France is", "tokens": ["The", " capital", " of", " France", " is"],
                           "answer": " Paris", "lens_of": "circuit"},
               "nodes": {h: {"lens": {"top": [[" Paris", 0.5 - i / 100]], "answer_rank": 1, "answer_prob": 0.5},
                             "role": {"role": "mover" if i % 2 else "relation"}} for i, h in enumerate(heads)}}
    page = tmp_path / "big_grouped.html"
    _report(graph, circuit, scores, details, page)
    return graph, scores, circuit, page


def test_opening_summary_and_readable_default(driver, tmp_path: Path) -> None:
    """The page opens on the key components (before the viewer, in the first screen) with role and
    lens token; the viewer opens on at most ~100 edges of a 300+ edge circuit, while the slider
    still reaches every stored edge and the button the whole circuit; k/v links only where used;
    layer and column labels stay in view and apart when zooming."""
    from selenium.webdriver.common.by import By

    graph, scores, circuit, page = _big_grouped_report(tmp_path)
    assert circuit.n_edges > 300
    _open(driver, page)
    driver.execute_script("window.scrollTo(0, 0)")
    key = driver.find_element(By.ID, "key-components")
    assert driver.execute_script(
        "var k = document.getElementById('key-components'), v = document.getElementById('viewer');"
        "return !!(k.compareDocumentPosition(v) & Node.DOCUMENT_POSITION_FOLLOWING)"
        " && k.getBoundingClientRect().top < window.innerHeight")
    rows = key.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert 10 <= len(rows) <= 15
    text = key.text
    assert "' Paris'" in text and ("mover" in text or "relation" in text) and "total |score|" in text

    # the viewer opens on a readable part: top n + prune with at most 100 edges, inside the circuit
    state = driver.execute_script("return kcViewer.state()")
    assert state["mode"] == "topn" and 0 < state["drawn"] <= 100 and state["n"] == state["initial"]["n"]
    want = prune(select_topn(graph, scores, state["n"]))
    drawn = set(driver.execute_script("return kcViewer.selectedEdges()"))
    assert drawn == _names(graph, want.edges) and drawn < _names(graph, circuit.edges)
    assert "strongest part" in driver.find_element(By.ID, "kcv-notes").text
    assert f"run's circuit: {circuit.n_edges}" in driver.find_element(By.ID, "kcv-count").text
    # ... the slider's end is every stored edge (here the whole graph) ...
    slider_max = int(driver.find_element(By.ID, "kcv-n").get_attribute("max"))
    assert driver.execute_script("return kcViewer.sliderN(arguments[0])", slider_max) == graph.n_edges == state["max"]
    driver.execute_script("var s=document.getElementById('kcv-n'); s.value=s.max; s.dispatchEvent(new Event('input'))")
    assert _wait(driver, f"return document.getElementById('kcv').getAttribute('data-n') === '{graph.n_edges}'")
    assert driver.execute_script("return kcViewer.state().drawn") == prune(select_topn(graph, scores,
                                                                                      graph.n_edges)).n_edges
    # ... and the button the run's whole circuit
    driver.find_element(By.CSS_SELECTOR, "#kcv [data-act=circuit]").click()
    assert _wait(driver, "return kcViewer.state().mode === 'circuit'")
    assert set(driver.execute_script("return kcViewer.selectedEdges()")) == _names(graph, circuit.edges)

    # k/v links only for the groups a drawn edge enters
    driver.execute_script("kcViewer.selectN(arguments[0])", state["n"])
    links = driver.execute_script("return kcViewer.kvLinks()")
    entered = {d.split("<")[0] for e in driver.execute_script("return kcViewer.selectedEdges()")
               for d in [e.split("->")[1]] if ".kv" in d}
    assert {kv for kv, _ in links} == entered and len(entered) < graph.n_layers * graph.n_kv_heads
    assert all(int(h.split(".h")[1]) // 4 == int(kv.split(".kv")[1]) for kv, h in links)  # the group's own heads

    # labels: layer labels never closer than a line, column labels on screen however far one zooms
    def labels(zoom: float) -> list[dict]:
        driver.execute_script("kcViewer.fit(); var v = kcViewer.view, c = document.getElementById('kcv-over');"
                              "var cx = c.clientWidth / 2, cy = c.clientHeight / 2, f = arguments[0];"
                              "v.x = cx - (cx - v.x) * f; v.y = cy - (cy - v.y) * f; v.z *= f;", zoom)
        return driver.execute_script("return kcViewer.labels()")

    height = driver.execute_script("return document.getElementById('kcv-over').clientHeight")
    for zoom in (0.15, 1.0, 8.0):
        got = labels(zoom)
        ys = sorted(lb["y"] for lb in got if lb["axis"] == "layer")
        cols = [lb for lb in got if lb["axis"] == "column"]
        assert ys and all(b - a >= 14 for a, b in zip(ys, ys[1:], strict=False)), (zoom, ys)
        assert cols and all(0 < lb["y"] < height for lb in cols), (zoom, cols)
    assert len([lb for lb in labels(1.0) if lb["axis"] == "layer"]) == graph.n_layers + 2  # all fit at the start
    driver.execute_script("kcViewer.fit()")
    driver.save_screenshot(str(SCREENSHOT.with_name(SCREENSHOT.stem + "_default.png")))
    assert not _console_errors(driver)
    assert driver.execute_script("return kcViewer.state().errors") == []


def test_viewer_edge_cases_in_chromium(driver, tmp_path: Path) -> None:
    """No node details, an empty circuit, NaN scores, no scores at all: the page still works."""
    graph = Graph(2, 4, 4, True, False)
    scores = torch.randn(graph.n_src, graph.n_dst) * graph.edge_exists()
    empty = prune(select_topn(graph, scores, 0))
    page = tmp_path / "empty.html"
    _report(graph, empty, scores, None, page)
    _open(driver, page)
    assert driver.execute_script("return kcViewer.state().drawn") == 0
    assert (driver.execute_script("kcViewer.selectN(30); return kcViewer.state().drawn")
            == prune(select_topn(graph, scores, 30)).n_edges)
    driver.execute_script("kcViewer.clickAt(kcViewer.nodeClientXY('logits').ox, kcViewer.nodeClientXY('logits').oy)")
    assert "logits" in driver.find_element("id", "kcv-panel").text

    nan_scores = scores.clone()
    nan_scores[0, :5] = float("nan")
    circuit = prune(select_topn(graph, scores, 20))
    page = tmp_path / "nan.html"
    _report(graph, circuit, nan_scores, {"nodes": {}}, page)
    _open(driver, page)
    assert driver.execute_script("return kcViewer.state().drawn") == circuit.n_edges
    driver.execute_script("kcViewer.selectN(kcViewer.state().max)")
    assert "NaN" in driver.find_element("id", "kcv-notes").text

    circuit.scores = None
    page = tmp_path / "noscores.html"
    write_report(page, {"title": "no scores", "viewer": viewer_payload(graph, circuit, None)})
    _open(driver, page)
    assert driver.execute_script("return kcViewer.state().drawn") == circuit.n_edges
    assert driver.find_element("id", "kcv-n").get_attribute("disabled") is not None
    assert not _console_errors(driver)


def test_two_viewers_side_by_side_highlight_the_difference(driver, tmp_path: Path) -> None:
    """A circuit pair (kcircuits edit-circuits' report): both viewers mount on one page with their own
    controls; each draws in the highlight colour exactly the edges its circuit has and the other lacks,
    also after re-selecting, and the page's run viewer hook is the first of them."""
    from kcircuits.report.circuit_pairs import circuit_pair

    graph = Graph(3, 6, 2, True, False)
    gen = torch.Generator().manual_seed(4)
    sa, sb = (torch.randn(graph.n_src, graph.n_dst, generator=gen) * graph.edge_exists() for _ in range(2))
    a, b = prune(select_topn(graph, sa, 40)), prune(select_topn(graph, sb, 40))
    assert a.n_edges <= 100 and b.n_edges <= 100  # both open on the whole circuit
    page = tmp_path / "pair.html"
    write_report(page, {"title": "pair", "circuit_pairs": [circuit_pair("fact", a, b, ("before", "after"))]})
    _open(driver, page)
    keys = ["kcv-pair0-before", "kcv-pair0-after"]
    assert sorted(driver.execute_script("return Object.keys(kcViewers)")) == sorted(keys)
    assert driver.execute_script("return kcViewer === kcViewers['kcv-pair0-before']")
    names = {k: _names(graph, c.edges) for k, c in zip(keys, (a, b), strict=True)}
    for key, other in zip(keys, keys[::-1], strict=True):
        hook = f"kcViewers['{key}']"
        assert set(driver.execute_script(f"return {hook}.selectedEdges()")) == names[key]
        assert set(driver.execute_script(f"return {hook}.highlightedEdges()")) == names[key] - names[other] != set()
        svg = driver.execute_script(f"return {hook}.exportSVG()")
        paths = re.findall(r'<path class="edges highlighted" d="([^"]*)"', svg)
        assert sum(p.count("M") for p in paths) == len(names[key] - names[other])
        nodes = set(driver.execute_script(f"return {hook}.highlightedNodes()"))
        one = a if key.endswith("before") else b
        assert nodes == set(one.nodes()) - set((b if one is a else a).nodes())
        assert svg.count('<circle class="highlighted"') == len(nodes)
    # re-selecting one side changes that side only; its highlight stays the other circuit's complement
    driver.execute_script("var s=document.getElementById('kcv-pair0-after-n'); s.value='80'; "
                          "s.dispatchEvent(new Event('input'))")
    assert _wait(driver, "return document.getElementById('kcv-pair0-after').getAttribute('data-n') === '80'")
    drawn = set(driver.execute_script("return kcViewers['kcv-pair0-after'].selectedEdges()"))
    assert drawn == _names(graph, prune(select_topn(graph, sb, 80)).edges)
    assert set(driver.execute_script("return kcViewers['kcv-pair0-after'].highlightedEdges()")) == \
        drawn & (names[keys[1]] - names[keys[0]])
    assert set(driver.execute_script("return kcViewers['kcv-pair0-before'].selectedEdges()")) == names[keys[0]]
    driver.save_screenshot(str(SCREENSHOT.with_name(SCREENSHOT.stem + "_pair.png")))
    assert not _console_errors(driver)


def test_redraw_10k_edges(driver, tmp_path: Path) -> None:
    """SmolLM2-135M's graph (30 layers x 9 heads, 3 kv heads, 70,651 edges), > 10^4 drawn edges."""
    graph = Graph(30, 9, 3, True, False)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(graph.n_src, graph.n_dst, generator=gen) * graph.edge_exists()
    circuit = prune(select_topn(graph, scores, 12000))
    assert circuit.n_edges >= 10_000
    page = tmp_path / "big.html"
    t0 = time.perf_counter()
    _report(graph, circuit, scores, None, page)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _open(driver, page)
    load_s = time.perf_counter() - t0
    # the page opens on a readable part of the circuit; the run's circuit is one click away
    assert 0 < driver.execute_script("return kcViewer.state().drawn") <= 100
    driver.find_element("css selector", "#kcv [data-act=circuit]").click()
    assert _wait(driver, "return kcViewer.state().mode === 'circuit'")
    assert driver.execute_script("return kcViewer.state().drawn") == circuit.n_edges
    assert set(driver.execute_script("return kcViewer.selectedEdges()")) == _names(graph, circuit.edges)
    # the slider is logarithmic here: its end is the last stored edge, its middle about sqrt of that
    driver.execute_script("var s=document.getElementById('kcv-n'); s.value=s.max; s.dispatchEvent(new Event('input'))")
    assert _wait(driver, "return document.getElementById('kcv').getAttribute('data-n') === '50000'")
    driver.execute_script(
        "var s=document.getElementById('kcv-n'); s.value=s.max/2; s.dispatchEvent(new Event('input'))")
    assert _wait(driver, "return document.getElementById('kcv').getAttribute('data-n') === '224'")
    driver.execute_script("kcViewer.showCircuit()")
    redraw = driver.execute_script("return kcViewer.benchRedraw(7)")
    # a slider move: re-select (prefix + prune) and redraw
    moves = [driver.execute_script("return kcViewer.selectN(arguments[0])", n) for n in (11000, 13000, 12000)]
    move_ms = [m["select_ms"] + m["draw_ms"] for m in moves]
    med = sorted(redraw)[len(redraw) // 2]
    print(f"\nviewer, {circuit.n_edges} drawn edges of {graph.n_edges}: redraw median {med:.1f} ms "
          f"(all {[round(t, 1) for t in redraw]}), slider move {[round(t, 1) for t in move_ms]} ms "
          f"(select {[round(m['select_ms'], 1) for m in moves]} ms), report build {build_s:.2f} s, "
          f"page load {load_s:.2f} s, page {page.stat().st_size / 1e6:.2f} MB")
    assert all(math.isfinite(t) and t >= 0 for t in redraw + move_ms)
    assert set(driver.execute_script("return kcViewer.selectedEdges()")) == _names(graph, circuit.edges)
    # pan by dragging and zoom with the wheel: the view follows, and a full redraw settles it
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By

    driver.execute_script("document.getElementById('kcv-stage').scrollIntoView({block: 'center'})")
    over = driver.find_element(By.ID, "kcv-over")
    x0, z0 = driver.execute_script("return [kcViewer.view.x, kcViewer.view.z]")
    ActionChains(driver).move_to_element(over).click_and_hold().move_by_offset(40, 10).move_by_offset(40, 10) \
        .release().perform()
    x1 = driver.execute_script("return kcViewer.view.x")
    assert x1 == pytest.approx(x0 + 80, abs=1)
    ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(over), 0, -200).perform()
    assert _wait(driver, f"return kcViewer.view.z > {z0 * 1.05}")
    time.sleep(0.4)
    quick = driver.execute_script("return kcViewer.state().timing.quick_ms")
    print(f"snapshot frame while panning/zooming: {quick:.1f} ms" if quick is not None else "no snapshot frame")
    driver.execute_script("kcViewer.fit()")
    driver.save_screenshot(str(SCREENSHOT.with_name(SCREENSHOT.stem + "_big.png")))
    assert not _console_errors(driver)
