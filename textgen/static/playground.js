// textgen playground: plain JavaScript, no build step, nothing loaded from elsewhere.
// Every call goes to this server's own API: /generate (stream: true), /v1/chat/completions (stream: true),
// /generate_background + /jobs/{id}/stream, /jobs, /stats. Errors are shown as the API states them.
"use strict";

const KEY_STORAGE = "textgen.apiKey";
const STATS_EVERY_MS = 1000;
const JOBS_EVERY_MS = 3000;
const QUEUE_POLL_MS = 1000;

const $ = (id) => document.getElementById(id);

// ----- API key (sessionStorage: this tab only) ----------------------------------------------------

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function showKeyPanel(message) {
  $("key-panel").hidden = false;
  if (message) $("key-status").textContent = message;
}

function setupKeyPanel() {
  if (apiKey()) {
    showKeyPanel("A key is set for this tab.");
    $("api-key").value = apiKey();
  }
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    $("key-status").textContent = key ? "Key saved for this tab." : "No key set.";
    needKey = false;
    refreshStats();
    refreshJobs();
  });
  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    $("api-key").value = "";
    $("key-status").textContent = "Key forgotten.";
  });
}

// ----- Errors, as the API states them -------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail, requestId, retryAfter) {
    super(detail);
    this.status = status;
    this.detail = detail;
    this.requestId = requestId;
    this.retryAfter = retryAfter;
  }

  describe() {
    const parts = [this.status ? `${this.status}: ${this.detail}` : this.detail];
    if (this.retryAfter) parts.push(`(Retry-After: ${this.retryAfter} s)`);
    if (this.requestId) parts.push(`(request id ${this.requestId})`);
    return parts.join(" ");
  }
}

function detailText(body) {
  if (!body || typeof body !== "object") return String(body ?? "");
  if (body.error && typeof body.error === "object") return body.error.message || JSON.stringify(body.error);
  const detail = body.detail;
  if (Array.isArray(detail)) {
    return detail.map((item) => `${(item.loc || []).slice(1).join(".") || "body"}: ${item.msg}`).join("; ");
  }
  return typeof detail === "string" ? detail : JSON.stringify(body);
}

async function errorFrom(response) {
  let body = null;
  const text = await response.text();
  try {
    body = JSON.parse(text);
  } catch {
    body = { detail: text || response.statusText };
  }
  const requestId = (body && body.request_id) || response.headers.get("x-request-id") || "";
  const error = new ApiError(response.status, detailText(body), requestId, response.headers.get("retry-after"));
  if (response.status === 401) {
    showKeyPanel("This server needs a valid API key: enter it above.");
    $("api-key").focus();
  }
  return error;
}

function showError(elementId, error) {
  const box = $(elementId);
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.hidden = false;
  box.textContent = error instanceof ApiError ? error.describe() : `Could not reach the server: ${error.message}`;
}

// ----- HTTP and Server-Sent Events ----------------------------------------------------------------

async function api(path, { method = "GET", body, signal } = {}) {
  const headers = authHeaders(body === undefined ? {} : { "Content-Type": "application/json" });
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await errorFrom(response);
  return response;
}

// Parses a text/event-stream body (any of the three line endings) into {event, data} records.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    for (;;) {
      const end = buffer.search(/\r\n\r\n|\n\n|\r\r/);
      if (end < 0) break;
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^(\r\n\r\n|\n\n|\r\r)/, "");
      let event = "message";
      const data = [];
      for (const line of block.split(/\r\n|\n|\r/)) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

function streamError(payload) {
  return new ApiError(payload.status || 0, detailText(payload), payload.request_id || "", null);
}

function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
}

function isAbort(error) {
  return error && error.name === "AbortError";
}

// ----- Generate tab --------------------------------------------------------------------------------

let generation = null; // {controller, startedAt, firstTokenAt, chunks}

function numberOrNull(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

function generationBody() {
  const body = {
    prompt: $("prompt").value,
    max_new_tokens: numberOrNull("max_new_tokens"),
    temperature: numberOrNull("temperature"),
    top_p: numberOrNull("top_p"),
    top_k: numberOrNull("top_k"),
    repetition_penalty: numberOrNull("repetition_penalty"),
    seed: numberOrNull("seed"),
    stop: $("stop").value.split("\n").filter((line) => line !== ""),
  };
  if (!body.stop.length) delete body.stop;
  const schema = $("json_schema").value.trim();
  if (schema) {
    // Not valid JSON: send it as it is, and the API's 422 says what is wrong.
    try {
      body.json_schema = JSON.parse(schema);
    } catch {
      body.json_schema = schema;
    }
  }
  if ($("ignore_eos").checked) body.ignore_eos = true;
  for (const key of Object.keys(body)) if (body[key] === null) delete body[key];
  return body;
}

function setGenerating(active) {
  $("generate").disabled = active;
  $("background").disabled = active;
  $("stop-button").disabled = !active;
  $("output").setAttribute("aria-busy", String(active));
}

function describeResult(done, clientTtft) {
  const timings = done.timings || {};
  const ttft = timings.time_to_first_token_s ?? clientTtft;
  const decodeSeconds = timings.total_s;
  const rate = decodeSeconds ? (done.completion_tokens / decodeSeconds).toFixed(1) : "–";
  return (
    `finish reason: ${done.finish_reason} · prompt tokens: ${done.prompt_tokens} · ` +
    `completion tokens: ${done.completion_tokens} · time to first token: ${formatSeconds(ttft)} · ` +
    `tokens/s: ${rate}`
  );
}

async function generate() {
  if (generation) return;
  const body = { ...generationBody(), stream: true };
  const output = $("output");
  output.textContent = "";
  $("result-meta").textContent = "";
  showError("generate-error", null);
  const controller = new AbortController();
  generation = { controller, startedAt: performance.now(), firstTokenAt: null, chunks: 0 };
  setGenerating(true);
  $("result-meta").textContent = "generating…";
  try {
    const response = await api("/generate", { method: "POST", body, signal: controller.signal });
    for await (const { event, data } of serverSentEvents(response)) {
      const payload = JSON.parse(data);
      if (event === "token") {
        if (generation.firstTokenAt === null) generation.firstTokenAt = performance.now();
        generation.chunks += 1;
        output.textContent += payload.text;
        output.scrollTop = output.scrollHeight;
      } else if (event === "done") {
        output.textContent = payload.generated_text;
        const clientTtft = generation.firstTokenAt === null ? null : (generation.firstTokenAt - generation.startedAt) / 1000;
        $("result-meta").textContent = describeResult(payload, clientTtft);
      } else if (event === "error") {
        throw streamError(payload);
      }
    }
  } catch (error) {
    if (isAbort(error)) {
      $("result-meta").textContent = `stopped after ${generation.chunks} chunk(s); the sequence left the batch`;
    } else {
      $("result-meta").textContent = "";
      showError("generate-error", error);
    }
  } finally {
    generation = null;
    setGenerating(false);
  }
}

function stopGeneration() {
  if (generation) generation.controller.abort();
}

async function runInBackground() {
  showError("generate-error", null);
  try {
    const response = await api("/generate_background", { method: "POST", body: generationBody() });
    const accepted = await response.json();
    selectTab("tab-jobs");
    followJob(accepted.job_id);
    refreshJobs();
  } catch (error) {
    showError("generate-error", error);
  }
}

// ----- Chat tab -------------------------------------------------------------------------------------

const conversation = [];
let chat = null; // {controller}

function appendChatMessage(role, content) {
  const item = document.createElement("li");
  item.className = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = content;
  item.append(who, text);
  $("chat-log").append(item);
  item.scrollIntoView({ block: "nearest" });
  return text;
}

function setChatting(active) {
  $("chat-send").disabled = active;
  $("chat-stop").disabled = !active;
}

async function sendChat() {
  if (chat) return;
  const content = $("chat-input").value.trim();
  if (!content) return;
  showError("chat-error", null);
  conversation.push({ role: "user", content });
  appendChatMessage("user", content);
  $("chat-input").value = "";
  const reply = appendChatMessage("assistant", "");
  const controller = new AbortController();
  chat = { controller };
  setChatting(true);
  $("chat-meta").textContent = "generating…";
  let finishReason = null;
  let usage = null;
  try {
    const body = {
      messages: conversation,
      max_tokens: numberOrNull("chat-max-tokens"),
      temperature: numberOrNull("chat-temperature"),
      stream: true,
      stream_options: { include_usage: true },
    };
    for (const key of Object.keys(body)) if (body[key] === null) delete body[key];
    const response = await api("/v1/chat/completions", { method: "POST", body, signal: controller.signal });
    for await (const { data } of serverSentEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw streamError(chunk);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) reply.textContent += choice.delta.content;
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    }
    conversation.push({ role: "assistant", content: reply.textContent });
    const tokens = usage ? ` · prompt tokens: ${usage.prompt_tokens} · completion tokens: ${usage.completion_tokens}` : "";
    $("chat-meta").textContent = `finish reason: ${finishReason}${tokens}`;
  } catch (error) {
    if (isAbort(error)) {
      conversation.push({ role: "assistant", content: reply.textContent });
      $("chat-meta").textContent = "stopped";
    } else {
      conversation.pop(); // the user's turn was not answered: let them resend it
      reply.parentElement.remove();
      $("chat-meta").textContent = "";
      showError("chat-error", error);
    }
  } finally {
    chat = null;
    setChatting(false);
  }
}

function clearChat() {
  if (chat) chat.controller.abort();
  conversation.length = 0;
  $("chat-log").replaceChildren();
  $("chat-meta").textContent = "";
  showError("chat-error", null);
}

// ----- Jobs tab: follow one job live, list recent ones ------------------------------------------------

let followed = null; // {jobId, controller}

function setBadge(element, state) {
  element.textContent = state;
  element.className = `badge ${state}`;
}

function describeQueue(queue) {
  if (!queue) return "–";
  const ahead = queue.position === 0 ? "next to start" : `${queue.position} job(s) ahead`;
  if (!queue.estimated_start_at) return `${ahead}; start time not estimated yet`;
  const seconds = Math.max(0, Math.round((new Date(queue.estimated_start_at) - Date.now()) / 1000));
  return `${ahead}; estimated start in ~${seconds} s`;
}

async function pollQueue(jobId, signal) {
  // The stream says when the state changes; position and estimated start come from GET /jobs/{id}.
  while (!signal.aborted && followed && followed.jobId === jobId) {
    try {
      const job = await (await api(`/jobs/${jobId}`, { signal })).json();
      if (job.state !== "queued") {
        $("job-queue").textContent = "–";
        return;
      }
      $("job-queue").textContent = describeQueue(job.queue);
    } catch (error) {
      if (!isAbort(error)) showError("jobs-error", error);
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, QUEUE_POLL_MS));
  }
}

async function followJob(jobId) {
  if (followed) followed.controller.abort();
  const controller = new AbortController();
  followed = { jobId, controller };
  showError("jobs-error", null);
  $("job-empty").hidden = true;
  $("job-details").hidden = false;
  $("job-output").hidden = false;
  $("job-id").textContent = jobId;
  $("job-output").textContent = "";
  $("job-meta").textContent = "";
  $("job-queue").textContent = "–";
  setBadge($("job-state"), "queued");
  pollQueue(jobId, controller.signal);
  try {
    const response = await api(`/jobs/${jobId}/stream`, { signal: controller.signal });
    for await (const { event, data } of serverSentEvents(response)) {
      const payload = JSON.parse(data);
      if (event === "state") {
        setBadge($("job-state"), payload.state);
        if (payload.state !== "queued") $("job-queue").textContent = "–";
        refreshJobs();
      } else if (event === "token") {
        $("job-output").textContent += payload.text;
      } else if (event === "done") {
        setBadge($("job-state"), payload.state);
        if (payload.result) {
          $("job-output").textContent = payload.result.generated_text;
          $("job-meta").textContent = describeResult(payload.result, null);
        } else if (payload.error) {
          $("job-meta").textContent = `error: ${payload.error}`;
        }
        refreshJobs();
      } else if (event === "error") {
        throw streamError(payload);
      }
    }
  } catch (error) {
    if (!isAbort(error)) showError("jobs-error", error);
  }
}

async function cancelJob(jobId) {
  showError("jobs-error", null);
  try {
    await api(`/jobs/${jobId}/cancel`, { method: "POST" });
  } catch (error) {
    showError("jobs-error", error);
  }
  refreshJobs();
}

function jobRow(job) {
  const row = document.createElement("tr");
  row.dataset.jobId = job.job_id;
  const idCell = document.createElement("td");
  const follow = document.createElement("button");
  follow.type = "button";
  follow.className = "small secondary";
  follow.textContent = job.job_id.slice(0, 8);
  follow.title = `Follow job ${job.job_id}`;
  follow.addEventListener("click", () => followJob(job.job_id));
  idCell.append(follow);
  const stateCell = document.createElement("td");
  const badge = document.createElement("span");
  setBadge(badge, job.state);
  stateCell.append(badge);
  const created = document.createElement("td");
  created.textContent = new Date(job.created_at).toLocaleTimeString();
  const prompt = document.createElement("td");
  prompt.className = "prompt";
  prompt.textContent = (job.request && job.request.prompt) || "";
  prompt.title = prompt.textContent;
  const actions = document.createElement("td");
  if (job.state === "queued" || job.state === "running") {
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "small danger";
    cancel.textContent = "Cancel";
    cancel.setAttribute("aria-label", `Cancel job ${job.job_id}`);
    cancel.addEventListener("click", () => cancelJob(job.job_id));
    actions.append(cancel);
  }
  row.append(idCell, stateCell, created, prompt, actions);
  return row;
}

let refreshingJobs = false;

async function refreshJobs() {
  if (refreshingJobs) return;
  refreshingJobs = true;
  try {
    const list = await (await api("/jobs?limit=10")).json();
    $("jobs-body").replaceChildren(...list.jobs.map(jobRow));
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) needKey = true;
    else showError("jobs-error", error);
  } finally {
    refreshingJobs = false;
  }
}

// ----- Live server panel (GET /stats) ---------------------------------------------------------------------

let statsBusy = false;
let needKey = false; // after a 401, background polling waits for a key instead of failing every second
// /stats counts against TEXTGEN_RATE_LIMIT_RPM like every API route: after a 429 the panel waits out
// Retry-After instead of spending the caller's next minute on polls.
let statsPausedUntil = 0;

async function refreshStats() {
  if (statsBusy || Date.now() < statsPausedUntil) return;
  statsBusy = true;
  try {
    const stats = await (await api("/stats")).json();
    $("stat-model").textContent = stats.model;
    $("stat-engine").textContent = stats.engine;
    $("stat-ready").textContent = stats.ready ? "yes" : "no";
    $("stat-running").textContent = stats.running;
    $("stat-max-running").textContent = stats.max_running;
    $("stat-waiting").textContent = `${stats.waiting_interactive} interactive · ${stats.waiting_background} background`;
    $("stat-tps").textContent = stats.tokens_per_s.toFixed(1);
    $("stat-jobs-queued").textContent = stats.jobs_queued;
    $("stat-jobs-running").textContent = stats.jobs_running;
    $("stats-live").className = "dot live";
    $("stats-error").textContent = "";
  } catch (error) {
    $("stats-live").className = "dot down";
    $("stats-error").textContent = error instanceof ApiError ? error.describe() : "Server unreachable.";
    if (error instanceof ApiError && error.status === 401) needKey = true;
    if (error instanceof ApiError && error.status === 429) {
      statsPausedUntil = Date.now() + 1000 * (Number(error.retryAfter) || 60);
    }
  } finally {
    statsBusy = false;
  }
}

// ----- Tabs and keyboard ----------------------------------------------------------------------------

const TABS = ["tab-generate", "tab-chat", "tab-jobs"];

function selectTab(tabId, focus = false) {
  for (const id of TABS) {
    const tab = $(id);
    const selected = id === tabId;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) $(tabId).focus();
  if (tabId === "tab-jobs") refreshJobs();
}

function setupTabs() {
  for (const id of TABS) {
    $(id).addEventListener("click", () => selectTab(id));
    $(id).addEventListener("keydown", (event) => {
      const index = TABS.indexOf(id);
      const moves = { ArrowRight: 1, ArrowLeft: -1, Home: -index, End: TABS.length - 1 - index };
      if (event.key in moves) {
        event.preventDefault();
        selectTab(TABS[(index + moves[event.key] + TABS.length) % TABS.length], true);
      }
    });
  }
}

function submitOnCtrlEnter(textareaId, action) {
  $(textareaId).addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      action();
    }
  });
}

function setup() {
  setupKeyPanel();
  setupTabs();
  $("generate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  $("stop-button").addEventListener("click", stopGeneration);
  $("background").addEventListener("click", runInBackground);
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sendChat();
  });
  $("chat-stop").addEventListener("click", () => chat && chat.controller.abort());
  $("chat-clear").addEventListener("click", clearChat);
  $("jobs-refresh").addEventListener("click", refreshJobs);
  submitOnCtrlEnter("prompt", generate);
  submitOnCtrlEnter("chat-input", sendChat);
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    if (generation) stopGeneration();
    if (chat) chat.controller.abort();
  });
  refreshStats();
  setInterval(() => document.hidden || needKey || refreshStats(), STATS_EVERY_MS);
  setInterval(() => document.hidden || needKey || $("panel-jobs").hidden || refreshJobs(), JOBS_EVERY_MS);
}

document.addEventListener("DOMContentLoaded", setup);
