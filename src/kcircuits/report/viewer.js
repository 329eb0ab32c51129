/* kcircuits interactive circuit viewer (inlined into report.html; no network, no libraries).
 * Data: the JSON payload in #<root id>-data (see docs/viewer.md). Edges are stored by decreasing |score|,
 * so "top n" is a prefix; prune() mirrors kcircuits.graph.prune exactly. A page can hold several viewers
 * (div.kcv, each with its own id; "kcv" is the run's own): every one not yet mounted is mounted, and
 * window.kcViewers[id] is its scripting hook (window.kcViewer the run's, or the first). */
(function () {
  "use strict";
  window.kcViewers = window.kcViewers || {};
  Array.prototype.forEach.call(document.querySelectorAll("div.kcv"), function (root) {
    if (root.getAttribute("data-mounted")) return;
    root.setAttribute("data-mounted", "1");
    var api = mount(root);
    if (!api) return;
    window.kcViewers[root.id] = api;
    if (root.id === "kcv" || !window.kcViewer) window.kcViewer = api;
  });

function mount(root) {
  // the viewer's elements are named "kcv-notes", "kcv-stage", ... after the root "kcv"; another root
  // "kcv-x" has "kcv-x-notes", ...
  var $ = function (id) { return document.getElementById(root.id + id.slice(3)); };
  var notesEl = $("kcv-notes");
  var P;
  try { P = JSON.parse($("kcv-data").textContent); } catch (err) {
    notesEl.textContent = "viewer data could not be read: " + err; return;
  }

  // ------------------------------------------------------------------ data
  function decode(spec) {
    var bin = atob(spec.data), n = bin.length, u = new Uint8Array(n);
    for (var i = 0; i < n; i++) u[i] = bin.charCodeAt(i);
    if (spec.dtype === "uint16") return new Uint16Array(u.buffer);
    if (spec.dtype === "int32") return new Int32Array(u.buffer);
    return new Float32Array(u.buffer);
  }
  var G = P.graph, L = G.n_layers, H = G.n_heads;
  var srcNames = P.src_names, dstNames = P.dst_names, feeds = P.dst_feeds, dstKind = P.dst_kind;
  var nSrc = srcNames.length, nDst = dstNames.length, logitsDst = nDst - 1;
  var ES = decode(P.edges.src), ED = decode(P.edges.dst), EW = decode(P.edges.score);
  var NE = ES.length, NORD = P.edges.n_ordered;
  var circRanks = decode(P.circuit.ranks);
  var details = (P.details && P.details.nodes) || {};
  var example = (P.details && P.details.example) || null;
  var hasScores = !!P.has_scores;
  // the edges and nodes to highlight (what only this circuit has, beside another): stored ranks, node names
  var HL = new Uint8Array(ES.length), HLN = {}, hlSpec = P.highlight || null;
  if (hlSpec) {
    var hlr = decode(hlSpec.ranks);
    for (var hi = 0; hi < hlr.length; hi++) HL[hlr[hi]] = 1;
    (hlSpec.nodes || []).forEach(function (nm) { HLN[nm] = 1; });
  }

  // ------------------------------------------------------------------ nodes and layout (world units)
  var stage = $("kcv-stage"), ROW = 64, R = 7;
  stage.style.height = Math.max(420, Math.min(720, (L + 2) * 40 + 60)) + "px";
  $("kcv-panel").style.height = stage.style.height;
  // column width chosen so the drawing's aspect ratio matches the stage's: fit then fills it
  var COL = (function () {
    var r = stage.getBoundingClientRect(), w = Math.max(200, r.width - 70), h = Math.max(200, r.height - 50);
    return Math.max(40, Math.min(170, ROW * (L + 1.6) * w / h / (H + 1.6)));
  })();
  var COLOURS = {input: "#059669", head: "#f59e0b", kv: "#d97706", mlp: "#7c3aed", logits: "#334155"};
  var KV_LINK = "#f3d9a8", LABEL_GAP = 14, LABEL_FONT = "11px system-ui,-apple-system,Segoe UI,Roboto,Arial,sans-serif";
  var POS = "#2563eb", NEG = "#dc2626", NANC = "#9ca3af", IDLE = "#d1d5db", DIFF = (hlSpec && hlSpec.colour) || "#16a34a";
  var nodes = [], nodeIndex = {};
  function addNode(name) {
    if (name in nodeIndex) return nodeIndex[name];
    var m, n = {name: name, type: "", layer: 0, idx: 0};
    if (name === "input") { n.type = "input"; n.layer = -1; }
    else if (name === "logits") { n.type = "logits"; n.layer = L; }
    else if ((m = /^a(\d+)\.h(\d+)$/.exec(name))) { n.type = "head"; n.layer = +m[1]; n.idx = +m[2]; }
    else if ((m = /^a(\d+)\.kv(\d+)$/.exec(name))) { n.type = "kv"; n.layer = +m[1]; n.idx = +m[2]; }
    else if ((m = /^m(\d+)$/.exec(name))) { n.type = "mlp"; n.layer = +m[1]; }
    else { n.type = "head"; }
    var yRow = (L - n.layer) * ROW, xHead = function (h) { return COL * (h + 0.5); };
    if (n.type === "head") { n.x = xHead(n.idx); n.y = yRow; }
    else if (n.type === "mlp") { n.x = COL * (H + 0.9); n.y = yRow - 0.4 * ROW; }
    else if (n.type === "kv") {
      var per = H / Math.max(G.n_kv_heads, 1);
      n.x = xHead(n.idx * per + (per - 1) / 2); n.y = yRow + 0.3 * ROW;
    } else { n.x = (xHead(0) + xHead(H - 1)) / 2; n.y = yRow; }
    n.id = nodes.length; nodes.push(n); nodeIndex[name] = n.id;
    return n.id;
  }
  var srcNode = new Int32Array(nSrc), dstNode = new Int32Array(nDst);
  for (var s = 0; s < nSrc; s++) srcNode[s] = addNode(srcNames[s]);
  for (var d = 0; d < nDst; d++) dstNode[d] = addNode(P.dst_node[d]);
  var kvOwners = {};  // kv node id -> head node ids that read it
  for (d = 0; d < nDst; d++) {
    if (nodes[dstNode[d]].type === "kv") kvOwners[dstNode[d]] = feeds[d].map(function (f) { return srcNode[f]; });
  }
  var minX = Infinity, maxX = -Infinity, minY = Infinity, maxY = -Infinity;
  nodes.forEach(function (n) {
    minX = Math.min(minX, n.x - 2 * R); maxX = Math.max(maxX, n.x + 2 * R);
    minY = Math.min(minY, n.y - 2 * R); maxY = Math.max(maxY, n.y + 2 * R);
  });
  var FIT = {left: 52, right: 14, top: 18, bottom: 30};  // screen margins: layer labels left, head labels below

  // per stored edge: world geometry (start, controls, end), computed once
  var GEO = new Float32Array(NE * 8);
  (function () {
    for (var i = 0; i < NE; i++) {
      var a = nodes[srcNode[ES[i]]], b = nodes[dstNode[ED[i]]], k = dstKind[ED[i]];
      var x1 = a.x, y1 = a.y - R, x2 = b.x, y2 = b.y + (b.type === "kv" ? 1.3 * R : b.type === "logits" ? 1.4 * R : R);
      if (b.type === "head") x2 += (k === "q" ? -0.65 : k === "v" ? 0.65 : 0) * R;
      else if (b.type === "kv") x2 += (k === "k" ? -0.5 : 0.5) * R;
      var ym = (y1 + y2) / 2, c = 0;
      if (y1 - y2 < ROW * 0.3) ym = Math.min(y1, y2) - ROW * 0.25;
      else if (Math.abs(x2 - x1) < COL * 0.3) c = (a.type === "mlp" || b.type === "mlp" ? 1 : -1) * Math.min(COL * 0.6, 0.25 * (y1 - y2));
      var o = i * 8;
      GEO[o] = x1; GEO[o + 1] = y1; GEO[o + 2] = x1 + c; GEO[o + 3] = ym;
      GEO[o + 4] = x2 + c; GEO[o + 5] = ym; GEO[o + 6] = x2; GEO[o + 7] = y2;
    }
  })();
  var DASH = {k: [5, 3], v: [1.5, 2.5]}, DASH_MAX = 3000;
  var kindCode = new Uint8Array(nDst);  // 0 solid (q, mlp, logits), 1 k, 2 v
  for (d = 0; d < nDst; d++) kindCode[d] = dstKind[d] === "k" ? 1 : dstKind[d] === "v" ? 2 : 0;

  // ------------------------------------------------------------------ selection: top n + prune
  var kept = new Int32Array(0), keptMask = new Uint8Array(NE), nodeUsed = new Uint8Array(nodes.length);
  var mode = "circuit", curN = 0, timing = {select_ms: 0, draw_ms: 0};

  function prune(cand) {  // cand: Int32Array of stored ranks (ascending); returns the kept ones
    var m = cand.length, start = new Int32Array(nDst + 1), i, j, d, f;
    for (i = 0; i < m; i++) start[ED[cand[i]] + 1]++;
    for (d = 0; d < nDst; d++) start[d + 1] += start[d];
    var pos = start.slice(0, nDst), byDst = new Int32Array(m);
    for (i = 0; i < m; i++) byDst[pos[ED[cand[i]]]++] = cand[i];
    var reached = new Uint8Array(nSrc), useful = new Uint8Array(nDst), srcUseful = new Uint8Array(nSrc);
    reached[0] = 1;
    for (d = 0; d < nDst - 1; d++) {  // destinations are in layer order
      for (j = start[d]; j < start[d + 1]; j++) {
        if (reached[ES[byDst[j]]]) { f = feeds[d]; for (var q = 0; q < f.length; q++) reached[f[q]] = 1; break; }
      }
    }
    for (d = nDst - 1; d >= 0; d--) {
      if (d === logitsDst) useful[d] = 1;
      else { f = feeds[d]; for (q = 0; q < f.length; q++) if (srcUseful[f[q]]) { useful[d] = 1; break; } }
      if (useful[d]) for (j = start[d]; j < start[d + 1]; j++) srcUseful[ES[byDst[j]]] = 1;
    }
    var out = new Int32Array(m), k = 0;
    for (i = 0; i < m; i++) { var r = cand[i]; if (reached[ES[r]] && useful[ED[r]]) out[k++] = r; }
    return out.slice(0, k);
  }
  function setKept(ranks) {
    kept = ranks; keptMask.fill(0); nodeUsed.fill(0);
    for (var i = 0; i < kept.length; i++) {
      var r = kept[i], dd = ED[r]; keptMask[r] = 1; nodeUsed[srcNode[ES[r]]] = 1; nodeUsed[dstNode[dd]] = 1;
      var f = feeds[dd]; for (var q = 0; q < f.length; q++) nodeUsed[srcNode[f[q]]] = 1;
    }
  }
  function selectTop(n) {
    var t0 = performance.now();
    n = Math.max(0, Math.min(NORD, Math.round(+n || 0)));
    var cand = new Int32Array(n);
    for (var i = 0; i < n; i++) cand[i] = i;
    setKept(prune(cand)); mode = "topn"; curN = n;
    timing.select_ms = performance.now() - t0;
  }
  function selectCircuit() {
    setKept(circRanks.slice()); mode = "circuit";
    curN = P.circuit.n_init !== null && P.circuit.n_init !== undefined ? P.circuit.n_init : P.circuit.n_edges;
  }

  // ------------------------------------------------------------------ view (pan / zoom)
  var cv = $("kcv-canvas"), ov = $("kcv-over"), tip = $("kcv-tip");
  var ctx = cv.getContext("2d"), octx = ov.getContext("2d");
  var W = 600, Hh = 400, dpr = 1, view = {z: 1, x: 0, y: 0};
  function resize() {
    var r = stage.getBoundingClientRect();
    W = Math.max(50, r.width); Hh = Math.max(50, r.height); dpr = window.devicePixelRatio || 1;
    [cv, ov].forEach(function (c) {
      c.width = Math.round(W * dpr); c.height = Math.round(Hh * dpr);
      c.style.width = W + "px"; c.style.height = Hh + "px";
    });
  }
  function fit() {
    var bw = maxX - minX, bh = maxY - minY, aw = W - FIT.left - FIT.right, ah = Hh - FIT.top - FIT.bottom;
    view.z = Math.max(1e-3, Math.min(aw / bw, ah / bh));
    view.x = FIT.left + (aw - bw * view.z) / 2 - minX * view.z; view.y = FIT.top + (ah - bh * view.z) / 2 - minY * view.z;
  }
  function sx(x) { return x * view.z + view.x; }
  function sy(y) { return y * view.z + view.y; }

  // ------------------------------------------------------------------ drawing
  function fmtScore(v) { return v !== v ? "NaN" : Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : v.toFixed(4); }
  function alphaFor(n) { return n <= 200 ? 0.75 : n <= 1000 ? 0.55 : n <= 5000 ? 0.4 : 0.28; }
  function maxAbsKept() {
    var m = 0;
    for (var i = 0; i < kept.length; i++) { var a = Math.abs(EW[kept[i]]); if (a > m) m = a; }
    return m;
  }
  function levelOf(v, mx) {  // width bucket 0..5 (6 for NaN)
    if (v !== v) return 6;
    return mx > 0 ? Math.min(5, Math.floor(Math.abs(v) / mx * 6)) : 0;
  }
  // the three weakest levels are hairlines (<= 1px): Skia strokes those several times faster
  var WIDTHS = [0.5, 0.75, 1, 1.6, 2.4, 3.4, 0.6];
  function widthOf(level) { return WIDTHS[level]; }
  function colourOf(v, r) { return r !== undefined && HL[r] ? DIFF : v !== v ? NANC : v >= 0 ? POS : NEG; }
  // buckets: (level 0..6) x (colour 0..3: positive, negative, NaN, highlighted) x (dash 0..2); drawn in
  // ORDER: NaN first, then weakest to strongest, the highlighted ones last (on top)
  var NB = 84, ORDER = [], oi, lvo;
  for (oi = 0; oi < 3; oi++) ORDER.push(6 * 12 + 2 * 3 + oi);
  for (lvo = 0; lvo < 6; lvo++) for (oi = 0; oi < 6; oi++) ORDER.push(lvo * 12 + oi);
  for (lvo = 0; lvo < 7; lvo++) for (oi = 9; oi < 12; oi++) ORDER.push(lvo * 12 + oi);
  function bucketOf(i) {  // [level, colour, dash] of bucket i
    return [Math.floor(i / 12), Math.floor(i / 3) % 4, i % 3];
  }
  function bucketColour(sg) { return sg === 0 ? POS : sg === 1 ? NEG : sg === 2 ? NANC : DIFF; }
  function buckets() {
    var mx = maxAbsKept(), b = [];
    for (var i = 0; i < NB; i++) b.push([]);
    for (i = 0; i < kept.length; i++) {
      var r = kept[i], v = EW[r], lv = levelOf(v, mx), sg = HL[r] ? 3 : v !== v ? 2 : v >= 0 ? 0 : 1;
      b[lv * 12 + sg * 3 + kindCode[ED[r]]].push(r);
    }
    return b;
  }
  function nodeRadius() { return Math.max(2.5, Math.min(13, R * view.z)); }
  function drawScene(c, w, h) {
    c.save();
    c.fillStyle = "#fff"; c.fillRect(0, 0, w, h);
    // layer guides
    c.lineWidth = 1; c.strokeStyle = "#f1f3f5";
    for (var layer = -1; layer <= L; layer++) {
      var y = sy((L - layer) * ROW);
      if (y < -20 || y > h + 20) continue;
      c.beginPath(); c.moveTo(sx(minX), y); c.lineTo(sx(maxX), y); c.stroke();
    }
    // kv group connectors, only for the groups the selection uses
    c.strokeStyle = KV_LINK;
    c.beginPath();
    kvLinks().forEach(function (p) {
      var kn = nodes[p[0]], hn = nodes[p[1]]; c.moveTo(sx(kn.x), sy(kn.y)); c.lineTo(sx(hn.x), sy(hn.y));
    });
    c.stroke();
    // edges
    // Style is set once per bucket, but every edge is stroked on its own: with software
    // rasterisation (headless, no GPU) one stroke per curve is several times faster than one
    // huge multi-curve path, and dashes cost about 1.5x, so they are left out above DASH_MAX.
    var b = buckets(), a = alphaFor(kept.length), dashed = kept.length <= DASH_MAX;
    c.globalAlpha = a; c.lineCap = kept.length <= 2000 ? "round" : "butt";
    for (var oo = 0; oo < ORDER.length; oo++) {
      var i = ORDER[oo], list = b[i];
      if (!list.length) continue;
      var bk = bucketOf(i), lv = bk[0], sg = bk[1], kd = bk[2];
      c.strokeStyle = bucketColour(sg);
      c.globalAlpha = sg === 3 ? Math.max(a, 0.85) : a;
      c.lineWidth = widthOf(lv) + (sg === 3 ? 0.6 : 0);
      c.setLineDash(dashed && kd === 1 ? DASH.k : dashed && kd === 2 ? DASH.v : []);
      for (var j = 0; j < list.length; j++) {
        var o = list[j] * 8, x0 = sx(GEO[o]), y0 = sy(GEO[o + 1]), x3 = sx(GEO[o + 6]), y3 = sy(GEO[o + 7]);
        if ((x0 < -50 && x3 < -50) || (x0 > w + 50 && x3 > w + 50) || (y0 < -50 && y3 < -50) || (y0 > h + 50 && y3 > h + 50)) continue;
        c.beginPath();
        c.moveTo(x0, y0);
        c.bezierCurveTo(sx(GEO[o + 2]), sy(GEO[o + 3]), sx(GEO[o + 4]), sy(GEO[o + 5]), x3, y3);
        c.stroke();
      }
    }
    c.setLineDash([]); c.globalAlpha = 1;
    // nodes
    var rr = nodeRadius();
    for (i = 0; i < nodes.length; i++) drawNode(c, nodes[i], rr, nodeUsed[i] ? COLOURS[nodes[i].type] : IDLE, !!nodeUsed[i]);
    for (i = 0; i < nodes.length; i++) if (nodeUsed[i] && HLN[nodes[i].name]) ring(c, i, DIFF);
    // labels last, on a white backing, so nothing drawn hides them
    c.font = LABEL_FONT; c.textBaseline = "middle";
    labelLayout(w, h).forEach(function (lb) {
      var tw = c.measureText(lb.text).width, x0 = lb.align === "center" ? lb.x - tw / 2 : lb.x;
      c.fillStyle = "rgba(255,255,255,0.85)"; c.fillRect(x0 - 2, lb.y - 7, tw + 4, 14);
      c.fillStyle = lb.colour; c.textAlign = lb.align; c.fillText(lb.text, lb.x, lb.y);
    });
    c.restore();
  }
  // [kv node id, head node id] for every k/v group input that a drawn edge enters: the faint lines
  // to the heads that read it would otherwise cross every layer of a grouped-query model
  function kvLinks() {
    var out = [];
    for (var kid in kvOwners) {
      if (nodeUsed[kid]) kvOwners[kid].forEach(function (hid) { out.push([+kid, hid]); });
    }
    return out;
  }
  // Layer labels at the left edge and column labels (h0.., MLP) along the bottom, in screen
  // coordinates: pinned to the stage, so zooming or panning never moves them out of view; thinned so
  // that no two overlap (input and logits first, then every step-th layer); drawn on a white backing.
  function labelLayout(w, h) {
    var out = [], ys = [], step = Math.max(1, Math.ceil(LABEL_GAP / (ROW * view.z)));
    var order = [-1, L];
    for (var layer = 0; layer < L; layer += step) order.push(layer);
    order.forEach(function (layer) {
      var y = sy((L - layer) * ROW);
      if (y < 6 || y > h - 6 || ys.some(function (o) { return Math.abs(o - y) < LABEL_GAP; })) return;
      ys.push(y);
      out.push({text: layer === -1 ? "input" : layer === L ? "logits" : "L" + layer, x: 4, y: y, align: "left",
                colour: "#6b7280", axis: "layer"});
    });
    var yl = Math.max(12, Math.min(h - 8, sy((L + 1) * ROW) + 20)), lastX = -Infinity;
    var cols = [];
    for (var hh = 0; hh < H; hh++) cols.push(["h" + hh, sx(COL * (hh + 0.5))]);
    cols.push(["MLP", sx(COL * (H + 0.9))]);
    cols.forEach(function (cl) {
      var half = 3.5 * cl[0].length + 2;
      if (cl[1] - lastX < 2 * half + 6 || cl[1] < 40 + half || cl[1] > w - half) return;
      lastX = cl[1];
      out.push({text: cl[0], x: cl[1], y: yl, align: "center", colour: "#6b7280", axis: "column"});
    });
    return out;
  }
  function drawNode(c, n, rr, fill, used) {
    var x = sx(n.x), y = sy(n.y);
    if (x < -60 || x > W + 60 || y < -30 || y > Hh + 30) return;
    c.fillStyle = fill; c.strokeStyle = "#fff"; c.lineWidth = 1;
    c.beginPath();
    if (n.type === "head") { c.arc(x, y, rr, 0, 2 * Math.PI); }
    else if (n.type === "mlp") { c.rect(x - rr * 0.9, y - rr * 0.9, rr * 1.8, rr * 1.8); }
    else if (n.type === "kv") { var q = rr * 1.2; c.moveTo(x, y - q); c.lineTo(x + q, y); c.lineTo(x, y + q); c.lineTo(x - q, y); c.closePath(); }
    else {
      var w = Math.max(34, 64 * Math.min(1, view.z * 1.2)), hb = Math.max(12, rr * 2.6);
      c.rect(x - w / 2, y - hb / 2, w, hb); c.fill();
      c.fillStyle = "#fff"; c.textAlign = "center"; c.textBaseline = "middle";
      c.font = "11px system-ui,-apple-system,Segoe UI,Roboto,Arial,sans-serif"; c.fillText(n.name, x, y + 0.5);
      return;
    }
    c.fill(); if (used) c.stroke();
  }
  function nodeHitRadius(n) { var rr = nodeRadius(); return n.type === "input" || n.type === "logits" ? Math.max(17, 32 * Math.min(1, view.z * 1.2)) : rr + 3; }

  function redraw() {
    var t0 = performance.now();
    snap = null;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    drawScene(ctx, W, Hh);
    drawOverlay();
    timing.draw_ms = performance.now() - t0;
    root.setAttribute("data-drawn", String(kept.length));
    return timing.draw_ms;
  }
  var rafPending = false;
  function schedule() { if (!rafPending) { rafPending = true; requestAnimationFrame(function () { rafPending = false; redraw(); }); } }
  // While panning or zooming a big selection, move a snapshot of the last full drawing instead
  // of redrawing every edge at every mouse event; the full redraw follows when the gesture ends.
  var snapC = null, snap = null, settleTimer = 0, QUICK_MIN = 1500;
  function quickDraw() {
    if (!snap) {
      snapC = snapC || document.createElement("canvas");
      snapC.width = cv.width; snapC.height = cv.height;
      snapC.getContext("2d").drawImage(cv, 0, 0);
      snap = {z: view.z, x: view.x, y: view.y};
      return;  // the view has not moved since the snapshot: nothing to do yet
    }
    var t0 = performance.now(), k = view.z / snap.z;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0); ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, Hh);
    ctx.setTransform(dpr * k, 0, 0, dpr * k, dpr * (view.x - snap.x * k), dpr * (view.y - snap.y * k));
    ctx.drawImage(snapC, 0, 0, W, Hh);
    drawOverlay();
    timing.quick_ms = performance.now() - t0;
  }
  function settle() { snap = null; redraw(); }
  function moveView() {  // called with the view already changed
    if (kept.length < QUICK_MIN) { schedule(); return; }
    if (!rafPending) { rafPending = true; requestAnimationFrame(function () { rafPending = false; if (snap) quickDraw(); else redraw(); }); }
    clearTimeout(settleTimer);
    if (!drag) settleTimer = setTimeout(settle, 160);
  }
  function beginMove() { if (kept.length >= QUICK_MIN && !snap) quickDraw(); }

  // ------------------------------------------------------------------ overlay: hover and selected node
  var hoverEdge = -1, hoverNode = -1, selNode = -1;
  function strokeEdge(c, r, extra) {
    var o = r * 8, v = EW[r];
    c.strokeStyle = colourOf(v, r); c.lineWidth = widthOf(levelOf(v, maxAbsKept())) + extra;
    var kd = kindCode[ED[r]]; c.setLineDash(kd === 1 ? DASH.k : kd === 2 ? DASH.v : []);
    c.beginPath(); c.moveTo(sx(GEO[o]), sy(GEO[o + 1]));
    c.bezierCurveTo(sx(GEO[o + 2]), sy(GEO[o + 3]), sx(GEO[o + 4]), sy(GEO[o + 5]), sx(GEO[o + 6]), sy(GEO[o + 7]));
    c.stroke();
  }
  function touches(r, nid) {
    if (srcNode[ES[r]] === nid || dstNode[ED[r]] === nid) return true;
    var f = feeds[ED[r]];
    for (var q = 0; q < f.length; q++) if (srcNode[f[q]] === nid) return true;
    return false;
  }
  function ring(c, nid, colour) {
    var n = nodes[nid], rr = nodeHitRadius(n);
    c.strokeStyle = colour; c.lineWidth = 2; c.setLineDash([]);
    c.beginPath(); c.arc(sx(n.x), sy(n.y), rr + 1, 0, 2 * Math.PI); c.stroke();
  }
  function drawOverlay() {
    octx.setTransform(dpr, 0, 0, dpr, 0, 0);
    octx.clearRect(0, 0, W, Hh);
    octx.lineCap = "round";
    if (selNode >= 0) {
      var cnt = 0;
      for (var i = 0; i < kept.length && cnt < 3000; i++) if (touches(kept[i], selNode)) { strokeEdge(octx, kept[i], 1); cnt++; }
      ring(octx, selNode, "#111827");
    }
    if (hoverEdge >= 0) strokeEdge(octx, hoverEdge, 2.5);
    if (hoverNode >= 0) ring(octx, hoverNode, "#6b7280");
    octx.setLineDash([]);
  }

  // ------------------------------------------------------------------ hit testing
  function nodeAt(mx, my) {
    var best = -1, bd = Infinity;
    for (var i = 0; i < nodes.length; i++) {
      var n = nodes[i], dx = sx(n.x) - mx, dy = sy(n.y) - my, rr = nodeHitRadius(n);
      var dd = n.type === "input" || n.type === "logits" ? (Math.abs(dx) <= rr && Math.abs(dy) <= 12 ? 0 : Infinity) : Math.hypot(dx, dy);
      if (dd <= rr && dd < bd) { bd = dd; best = i; }
    }
    return best;
  }
  function segDist(px, py, ax, ay, bx, by) {
    var vx = bx - ax, vy = by - ay, l2 = vx * vx + vy * vy, t = l2 ? ((px - ax) * vx + (py - ay) * vy) / l2 : 0;
    t = Math.max(0, Math.min(1, t));
    return Math.hypot(px - ax - t * vx, py - ay - t * vy);
  }
  function edgeAt(mx, my) {
    var best = -1, bd = 5;
    for (var i = kept.length - 1; i >= 0; i--) {
      var r = kept[i], o = r * 8;
      var x0 = sx(GEO[o]), y0 = sy(GEO[o + 1]), x1 = sx(GEO[o + 2]), y1 = sy(GEO[o + 3]);
      var x2 = sx(GEO[o + 4]), y2 = sy(GEO[o + 5]), x3 = sx(GEO[o + 6]), y3 = sy(GEO[o + 7]);
      if (mx < Math.min(x0, x1, x2, x3) - bd || mx > Math.max(x0, x1, x2, x3) + bd ||
          my < Math.min(y0, y1, y2, y3) - bd || my > Math.max(y0, y1, y2, y3) + bd) continue;
      var px = x0, py = y0;
      for (var k = 1; k <= 12; k++) {
        var t = k / 12, u = 1 - t, a = u * u * u, b = 3 * u * u * t, c = 3 * u * t * t, e = t * t * t;
        var qx = a * x0 + b * x1 + c * x2 + e * x3, qy = a * y0 + b * y1 + c * y2 + e * y3;
        var dd = segDist(mx, my, px, py, qx, qy);
        if (dd < bd || (dd === bd && best < 0)) { bd = dd; best = r; }
        px = qx; py = qy;
      }
    }
    return best;
  }
  function edgeLabel(r) {
    return srcNames[ES[r]] + " \u2192 " + dstNames[ED[r]] + ":  " + fmtScore(EW[r]) + "  (rank " + (r + 1) + ")";
  }
  function nodeLabel(nid) {
    var n = nodes[nid], din = 0, dout = 0;
    for (var i = 0; i < kept.length; i++) {
      var r = kept[i];
      if (srcNode[ES[r]] === nid) dout++;
      else if (touches(r, nid)) din++;
    }
    var where = n.type === "input" || n.type === "logits" ? "" : ", layer " + n.layer;
    return n.name + " (" + n.type + where + "): " + din + " in, " + dout + " out";
  }
  function showTip(text, mx, my) {
    tip.hidden = false; tip.textContent = text;
    var tw = tip.offsetWidth, x = mx + 14, y = my + 12;
    if (x + tw > W - 4) x = Math.max(4, mx - tw - 10);
    if (y > Hh - 26) y = my - 28;
    tip.style.left = x + "px"; tip.style.top = y + "px";
  }

  // ------------------------------------------------------------------ pointer input
  var drag = null, hoverPending = null;
  function local(ev) { var r = ov.getBoundingClientRect(); return [ev.clientX - r.left, ev.clientY - r.top]; }
  stage.addEventListener("wheel", function (ev) {
    ev.preventDefault();
    var p = local(ev), f = Math.exp(-ev.deltaY * (ev.deltaMode === 1 ? 0.05 : 0.0015));
    var z = Math.max(0.05, Math.min(40, view.z * f)); f = z / view.z;
    beginMove();
    view.x = p[0] - (p[0] - view.x) * f; view.y = p[1] - (p[1] - view.y) * f; view.z = z;
    tip.hidden = true; moveView();
  }, {passive: false});
  stage.addEventListener("mousedown", function (ev) {
    if (ev.button !== 0) return;
    var p = local(ev); drag = {x: p[0], y: p[1], vx: view.x, vy: view.y, moved: false};
  });
  window.addEventListener("mousemove", function (ev) {
    if (drag) {
      var p = local(ev), dx = p[0] - drag.x, dy = p[1] - drag.y;
      if (!drag.moved && Math.abs(dx) + Math.abs(dy) > 3) { drag.moved = true; stage.classList.add("kcv-drag"); beginMove(); }
      if (drag.moved) { view.x = drag.vx + dx; view.y = drag.vy + dy; tip.hidden = true; moveView(); }
      return;
    }
    if (ev.target !== ov) return;
    var first = hoverPending === null;
    hoverPending = local(ev);
    if (first) requestAnimationFrame(function () { var p = hoverPending; hoverPending = null; hover(p[0], p[1]); });
  });
  window.addEventListener("mouseup", function (ev) {
    if (!drag) return;
    var wasClick = !drag.moved; drag = null; stage.classList.remove("kcv-drag");
    if (snap) { clearTimeout(settleTimer); settle(); }
    if (wasClick && ev.target === ov) { var p = local(ev); clickAt(p[0], p[1]); }
  });
  ov.addEventListener("mouseleave", function () { tip.hidden = true; hoverEdge = hoverNode = -1; drawOverlay(); });
  function hover(mx, my) {
    var nid = nodeAt(mx, my), r = nid < 0 ? edgeAt(mx, my) : -1;
    if (nid !== hoverNode || r !== hoverEdge) { hoverNode = nid; hoverEdge = r; drawOverlay(); }
    if (nid >= 0) showTip(nodeLabel(nid), mx, my);
    else if (r >= 0) showTip(edgeLabel(r), mx, my);
    else tip.hidden = true;
  }
  function clickAt(mx, my) {
    var nid = nodeAt(mx, my);
    if (nid >= 0) openNode(nid);
    return nid >= 0 ? nodes[nid].name : null;
  }

  // ------------------------------------------------------------------ side panel
  var panel = $("kcv-panel");
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function num(v, digits) {  // fixed decimals; a value that rounds to zero shows no sign ("0.000", never "-0.000")
    if (typeof v !== "number" || !isFinite(v)) return "n/a";
    var s = v.toFixed(digits === undefined ? 3 : digits);
    return /^-[0.]+$/.test(s) ? s.slice(1) : s;
  }
  // a token in quotes with its leading space kept, newlines and tabs visible: the rule of
  // kcircuits.report.base.token_label, so a token reads the same here and in the report's tables
  function showTok(t) { return "'" + String(t).replace(/\n/g, "\\n").replace(/\r/g, "\\r").replace(/\t/g, "\\t") + "'"; }
  function barTable(rows, cls, maxVal) {  // rows: [label, value]
    var t = el("table", "kcv-bars"), mx = maxVal || 0;
    rows.forEach(function (r) { if (typeof r[1] === "number" && isFinite(r[1])) mx = Math.max(mx, Math.abs(r[1])); });
    rows.forEach(function (r) {
      var tr = el("tr"), v = r[1];
      tr.appendChild(el("td", "kcv-tok", r[0]));
      var cell = el("td"), bg = el("div", "kcv-bar-bg"), fg = el("div", "kcv-bar-fg " + (cls || ""));
      fg.style.width = (typeof v === "number" && isFinite(v) && mx > 0 ? Math.max(0, Math.abs(v) / mx * 100) : 0) + "%";
      bg.appendChild(fg); cell.appendChild(bg); tr.appendChild(cell);
      tr.appendChild(el("td", "kcv-val", num(v)));
      t.appendChild(tr);
    });
    return t;
  }
  function edgeList(title, ranks, other) {
    var box = el("div");
    box.appendChild(el("h4", null, title + " (" + ranks.length + ")"));
    if (!ranks.length) { box.appendChild(el("p", "kcv-muted", "none in this selection")); return box; }
    var ul = el("ul", "kcv-elist");
    ranks.slice(0, 40).forEach(function (r) {
      var v = EW[r], li = el("li");
      li.appendChild(el("span", v !== v ? "kcv-nan" : v >= 0 ? "kcv-pos" : "kcv-neg", fmtScore(v)));
      li.appendChild(document.createTextNode("  " + srcNames[ES[r]] + " \u2192 " + dstNames[ED[r]]));
      li.title = "show " + other(r);
      li.addEventListener("click", function () { openNode(nodeIndex[other(r)]); });
      ul.appendChild(li);
    });
    box.appendChild(ul);
    if (ranks.length > 40) box.appendChild(el("p", "kcv-muted", "\u2026 and " + (ranks.length - 40) + " more (see the edge table)"));
    return box;
  }
  function describeNode(n) {
    if (n.type === "head") return "attention head " + n.idx + " of layer " + n.layer;
    if (n.type === "mlp") return "MLP of layer " + n.layer;
    if (n.type === "kv") return "k/v input of kv group " + n.idx + ", layer " + n.layer + " (read by " + kvOwners[n.id].map(function (h) { return nodes[h].name; }).join(", ") + ")";
    if (n.type === "input") return "token embeddings (input)";
    return "the output logits";
  }
  function openNode(nid) {
    if (nid === undefined || nid < 0) return;
    selNode = nid; drawOverlay();
    var n = nodes[nid], det = details[n.name] || null;
    panel.textContent = "";
    panel.setAttribute("data-node", n.name);
    panel.appendChild(el("h3", null, n.name));
    panel.appendChild(el("div", "kcv-muted", describeNode(n)));
    if (det && det.lens) {
      var lens = det.lens;
      panel.appendChild(el("h4", null, "logit lens"));
      if (Array.isArray(lens.top) && lens.top.length) {
        panel.appendChild(barTable(lens.top.map(function (p) {
          return Array.isArray(p) ? [showTok(p[0]), typeof p[1] === "number" ? p[1] : NaN] : [showTok(p), NaN];
        }), ""));
      }
      if (lens.answer_rank !== undefined || lens.answer_prob !== undefined) {
        var ans = example && example.answer !== undefined ? showTok(example.answer) : "answer";
        panel.appendChild(el("div", "kcv-lens-ans", ans + ": rank " + (lens.answer_rank === null || lens.answer_rank === undefined ? "n/a" : lens.answer_rank) +
          ", prob " + num(lens.answer_prob, 4)));
      }
    }
    if (det && det.attention && Array.isArray(det.attention.weights)) {
      var toks = example && Array.isArray(example.tokens) ? example.tokens : [];
      panel.appendChild(el("h4", null, "attention from the last position"));
      panel.appendChild(barTable(det.attention.weights.map(function (w, i) {
        return [i < toks.length ? showTok(toks[i]) : "#" + i, typeof w === "number" ? w : NaN];
      }), "kcv-att", 0));
    }
    if (det && det.role) {
      var ro = det.role;
      panel.appendChild(el("h4", null, "head role"));
      var line = el("div"); line.appendChild(el("span", "kcv-role", ro.role || "n/a")); panel.appendChild(line);
      var mass = el("div", "kcv-mass"), parts = [["subject_mass", "#059669"], ["relation_mass", "#7c3aed"], ["other_mass", "#9ca3af"]];
      parts.forEach(function (p) {
        var v = ro[p[0]];
        if (typeof v === "number" && isFinite(v) && v > 0) { var sp = el("span"); sp.style.width = Math.min(100, v * 100) + "%"; sp.style.background = p[1]; sp.title = p[0] + " " + num(v); mass.appendChild(sp); }
      });
      panel.appendChild(mass);
      var kv = el("table", "kcv-bars");
      ["subject_mass", "relation_mass", "other_mass", "direct_effect"].forEach(function (k) {
        if (k in ro) { var tr = el("tr"); tr.appendChild(el("td", null, k.replace("_", " "))); tr.appendChild(el("td", "kcv-val", num(ro[k]))); kv.appendChild(tr); }
      });
      panel.appendChild(kv);
    }
    if (!det && P.details) panel.appendChild(el("p", "kcv-muted", "no analysis details for this node"));
    var ins = [], outs = [];
    for (var i = 0; i < kept.length; i++) {
      var r = kept[i];
      if (srcNode[ES[r]] === nid) outs.push(r);
      else if (touches(r, nid)) ins.push(r);
    }
    panel.appendChild(edgeList("edges in", ins, function (r) { return srcNames[ES[r]]; }));
    panel.appendChild(edgeList("edges out", outs, function (r) { return P.dst_node[ED[r]]; }));
  }

  // ------------------------------------------------------------------ edge table
  var tbody = $("kcv-table").querySelector("tbody"), filterEl = $("kcv-filter"), moreBtn = $("kcv-more");
  var sortKey = "rank", sortAsc = true, rowLimit = 300, tableRows = [];
  function tableData() {
    var f = filterEl.value.trim().toLowerCase(), rows = [];
    for (var i = 0; i < kept.length; i++) {
      var r = kept[i];
      if (f && srcNames[ES[r]].toLowerCase().indexOf(f) < 0 && dstNames[ED[r]].toLowerCase().indexOf(f) < 0) continue;
      rows.push(r);
    }
    var key = {
      rank: function (r) { return r; }, score: function (r) { var v = EW[r]; return v !== v ? -Infinity : v; },
      abs: function (r) { var v = Math.abs(EW[r]); return v !== v ? -1 : v; },
      src: function (r) { return srcNames[ES[r]]; }, dst: function (r) { return dstNames[ED[r]]; },
      kind: function (r) { return dstKind[ED[r]]; }
    }[sortKey];
    rows.sort(function (a, b) { var x = key(a), y = key(b); return x < y ? (sortAsc ? -1 : 1) : x > y ? (sortAsc ? 1 : -1) : a - b; });
    return rows;
  }
  function renderTable() {
    tableRows = tableData();
    var frag = document.createDocumentFragment(), n = Math.min(rowLimit, tableRows.length);
    for (var i = 0; i < n; i++) {
      var r = tableRows[i], tr = document.createElement("tr"), v = EW[r];
      tr.setAttribute("data-edge", srcNames[ES[r]] + "->" + dstNames[ED[r]]);
      tr.setAttribute("data-rank", String(r));
      [String(r + 1), srcNames[ES[r]], dstNames[ED[r]], dstKind[ED[r]], fmtScore(v), fmtScore(Math.abs(v))].forEach(function (t, j) {
        var td = el("td", j === 0 || j >= 4 ? "num" : null, t);
        if (j === 4) td.className = "num " + (v !== v ? "kcv-nan" : v >= 0 ? "kcv-pos" : "kcv-neg");
        tr.appendChild(td);
      });
      frag.appendChild(tr);
    }
    tbody.textContent = ""; tbody.appendChild(frag);
    $("kcv-tcount").textContent = tableRows.length + " of " + kept.length + " edges" + (n < tableRows.length ? ", first " + n + " shown" : "");
    moreBtn.hidden = n >= tableRows.length;
    root.querySelectorAll(".kcv-table th[data-sort]").forEach(function (th) {
      th.classList.toggle("kcv-sorted", th.getAttribute("data-sort") === sortKey);
      th.classList.toggle("kcv-asc", sortAsc);
    });
  }
  root.querySelectorAll(".kcv-table th[data-sort]").forEach(function (th) {
    th.addEventListener("click", function () {
      var k = th.getAttribute("data-sort");
      if (k === sortKey) sortAsc = !sortAsc; else { sortKey = k; sortAsc = k === "rank" || k === "src" || k === "dst" || k === "kind"; }
      renderTable();
    });
  });
  filterEl.addEventListener("input", function () { rowLimit = 300; renderTable(); });
  moreBtn.addEventListener("click", function () { rowLimit += 1000; renderTable(); });
  tbody.addEventListener("mouseover", function (ev) {
    var tr = ev.target.closest && ev.target.closest("tr");
    if (tr) { hoverEdge = +tr.getAttribute("data-rank"); drawOverlay(); }
  });
  tbody.addEventListener("mouseleave", function () { hoverEdge = -1; drawOverlay(); });

  // ------------------------------------------------------------------ controls
  var slider = $("kcv-n"), nbox = $("kcv-nbox"), countEl = $("kcv-count");
  // the slider is logarithmic for big graphs (circuits are usually a small fraction of the edges);
  // the number box always takes the exact n
  var LOGS = NORD > 2000, SMAX = LOGS ? 1000 : NORD, fromSlider = false;
  function posToN(p) { p = +p || 0; return !LOGS ? p : p <= 0 ? 0 : Math.round(Math.pow(NORD, p / SMAX)); }
  function nToPos(n) { return !LOGS ? n : n <= 0 ? 0 : Math.max(1, Math.round(Math.log(n) / Math.log(NORD) * SMAX)); }
  slider.max = String(SMAX); nbox.max = String(NORD);
  if (!hasScores) { slider.disabled = nbox.disabled = true; }
  function updateCount() {
    if (!fromSlider) slider.value = String(nToPos(curN));
    nbox.value = String(curN);
    countEl.textContent = mode === "circuit"
      ? "run's circuit: " + kept.length + " edges"
      : "top " + curN + " by |score| \u2192 " + kept.length + " edges after pruning" +
        (hasScores ? " (run's circuit: " + P.circuit.n_edges + ")" : "");
    root.setAttribute("data-mode", mode);
    root.setAttribute("data-n", String(curN));
  }
  function apply() {
    updateCount(); redraw(); renderTable();
    if (selNode >= 0) openNode(selNode);
  }
  var pendingN = null;
  function requestN(v) {
    var first = pendingN === null; pendingN = v;
    if (first) requestAnimationFrame(function () { var n = pendingN; pendingN = null; selectTop(n); apply(); fromSlider = false; });
  }
  slider.addEventListener("input", function () { fromSlider = true; requestN(posToN(slider.value)); });
  slider.addEventListener("change", function () { fromSlider = false; });
  nbox.addEventListener("change", function () { requestN(nbox.value); });
  nbox.addEventListener("keydown", function (ev) { if (ev.key === "Enter") requestN(nbox.value); });
  root.querySelector("[data-act=circuit]").addEventListener("click", function () { selectCircuit(); apply(); });
  root.querySelector("[data-act=fit]").addEventListener("click", function () { fit(); redraw(); });
  root.querySelector("[data-act=svg]").addEventListener("click", function () {
    download("circuit.svg", new Blob([exportSVG()], {type: "image/svg+xml"}));
  });
  root.querySelector("[data-act=png]").addEventListener("click", function () {
    pngBlob(2).then(function (b) { download("circuit.png", b); });
  });
  function download(name, blob) {
    var a = document.createElement("a"), url = URL.createObjectURL(blob);
    a.href = url; a.download = name; document.body.appendChild(a); a.click(); a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 2000);
  }

  // ------------------------------------------------------------------ exports
  function pngBlob(scale) {
    var c = document.createElement("canvas");
    c.width = Math.round(W * scale); c.height = Math.round(Hh * scale);
    var x = c.getContext("2d"); x.setTransform(scale, 0, 0, scale, 0, 0);
    drawScene(x, W, Hh);
    return new Promise(function (resolve) { c.toBlob(resolve, "image/png"); });
  }
  function xmlEsc(s) { return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;"); }
  function f1(v) { return (Math.round(v * 10) / 10).toString(); }
  function exportSVG() {
    var out = [], NS = "http://www.w3.org/2000/svg", font = "system-ui,-apple-system,Segoe UI,Roboto,Arial,sans-serif";
    out.push('<svg xmlns="' + NS + '" width="' + f1(W) + '" height="' + f1(Hh) + '" viewBox="0 0 ' + f1(W) + " " + f1(Hh) + '" font-family="' + font + '" font-size="11">');
    out.push('<rect width="100%" height="100%" fill="#fff"/>');
    for (var layer = -1; layer <= L; layer++) {
      var y = sy((L - layer) * ROW);
      if (y < -20 || y > Hh + 20) continue;
      out.push('<line x1="' + f1(sx(minX)) + '" y1="' + f1(y) + '" x2="' + f1(sx(maxX)) + '" y2="' + f1(y) + '" stroke="#f1f3f5"/>');
    }
    var conn = kvLinks().map(function (p) {
      var kn = nodes[p[0]], hn = nodes[p[1]];
      return "M" + f1(sx(kn.x)) + " " + f1(sy(kn.y)) + "L" + f1(sx(hn.x)) + " " + f1(sy(hn.y));
    });
    if (conn.length) out.push('<path class="kv-links" d="' + conn.join("") + '" fill="none" stroke="' + KV_LINK + '"/>');
    var b = buckets(), a = alphaFor(kept.length), dashed = kept.length <= DASH_MAX;
    for (var oo = 0; oo < ORDER.length; oo++) {
      var i = ORDER[oo], list = b[i];
      if (!list.length) continue;
      var bk = bucketOf(i), lv = bk[0], sg = bk[1], kd = dashed ? bk[2] : 0, d = [];
      for (var j = 0; j < list.length; j++) {
        var o = list[j] * 8;
        d.push("M" + f1(sx(GEO[o])) + " " + f1(sy(GEO[o + 1])) + "C" + f1(sx(GEO[o + 2])) + " " + f1(sy(GEO[o + 3])) + " " +
          f1(sx(GEO[o + 4])) + " " + f1(sy(GEO[o + 5])) + " " + f1(sx(GEO[o + 6])) + " " + f1(sy(GEO[o + 7])));
      }
      var dash = kd === 1 ? ' stroke-dasharray="5 3"' : kd === 2 ? ' stroke-dasharray="1.5 2.5"' : "";
      out.push('<path class="edges' + (sg === 3 ? " highlighted" : "") + '" d="' + d.join("") + '" fill="none" stroke="' + bucketColour(sg) +
        '" stroke-width="' + (widthOf(lv) + (sg === 3 ? 0.6 : 0)).toFixed(1) + '" stroke-opacity="' + (sg === 3 ? Math.max(a, 0.85) : a) +
        '" stroke-linecap="round"' + dash + "/>");
    }
    var rr = nodeRadius();
    nodes.forEach(function (n, k) {
      if (!nodeUsed[k]) return;
      var x = sx(n.x), y2 = sy(n.y), fill = COLOURS[n.type], t = "<title>" + xmlEsc(n.name) + "</title>";
      if (x < -60 || x > W + 60 || y2 < -30 || y2 > Hh + 30) return;
      if (n.type === "head") out.push('<circle cx="' + f1(x) + '" cy="' + f1(y2) + '" r="' + f1(rr) + '" fill="' + fill + '" stroke="#fff">' + t + "</circle>");
      else if (n.type === "mlp") out.push('<rect x="' + f1(x - rr * 0.9) + '" y="' + f1(y2 - rr * 0.9) + '" width="' + f1(rr * 1.8) + '" height="' + f1(rr * 1.8) + '" fill="' + fill + '" stroke="#fff">' + t + "</rect>");
      else if (n.type === "kv") { var q = rr * 1.2; out.push('<polygon points="' + [[0, -q], [q, 0], [0, q], [-q, 0]].map(function (p) { return f1(x + p[0]) + "," + f1(y2 + p[1]); }).join(" ") + '" fill="' + fill + '">' + t + "</polygon>"); }
      else {
        var w = Math.max(34, 64 * Math.min(1, view.z * 1.2)), hb = Math.max(12, rr * 2.6);
        out.push('<rect x="' + f1(x - w / 2) + '" y="' + f1(y2 - hb / 2) + '" width="' + f1(w) + '" height="' + f1(hb) + '" fill="' + fill + '">' + t + "</rect>");
        out.push('<text x="' + f1(x) + '" y="' + f1(y2 + 4) + '" text-anchor="middle" fill="#fff">' + xmlEsc(n.name) + "</text>");
      }
      if (HLN[n.name]) out.push('<circle class="highlighted" cx="' + f1(x) + '" cy="' + f1(y2) + '" r="' + f1(nodeHitRadius(n) + 1) + '" fill="none" stroke="' + DIFF + '" stroke-width="2"/>');
    });
    labelLayout(W, Hh).forEach(function (lb) {
      out.push('<text class="axis-label" x="' + f1(lb.x) + '" y="' + f1(lb.y + 4) + '"' + (lb.align === "center" ? ' text-anchor="middle"' : "") +
        ' fill="' + lb.colour + '" stroke="#fff" stroke-width="3" paint-order="stroke">' + xmlEsc(lb.text) + "</text>");
    });
    out.push("</svg>");
    return out.join("\n");
  }

  // ------------------------------------------------------------------ legend and notes
  (function () {
    var lg = $("kcv-legend");
    function item(html, text) { var s = el("span"); s.innerHTML = html; s.appendChild(document.createTextNode(text)); lg.appendChild(s); }
    item('<i style="width:10px;height:10px;border-radius:5px;background:' + COLOURS.head + '"></i>', "attention head");
    item('<i style="width:10px;height:10px;background:' + COLOURS.mlp + '"></i>', "MLP");
    if (Object.keys(kvOwners).length) item('<i style="width:8px;height:8px;transform:rotate(45deg);background:' + COLOURS.kv + '"></i>', "k/v group input");
    item('<i style="width:22px;height:3px;background:' + POS + '"></i>', "positive (supports the answer)");
    item('<i style="width:22px;height:3px;background:' + NEG + '"></i>', "negative");
    item('<i style="width:22px;border-top:2px solid #4b5563"></i>', "q / MLP / logits");
    item('<i style="width:22px;border-top:2px dashed #4b5563"></i>', "k");
    item('<i style="width:22px;border-top:2px dotted #4b5563"></i>', "v");
    if (hlSpec) item('<i style="width:22px;height:3px;background:' + DIFF + '"></i>', hlSpec.label || "highlighted");
    item("", "width \u221d |score|; q enters a head left, k centre, v right");
    (P.notes || []).forEach(function (t) { notesEl.appendChild(el("p", null, t)); });
  })();

  // ------------------------------------------------------------------ start
  // the static SVG of the Circuit section is there for readers without JavaScript: fold it away
  var fig = root.id === "kcv" ? document.getElementById("kc-static-circuit") : null;
  if (fig && fig.parentNode && !(fig.parentNode.tagName === "DETAILS")) {
    var fold = document.createElement("details");
    fold.id = "kc-static-fold";
    fold.appendChild(el("summary", null, "static drawing of the circuit (the interactive viewer is in the next section)"));
    fig.parentNode.insertBefore(fold, fig); fold.appendChild(fig);
  }
  var errors = [];
  window.addEventListener("error", function (ev) { errors.push(String(ev.message)); });
  // a big circuit opens on its strongest part (payload "initial", chosen in Python), the rest is on the slider
  var INITIAL = P.initial || {mode: "circuit"};
  resize(); fit();
  if (INITIAL.mode === "topn") selectTop(INITIAL.n); else selectCircuit();
  apply();
  window.addEventListener("resize", function () {
    var oldW = W, oldH = Hh; resize();
    view.x += (W - oldW) / 2; view.y += (Hh - oldH) / 2; redraw();
  });

  // test / scripting hooks
  return {
    payload: P,
    selectN: function (n) { selectTop(n); apply(); return {select_ms: timing.select_ms, draw_ms: timing.draw_ms}; },
    showCircuit: function () { selectCircuit(); apply(); },
    state: function () { return {mode: mode, n: curN, drawn: kept.length, max: NORD, timing: timing, errors: errors.slice(), initial: INITIAL}; },
    labels: function () { return labelLayout(W, Hh); },
    kvLinks: function () { return kvLinks().map(function (p) { return [nodes[p[0]].name, nodes[p[1]].name]; }); },
    sliderN: function (pos) { return posToN(pos === undefined ? slider.value : pos); },
    selectedEdges: function () { return Array.prototype.map.call(kept, function (r) { return srcNames[ES[r]] + "->" + dstNames[ED[r]]; }); },
    highlightedEdges: function () {  // the drawn edges in the highlight colour
      return Array.prototype.filter.call(kept, function (r) { return HL[r]; }).map(function (r) { return srcNames[ES[r]] + "->" + dstNames[ED[r]]; });
    },
    highlightedNodes: function () { return nodes.filter(function (n, k) { return nodeUsed[k] && HLN[n.name]; }).map(function (n) { return n.name; }); },
    tableEdges: function () { return Array.prototype.map.call(tbody.querySelectorAll("tr"), function (tr) { return tr.getAttribute("data-edge"); }); },
    nodeClientXY: function (name) {
      var n = nodes[nodeIndex[name]], r = ov.getBoundingClientRect();
      return n ? {x: r.left + sx(n.x), y: r.top + sy(n.y), ox: sx(n.x), oy: sy(n.y), w: r.width, h: r.height} : null;
    },
    edgeXY: function (name) {  // the middle of a drawn edge, in canvas coordinates (for hover tests)
      for (var i = 0; i < kept.length; i++) {
        var r = kept[i];
        if (srcNames[ES[r]] + "->" + dstNames[ED[r]] !== name) continue;
        var o = r * 8, x = 0, y = 0, wts = [0.125, 0.375, 0.375, 0.125];
        for (var k = 0; k < 4; k++) { x += wts[k] * sx(GEO[o + 2 * k]); y += wts[k] * sy(GEO[o + 2 * k + 1]); }
        return {ox: x, oy: y, w: W, h: Hh};
      }
      return null;
    },
    hitAt: function (x, y) {  // what the pointer would hit at canvas coordinates (x, y)
      var nid = nodeAt(x, y), r = nid < 0 ? edgeAt(x, y) : -1;
      return {node: nid >= 0 ? nodes[nid].name : null, edge: r >= 0 ? srcNames[ES[r]] + "->" + dstNames[ED[r]] : null};
    },
    clickAt: clickAt,
    benchRedraw: function (reps) {  // full redraws, rasterisation forced by reading a pixel back
      reps = reps || 5; var times = [];
      for (var i = 0; i < reps; i++) {
        var t0 = performance.now(); redraw(); ctx.getImageData(0, 0, 1, 1); times.push(performance.now() - t0);
      }
      return times;
    },
    exportSVG: exportSVG,
    pngBlob: pngBlob,
    fit: function () { fit(); redraw(); },
    view: view
  };
}
})();
