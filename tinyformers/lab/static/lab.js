// The lab's page: asks /lab/api for the numbers and draws them. Nothing is computed here
// but colours and the softmax at the slider's temperature (of the logits the server sent).
"use strict";

const DIMS = 8;  // embedding dimensions shown at once
const LISTED = 10;  // next tokens listed
const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779",
  "#6ece58", "#b5de2b", "#fde725"];

const S = {
  info: null,  // GET /lab/api/model: the model's shape and each view's links
  run: null,  // POST /lab/api/run for the prompt shown
  layer: 0, head: 0, picked: false,  // the head shown; picked: the learner clicked one
  ablated: null,  // POST /lab/api/ablate for the prompt shown, or null
  pending: null,  // the AbortController of the run in flight
};
const $ = id => document.getElementById(id);

function el(tag, text, parent, className) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (className) e.className = className;
  if (parent) parent.appendChild(e);
  return e;
}

// -- talking to the server -------------------------------------------------------------

async function api(path, body, signal) {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem("tinyformers-key");
  if (key) headers.Authorization = `Bearer ${key}`;
  const r = await fetch(path, {
    method: body ? "POST" : "GET", headers, signal,
    body: body ? JSON.stringify(body) : undefined,
  });
  if (r.status === 401) {  // `serve --api-key`: ask once, keep it for this tab
    const given = window.prompt("This server wants its API key:");
    if (given && given !== key) {
      sessionStorage.setItem("tinyformers-key", given);
      return api(path, body, signal);
    }
  }
  const data = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
  if (!r.ok) throw new Error(data.error?.message ?? data.error ?? r.statusText);
  return data;
}

function setState(state, message) {
  document.body.dataset.state = state;
  $("status").textContent = message;
}

async function start() {
  try {
    S.info = await api("/lab/api/model");
  } catch (e) {
    setState("error", e.message);
    if (e.message.includes("loading")) setTimeout(start, 1000);
    return;
  }
  const I = S.info;
  $("model").textContent =
    `${I.model}: ${I.architecture}, ${I.n_layer} layers of ${I.n_head} heads, ` +
    `${I.vocab} tokens in its vocabulary`;
  $("prompt").maxLength = I.max_chars;
  if (!$("prompt").value) $("prompt").value = I.example;
  document.querySelectorAll(".links").forEach(p => drawLinks(p, I.links[p.dataset.view]));
  runPrompt();
}

function drawLinks(p, links) {
  el("span", "Course: ", p);
  links.course.forEach(([label, url]) => { el("a", label, p).href = url; });
  if (links.code.length) el("span", "Code: ", p);
  links.code.forEach(([label, url]) => { el("a", label, p).href = url; });
}

let timer = null;
$("prompt").addEventListener("input", () => {
  clearTimeout(timer);
  timer = setTimeout(runPrompt, 250);  // a forward pass per pause in typing, not per key
});

async function runPrompt() {
  const prompt = $("prompt").value;
  if (S.pending) S.pending.abort();
  const pending = S.pending = new AbortController();
  setState("busy", "computing…");
  try {
    const run = await api("/lab/api/run", { prompt }, pending.signal);
    S.run = run; S.prompt = prompt; S.ablated = null;
    if (!S.picked) ({ layer: S.layer, head: S.head } = run.start);
    drawAll();
    const n = run.ids.length;
    setState("ready", `${n} token${n === 1 ? "" : "s"}, computed in ${run.seconds.toFixed(2)} s`);
    document.body.dataset.prompt = prompt;
  } catch (e) {
    if (e.name !== "AbortError") setState("error", e.message);
  } finally {
    if (S.pending === pending) S.pending = null;
  }
}

function drawAll() {
  drawTokens(); drawEmbeddings(); drawHeads(); drawPattern(); drawAblation(); drawNext();
  drawLens();
}

// -- 1. tokens ---------------------------------------------------------------------------

function drawTokens() {
  const box = $("tokens");
  box.textContent = "";
  S.run.pieces.forEach((piece, i) => {
    const t = el("span", piece, box, "tok");
    el("small", String(S.run.ids[i]), t);
    t.title = `position ${i}, id ${S.run.ids[i]}`;
  });
}

// -- 2. embeddings -------------------------------------------------------------------------

function diverging(v, scale) {  // blue below 0, white at 0, red above, full at +-scale
  const a = Math.min(1, Math.abs(v) / scale);
  const [r, g, b] = v < 0 ? [33, 102, 172] : [178, 24, 43];
  const mix = c => Math.round(255 + (c - 255) * a);
  return `rgb(${mix(r)},${mix(g)},${mix(b)})`;
}

function drawEmbeddings() {
  const { vectors, nearest } = S.run.embeddings;
  const width = vectors[0].length, slider = $("dims");
  slider.max = Math.max(0, width - DIMS);
  const d0 = Math.min(+slider.value, +slider.max), shown = Math.min(DIMS, width);
  $("dims-value").textContent = `${d0} (dimensions ${d0} to ${d0 + shown - 1})`;
  $("dims-shown").textContent = `${shown} of the ${width} numbers`;
  let scale = 1e-9;
  vectors.forEach(v => { for (let d = d0; d < d0 + shown; d++) scale = Math.max(scale, Math.abs(v[d])); });
  const table = $("embeddings");
  table.textContent = "";
  const head = el("tr", null, el("thead", null, table));
  el("th", "token", head, "piece");
  for (let d = d0; d < d0 + shown; d++) el("th", `dim ${d}`, head);
  el("th", `nearest tokens (cosine)`, head, "piece");
  const body = el("tbody", null, table);
  vectors.forEach((v, i) => {
    const tr = el("tr", null, body);
    el("td", S.run.pieces[i], tr, "piece");
    for (let d = d0; d < d0 + shown; d++) {
      const td = el("td", v[d].toFixed(3), tr);
      td.style.background = diverging(v[d], scale);
      td.title = `${S.run.pieces[i]}, dimension ${d}: ${v[d]}`;
    }
    const near = el("td", null, tr, "near");
    nearest[i].forEach(([piece, id, cos]) => {
      el("span", `${piece} ${cos.toFixed(2)}`, near).title = `id ${id}, cosine ${cos}`;
    });
  });
  $("embedding-scale").textContent =
    `Colour: blue below 0, white at 0, red above; the strongest colour is ±${scale.toFixed(3)}, ` +
    "the largest value on screen.";
}
$("dims").addEventListener("input", () => { if (S.run) drawEmbeddings(); });

// -- 3. attention --------------------------------------------------------------------------

function colour(w) {  // viridis on the square root of the weight
  const x = Math.sqrt(Math.max(0, Math.min(1, w))) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2), f = x - i;
  const a = parseInt(VIRIDIS[i].slice(1), 16), b = parseInt(VIRIDIS[i + 1].slice(1), 16);
  const mix = s => Math.round(((a >> s) & 255) * (1 - f) + ((b >> s) & 255) * f);
  return `rgb(${mix(16)},${mix(8)},${mix(0)})`;
}

function drawHeads() {
  const table = $("heads"), T = S.run.ids.length, cell = Math.max(1, Math.floor(40 / T));
  table.textContent = "";
  const top = el("tr", null, table);
  el("th", "", top);
  for (let h = 0; h < S.info.n_head; h++) el("th", `head ${h}`, top);
  S.run.patterns.forEach((heads, l) => {
    const tr = el("tr", null, table);
    el("th", `layer ${l}`, tr);
    heads.forEach((pat, h) => {
      const c = el("canvas", null, el("td", null, tr));
      c.width = c.height = T * cell;
      c.dataset.layer = l; c.dataset.head = h;
      c.title = `layer ${l}, head ${h}: on average ${(100 * S.run.scores[l][h]).toFixed(0)}% ` +
        "of a token's attention on one other token (not the first, not itself)";
      const g = c.getContext("2d");
      for (let q = 0; q < T; q++) for (let k = 0; k <= q; k++) {
        g.fillStyle = colour(pat[q][k]); g.fillRect(k * cell, q * cell, cell, cell);
      }
      c.onclick = () => { S.layer = l; S.head = h; S.picked = true; drawPattern(); markHeads(); };
    });
  });
  markHeads();
  const on = table.querySelector("canvas.on"), box = $("heads-box");
  if (!S.picked && on) {  // scroll the grid to the head the page opens on
    const y = on.getBoundingClientRect().top - box.getBoundingClientRect().top;
    box.scrollTop += y - box.clientHeight / 2;
  }
}

function markHeads() {
  document.querySelectorAll("#heads canvas").forEach(c => {
    const l = +c.dataset.layer, h = +c.dataset.head;
    c.classList.toggle("on", l === S.layer && h === S.head);
    c.classList.toggle("off", S.ablated !== null && l === S.ablated.layer && h === S.ablated.head);
  });
}

function drawPattern() {
  const { pieces } = S.run, T = pieces.length, pat = S.run.patterns[S.layer][S.head];
  $("pattern-title").textContent = `layer ${S.layer}, head ${S.head}`;
  $("ablate").textContent = `Switch off layer ${S.layer} head ${S.head}`;
  const table = $("pattern");
  table.textContent = "";
  table.style.setProperty("--cell", `${Math.max(8, Math.min(22, Math.floor(640 / T)))}px`);
  const head = el("tr", null, el("thead", null, table));
  el("th", "", head);
  pieces.forEach((p, k) => el("th", `${p} ${k}`, head));
  const body = el("tbody", null, table);
  for (let q = 0; q < T; q++) {
    const tr = el("tr", null, body);
    el("th", `${pieces[q]} ${q}`, tr);
    for (let k = 0; k < T; k++) {
      const td = el("td", k <= q && T <= 24 ? String(Math.round(100 * pat[q][k])) : "", tr);
      td.dataset.q = q; td.dataset.k = k;
      if (k > q) { td.className = "masked"; continue; }
      td.style.background = colour(pat[q][k]);
      td.style.color = Math.sqrt(pat[q][k]) > 0.6 ? "#222" : "#eee";
    }
  }
  $("pattern-info").textContent = "hover a cell for its weight";
}

$("pattern").addEventListener("mouseover", e => {
  const td = e.target.closest("td");
  if (!td) return;
  const q = +td.dataset.q, k = +td.dataset.k, p = S.run.pieces;
  $("pattern-info").textContent = k > q
    ? `${p[q]} (${q}) cannot see the later ${p[k]} (${k})`
    : `${p[q]} (${q}) attends to ${p[k]} (${k}) with weight ` +
      S.run.patterns[S.layer][S.head][q][k].toFixed(4);
});

(function legend() {  // the colour scale, with ticks at the weights they stand for
  const g = $("legend").getContext("2d"), left = 10, w = 320;
  for (let x = 0; x < w; x++) { g.fillStyle = colour((x / w) ** 2); g.fillRect(left + x, 0, 1, 16); }
  g.fillStyle = "#222"; g.font = "11px sans-serif"; g.textAlign = "center";
  [0, 0.01, 0.05, 0.1, 0.25, 0.5, 1].forEach(v => {
    const x = left + w * Math.sqrt(v);
    g.fillRect(x, 16, 1, 4); g.fillText(String(v), x, 32);
  });
})();

// -- switching a head off ----------------------------------------------------------------

$("ablate").addEventListener("click", async () => {
  const asked = { prompt: S.prompt, layer: S.layer, head: S.head };
  setState("busy", `switching off layer ${asked.layer} head ${asked.head}…`);
  try {
    const ablated = await api("/lab/api/ablate", asked);
    if (asked.prompt !== S.prompt) return;  // the prompt changed meanwhile
    S.ablated = ablated;
    drawAblation(); drawNext(); markHeads();
    setState("ready", `layer ${ablated.layer} head ${ablated.head} switched off, computed in ` +
      `${ablated.seconds.toFixed(2)} s`);
    document.body.dataset.ablated = `${ablated.layer}.${ablated.head}`;
  } catch (e) {
    setState("error", e.message);
  }
});

$("restore").addEventListener("click", () => {
  S.ablated = null;
  drawAblation(); drawNext(); markHeads();
});

function drawAblation() {
  const A = S.ablated, summary = $("ablation-summary");
  $("restore").hidden = A === null;
  if (A === null) {
    summary.textContent = "Switching a head off sets its output (z, the mix of values it " +
      "read) to zero, as if the head were not there; the next-token probabilities below " +
      "then show what it was doing for this prompt.";
    delete document.body.dataset.ablated;
    return;
  }
  const T = temperature(), [id, piece] = S.run.next.top[0];
  const before = softmax(S.run.next.logits, T)[id], after = softmax(A.next.logits, T)[id];
  const [newId, newPiece] = A.next.top[0];
  summary.textContent = `Without layer ${A.layer} head ${A.head}, ${piece} goes from ` +
    `${percent(before)} to ${percent(after)}` +
    (newId === id ? "." : `, and the top token is now ${newPiece}.`);
}

// -- 4. next token -------------------------------------------------------------------------

function temperature() { return +$("temperature").value; }

function softmax(logits, T) {  // probabilities at temperature T; T = 0: the top token alone
  let top = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[top]) top = i;
  const p = new Float64Array(logits.length);
  if (T === 0) { p[top] = 1; return p; }
  const m = logits[top];
  let sum = 0;
  for (let i = 0; i < logits.length; i++) { p[i] = Math.exp((logits[i] - m) / T); sum += p[i]; }
  for (let i = 0; i < p.length; i++) p[i] /= sum;
  return p;
}

function percent(p) { return `${(100 * p).toFixed(2)}%`; }

function drawNext() {
  const T = temperature(), probs = softmax(S.run.next.logits, T);
  const after = S.ablated ? softmax(S.ablated.next.logits, T) : null;
  $("temperature-value").textContent = T === 0 ? "0 (greedy)" : T.toFixed(2);
  const table = $("next");
  table.textContent = "";
  const head = el("tr", null, table);
  ["rank", "token", "id", "logit", "probability"].forEach(t => el("th", t, head));
  if (after) ["switched off", "change"].forEach(t => el("th", t, head));
  el("th", "", head);
  S.run.next.top.slice(0, LISTED).forEach(([id, piece], r) => {
    const tr = el("tr", null, table);
    tr.dataset.id = id;
    el("td", String(r + 1), tr, "num");
    el("td", piece, tr, "piece");
    el("td", String(id), tr, "num");
    el("td", S.run.next.logits[id].toFixed(3), tr, "num");
    el("td", percent(probs[id]), tr, "num prob");
    if (after) {
      el("td", percent(after[id]), tr, "num after");
      const change = 100 * (after[id] - probs[id]);
      el("td", `${change >= 0 ? "+" : ""}${change.toFixed(2)}`, tr, "num");
    }
    const bars = el("td", null, tr, "bars");
    el("div", null, bars, "bar").style.width = `${100 * probs[id]}%`;
    if (after) el("div", null, bars, "bar after").style.width = `${100 * after[id]}%`;
  });
}
$("temperature").addEventListener("input", () => { if (S.run) { drawNext(); drawAblation(); } });

// -- 5. logit lens -------------------------------------------------------------------------

function drawLens() {
  const { pieces, lens } = S.run, n = lens.pieces.length - 1, table = $("lens");
  table.textContent = "";
  const head = el("tr", null, table);
  el("th", "after layer", head);
  pieces.forEach((p, t) => el("th", `${p} ${t}`, head));
  lens.pieces.forEach((row, l) => {
    const tr = el("tr", null, table);
    el("th", l === 0 ? "0 (embeddings)" : l === n ? `${l} (output)` : String(l), tr);
    row.forEach((piece, t) => {
      const td = el("td", piece, tr), p = lens.probs[l][t];
      td.style.background = `rgba(31,119,180,${p})`;
      td.style.color = p > 0.5 ? "#fff" : "#222";
      td.title = `after ${l} layers, at ${pieces[t]} (${t}): ${piece} with probability ${p.toFixed(4)}`;
    });
  });
}

start();
