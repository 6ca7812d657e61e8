// tallow playground: plain JavaScript, no build step, nothing from a CDN.
// Every request goes through api(): it sends the API key it was given
// (Authorization: Bearer) and, when a request is answered 401, asks for a
// key and tries once more. Errors are shown as the server words them
// ({"error": {"message"}}), e.g. the 503 naming the setting of a model that
// is not configured.
"use strict";

const BASE = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const KEY_STORE = "tallow-api-key";
const $ = (id) => document.getElementById(id);

let apiKey = sessionStorage.getItem(KEY_STORE) || "";

function showKeyState() {
  $("key-state").textContent = apiKey ? "API key set" : "no API key";
}

function askForKey(reason) {
  // Resolves with the key typed in, or null when the dialog is cancelled.
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-reason").textContent = reason;
    $("key-input").value = apiKey;
    const done = (key) => {
      $("key-form").onsubmit = null;
      $("key-cancel").onclick = null;
      dialog.close();
      resolve(key);
    };
    $("key-form").onsubmit = (ev) => {
      ev.preventDefault();
      apiKey = $("key-input").value.trim();
      if (apiKey) sessionStorage.setItem(KEY_STORE, apiKey); else sessionStorage.removeItem(KEY_STORE);
      showKeyState();
      done(apiKey || null);
    };
    $("key-cancel").onclick = () => done(null);
    dialog.showModal();
    $("key-input").focus();
  });
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorMessage(resp) {
  const text = await resp.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return body.error.message;
    if (body && body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) { /* not JSON */ }
  return text || resp.statusText;
}

// fetch() with the key; on 401 asks for a key and retries once. Returns the
// Response when it is ok, throws ApiError(status, server's message) otherwise.
async function api(path, options = {}, retried = false) {
  const headers = new Headers(options.headers || {});
  if (apiKey) headers.set("Authorization", "Bearer " + apiKey);
  const resp = await fetch(BASE + path, { ...options, headers });
  if (resp.ok) return resp;
  const message = await errorMessage(resp);
  if ((resp.status === 401 || resp.status === 403) && !retried) {
    const key = await askForKey(`${resp.status}: ${message}`);
    if (key) return api(path, options, true);
  }
  throw new ApiError(resp.status, message);
}

async function postJSON(path, body, options = {}) {
  const resp = await api(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), ...options,
  });
  return resp.json();
}

// -- panel helpers -------------------------------------------------------------------------

function panelError(panel, err) {
  const box = panel.querySelector(".error");
  if (!err) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.hidden = false;
  box.textContent = err instanceof ApiError ? `${err.status}: ${err.message}` : String(err.message || err);
}

function onSubmit(formId, handler) {
  const form = $(formId);
  const panel = form.closest(".panel");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    panelError(panel, null);
    panel.classList.add("busy");
    try {
      await handler();
    } catch (err) {
      panelError(panel, err);
    } finally {
      panel.classList.remove("busy");
    }
  });
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const fmt = (x, d = 4) => (typeof x === "number" ? x.toFixed(d) : String(x));
const snippet = (s, n = 220) => { s = s.replace(/\s+/g, " ").trim(); return s.length > n ? s.slice(0, n) + "…" : s; };

// -- search --------------------------------------------------------------------------------

onSubmit("search-form", async () => {
  let filter = null;
  const raw = $("search-filter").value.trim();
  if (raw) {
    try { filter = JSON.parse(raw); } catch (e) { throw new Error("filter is not valid JSON: " + e.message); }
  }
  const category = $("search-category").value.trim();
  if (category) filter = filter ? { must: [filter, { category }] } : { category };
  const body = { query: $("search-query").value, k: Number($("search-k").value) || 5, hybrid: $("search-hybrid").checked };
  if (filter) body.filter = filter;
  const out = await postJSON("v1/search", body);
  $("search-meta").textContent = `${out.hits.length} hits in ${fmt(out.took_ms, 1)} ms` + (body.hybrid ? " (hybrid)" : "");
  const list = $("search-results");
  list.replaceChildren(...out.hits.map((h) => el("li", { class: "hit" },
    el("div", { class: "hit-head" }, el("b", {}, h.title || h.doc_id), " ",
      el("span", { class: "score" }, fmt(h.score)), " ", el("span", { class: "tag" }, h.category || "")),
    el("div", { class: "hit-text" }, snippet(h.text)))));
});

// -- RAG -----------------------------------------------------------------------------------

onSubmit("rag-form", async () => {
  const out = await postJSON("v1/rag", {
    question: $("rag-question").value, k: Number($("rag-k").value) || 4, max_tokens: Number($("rag-max-tokens").value) || 32,
  });
  // without a generator the server answers with the closest retrieved sentences
  $("rag-answer").textContent = (out.mode === "extractive" ? "(extractive, no generator) " : "") + out.answer;
  $("rag-sources").replaceChildren(...out.sources.map((s) => el("li", { class: "hit" },
    el("div", { class: "hit-head" }, el("b", {}, s.title || s.doc_id), " ", el("span", { class: "score" }, fmt(s.score)),
      s.trimmed ? el("span", { class: "tag" }, "trimmed") : ""),
    el("div", { class: "hit-text" }, snippet(s.text || "")))));
});

// -- classify ------------------------------------------------------------------------------

onSubmit("classify-form", async () => {
  const lines = $("classify-input").value.split("\n").map((s) => s.trim()).filter(Boolean);
  if (!lines.length) throw new Error("type at least one line of text");
  const out = await postJSON("v1/classify", { input: lines });
  $("classify-results").replaceChildren(
    el("tr", {}, el("th", {}, "text"), el("th", {}, "label"), el("th", {}, "score")),
    ...out.data.map((row) => el("tr", { class: "row" }, el("td", {}, lines[row.index]),
      el("td", { class: "label" }, row.label), el("td", {}, fmt(row.score)))));
});

// -- server-sent events ---------------------------------------------------------------------

// Reads a stream of server-sent events whose data are JSON chunks (OpenAI's
// format, ending with "data: [DONE]"), calling onChunk(chunk) for each. A
// failure after the 200 was sent comes as an {"error": ...} chunk: thrown.
async function readSSE(resp, onChunk) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.code || 500, chunk.error.message);
        onChunk(chunk);
      }
    }
  }
}

// -- streaming generation (SSE from /v1/completions) ---------------------------------------

let generation = null;

onSubmit("generate-form", async () => {
  const output = $("generate-output");
  output.textContent = "";
  $("generate-meta").textContent = "";
  const body = {
    prompt: $("generate-prompt").value, max_tokens: Number($("generate-max-tokens").value) || 32,
    temperature: Number($("generate-temperature").value), stream: true, stream_options: { include_usage: true },
  };
  const seed = $("generate-seed").value.trim();
  if (seed) body.seed = Number(seed);
  generation = new AbortController();
  $("generate-stop").disabled = false;
  const t0 = performance.now();
  let firstToken = null;
  let usage = null;
  try {
    const resp = await api("v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal: generation.signal,
    });
    await readSSE(resp, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.text && firstToken === null) firstToken = performance.now() - t0;
        output.textContent += choice.text || "";
      }
    });
    const total = performance.now() - t0;
    $("generate-meta").textContent = `done in ${fmt(total, 0)} ms` +
      (firstToken !== null ? `, first token after ${fmt(firstToken, 0)} ms` : "") +
      (usage ? `, ${usage.completion_tokens} tokens` : "");
    output.dataset.done = "1";
  } catch (err) {
    if (err.name === "AbortError") { $("generate-meta").textContent = "stopped"; return; }
    throw err;
  } finally {
    $("generate-stop").disabled = true;
    generation = null;
  }
});

$("generate-stop").addEventListener("click", () => generation && generation.abort());

// -- chat (SSE from /v1/chat/completions) --------------------------------------------------

// The conversation so far (user and assistant turns); the system message is
// read from its field at each turn. The server renders it with the model's
// own chat template.
let chatHistory = [];
let chatting = null;

function chatTurn(role, text) {
  const turn = el("div", { class: "turn " + role }, el("span", { class: "role" }, role), el("span", { class: "text" }, text));
  $("chat-log").append(turn);
  return turn;
}

onSubmit("chat-form", async () => {
  const text = $("chat-input").value.trim();
  if (!text) throw new Error("type a message");
  const system = $("chat-system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...chatHistory, { role: "user", content: text }];
  const body = {
    messages, max_tokens: Number($("chat-max-tokens").value) || 128, temperature: Number($("chat-temperature").value),
    stream: true, stream_options: { include_usage: true },
  };
  $("chat-meta").textContent = "";
  const asked = chatTurn("user", text);
  const reply = chatTurn("assistant", "");
  const out = reply.querySelector(".text");
  $("chat-input").value = "";
  chatting = new AbortController();
  $("chat-stop").disabled = false;
  const t0 = performance.now();
  let finish = null;
  let usage = null;
  try {
    const resp = await api("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal: chatting.signal,
    });
    await readSSE(resp, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        out.textContent += (choice.delta && choice.delta.content) || "";
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
    chatHistory.push({ role: "user", content: text }, { role: "assistant", content: out.textContent });
    $("chat-meta").textContent = `${finish === "length" ? "cut at max tokens" : "done"} in ${fmt(performance.now() - t0, 0)} ms` +
      (usage ? `, ${usage.prompt_tokens} prompt + ${usage.completion_tokens} reply tokens` : "");
    reply.dataset.done = "1";
  } catch (err) {
    // the turn did not happen: it leaves the conversation, its text goes back to the input
    asked.remove();
    reply.remove();
    $("chat-input").value = text;
    if (err.name === "AbortError") { $("chat-meta").textContent = "stopped"; return; }
    throw err;
  } finally {
    $("chat-stop").disabled = true;
    chatting = null;
  }
});

$("chat-stop").addEventListener("click", () => chatting && chatting.abort());
$("chat-clear").addEventListener("click", () => {
  if (chatting) chatting.abort();
  chatHistory = [];
  $("chat-log").replaceChildren();
  $("chat-meta").textContent = "";
});

// -- embeddings similarity -----------------------------------------------------------------

onSubmit("embeddings-form", async () => {
  const lines = $("embeddings-input").value.split("\n").map((s) => s.trim()).filter(Boolean);
  if (lines.length < 2) throw new Error("type at least two sentences, one per line");
  const out = await postJSON("v1/embeddings", { input: lines });
  const vecs = out.data.sort((a, b) => a.index - b.index).map((d) => d.embedding);
  const norm = (v) => Math.sqrt(v.reduce((s, x) => s + x * x, 0));
  const cos = (a, b) => a.reduce((s, x, i) => s + x * b[i], 0) / (norm(a) * norm(b));
  const head = el("tr", {}, el("th", {}, ""), ...lines.map((_, j) => el("th", {}, `#${j + 1}`)));
  const rows = lines.map((line, i) => el("tr", { class: "row" }, el("th", { class: "rowhead" }, `#${i + 1} ${snippet(line, 40)}`),
    ...lines.map((_, j) => {
      const c = cos(vecs[i], vecs[j]);
      return el("td", { class: "sim", style: `background: rgba(70, 130, 180, ${Math.max(0, c).toFixed(2)})` }, fmt(c, 3));
    })));
  $("embeddings-matrix").replaceChildren(head, ...rows);
});

// -- images --------------------------------------------------------------------------------

function chosenImage() {
  const file = $("images-file").files[0];
  if (!file) throw new Error("choose an image file first");
  return file;
}

$("images-file").addEventListener("change", () => {
  const file = $("images-file").files[0];
  const img = $("images-preview");
  if (file) { img.src = URL.createObjectURL(file); img.hidden = false; } else { img.hidden = true; }
});

onSubmit("images-form", async () => {
  const form = new FormData();
  form.append("image", chosenImage());
  form.append("k", String(Number($("images-k").value) || 5));
  const resp = await api("v1/images/search", { method: "POST", body: form });
  const out = await resp.json();
  const t = out.timing_ms || {};
  $("images-meta").textContent = `${out.hits.length} similar images` + (out.cached ? " (features from the cache)" : "");
  const stages = ["preprocess", "inference", "search", "metadata", "total"].filter((s) => s in t);
  $("images-timing").replaceChildren(el("tr", {}, ...stages.map((s) => el("th", {}, s))),
    el("tr", { class: "row" }, ...stages.map((s) => el("td", {}, `${fmt(t[s], 1)} ms`))));
  $("images-results").replaceChildren(...out.hits.map((h) => el("li", { class: "hit" },
    el("b", {}, h.id), " ", el("span", { class: "score" }, fmt(h.score)), " ",
    el("span", { class: "tag" }, `${h.width}×${h.height}`), " ",
    el("code", {}, JSON.stringify(h.payload || {})))));
});

$("images-add").addEventListener("click", async () => {
  const panel = $("panel-images");
  panelError(panel, null);
  try {
    const id = $("images-id").value.trim();
    if (!id) throw new Error("give the image an id");
    const form = new FormData();
    form.append("image", chosenImage());
    form.append("id", id);
    form.append("payload", JSON.stringify({ source: "playground" }));
    const out = await (await api("v1/images", { method: "POST", body: form })).json();
    $("images-meta").textContent = `stored ${out.id} (${out.width}×${out.height})`;
  } catch (err) {
    panelError(panel, err);
  }
});

// -- live metrics --------------------------------------------------------------------------

function parsePrometheus(text) {
  // {name: [{labels, value}]} for the samples (comments skipped)
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    // label values are quoted and may hold "}" (route="/v1/documents/{id}")
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{((?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    (m[3] || "").replace(/(\w+)="((?:[^"\\]|\\.)*)"/g, (_, k, v) => { labels[k] = v; });
    (out[m[1]] = out[m[1]] || []).push({ labels, value: Number(m[4]) });
  }
  return out;
}

function sum(samples, pred = () => true) {
  return (samples || []).filter((s) => pred(s.labels)).reduce((a, s) => a + s.value, 0);
}

async function refreshMetrics() {
  const panel = $("panel-metrics");
  try {
    const text = await (await api("metrics")).text();
    const m = parsePrometheus(text);
    const find = (suffix) => Object.keys(m).filter((k) => k.endsWith(suffix));
    const requests = find("requests_total").flatMap((k) => m[k]);
    const byRoute = {};
    for (const s of requests) {
      const route = s.labels.route || s.labels.path || s.labels.handler || "?";
      byRoute[route] = (byRoute[route] || 0) + s.value;
    }
    const queue = find("queue_depth").flatMap((k) => m[k]);
    const tokens = sum(find("tokens_generated_total").flatMap((k) => m[k]));
    const rejected = sum(find("rejected_total").flatMap((k) => m[k]));
    const hits = sum(find("cache_hits_total").flatMap((k) => m[k]));
    const misses = sum(find("cache_misses_total").flatMap((k) => m[k]));
    const rows = Object.entries(byRoute).sort((a, b) => b[1] - a[1]).map(([route, n]) =>
      el("tr", { class: "row" }, el("td", {}, route), el("td", {}, String(n))));
    $("metrics-table").replaceChildren(el("tr", {}, el("th", {}, "route"), el("th", {}, "requests")), ...rows);
    const lanes = queue.map((s) => `${s.labels.lane || "?"} ${s.value}`).join(", ");
    $("metrics-meta").textContent = `tokens generated ${tokens} · 429s ${rejected} · cache hits ${hits} / misses ${misses}` + (lanes ? ` · queue depth: ${lanes}` : "") +
      ` · updated ${new Date().toLocaleTimeString()}`;
    panelError(panel, null);
  } catch (err) {
    panelError(panel, err);
  }
}

let metricsTimer = null;
function scheduleMetrics() {
  clearInterval(metricsTimer);
  if ($("metrics-live").checked) metricsTimer = setInterval(refreshMetrics, 2000);
}
$("metrics-live").addEventListener("change", scheduleMetrics);

// -- readiness: which panels have their model ----------------------------------------------

const slotState = (name, slot) => `${name}: ${slot.status}${slot.error ? " — " + slot.error : ""}`;

// The note under a panel's title: its model's state when not ready. RAG needs
// only the embedder: without a generator /v1/rag answers extractively (as
// serve/routes_data.py decides, from the generator's status), with one it
// needs the generator ready.
function panelNote(panel, models) {
  const name = panel.dataset.model, slot = models[name];
  if (slot && slot.status !== "ready") {
    if (slot.status === "absent" && slot.error) return `no ${name} model: ${slot.error} (its requests answer 503)`;
    return slot.status === "absent" ? `no ${name} model is configured on this server (its requests answer 503)`
      : slotState(name, slot);
  }
  if (panel.id === "panel-rag") {
    const gen = models.generator;
    if (!gen || gen.status === "absent") {
      return "extractive: no generator is configured, so the answer is the retrieved sentences closest to the question";
    }
    if (gen.status !== "ready") return slotState("generator", gen) + " (generative answers wait for it)";
  }
  return null;
}

async function refreshStatus() {
  try {
    const resp = await fetch(BASE + "ready", { headers: apiKey ? { Authorization: "Bearer " + apiKey } : {} });
    const state = await resp.json();
    const models = state.models || {};
    const parts = Object.entries(models).map(([name, s]) => `${name}: ${s.status}`);
    $("status").textContent = (state.ready ? "ready" : "starting") + " · " + parts.join(" · ");
    $("status").className = "status " + (state.ready ? "ok" : "wait");
    for (const panel of document.querySelectorAll(".panel[data-model]")) {
      const slot = models[panel.dataset.model];
      panel.classList.toggle("absent", !!slot && slot.status === "absent");
      const text = panelNote(panel, models);
      let note = panel.querySelector(".note");
      if (text) {
        if (!note) { note = el("div", { class: "note" }); panel.querySelector("h2").after(note); }
        note.textContent = text;
      } else if (note) {
        note.remove();
      }
    }
    if (!state.ready) setTimeout(refreshStatus, 1000);
  } catch (err) {
    $("status").textContent = "cannot reach the server: " + err.message;
    setTimeout(refreshStatus, 2000);
  }
}

$("key-change").addEventListener("click", () => askForKey("The API key sent with every request (kept in this tab only)."));

showKeyState();
refreshStatus();
refreshMetrics();
scheduleMetrics();
