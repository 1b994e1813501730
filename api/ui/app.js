// The batchgate dashboard: a single page over the JSON API, using only the key its user typed in.
// Every piece of data goes into the DOM as text (textContent / text nodes), never as HTML.
"use strict";

const KEY_STORAGE = "batchgate.apiKey";
const TERMINAL = new Set(["completed", "failed", "expired", "cancelled"]);
const MAX_BATCHES = 100;
const ERROR_LINES_SHOWN = 200;
const ACTIVE_REFRESH_MS = 1000;
const IDLE_REFRESH_MS = 10000;

let generation = 0; // bumped on every navigation; late answers for an older view are dropped
let timer = null;
let rowCache = new Map(); // batch id -> {json, row}, so unchanged rows stay the same nodes
let errorLinesCache = null; // {fileId, lines}: output and error files never change once written

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;
const number = new Intl.NumberFormat();

// ---- DOM helpers -------------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === null || value === undefined) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function showOnly(sectionId) {
  for (const id of ["sign-in", "list-view", "batch-view"]) $(id).hidden = id !== sectionId;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// ---- the API -----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path) {
  const response = await fetch(path, {
    headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY_STORAGE)}` },
    cache: "no-store",
  });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error.message || message;
    } catch {
      // not an OpenAI error envelope: keep the status line
    }
    throw new ApiError(response.status, message);
  }
  return response;
}

const getJSON = async (path) => (await api(path)).json();

async function listBatches() {
  const batches = [];
  let after = null;
  while (batches.length < MAX_BATCHES) {
    const query = new URLSearchParams({ limit: String(MAX_BATCHES - batches.length) });
    if (after) query.set("after", after);
    const page = await getJSON(`/v1/batches?${query}`);
    batches.push(...page.data);
    if (!page.has_more || !page.last_id) break;
    after = page.last_id;
  }
  return batches.sort((a, b) => b.created_at - a.created_at);
}

// The first `count` lines of a file, read from the stream so a large file is not fetched whole.
async function firstLines(fileId, count) {
  const response = await api(`/v1/files/${enc(fileId)}/content`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const lines = [];
  let rest = "";
  while (lines.length < count) {
    const { value, done } = await reader.read();
    if (done) {
      if (rest.trim()) lines.push(rest);
      break;
    }
    const parts = (rest + value).split("\n");
    rest = parts.pop();
    lines.push(...parts.filter((line) => line.trim()));
  }
  reader.cancel().catch(() => {});
  return lines.slice(0, count);
}

async function download(fileId) {
  try {
    const [meta, content] = await Promise.all([
      getJSON(`/v1/files/${enc(fileId)}`),
      api(`/v1/files/${enc(fileId)}/content`).then((response) => response.blob()),
    ]);
    const url = URL.createObjectURL(content);
    const link = el("a", { href: url, download: meta.filename || `${fileId}.jsonl` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (err) {
    failed(err);
  }
}

// ---- pieces of a batch -------------------------------------------------------------------------

const batchHref = (id) => `#/batches/${enc(id)}`;
const finishedAt = (b) => b.completed_at ?? b.failed_at ?? b.expired_at ?? b.cancelled_at;

function badge(status) {
  return el("span", { class: `badge badge-${status}`, dataset: { status } }, status.replace("_", " "));
}

// In local time; `stacked` puts the time over the date, to keep the table narrow.
function timestamp(seconds, stacked = false) {
  if (!seconds) return el("span", { class: "muted" }, "—");
  const when = new Date(seconds * 1000);
  const props = { datetime: when.toISOString(), title: when.toISOString() };
  if (!stacked) return el("time", props, when.toLocaleString());
  return el("time", props, when.toLocaleTimeString(), el("div", { class: "muted small" }, when.toLocaleDateString()));
}

function progress(counts = {}) {
  const { total = 0, completed = 0, failed = 0 } = counts;
  const done = completed + failed;
  const percent = total ? Math.floor((100 * done) / total) : 0;
  return el(
    "div",
    { class: "progress", dataset: { completed, failed, total, done } },
    el("progress", { max: Math.max(total, 1), value: done }),
    el("span", { class: "percent" }, `${percent}%`),
    el(
      "div",
      { class: "counts" },
      el("span", { class: "ok" }, `${number.format(completed)} completed`),
      " · ",
      el("span", { class: failed ? "bad" : "" }, `${number.format(failed)} failed`),
      " · ",
      `${number.format(total)} total`,
    ),
  );
}

// "1h 02m", "3m 05s", "12s".
function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s >= 3600) return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  if (s >= 60) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${s}s`;
}

// How long a batch ran: from in_progress_at to its end, or until now while it runs.
function ran(batch) {
  if (!batch.in_progress_at) return el("span", { class: "muted" }, "—");
  const end = finishedAt(batch);
  const seconds = (end ?? Date.now() / 1000) - batch.in_progress_at;
  return el(
    "div",
    { class: "ran" },
    duration(seconds),
    el("div", { class: "muted small" }, end ? new Date(end * 1000).toLocaleTimeString() : "running"),
  );
}

function usage(u) {
  if (!u || !u.total_tokens) return el("span", { class: "muted" }, "—");
  return el(
    "div",
    { class: "usage" },
    `${number.format(u.total_tokens)}`,
    el("div", { class: "muted small" }, `in ${number.format(u.input_tokens)} · out ${number.format(u.output_tokens)}`),
  );
}

function fileButton(fileId, kind, label) {
  if (!fileId) return null;
  return el(
    "button",
    { type: "button", class: "link download", title: `Download ${fileId}`, dataset: { fileId, kind },
      onclick: () => download(fileId) },
    label,
  );
}

function files(batch) {
  return [fileButton(batch.output_file_id, "output", "Output"), fileButton(batch.error_file_id, "error", "Errors")];
}

// ---- the list of batches -----------------------------------------------------------------------

function batchRow(batch) {
  const open = (event) => {
    if (!event.target.closest("a, button")) location.hash = batchHref(batch.id);
  };
  return el(
    "tr",
    { class: "batch-row", dataset: { batchId: batch.id, status: batch.status }, onclick: open },
    el("td", {}, el("a", { href: batchHref(batch.id), class: "mono batch-link" }, batch.id)),
    el("td", {}, badge(batch.status)),
    el("td", {}, progress(batch.request_counts)),
    el("td", { class: "model" }, batch.model || "—"),
    el("td", {}, timestamp(batch.created_at, true)),
    el("td", {}, ran(batch)),
    el("td", {}, usage(batch.usage)),
    el("td", { class: "files" }, ...files(batch)),
  );
}

const listView = {
  load: listBatches,
  render(batches) {
    const kept = new Map();
    const rows = batches.map((batch) => {
      const json = JSON.stringify(batch);
      const cached = rowCache.get(batch.id);
      const row = cached && cached.json === json ? cached.row : batchRow(batch);
      kept.set(batch.id, { json, row });
      return row;
    });
    rowCache = kept;
    $("batches").tBodies[0].replaceChildren(...rows);
    $("no-batches").hidden = batches.length > 0;
    showOnly("list-view");
    return batches.some((b) => !TERMINAL.has(b.status));
  },
};

// ---- one batch ---------------------------------------------------------------------------------

function fieldValue(name, value) {
  if (value === null || value === undefined) return el("span", { class: "muted" }, "—");
  if (name.endsWith("_at") && typeof value === "number") {
    return el("span", {}, timestamp(value), el("span", { class: "muted small" }, ` (${value})`));
  }
  if (typeof value === "object") return el("pre", {}, JSON.stringify(value, null, 2));
  return String(value);
}

function errorLineRow(text) {
  let line;
  try {
    line = JSON.parse(text);
  } catch {
    return el("tr", { class: "error-line" }, el("td", {}, "—"), el("td", {}, "—"), el("td", {}, text));
  }
  const status = line.response?.status_code ?? line.error?.code ?? "";
  const body = line.response?.body;
  const message = line.error?.message ?? body?.error?.message ?? (body === undefined ? "" : JSON.stringify(body));
  return el(
    "tr",
    { class: "error-line", dataset: { customId: line.custom_id ?? "" } },
    el("td", { class: "mono" }, line.custom_id ?? "—"),
    el("td", {}, status),
    el("td", {}, message),
  );
}

async function errorLines(fileId) {
  if (errorLinesCache?.fileId !== fileId) {
    errorLinesCache = { fileId, lines: await firstLines(fileId, ERROR_LINES_SHOWN) };
  }
  return errorLinesCache.lines;
}

function batchView(id) {
  return {
    async load() {
      const batch = await getJSON(`/v1/batches/${enc(id)}`);
      return { batch, lines: batch.error_file_id ? await errorLines(batch.error_file_id) : [] };
    },
    render({ batch, lines }) {
      $("batch-title").textContent = batch.id;
      const view = $("batch-view");
      view.dataset.batchId = batch.id;
      view.dataset.status = batch.status;
      $("batch-summary").replaceChildren(
        el("div", { class: "summary-row" }, badge(batch.status), el("span", {}, batch.model || ""),
          el("span", { class: "files" }, ...files(batch))),
        progress(batch.request_counts),
      );
      $("batch-fields").replaceChildren(
        ...Object.entries(batch).flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, fieldValue(name, value))]),
      );

      const problems = batch.errors?.data ?? [];
      $("validation-section").hidden = problems.length === 0;
      $("validation-errors").tBodies[0].replaceChildren(
        ...problems.map((p) =>
          el("tr", { class: "validation-error" }, el("td", {}, p.line ?? "—"), el("td", {}, p.code ?? ""),
            el("td", {}, p.message ?? "")),
        ),
      );

      $("error-lines-section").hidden = !batch.error_file_id;
      const failedCount = batch.request_counts?.failed ?? lines.length;
      $("error-lines-note").textContent =
        lines.length < failedCount
          ? `The first ${lines.length} of ${number.format(failedCount)} lines.`
          : `${lines.length} line${lines.length === 1 ? "" : "s"}.`;
      $("error-lines").tBodies[0].replaceChildren(...lines.map(errorLineRow));
      showOnly("batch-view");
      return !TERMINAL.has(batch.status);
    },
  };
}

// ---- navigation, refresh and the key -----------------------------------------------------------

function failed(err) {
  if (err instanceof ApiError && err.status === 401) signOut(err.message);
  else showError(err.message || String(err));
}

function show(view) {
  const mine = ++generation;
  clearTimeout(timer);
  const tick = async () => {
    let active = false;
    try {
      const data = await view.load();
      if (mine !== generation) return;
      active = view.render(data);
      showError("");
      $("updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      if (mine !== generation) return;
      failed(err);
      if (!sessionStorage.getItem(KEY_STORAGE)) return;
    }
    timer = setTimeout(tick, active ? ACTIVE_REFRESH_MS : IDLE_REFRESH_MS);
  };
  tick();
}

function route() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (!key) return signOut("");
  $("sign-out").hidden = false;
  $("who").textContent = `Key ${key.length > 8 ? `${key.slice(0, 3)}…${key.slice(-4)}` : "****"}`;
  const match = location.hash.match(/^#\/batches\/([^/]+)$/);
  showOnly(null); // nothing from the previous view stays up while the next one loads
  show(match ? batchView(decodeURIComponent(match[1])) : listView);
}

function signOut(message) {
  generation++;
  clearTimeout(timer);
  sessionStorage.removeItem(KEY_STORAGE);
  rowCache = new Map();
  errorLinesCache = null;
  for (const id of ["batches", "validation-errors", "error-lines"]) $(id).tBodies[0].replaceChildren();
  for (const id of ["batch-title", "batch-summary", "batch-fields", "who", "updated"]) $(id).replaceChildren();
  $("sign-out").hidden = true;
  showError(message);
  showOnly("sign-in");
  $("api-key").focus();
}

function start() {
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    $("api-key").value = "";
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    route();
  });
  $("sign-out").addEventListener("click", () => signOut(""));
  window.addEventListener("hashchange", route);
  route();
}

start();
