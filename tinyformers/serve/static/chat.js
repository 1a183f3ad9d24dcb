// The chat page: the conversation lives here and goes whole to the server's own
// /v1/chat/completions at every turn, whose answer streams back as server-sent events.
"use strict";

const S = {
  model: null,  // the id /v1/models gives
  messages: [],  // the conversation so far: [{role, content}], the system prompt first
  controller: null,  // the AbortController of the answer streaming now
};
const $ = id => document.getElementById(id);
const KEY = "tinyformers-key";  // sessionStorage, shared with the lab's page

function setState(state, message) {
  document.body.dataset.state = state;
  $("status").textContent = message ?? "";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorOf(response) {
  const body = await response.json().catch(() => null);
  return body?.error?.message ?? `${response.status} ${response.statusText}`;
}

// -- connecting --------------------------------------------------------------------------

async function connect() {
  let r;
  try {
    r = await fetch("v1/models", { headers: headers() });
  } catch (e) {
    return setState("error", `the server does not answer: ${e.message}`);
  }
  if (r.status === 401) {  // `serve --api-key`: ask for it
    $("key-form").hidden = false;
    $("api-key").focus();
    return setState("key", "this server wants its API key");
  }
  if (r.status === 503) {  // the model is loading
    setState("loading", "the model is loading…");
    return setTimeout(connect, 1000);
  }
  if (!r.ok) return setState("error", await errorOf(r));
  S.model = (await r.json()).data[0].id;
  $("key-form").hidden = true;
  $("model").textContent = S.model;
  setState("ready", "");
  $("input").focus();
}

$("key-form").addEventListener("submit", event => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("api-key").value.trim());
  connect();
});

// -- the request -------------------------------------------------------------------------

// A stop line's escapes, as `tinyformers generate --stop` reads them.
function unescape(line) {
  return line.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]);
}

function settings() {
  const body = {};
  const number = (id, name) => {
    const value = $(id).value.trim();
    if (value !== "") body[name] = Number(value);
  };
  number("temperature", "temperature");
  number("top-p", "top_p");
  number("max-tokens", "max_tokens");
  const stops = $("stop-strings").value.split("\n").filter(s => s !== "").map(unescape);
  if (stops.length) body.stop = stops;
  return body;
}

// -- the conversation --------------------------------------------------------------------

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;  // text, never HTML
  div.append(label, content);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return content;
}

async function send(text) {
  if (!S.messages.length && $("system").value.trim()) {
    S.messages.push({ role: "system", content: $("system").value });
    bubble("system", $("system").value);
  }
  S.messages.push({ role: "user", content: text });
  const userBubble = bubble("user", text).parentElement;
  const answer = bubble("assistant", "");
  S.controller = new AbortController();
  busy(true);
  setState("generating", "…");
  const started = performance.now();
  let usage = null;
  try {
    const r = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: S.controller.signal,
      body: JSON.stringify({
        model: S.model, messages: S.messages, stream: true,
        stream_options: { include_usage: true }, ...settings(),
      }),
    });
    if (!r.ok) throw new Error(await errorOf(r));
    for await (const event of events(r.body)) {
      if (event.error) throw new Error(event.error.message);
      const delta = event.choices?.[0]?.delta?.content;
      if (delta) answer.textContent += delta;
      if (event.usage) usage = event.usage;
    }
  } catch (e) {
    if (e.name !== "AbortError") {  // Stop keeps what came; an error takes the turn back
      S.messages.pop();
      userBubble.remove();
      answer.parentElement.remove();
      $("input").value = text;
      busy(false);
      return setState("error", e.message);
    }
  }
  S.messages.push({ role: "assistant", content: answer.textContent });
  busy(false);
  setState("ready", usage ? stats(usage, performance.now() - started) : "stopped");
}

// The JSON of each `data:` event of a server-sent event stream, until [DONE].
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).replace(/^data: /, "");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function stats(usage, ms) {
  const rate = usage.completion_tokens / (ms / 1000);
  return `${usage.prompt_tokens} prompt tokens, ${usage.completion_tokens} generated ` +
    `in ${(ms / 1000).toFixed(1)} s (${rate.toFixed(1)} tok/s)`;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("new").disabled = on;
}

$("composer").addEventListener("submit", event => {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || $("send").disabled) return;  // nothing typed, or an answer streams
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", event => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => S.controller?.abort());

$("new").addEventListener("click", () => {
  S.messages = [];
  $("messages").replaceChildren();
  setState("ready", "");
});

connect();
