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

// A batch's progress over time (a batchgate extension): {data: [{t, completed, failed}], requests_per_second,
// eta_seconds}. Rate and ETA are measured by the server over the last seconds of the history it keeps.
const getProgress = (id) => getJSON(`/v1/batches/${enc(id)}/progress`);

// The list with each running batch's rate and ETA.
async function listWithRates() {
  const batches = await listBatches();
  const running = batches.filter((b) => b.status === "in_progress");
  const answers = await Promise.all(running.map((b) => getProgress(b.id).catch(() => null)));
  const rates = new Map(running.map((b, i) => [b.id, answers[i]]));
  return batches.map((batch) => ({ batch, progress: rates.get(batch.id) ?? null }));
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

// `failed` counts every line of the error file, as OpenAI's does; batchgate also says how many of them were never
// sent because the batch was cancelled or expired, and those are not shown as failures.
function progress(counts = {}, rates = null) {
  const { total = 0, completed = 0, failed = 0, cancelled = 0, expired = 0 } = counts;
  const errored = Math.max(0, failed - cancelled - expired);
  const done = completed + failed;
  const percent = total ? Math.floor((100 * done) / total) : 0;
  const parts = [
    el("span", { class: "ok" }, `${number.format(completed)} completed`),
    " · ",
    el("span", { class: errored ? "bad failed" : "failed" }, `${number.format(errored)} failed`),
  ];
  if (cancelled) parts.push(" · ", el("span", { class: "stopped cancelled" }, `${number.format(cancelled)} cancelled`));
  if (expired) parts.push(" · ", el("span", { class: "stopped expired" }, `${number.format(expired)} expired`));
  parts.push(" · ", `${number.format(total)} total`);
  return el(
    "div",
    { class: "progress", dataset: { completed, failed: errored, cancelled, expired, total, done } },
    el("progress", { max: Math.max(total, 1), value: done }),
    el("span", { class: "percent" }, `${percent}%`),
    el("div", { class: "counts" }, ...parts),
    rates ? rateLine(rates) : null,
  );
}

// "12.5 req/s · ETA 3m 05s", from the server's history of the batch.
function rateLine(p) {
  const perSecond = p.requests_per_second;
  const eta = p.eta_seconds;
  const text = [
    perSecond === null || perSecond === undefined ? "measuring…" : `${perSecond.toFixed(perSecond < 10 ? 1 : 0)} req/s`,
    eta === null || eta === undefined ? "ETA —" : `ETA ${duration(eta)}`,
  ].join(" · ");
  return el("div", { class: "rate", dataset: { rate: perSecond ?? "", eta: eta ?? "" } }, text);
}

// Why a failed batch failed: its first error, with the line it is about.
function failureReason(batch) {
  const problems = batch.errors?.data ?? [];
  if (batch.status !== "failed" || problems.length === 0) return null;
  const first = problems[0];
  const where = first.line ? ` (line ${first.line})` : "";
  const more = problems.length > 1 ? ` +${problems.length - 1} more` : "";
  return el("div", { class: "reason small", title: first.message ?? "" }, `${first.code ?? "error"}${where}${more}`);
}

// Where a batch waiting for room under its tenant's cap stands (extension fields queue_position, queued_reason).
function queueNote(batch) {
  if (batch.queue_position == null) return null;
  return el("div", { class: "reason small queued", title: batch.queued_reason ?? "", dataset: { queuePosition: batch.queue_position } },
    `waiting: #${batch.queue_position} in line`);
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

function batchRow({ batch, progress: rates }) {
  const open = (event) => {
    if (!event.target.closest("a, button")) location.hash = batchHref(batch.id);
  };
  return el(
    "tr",
    { class: "batch-row", dataset: { batchId: batch.id, status: batch.status }, onclick: open },
    el("td", {}, el("a", { href: batchHref(batch.id), class: "mono batch-link" }, batch.id)),
    el("td", { class: "status" }, badge(batch.status), failureReason(batch), queueNote(batch)),
    el("td", {}, progress(batch.request_counts, rates)),
    el("td", { class: "model" }, batch.model || "—"),
    el("td", {}, timestamp(batch.created_at, true)),
    el("td", {}, ran(batch)),
    el("td", {}, usage(batch.usage)),
    el("td", { class: "files" }, ...files(batch)),
  );
}

const listView = {
  load: listWithRates,
  render(items) {
    const kept = new Map();
    const batches = items.map((item) => item.batch);
    const rows = items.map((item) => {
      const json = JSON.stringify(item);
      const cached = rowCache.get(item.batch.id);
      const row = cached && cached.json === json ? cached.row : batchRow(item);
      kept.set(item.batch.id, { json, row });
      return row;
    });
    rowCache = kept;
    $("batches").tBodies[0].replaceChildren(...rows);
    $("no-batches").hidden = batches.length > 0;
    showOnly("list-view");
    return batches.some((b) => !TERMINAL.has(b.status));
  },
};

// ---- the progress chart: completed and failed against time, drawn as inline SVG -----------------

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function chart(points, batch) {
  const width = 720;
  const height = 220;
  const pad = { left: 56, right: 16, top: 12, bottom: 28 };
  const t0 = points[0].t;
  const span = Math.max(points[points.length - 1].t - t0, 1);
  const top = Math.max(batch.request_counts?.total ?? 0, ...points.map((p) => p.completed + p.failed), 1);
  const x = (t) => pad.left + ((t - t0) / span) * (width - pad.left - pad.right);
  const y = (n) => height - pad.bottom - (n / top) * (height - pad.top - pad.bottom);
  const line = (value, cls, color) =>
    svg("polyline", {
      class: cls, fill: "none", stroke: color, "stroke-width": 2, "stroke-linejoin": "round",
      points: points.map((p) => `${x(p.t).toFixed(1)},${y(value(p)).toFixed(1)}`).join(" "),
    });
  const grid = [0, 0.5, 1].map((f) =>
    svg("g", {},
      svg("line", { x1: pad.left, x2: width - pad.right, y1: y(top * f), y2: y(top * f), stroke: "#e3e6eb" }),
      svg("text", { x: pad.left - 6, y: y(top * f) + 4, "text-anchor": "end", "font-size": 11, fill: "#6b7280" },
        number.format(Math.round(top * f)))));
  const axis = [
    svg("text", { x: pad.left, y: height - 8, "font-size": 11, fill: "#6b7280" },
      new Date(t0 * 1000).toLocaleTimeString()),
    svg("text", { x: width - pad.right, y: height - 8, "text-anchor": "end", "font-size": 11, fill: "#6b7280" },
      `+${duration(span)}`),
  ];
  const last = points[points.length - 1];
  return svg(
    "svg",
    { id: "progress-svg", viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
      "aria-label": `${last.completed} completed and ${last.failed} failed over ${duration(span)}`,
      "data-points": points.length },
    ...grid, ...axis,
    line((p) => p.completed, "series-completed", "#1f8a4c"),
    line((p) => p.failed, "series-failed", "#c0392b"),
    svg("text", { x: pad.left + 8, y: pad.top + 12, "font-size": 12, fill: "#1f8a4c" }, "completed"),
    svg("text", { x: pad.left + 88, y: pad.top + 12, "font-size": 12, fill: "#c0392b" }, "failed"),
  );
}

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
      const [lines, history] = await Promise.all([
        batch.error_file_id ? errorLines(batch.error_file_id) : [],
        batch.in_progress_at ? getProgress(batch.id).catch(() => null) : null,
      ]);
      return { batch, lines, history };
    },
    render({ batch, lines, history }) {
      $("batch-title").textContent = batch.id;
      const view = $("batch-view");
      view.dataset.batchId = batch.id;
      view.dataset.status = batch.status;
      const summary = [
        el("div", { class: "summary-row" }, badge(batch.status), el("span", {}, batch.model || ""),
          el("span", { class: "files" }, ...files(batch))),
        progress(batch.request_counts, batch.status === "in_progress" ? history : null),
        failureReason(batch),
        queueNote(batch),
        batch.queued_reason ? el("p", { class: "small muted" }, batch.queued_reason) : null,
      ];
      $("batch-summary").replaceChildren(...summary.filter(Boolean));
      $("chart-section").hidden = !history || history.data.length < 2;
      $("progress-chart").replaceChildren(history && history.data.length >= 2 ? chart(history.data, batch) : "");
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
  for (const id of ["batch-title", "batch-summary", "batch-fields", "progress-chart", "who", "updated"]) $(id).replaceChildren();
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
