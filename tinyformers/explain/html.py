"""One self-contained HTML page: the tables and every head's attention, with hover.

No network: the data sits in the page as JSON and the heat maps are drawn by a few lines of
inline JavaScript on a <canvas>, so the file opens offline and can be mailed as it is
(circuitsvis and bertviz load their scripts from a CDN).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from tinyformers.explain.data import Explanation, most_interesting_head


def write_html(ex: Explanation, path: Path) -> None:
    path.write_text(page(ex), encoding="utf-8")


def page(ex: Explanation) -> str:
    data = {
        "model": ex.model_name,
        "ids": ex.ids,
        "pieces": ex.pieces,
        "next": [
            list(row)
            for row in zip(ex.next_pieces, ex.next_ids, ex.next_probs, ex.next_logits, strict=True)
        ],
        "lens": {
            "pieces": ex.lens_pieces,
            "probs": [[round(p, 4) for p in r] for r in ex.lens_probs],
        },
        "layers": list(ex.patterns),
        # the head the page opens on: [layer, head] (data.most_interesting_head says how)
        "start": list(most_interesting_head(ex.patterns)),
        # [layer][head][query][key <= query]: the causal half only, 4 decimals
        "patterns": [
            [
                [row[: q + 1] for q, row in enumerate(head)]
                for head in p.double().mul(1e4).round().div(1e4).tolist()
            ]
            for p in ex.patterns.values()
        ],
    }
    # "</" would end the <script> element early if a token piece held "</script>"
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(f"{ex.model_name}: {''.join(ex.pieces)[:60]}")
    return TEMPLATE.replace("{{title}}", title).replace("{{data}}", blob)


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>tinyformers explain · {{title}}</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.2em; } h2 { font-size: 1.05em; margin-top: 1.6em; }
.tok { display: inline-block; border: 1px solid #ccc; border-radius: 3px; padding: 1px 4px;
  margin: 2px; font-family: monospace; white-space: pre; }
table { border-collapse: collapse; font-family: monospace; font-size: 12px; }
td, th { padding: 1px 6px; text-align: left; white-space: pre; }
#next td:nth-child(n+3) { text-align: right; }
#lens td { border: 1px solid #fff; }
.controls { margin: 0.6em 0; } select { font-size: 14px; }
#heads canvas { border: 2px solid transparent; margin: 2px; cursor: pointer; }
#heads canvas.on { border-color: #d62728; }
#legend { vertical-align: top; margin-top: 110px; }
#info { font-family: monospace; min-height: 1.4em; }
.note { color: #666; font-size: 12px; }
</style></head>
<body>
<h1 id="title"></h1>
<div id="tokens"></div>
<p class="note">␣ is a space, ↵ a newline. Hover a token for its id.</p>
<h2>Next token</h2>
<table id="next">
<tr><th>rank</th><th>token</th><th>id</th><th>probability</th><th>logit</th></tr></table>
<h2>Attention</h2>
<div class="controls">layer <select id="layer"></select> head <select id="head"></select>
<span class="note">(or click a head below; row: the token attending, column: the token attended to;
grey: later tokens, masked; colour: square root of the weight). The page opens on the head
that looks hardest at one other token: not the first token, not the token itself.</span></div>
<div id="heads"></div>
<div id="info">hover a cell for its weight</div>
<canvas id="big"></canvas> <canvas id="legend" width="70" height="260"></canvas>
<h2>Logit lens</h2>
<p class="note">The most likely next token read from the residual stream after each layer's
blocks (row 0: the embeddings only; last row: the model's output). Darker: more probable;
hover for the probability.</p>
<table id="lens"></table>
<script type="application/json" id="data">{{data}}</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const T = D.ids.length;
const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779",
  "#6ece58", "#b5de2b", "#fde725"];
function colour(w) {  // viridis on the square root of the weight, as the PNGs
  const x = Math.sqrt(Math.max(0, Math.min(1, w))) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2), f = x - i;
  const a = parseInt(VIRIDIS[i].slice(1), 16), b = parseInt(VIRIDIS[i + 1].slice(1), 16);
  const mix = s => Math.round(((a >> s) & 255) * (1 - f) + ((b >> s) & 255) * f);
  return `rgb(${mix(16)},${mix(8)},${mix(0)})`;
}
function el(tag, text, parent) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (parent) parent.appendChild(e);
  return e;
}
document.getElementById("title").textContent = `${D.model}: ${T} tokens`;
D.pieces.forEach((p, i) => { el("span", p, document.getElementById("tokens")).className = "tok";
  document.getElementById("tokens").lastChild.title = `position ${i}, id ${D.ids[i]}`; });
D.next.forEach(([piece, id, p, logit], r) => {
  const tr = el("tr", undefined, document.getElementById("next"));
  [r + 1, piece, id, p.toPrecision(4), logit.toFixed(3)].forEach(v => el("td", String(v), tr));
});
const lens = document.getElementById("lens");
const hr = el("tr", undefined, lens); el("th", "layer", hr);
D.pieces.forEach(p => el("th", p, hr));
D.lens.pieces.forEach((row, l) => {
  const tr = el("tr", undefined, lens); el("th", String(l), tr);
  row.forEach((p, t) => { const td = el("td", p, tr), w = D.lens.probs[l][t];
    td.style.background = `rgba(31,119,180,${w})`; td.style.color = w > 0.5 ? "#fff" : "#222";
    td.title = `after ${l} blocks, at ${D.pieces[t]} (${t}): ${p} ${w.toFixed(4)}`; });
});
const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
D.layers.forEach((l, i) => { const o = el("option", String(l), layerSel); o.value = i; });
const nHead = D.patterns[0].length;
for (let h = 0; h < nHead; h++) { const o = el("option", String(h), headSel); o.value = h; }
function draw(canvas, pat, cell, margin) {
  canvas.width = margin + T * cell; canvas.height = margin + T * cell;
  const g = canvas.getContext("2d");
  for (let q = 0; q < T; q++) for (let k = 0; k < T; k++) {
    g.fillStyle = k <= q ? colour(pat[q][k]) : "#ddd";
    g.fillRect(margin + k * cell, margin + q * cell, cell, cell);
  }
  if (!margin) return;
  g.fillStyle = "#222"; g.font = `${Math.min(12, cell)}px monospace`; g.textBaseline = "middle";
  D.pieces.forEach((p, i) => {
    g.textAlign = "right"; g.fillText(`${p} ${i}`, margin - 4, margin + (i + 0.5) * cell);
    g.save(); g.translate(margin + (i + 0.5) * cell, margin - 4); g.rotate(-Math.PI / 2);
    g.textAlign = "left"; g.fillText(`${p} ${i}`, 0, 0); g.restore();
  });
}
const big = document.getElementById("big"), info = document.getElementById("info");
const CELL = Math.max(8, Math.min(28, Math.floor(560 / T))), MARGIN = 120;
function show() {
  const L = +layerSel.value, H = +headSel.value, heads = document.getElementById("heads");
  heads.textContent = "";
  D.patterns[L].forEach((pat, h) => {
    const c = el("canvas", undefined, heads); c.title = `head ${h}`;
    draw(c, pat, Math.max(2, Math.floor(80 / T)), 0);
    if (h === H) c.className = "on";
    c.onclick = () => { headSel.value = h; show(); };
  });
  draw(big, D.patterns[L][H], CELL, MARGIN);
}
big.onmousemove = e => {
  const r = big.getBoundingClientRect();
  const k = Math.floor((e.clientX - r.left - MARGIN) / CELL);
  const q = Math.floor((e.clientY - r.top - MARGIN) / CELL);
  const L = +layerSel.value, H = +headSel.value;
  if (q < 0 || k < 0 || q >= T || k >= T) { info.textContent = ""; return; }
  info.textContent = k > q
    ? `${D.pieces[q]} (${q}) cannot attend to the later ${D.pieces[k]} (${k})`
    : `layer ${D.layers[L]}, head ${H}: ${D.pieces[q]} (${q}) attends to ${D.pieces[k]} (${k}) ` +
      `with weight ${D.patterns[L][H][q][k].toFixed(4)}`;
};
(function legend() {  // the colour scale, its ticks at the weights they stand for
  const g = document.getElementById("legend").getContext("2d"), top = 10, h = 240;
  for (let y = 0; y < h; y++) {
    g.fillStyle = colour((1 - y / h) ** 2); g.fillRect(0, top + y, 16, 1);
  }
  g.fillStyle = "#222"; g.font = "11px sans-serif"; g.textBaseline = "middle";
  [0, 0.01, 0.05, 0.1, 0.25, 0.5, 1].forEach(
    w => g.fillText(String(w), 20, top + h * (1 - Math.sqrt(w))));
})();
layerSel.onchange = show; headSel.onchange = show;
layerSel.value = D.layers.indexOf(D.start[0]); headSel.value = D.start[1];
show();
</script>
</body></html>
"""
