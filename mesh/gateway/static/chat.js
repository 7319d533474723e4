// The chat: a multi-turn conversation streamed from /v1/chat/completions over SSE.

import { apiFetch, apiJson, errorMessage, events, h, settings } from "./api.js";
import { renderMarkdown } from "./md.js";
import { describeRoute, knowsNodes, learnNodes, noteRoute } from "./mesh-state.js";

const $ = (id) => document.getElementById(id);

const state = {
  history: [], // [{role, content}] sent with every request (the system prompt is added on top)
  controller: null, // AbortController of the answer being streamed
  conversation: 0, // bumped by "New chat", so that an answer still ending belongs to the old one
};

// ---------------------------------------------------------------- SSE

/** Yields the data payloads of an SSE body (one string per event). */
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = done ? "" : lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        } // comments (":...") and other fields are ignored
      }
      if (done) break;
    }
    if (data.length) yield data.join("\n");
  } finally {
    reader.releaseLock();
  }
}

// ---------------------------------------------------------------- DOM

function scrollBox() {
  return $("messages");
}

function nearBottom() {
  const box = scrollBox();
  return box.scrollHeight - box.scrollTop - box.clientHeight < 120;
}

function scrollToBottom() {
  const box = scrollBox();
  box.scrollTop = box.scrollHeight;
}

function addUser(text) {
  $("empty-state").hidden = true;
  const el = h("article", { class: "msg user" },
    h("div", { class: "bubble", dataset: { testid: "user-message" } }, text));
  scrollBox().append(el);
  scrollToBottom();
  return el;
}

function addAssistant() {
  const content = h("div", { class: "content md pending", dataset: { testid: "assistant-message" } });
  const routeEl = h("span", { class: "route", dataset: { testid: "route" }, hidden: true });
  const stats = h("span", { class: "stats" });
  const status = h("span", { class: "status" });
  const meta = h("div", { class: "meta" }, routeEl, stats, status);
  const el = h("article", { class: "msg assistant" },
    h("div", { class: "avatar", "aria-hidden": "true" }, h("span", {}, "E")),
    h("div", { class: "body" }, content, meta));
  scrollBox().append(el);
  scrollToBottom();

  let text = "";
  let frame = 0;
  const paint = () => {
    frame = 0;
    const stick = nearBottom();
    content.innerHTML = renderMarkdown(text);
    if (stick) scrollToBottom();
  };
  return {
    el,
    append(delta) {
      text += delta;
      content.classList.remove("pending");
      content.classList.add("streaming");
      if (!frame) frame = requestAnimationFrame(paint);
    },
    get text() { return text; },
    setRoute(header) {
      const route = describeRoute(header);
      if (!route) return;
      routeEl.dataset.header = header;
      paintRoute(routeEl);
      learnNamesOf(route);
    },
    finish({ stopped, error, stats: statsText }) {
      if (frame) cancelAnimationFrame(frame);
      paint();
      content.classList.remove("pending", "streaming");
      stats.textContent = statsText || "";
      if (error) {
        el.classList.add("failed");
        content.append(h("div", { class: "error", role: "alert", dataset: { testid: "chat-error" } }, error));
      } else if (stopped) {
        status.textContent = "stopped";
        status.className = "status stopped";
      } else if (!text.trim()) {
        content.append(h("span", { class: "muted" }, "(empty answer)"));
      }
      if (nearBottom()) scrollToBottom();
    },
  };
}

/** The footer that says where an answer came from, by node name (the header has the ids). */
function paintRoute(el) {
  const header = el.dataset.header || "";
  const route = describeRoute(header);
  if (!route) return;
  el.hidden = false;
  el.dataset.target = route.target;
  el.title = `X-EdgeMesh-Route: ${header}`;
  el.textContent = route.target === "cloud" ? "via cloud" : `via ${route.label}`;
}

/** A route through nodes this page has not seen yet (a new node, a re-plan): ask the gateway
 * for their names; the footers repaint when the names arrive. */
async function learnNamesOf(route) {
  if (!route || knowsNodes(route.nodes)) return;
  try {
    const view = await apiJson("api/cluster");
    learnNodes(view.nodes, view);
  } catch {
    /* the footer keeps the short ids; the cluster poll will learn the names */
  }
}

function repaintRoutes() {
  for (const el of scrollBox().querySelectorAll("[data-testid=route][data-header]")) paintRoute(el);
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("stop").disabled = !busy;
  $("composer").classList.toggle("busy", busy);
  document.body.classList.toggle("streaming", busy);
}

function autosize() {
  const input = $("chat-input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 220)}px`;
}

function statsLine(tokens, startedAt, firstAt, exact) {
  if (!tokens || firstAt === null) return "";
  const total = (performance.now() - startedAt) / 1000;
  const decode = (performance.now() - firstAt) / 1000;
  const rate = tokens > 1 && decode > 0 ? ` · ${((tokens - 1) / decode).toFixed(1)} tok/s` : "";
  return `${exact ? "" : "~"}${tokens} token${tokens === 1 ? "" : "s"} · ${total.toFixed(1)} s${rate}`;
}

// ---------------------------------------------------------------- a turn

function requestBody() {
  const body = { messages: [], stream: true, stream_options: { include_usage: true } };
  const system = settings.system.trim();
  if (system) body.messages.push({ role: "system", content: system });
  body.messages.push(...state.history);
  const model = $("model-picker").value;
  if (model) body.model = model;
  const maxTokens = parseInt(settings.maxTokens, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const temperature = parseFloat(settings.temperature);
  if (Number.isFinite(temperature)) body.temperature = Math.min(2, Math.max(0, temperature));
  return body;
}

async function send(text) {
  if (state.controller || !text.trim()) return;
  const controller = new AbortController();
  const conversation = state.conversation;
  state.controller = controller;
  setBusy(true);
  const userEl = addUser(text);
  state.history.push({ role: "user", content: text });
  const answer = addAssistant();

  const startedAt = performance.now();
  let firstAt = null;
  let chunks = 0;
  let usage = null;
  let error = null;
  let stopped = false;
  try {
    const response = await apiFetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    const route = response.headers.get("X-EdgeMesh-Route");
    if (route) {
      answer.setRoute(route);
      noteRoute(route);
    }
    if (!response.ok) {
      error = await errorMessage(response);
    } else if (!response.body) {
      error = "the browser cannot stream this response";
    } else {
      for await (const data of sseData(response.body)) {
        if (data.trim() === "[DONE]") break;
        let event;
        try {
          event = JSON.parse(data);
        } catch {
          continue; // not JSON: not ours to show
        }
        if (event.error) {
          error = String(event.error.message || JSON.stringify(event.error));
          continue;
        }
        if (event.usage) usage = event.usage;
        const choice = event.choices && event.choices[0];
        const delta = choice && ((choice.delta && choice.delta.content) || choice.text);
        if (delta) {
          if (firstAt === null) firstAt = performance.now();
          chunks += 1;
          answer.append(delta);
        }
      }
    }
  } catch (err) {
    if (controller.signal.aborted || (err && err.name === "AbortError")) stopped = true;
    else error = `could not reach the gateway: ${err && err.message ? err.message : err}`;
  } finally {
    state.controller = null;
  }

  const tokens = usage && Number.isFinite(usage.completion_tokens) ? usage.completion_tokens : chunks;
  answer.finish({ stopped, error, stats: statsLine(tokens, startedAt, firstAt, Boolean(usage)) });
  if (conversation !== state.conversation) {
    // "New chat" was clicked meanwhile: this turn is gone with the old conversation.
  } else if ((error || stopped) && !answer.text.trim()) {
    // Nothing was answered: take the turn back out of the conversation (and, after an error,
    // put the text back into the input so that it can be sent again).
    state.history.pop();
    userEl.classList.add("failed");
    const input = $("chat-input");
    if (error && !input.value.trim()) {
      input.value = text;
      autosize();
    }
  } else {
    state.history.push({ role: "assistant", content: answer.text });
  }
  setBusy(false);
  if (!("ontouchstart" in window)) $("chat-input").focus();
}

export function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.conversation += 1;
  state.history = [];
  for (const el of [...scrollBox().querySelectorAll(".msg")]) el.remove();
  $("empty-state").hidden = false;
  $("chat-input").focus();
}

// ---------------------------------------------------------------- models

let shownModels = []; // the picker's models, with their provenance

export async function loadModels() {
  const picker = $("model-picker");
  let ids = [];
  try {
    const list = await apiJson("v1/models");
    ids = (list.data || []).filter((m) => m && m.id).map((m) => ({
      id: String(m.id), ready: m.ready !== false, provenance: m.provenance || null }));
  } catch {
    /* shown by the auth notice or the cluster status; the gateway's default model is used */
  }
  const wanted = picker.value || settings.model;
  picker.replaceChildren(...(ids.length
    ? ids.map((m) => h("option", { value: m.id }, m.ready ? m.id : `${m.id} (not ready)`))
    : [h("option", { value: "" }, "default model")]));
  if (ids.some((m) => m.id === wanted)) picker.value = wanted;
  picker.disabled = ids.length <= 1;
  picker.title = picker.value || "the gateway's model";
  shownModels = ids;
  showProvenance(ids.find((m) => m.id === picker.value) || ids[0]);
}

// What the model's GGUF file says about its origin, and its sha256. The values come from
// the file (untrusted): they are set as text, never as HTML, and cut short.
function provenanceText(p) {
  const cut = (v, n = 80) => { const t = String(v ?? ""); return t.length > n ? `${t.slice(0, n - 1)}…` : t; };
  const parts = [cut(p.name) || "unnamed model"];
  if (p.organization) parts.push(`by ${cut(p.organization)}`);
  parts.push(`licence ${cut(p.license) || "not stated"}`);
  if (p.sha256) parts.push(`sha256 ${String(p.sha256).slice(0, 12)}`);
  return parts.join(" · ");
}

function showProvenance(model) {
  const line = $("model-provenance");
  const p = model && model.provenance;
  line.hidden = !p;
  line.textContent = p ? provenanceText(p) : "";
  line.title = p ? `${provenanceText(p)}\nsha256 ${String(p.sha256 || "")}` : "";
}

// ---------------------------------------------------------------- wiring

export function initChat() {
  const input = $("chat-input");
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value;
    if (!text.trim() || state.controller) return;
    input.value = "";
    autosize();
    send(text);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    } else if (event.key === "Escape" && state.controller) {
      stop();
    }
  });
  input.addEventListener("input", autosize);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("model-picker").addEventListener("change", (event) => {
    settings.model = event.target.value;
    event.target.title = event.target.value;
    showProvenance(shownModels.find((m) => m.id === event.target.value));
  });
  for (const chip of document.querySelectorAll("[data-prompt]")) {
    chip.addEventListener("click", () => {
      input.value = chip.dataset.prompt;
      $("composer").requestSubmit();
    });
  }
  scrollBox().addEventListener("click", async (event) => {
    const button = event.target.closest("[data-copy-code]");
    if (!button) return;
    const code = button.closest(".code-block").querySelector("code").textContent;
    try {
      await navigator.clipboard.writeText(code);
      button.textContent = "Copied";
    } catch {
      const range = document.createRange();
      range.selectNodeContents(button.closest(".code-block").querySelector("code"));
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      button.textContent = "Selected: press Ctrl+C";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1800);
  });
  events.addEventListener("settings-changed", loadModels);
  events.addEventListener("names", repaintRoutes);
  setBusy(false);
  loadModels();
}
