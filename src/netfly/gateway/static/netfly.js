// netfly's pages: the chat playground (body.chat) and the live status (body.status).
// Plain browser JavaScript, no build step; talks only to the gateway that served the page.
"use strict";

const TOKEN_KEY = "netfly.token";
const $ = (id) => document.getElementById(id);

// -- shared: the token, API calls, the notice line --------------------------------------------------

function setupToken(onChange) {
  const field = $("token");
  field.value = sessionStorage.getItem(TOKEN_KEY) || "";
  field.addEventListener("change", () => {
    sessionStorage.setItem(TOKEN_KEY, field.value.trim());
    onChange();
  });
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

// A failed call, in words a person can act on.
class ApiError extends Error {}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError("The gateway is not reachable: is netfly serve running? (" + error.message + ")");
  }
  if (response.ok) return response;
  throw new ApiError(await describeFailure(response));
}

async function describeFailure(response) {
  let message = "";
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || "";
  } catch (_) { /* not JSON */ }
  if (response.status === 401) {
    return "The gateway refused the token (401): enter the right token in the Token field. " + message;
  }
  return "The gateway answered " + response.status + ": " + (message || response.statusText);
}

function notice(text) {
  const box = $("notice");
  box.textContent = text || "";
  box.hidden = !text;
}

function seconds(value, digits = 2) {
  return value === null || value === undefined ? "–" : value.toFixed(digits) + " s";
}

// -- the chat page ---------------------------------------------------------------------------------

const chat = { messages: [], controller: null };

function startChat() {
  if (window.marked) marked.setOptions({ gfm: true, breaks: false });
  setupToken(loadModels);
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  $("new").addEventListener("click", newConversation);
  loadModels();
}

async function loadModels() {
  const select = $("model");
  try {
    const body = await (await api("/v1/models")).json();
    const chosen = select.value;
    select.replaceChildren(...body.data.map((model) => new Option(model.id, model.id)));
    if (chosen) select.value = chosen;
    notice("");
  } catch (error) {
    notice(error.message);
  }
}

function newConversation() {
  if (chat.controller) chat.controller.abort();
  chat.messages = [];
  $("conversation").replaceChildren();
  $("prompt").focus();
}

function addBubble(role, text) {
  const bubble = document.createElement("article");
  bubble.className = "message " + role;
  const body = document.createElement("div");
  body.className = "body";
  if (role === "user") body.textContent = text;
  bubble.append(body);
  $("conversation").append(bubble);
  bubble.scrollIntoView({ block: "end" });
  return bubble;
}

async function send() {
  const prompt = $("prompt").value;
  if (!prompt.trim() || chat.controller) return;
  $("prompt").value = "";
  chat.messages.push({ role: "user", content: prompt });
  addBubble("user", prompt);
  const answer = new Answer(addBubble("assistant"));
  chat.controller = new AbortController();
  setBusy(true);
  try {
    await streamAnswer(answer, chat.controller.signal);
    notice("");
  } catch (error) {
    if (error.name === "AbortError") answer.stopped();
    else answer.failed(error.message);
  } finally {
    chat.controller = null;
    setBusy(false);
    if (answer.text || answer.toolCalls.length) chat.messages.push(answer.message());
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function streamAnswer(answer, signal) {
  const request = {
    model: $("model").value || undefined, messages: chat.messages, stream: true,
    stream_options: { include_usage: true },
  };
  const response = await api("/v1/chat/completions", {
    method: "POST", signal, headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
  });
  answer.servedBy(response.headers.get("x-netfly-provider"), response.headers.get("x-netfly-attempts"));
  for await (const data of sseData(response.body.getReader())) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError("The upstream failed mid-answer: " + (chunk.error.message || "error"));
    answer.add(chunk);
  }
  answer.done();
}

// The data fields of a server-sent-events body, one per event (comment lines are skipped).
async function* sseData(reader) {
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      const data = lines.filter((line) => line.startsWith("data:")).map((line) => line.slice(5).replace(/^ /, ""));
      if (data.length) yield data.join("\n");
    }
  }
}

// One assistant answer being streamed: its text, reasoning, tool calls and figures.
class Answer {
  constructor(bubble) {
    this.bubble = bubble;
    this.body = bubble.querySelector(".body");
    this.text = "";
    this.reasoning = "";
    this.toolCalls = [];
    this.started = performance.now();
    this.firstAt = null;
    this.chunks = 0;
    this.usage = null;
    this.provider = null;
    this.attempts = null;
    this.pending = false;
    bubble.classList.add("streaming");
  }

  servedBy(provider, attempts) {
    this.provider = provider;
    this.attempts = attempts;
  }

  add(chunk) {
    if (chunk.usage) this.usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      if (choice.index !== 0) continue;
      const delta = choice.delta || {};
      const reasoning = delta.reasoning_content || delta.reasoning || "";
      if (delta.content || reasoning || delta.tool_calls) {
        if (this.firstAt === null) this.firstAt = performance.now();
        this.chunks += 1;
      }
      this.text += delta.content || "";
      this.reasoning += reasoning;
      for (const call of delta.tool_calls || []) this.addToolCall(call);
    }
    this.scheduleRender();
  }

  addToolCall(fragment) {
    const call = this.toolCalls[fragment.index || 0] ||= { id: "", type: "function", function: { name: "", arguments: "" } };
    if (fragment.id) call.id = fragment.id;
    if (fragment.function) {
      call.function.name += fragment.function.name || "";
      call.function.arguments += fragment.function.arguments || "";
    }
  }

  scheduleRender() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.render(); });
  }

  render() {
    const parts = [];
    if (this.reasoning) {
      const details = document.createElement("details");
      details.className = "reasoning";
      const summary = document.createElement("summary");
      summary.textContent = "Reasoning";
      const text = document.createElement("div");
      text.textContent = this.reasoning;
      details.append(summary, text);
      parts.push(details);
    }
    const content = document.createElement("div");
    content.className = "content";
    content.innerHTML = renderMarkdown(this.text);
    parts.push(content);
    for (const call of this.toolCalls) parts.push(toolCallView(call));
    const open = this.body.querySelector("details.reasoning[open]");
    this.body.replaceChildren(...parts);
    if (open && parts[0].tagName === "DETAILS") parts[0].open = true;
  }

  message() {
    const message = { role: "assistant", content: this.text || null };
    if (this.toolCalls.length) message.tool_calls = this.toolCalls;
    return message;
  }

  done() { this.finish(""); }
  stopped() { this.finish("stopped"); }

  failed(text) {
    this.finish("failed");
    const error = document.createElement("p");
    error.className = "error";
    error.textContent = text;
    this.bubble.append(error);
  }

  finish(state) {
    this.render();
    this.bubble.classList.remove("streaming");
    if (state) this.bubble.classList.add(state);
    const figures = document.createElement("footer");
    figures.className = "figures";
    figures.textContent = this.figures(state);
    this.bubble.append(figures);
  }

  figures(state) {
    const now = performance.now();
    const parts = [];
    if (state) parts.push(state);
    parts.push("TTFT " + (this.firstAt === null ? "–" : seconds((this.firstAt - this.started) / 1000)));
    const tokens = this.usage && this.usage.completion_tokens;
    const elapsed = this.firstAt === null ? 0 : (now - this.firstAt) / 1000;
    if (elapsed > 0) {
      const rate = (tokens || this.chunks) / elapsed;
      parts.push(rate.toFixed(1) + (tokens ? " tokens/s" : " chunks/s"));
    }
    if (this.provider) parts.push("provider " + this.provider);
    if (this.attempts) parts.push("attempts " + this.attempts);
    return parts.join(" · ");
  }
}

// Markdown to HTML that cannot run anything: marked renders, DOMPurify removes scripts and handlers.
function renderMarkdown(text) {
  if (!window.marked || !window.DOMPurify) {
    const escaped = document.createElement("pre");
    escaped.textContent = text;
    return escaped.outerHTML;
  }
  return DOMPurify.sanitize(marked.parse(text));
}

function toolCallView(call) {
  const box = document.createElement("div");
  box.className = "tool-call";
  const title = document.createElement("div");
  title.className = "tool-name";
  title.textContent = "tool call: " + call.function.name + (call.id ? "  (" + call.id + ")" : "");
  const args = document.createElement("pre");
  args.textContent = prettyJson(call.function.arguments);
  box.append(title, args);
  return box;
}

function prettyJson(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch (_) { return text; }
}

// -- the status page -------------------------------------------------------------------------------

const REFRESH_MS = 3000;

function startStatus() {
  setupToken(refreshStatus);
  refreshStatus();
  setInterval(refreshStatus, REFRESH_MS);
}

async function refreshStatus() {
  try {
    const status = await (await api("/v1/netfly/status")).json();
    showStatus(status);
    notice("");
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    notice(error.message);
    $("updated").textContent = "not updated since " + ($("updated").dataset.last || "the page loaded");
  }
}

function showStatus(status) {
  $("updated").dataset.last = new Date().toLocaleTimeString();
  const figures = [
    ["In flight", status.in_flight], ["Requests / min", status.requests_per_minute],
    ["Requests", status.requests_total], ["Up", Math.round(status.uptime) + " s"], ["Version", status.version],
  ];
  if (status.local) figures.push(["Local model", status.local.state + (status.local.reason ? ": " + status.local.reason : "")]);
  $("summary").replaceChildren(...figures.map(([name, value]) => figure(name, value)));
  $("providers").tBodies[0].replaceChildren(...status.providers.map(providerRow));
  $("window").textContent = "Error rate, TTFT and attempts: the last " + status.window_seconds + " s.";
}

function figure(name, value) {
  const box = document.createElement("div");
  const label = document.createElement("span");
  label.textContent = name;
  const number = document.createElement("strong");
  number.textContent = String(value);
  box.append(label, number);
  return box;
}

function providerRow(provider) {
  const row = document.createElement("tr");
  row.dataset.provider = provider.name;
  const circuit = provider.circuit || "no breaker";
  const rate = provider.error_rate === null ? "–" : Math.round(provider.error_rate * 100) + " %";
  const last = provider.last_error ? provider.last_error.message + " (" + provider.last_error.seconds_ago + " s ago)" : "–";
  const cells = [
    provider.name + (provider.router ? " (in " + provider.router + ")" : ""), circuit,
    seconds(provider.ttft_median, 3) + " / " + seconds(provider.ttft_last, 3), rate,
    String(provider.attempts), last,
  ];
  for (const text of cells) {
    const cell = document.createElement("td");
    cell.textContent = text;
    row.append(cell);
  }
  row.cells[1].className = "circuit " + circuit.replace(" ", "-");
  return row;
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.classList.contains("chat")) startChat();
  else if (document.body.classList.contains("status")) startStatus();
});
