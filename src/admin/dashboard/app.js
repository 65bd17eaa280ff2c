// sendguard dashboard: renders each page from the admin JSON API, using
// the session cookie. No framework and no external resources, so the page
// works on a host without Internet access and under a strict CSP.
"use strict";

const state = { role: null, csrf: null, timers: [], clockOffset: 0 };

/**
 * Interval of the overview's redraw, in milliseconds, so new lockouts and
 * blocks appear without a reload. The browser tests set
 * window.sendguardOverviewRefresh to a shorter one.
 */
const OVERVIEW_REFRESH = window.sendguardOverviewRefresh || 30000;

const EVENT_TYPES = [
  "bad_message", "sender_refused", "lockout_started", "lockout_ended", "blocked_permanently",
  "config_loaded", "action_delivered", "action_failed", "action_abandoned", "block_lifted",
  "lockout_count_reset", "lockouts_forgiven", "exemption_added", "exemption_removed",
  "exemption_expired", "device_state_changed", "access_refused", "relay_refused",
  "device_exclusion_added", "device_exclusion_removed", "device_exclusion_lifted", "device_exclusion_restored",
  "device_setting_changed", "setting_changed", "endpoint_scan_result",
];
const HISTORY_TYPES = ["lockout_started", "lockout_ended", "blocked_permanently", "block_lifted",
  "lockout_count_reset", "lockouts_forgiven"];

// ---- DOM helpers ---------------------------------------------------------

/** Builds an element: h("td", {class: "num"}, "text", child). */
function h(tag, attributes, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function announce(text) {
  const status = document.getElementById("status");
  status.textContent = "";
  setTimeout(() => { status.textContent = text; }, 50);
}

function table(caption, headers, rows, emptyText) {
  if (rows.length === 0) return h("p", { class: "empty" }, emptyText);
  // Each cell carries its column's name, which narrow screens show beside
  // the value when rows are stacked as cards.
  for (const row of rows) {
    [...row.children].forEach((cell, index) => {
      const header = headers[index];
      cell.setAttribute("data-label", header ? (header.label || header) : "");
    });
  }
  return h("div", { class: "table-wrap" },
    h("table", { class: "stack" },
      h("caption", { class: "visually-hidden" }, caption),
      h("thead", {}, h("tr", {}, headers.map((header) =>
        h("th", { scope: "col", class: header.class || null }, header.label || header)))),
      h("tbody", {}, rows)));
}

function field(label, input) {
  const id = input.id || "f-" + Math.random().toString(36).slice(2, 9);
  input.id = id;
  return h("div", { class: "field" }, h("label", { for: id }, label), input);
}

function badge(text, kind) {
  return h("span", { class: "badge " + (kind || "") }, text);
}

function mailboxLink(mailbox, client) {
  const query = client ? "?client=" + encodeURIComponent(client) : "";
  return h("a", { href: "#/mailbox/" + encodeURIComponent(mailbox) + query }, mailbox);
}

function formatTime(text) {
  if (!text) return "–";
  const date = new Date(text);
  if (Number.isNaN(date.getTime())) return text;
  return date.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric",
    hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function timeCell(text) {
  return h("td", {}, h("time", { datetime: text || "" }, formatTime(text)));
}

function plural(count, noun) {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

function formatRemaining(milliseconds) {
  if (milliseconds <= 0) return "ended";
  let seconds = Math.floor(milliseconds / 1000);
  const days = Math.floor(seconds / 86400); seconds -= days * 86400;
  const hours = Math.floor(seconds / 3600); seconds -= hours * 3600;
  const minutes = Math.floor(seconds / 60); seconds -= minutes * 60;
  const pad = (value) => String(value).padStart(2, "0");
  if (days > 0) return `${days}d ${pad(hours)}h ${pad(minutes)}m ${pad(seconds)}s`;
  if (hours > 0) return `${hours}h ${pad(minutes)}m ${pad(seconds)}s`;
  return `${minutes}m ${pad(seconds)}s`;
}

/**
 * Builds a live countdown to `until`, updated every second. When it ends,
 * the status region announces it and the page is drawn again, so the
 * ended lockout leaves the list.
 */
function countdown(until, label) {
  const end = new Date(until).getTime();
  const element = h("span", { class: "countdown", role: "timer", "aria-label": label,
    "data-until": until }, "");
  let announced = false;
  const update = () => {
    const left = end - (Date.now() + state.clockOffset);
    element.textContent = formatRemaining(left);
    if (left <= 0 && !announced) {
      announced = true;
      announce(label + " has ended");
      state.timers.push(setTimeout(route, 2000));
    }
  };
  update();
  state.timers.push(setInterval(update, 1000));
  return element;
}

// ---- API -----------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/**
 * Keeps state.clockOffset, the server's clock minus the browser's, from a
 * response's Date header (whole seconds), so countdowns and time ranges
 * follow the server even on the first page loaded.
 */
function syncClock(response) {
  const date = new Date(response.headers.get("Date") || "");
  if (!Number.isNaN(date.getTime())) state.clockOffset = date.getTime() - Date.now();
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") {
    headers["X-CSRF-Token"] = state.csrf || "";
    headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  syncClock(response);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (response.status === 401 && path !== "/api/v1/session") {
    showLogin("Your session has ended. Log in again.");
    throw new ApiFailure(401, "session ended");
  }
  if (!response.ok) {
    const message = data && data.error ? data.error : `${method} ${path} failed with status ${response.status}`;
    throw new ApiFailure(response.status, message);
  }
  return data;
}

/** Maximum number of events the dashboard reads for one view. */
const MAX_EVENTS = 100000;

/** Returns the URL of the next page from a Link header, if any. */
function nextPage(link) {
  const match = /<(\/api\/v1\/events\?[^>]*)>;\s*rel="next"/.exec(link || "");
  return match ? match[1] : null;
}

/**
 * Reads the events report (JSON lines) with the given query. The report
 * comes oldest first in pages of at most 10000 events, so every page is
 * read (up to MAX_EVENTS events) to reach the newest. The list's
 * `truncated` is true when more events match than were read.
 */
async function events(query) {
  const parameters = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) if (value) parameters.set(name, value);
  parameters.set("limit", "10000");
  const list = [];
  list.truncated = false;
  let url = "/api/v1/events?" + parameters.toString();
  while (url) {
    if (list.length >= MAX_EVENTS) {
      list.truncated = true;
      break;
    }
    const response = await fetch(url, { credentials: "same-origin" });
    const text = await response.text();
    if (response.status === 401) { showLogin("Your session has ended. Log in again."); throw new ApiFailure(401, "session ended"); }
    if (!response.ok) {
      let message = text;
      try { message = JSON.parse(text).error; } catch (_) { /* plain text */ }
      throw new ApiFailure(response.status, message);
    }
    for (const line of text.split("\n")) if (line.trim()) list.push(JSON.parse(line));
    url = nextPage(response.headers.get("Link"));
  }
  return list;
}

/** Builds the notice shown when a view read only the oldest MAX_EVENTS events. */
function truncatedNotice(list) {
  if (!list.truncated) return null;
  return h("p", { class: "notice", role: "status" },
    `More than ${MAX_EVENTS} events match, and only the oldest ${MAX_EVENTS} are shown and counted. ` +
    "Narrow the time range or the filters to see the newest.");
}

// ---- session -------------------------------------------------------------

function showLogin(message) {
  stopTimers();
  state.role = null;
  document.getElementById("nav").hidden = true;
  document.getElementById("session").hidden = true;
  document.getElementById("view").replaceChildren();
  document.getElementById("login-view").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("token").focus();
}

function startSession(session) {
  state.role = session.role;
  state.csrf = session.csrf_token;
  document.getElementById("login-view").hidden = true;
  document.getElementById("nav").hidden = false;
  document.getElementById("session").hidden = false;
  document.getElementById("role").textContent =
    session.role === "support" ? "Support session" : "Admin session";
}

async function login(event) {
  event.preventDefault();
  const input = document.getElementById("token");
  const error = document.getElementById("login-error");
  error.textContent = "";
  if (!input.value.trim()) { error.textContent = "Enter the admin or support token."; input.focus(); return; }
  try {
    const session = await api("POST", "/api/v1/session", { token: input.value.trim() });
    input.value = "";
    startSession(session);
    if (!location.hash || location.hash === "#/") location.hash = "#/overview";
    else route();
  } catch (failure) {
    error.textContent = failure.message;
    input.focus();
  }
}

async function logout() {
  try { await api("DELETE", "/api/v1/session"); } catch (_) { /* ended anyway */ }
  state.csrf = null;
  showLogin("You are logged out.");
}

// ---- routing -------------------------------------------------------------

function stopTimers() {
  for (const timer of state.timers) {
    clearInterval(timer);
    clearTimeout(timer);
  }
  state.timers = [];
}

/**
 * Splits the address's hash into page, argument and query.
 *
 * @throws {ApiFailure} with status 0 when a part is not valid percent-encoding.
 */
function parseHash() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, query] = hash.split("?");
  let parts;
  try {
    parts = path.split("/").map(decodeURIComponent);
  } catch (_) {
    throw new ApiFailure(0, `The address ${location.hash} is invalid: it contains a % not followed by ` +
      "the encoding of a character. Go to the Overview and follow the links from there.");
  }
  return { page: parts[0] || "overview", argument: parts.slice(1).join("/"),
    query: new URLSearchParams(query || "") };
}

const PAGES = { overview: renderOverview, events: renderEvents, mailbox: renderMailbox,
  devices: renderDevices, settings: renderSettings };

async function route() {
  if (!state.role) return;
  stopTimers();
  const view = document.getElementById("view");
  try {
    const { page, argument, query } = parseHash();
    const render = PAGES[page] || renderOverview;
    const navPage = page === "mailbox" ? "overview" : page;
    for (const link of document.querySelectorAll("#nav a")) {
      if (link.dataset.page === navPage) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    view.replaceChildren(h("p", { class: "muted" }, "Loading…"));
    view.replaceChildren(await render(argument, query));
  } catch (failure) {
    if (failure.status === 401) return;
    view.replaceChildren(h("div", { class: "panel" }, h("h1", {}, "Something went wrong"),
      h("p", { class: "error", role: "alert" }, failure.message)));
  }
  const heading = view.querySelector("h1");
  document.title = (heading ? heading.textContent + " – " : "") + "sendguard dashboard";
}

function focusMain() {
  document.getElementById("main").focus({ preventScroll: true });
}

// ---- overview ------------------------------------------------------------

/**
 * Draws the overview again with fresh data. It skips a turn while the tab
 * is hidden or a control on the page has the keyboard focus, so a redraw
 * never takes the focus away.
 */
async function refreshOverview() {
  const view = document.getElementById("view");
  if (document.hidden || view.contains(document.activeElement)) return;
  if (parseHash().page !== "overview") return;
  stopTimers();
  try {
    view.replaceChildren(await renderOverview());
  } catch (failure) {
    if (failure.status !== 401) route();
  }
}

async function renderOverview() {
  const overview = await api("GET", "/api/v1/overview");
  state.clockOffset = new Date(overview.now).getTime() - Date.now();
  state.timers.push(setInterval(refreshOverview, OVERVIEW_REFRESH));
  const lockoutRows = overview.lockouts.map((block) => h("tr", {},
    h("td", {}, mailboxLink(block.mailbox, block.key_client)),
    h("td", { class: "num" }, block.level),
    timeCell(block.started),
    timeCell(block.until),
    h("td", {}, countdown(block.until, `Lockout of ${block.mailbox}`)),
    h("td", {}, block.enforced ? badge("enforced", "danger") : badge("monitor only"))));
  const permanentRows = overview.permanent_blocks.map((block) => h("tr", {},
    h("td", {}, mailboxLink(block.mailbox, block.key_client)),
    h("td", { class: "num" }, block.level),
    timeCell(block.started),
    h("td", {}, block.enforced ? badge("blocked", "danger") : badge("monitor only"))));
  const nearRows = overview.near_threshold.map((mailbox) => {
    const share = Math.min(100, Math.round(100 * mailbox.strikes / mailbox.threshold));
    const meter = h("span", { class: "meter", "aria-hidden": "true" }, h("span", {}));
    meter.firstChild.style.width = share + "%";
    return h("tr", {},
      h("td", {}, mailboxLink(mailbox.mailbox, mailbox.key_client)),
      h("td", {}, meter, `${mailbox.strikes} of ${mailbox.threshold}`),
      timeCell(mailbox.newest_strike),
      h("td", { class: "num" }, mailbox.lockouts));
  });
  return h("div", {},
    h("h1", {}, "Overview"),
    h("p", { class: "muted" }, `Updated ${formatTime(overview.now)}; the page updates itself every ` +
      `${Math.round(OVERVIEW_REFRESH / 1000)} s.`),
    h("div", { class: "cards" },
      h("div", { class: "card alert" }, h("div", { class: "value" }, overview.lockouts.length),
        h("div", { class: "label" }, "Active lockouts")),
      h("div", { class: "card alert" }, h("div", { class: "value" }, overview.permanent_blocks.length),
        h("div", { class: "label" }, "Permanent blocks")),
      h("div", { class: "card warn" }, h("div", { class: "value" }, overview.near_threshold.length),
        h("div", { class: "label" }, `Close to the threshold (${overview.threshold} in ${overview.window})`))),
    h("section", { class: "panel", "aria-labelledby": "h-lockouts" },
      h("h2", { id: "h-lockouts" }, "Active lockouts"),
      table("Active lockouts and the time left until each ends",
        ["Mailbox", { label: "Lockout", class: "num" }, "Started", "Ends", "Time left", "Mode"],
        lockoutRows, "No mailbox is locked out.")),
    h("section", { class: "panel", "aria-labelledby": "h-permanent" },
      h("h2", { id: "h-permanent" }, "Permanent blocks"),
      h("p", { class: "muted" }, "Only the support token lifts a permanent block, on the mailbox's page."),
      table("Mailboxes blocked permanently",
        ["Mailbox", { label: "Lockout", class: "num" }, "Since", "Mode"],
        permanentRows, "No mailbox is blocked permanently.")),
    h("section", { class: "panel", "aria-labelledby": "h-near" },
      h("h2", { id: "h-near" }, "Close to the threshold"),
      table("Mailboxes with strikes in the window",
        ["Mailbox", "Strikes in the window", "Newest strike", { label: "Lockouts so far", class: "num" }],
        nearRows, "No mailbox has strikes in the window.")));
}

// ---- events --------------------------------------------------------------

const RANGES = [["1h", "Last hour"], ["24h", "Last 24 hours"], ["7d", "Last 7 days"], ["30d", "Last 30 days"]];
const RANGE_MILLISECONDS = { "1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3 };

function eventSummary(event) {
  const skip = new Set(["time", "type", "mailbox", "key_client", "id", "strikes", "deliveries"]);
  const parts = [];
  for (const [name, value] of Object.entries(event)) {
    if (skip.has(name) || value === null || value === "") continue;
    const shown = typeof value === "object" ? JSON.stringify(value) : String(value);
    parts.push(`${name}: ${shown.length > 80 ? shown.slice(0, 77) + "…" : shown}`);
  }
  return parts.slice(0, 6).join(" · ");
}

function chart(list, since, until) {
  const buckets = 24;
  const span = Math.max(1, until - since);
  const strikes = new Array(buckets).fill(0);
  const lockouts = new Array(buckets).fill(0);
  for (const event of list) {
    const time = new Date(event.time).getTime();
    const index = Math.min(buckets - 1, Math.max(0, Math.floor((time - since) / span * buckets)));
    if (event.type === "bad_message" && event.counted === true) strikes[index] += 1;
    if (event.type === "lockout_started" || event.type === "blocked_permanently") lockouts[index] += 1;
  }
  const totalStrikes = strikes.reduce((a, b) => a + b, 0);
  const totalLockouts = lockouts.reduce((a, b) => a + b, 0);
  // The scale's top is a multiple of 4, so the 4 grid steps are whole numbers.
  const peak = Math.max(4, Math.ceil(Math.max(...strikes, ...lockouts) / 4) * 4);
  const width = 720, height = 220, left = 36, bottom = 28, top = 10;
  const plotWidth = width - left - 8, plotHeight = height - bottom - top;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  const make = (tag, attributes, text) => {
    const element = document.createElementNS(ns, tag);
    for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
    if (text !== undefined) element.textContent = text;
    svg.append(element);
    return element;
  };
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-labelledby", "chart-title");
  make("title", { id: "chart-title" },
    `${plural(totalStrikes, "strike")} and ${plural(totalLockouts, "lockout")} between ${formatTime(new Date(since).toISOString())} and ${formatTime(new Date(until).toISOString())}`);
  for (let step = 0; step <= 4; step += 1) {
    const y = top + plotHeight - plotHeight * step / 4;
    make("line", { class: "gridline", x1: left, x2: width - 8, y1: y, y2: y });
    make("text", { x: left - 6, y: y + 4, "text-anchor": "end" }, String(Math.round(peak * step / 4)));
  }
  const slot = plotWidth / buckets;
  const barWidth = Math.max(2, slot / 2 - 2);
  for (let index = 0; index < buckets; index += 1) {
    const x = left + index * slot + 2;
    const strikeHeight = plotHeight * strikes[index] / peak;
    const lockoutHeight = plotHeight * lockouts[index] / peak;
    make("rect", { class: "bar-strikes", x, y: top + plotHeight - strikeHeight, width: barWidth, height: strikeHeight },
    ).append(document.createElementNS(ns, "title"));
    svg.lastChild.firstChild.textContent = plural(strikes[index], "strike");
    make("rect", { class: "bar-lockouts", x: x + barWidth + 1, y: top + plotHeight - lockoutHeight, width: barWidth, height: lockoutHeight })
      .append(document.createElementNS(ns, "title"));
    svg.lastChild.firstChild.textContent = plural(lockouts[index], "lockout");
  }
  make("line", { class: "axis", x1: left, x2: width - 8, y1: top + plotHeight, y2: top + plotHeight });
  for (const index of [0, buckets / 2, buckets]) {
    const time = new Date(since + span * index / buckets);
    const label = span > 2 * 86400e3 ? time.toLocaleDateString() : time.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    let anchor = "middle";
    if (index === 0) anchor = "start";
    if (index === buckets) anchor = "end";
    make("text", { x: left + plotWidth * index / buckets, y: height - 8, "text-anchor": anchor }, label);
  }
  return h("figure", { class: "chart", style: null },
    svg,
    h("figcaption", { class: "legend" },
      h("span", { class: "strikes" }, `Strikes (${totalStrikes})`),
      h("span", { class: "lockouts" }, `Lockouts (${totalLockouts})`)));
}

/**
 * Downloads the events report as one CSV file. The report comes in pages
 * of at most 10000 events, so this follows each page's Link header, keeps
 * the first page's header line only, and stops after MAX_EVENTS events.
 */
async function exportCsv(path, button) {
  button.disabled = true;
  announce("Preparing the CSV export…");
  try {
    const parts = [];
    let next = path;
    let pages = 0;
    while (next && pages < MAX_EVENTS / 10000) {
      const response = await fetch(next, { credentials: "same-origin", headers: { Accept: "text/csv" } });
      syncClock(response);
      if (response.status === 401) {
        showLogin("Your session has ended. Log in again.");
        return;
      }
      const text = await response.text();
      if (!response.ok) throw new ApiFailure(response.status, `the CSV export failed with status ${response.status}: ${text}`);
      parts.push(pages === 0 ? text : text.slice(text.indexOf("\n") + 1));
      pages += 1;
      next = nextPage(response.headers.get("Link"));
    }
    const url = URL.createObjectURL(new Blob(parts, { type: "text/csv" }));
    const link = h("a", { href: url, download: "sendguard-events.csv", hidden: "" });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    announce(next ? `The CSV export holds the oldest ${MAX_EVENTS} matching events; narrow the filters for the rest.`
      : "The CSV export is ready.");
  } catch (failure) {
    announce(failure.message);
  } finally {
    button.disabled = false;
  }
}

async function renderEvents(_argument, query) {
  // An unknown range (from an edited address) falls back to 24 hours, and
  // the select shows the range in effect.
  const requested = query.get("range");
  const range = Object.hasOwn(RANGE_MILLISECONDS, requested) ? requested : "24h";
  const filters = {
    type: query.get("type") || "",
    mailbox: query.get("mailbox") || "",
    device: query.get("device") || "",
  };
  const now = Date.now() + state.clockOffset;
  const since = now - RANGE_MILLISECONDS[range];
  const common = { since: new Date(since).toISOString(), mailbox: filters.mailbox, device: filters.device };
  // The chart counts every type, so a type filter needs a second read.
  const [all, filtered] = filters.type
    ? await Promise.all([events(common), events({ ...common, type: filters.type })])
    : await events(common).then((list) => [list, list]);
  const rangeSelect = h("select", { id: "f-range", name: "range" },
    RANGES.map(([value, label]) => h("option", { value, selected: value === range }, label)));
  const typeSelect = h("select", { id: "f-type", name: "type" },
    h("option", { value: "" }, "All types"),
    EVENT_TYPES.map((type) => h("option", { value: type, selected: type === filters.type }, type)));
  const mailboxInput = h("input", { id: "f-mailbox", name: "mailbox", type: "text", value: filters.mailbox,
    placeholder: "alice@example.org", autocomplete: "off" });
  const deviceInput = h("input", { id: "f-device", name: "device", type: "text", value: filters.device,
    placeholder: "dev-17", autocomplete: "off" });
  const csv = new URLSearchParams({ ...Object.fromEntries(Object.entries({ ...common, type: filters.type }).filter(([, v]) => v)), format: "csv", limit: "10000" });
  const form = h("form", { class: "grid", "aria-label": "Event filters",
    onsubmit: (event) => {
      event.preventDefault();
      const next = new URLSearchParams();
      next.set("range", rangeSelect.value);
      if (typeSelect.value) next.set("type", typeSelect.value);
      if (mailboxInput.value.trim()) next.set("mailbox", mailboxInput.value.trim());
      if (deviceInput.value.trim()) next.set("device", deviceInput.value.trim());
      location.hash = "#/events?" + next.toString();
    } },
    field("Time", rangeSelect), field("Type", typeSelect), field("Mailbox", mailboxInput),
    field("Device", deviceInput),
    h("div", { class: "actions" },
      h("button", { type: "submit" }, "Apply filters"),
      h("button", { type: "button", class: "secondary",
        onclick: (event) => exportCsv("/api/v1/events?" + csv.toString(), event.currentTarget) }, "Export CSV")));
  const newestFirst = filtered.slice().reverse().slice(0, 500);
  const rows = newestFirst.map((event) => h("tr", {},
    timeCell(event.time),
    h("td", {}, badge(event.type, /lockout_started|blocked|refused|failed|abandoned/.test(event.type) ? "danger" : "")),
    h("td", {}, event.mailbox ? mailboxLink(event.mailbox, event.key_client) : (event.device || "–")),
    h("td", { class: "details" }, eventSummary(event))));
  announce(`${filtered.length} events match the filters`);
  return h("div", {},
    h("h1", {}, "Events report"),
    h("section", { class: "panel", "aria-labelledby": "h-filters" },
      h("h2", { id: "h-filters" }, "Filters"), form),
    truncatedNotice(all.truncated ? all : filtered),
    h("section", { class: "panel", "aria-labelledby": "h-chart" },
      h("h2", { id: "h-chart" }, "Strikes and lockouts over time"), chart(all, since, now)),
    h("section", { class: "panel", "aria-labelledby": "h-list" },
      h("h2", { id: "h-list" }, `Events (${filtered.length}${filtered.truncated ? "+" : ""}${filtered.length > 500 ? ", newest 500 shown" : ""})`),
      table("Events, newest first", ["Time", "Type", "Mailbox or device", "Details"], rows,
        "No event matches these filters.")));
}

// ---- mailbox -------------------------------------------------------------

async function renderMailbox(mailbox, query) {
  const client = query.get("client") || "";
  const suffix = client ? "?client=" + encodeURIComponent(client) : "";
  const [ledger, history] = await Promise.all([
    api("GET", "/api/v1/mailboxes/" + encodeURIComponent(mailbox) + suffix),
    events({ mailbox, since: "400d" }),
  ]);
  const block = ledger.block;
  let blockView;
  if (!block) blockView = h("p", {}, badge("not blocked", "ok"));
  else if (block.permanent) blockView = h("p", {}, badge("blocked permanently", "danger"), ` since ${formatTime(block.started)} (lockout ${block.level})`);
  else blockView = h("p", {}, badge(`lockout ${block.level}`, "danger"), " ends ", formatTime(block.until), " – ",
    countdown(block.until, `Lockout of ${ledger.mailbox}`), " left");
  const strikeRows = ledger.strikes.map((strike) => h("tr", {},
    timeCell(strike.time), h("td", {}, strike.verdict), h("td", {}, strike.transaction || "–"),
    h("td", { class: "details" }, strike.message_id || "–")));
  const badRows = history.filter((event) => event.type === "bad_message").reverse().slice(0, 50).map((event) => h("tr", {},
    timeCell(event.time), h("td", {}, event.verdict || "–"),
    h("td", {}, event.counted ? badge("strike", "danger") : badge("not counted")),
    h("td", { class: "details" }, event.note || event.transaction || "–")));
  const historyRows = history.filter((event) => HISTORY_TYPES.includes(event.type)).reverse().map((event) => h("tr", {},
    timeCell(event.time), h("td", {}, badge(event.type, event.type === "lockout_ended" || event.type === "block_lifted" ? "ok" : "danger")),
    h("td", { class: "details" }, eventSummary(event))));
  const next = ledger.next_lockout.permanent ? "a permanent block" : `lockout ${ledger.next_lockout.level}, ${ledger.next_lockout.length}`;

  let action;
  // The server refuses (409) to end a timed lockout early, or to reset a
  // count of zero when nothing is blocked, so no form is offered for them.
  if (state.role === "support" && block && !block.permanent) {
    action = h("p", {}, `Lockout ${block.level} is a timed lockout, which cannot be lifted early; it ends at ` +
      `${formatTime(block.until)}. The lockout count can be reset after it ends.`);
  } else if (state.role === "support" && !block && ledger.lockouts === 0) {
    action = h("p", {}, "Nothing to lift or reset: the mailbox is not blocked and its lockout count is zero.");
  } else if (state.role === "support") {
    const reason = h("textarea", { id: "unblock-reason", name: "reason", required: true });
    const reset = h("input", { id: "unblock-reset", type: "checkbox", name: "reset_count" });
    const message = h("p", { class: "error", role: "alert" });
    action = h("form", { "aria-labelledby": "h-action", onsubmit: async (event) => {
      event.preventDefault();
      message.textContent = "";
      if (!reason.value.trim()) { message.textContent = "Give a reason; it is recorded in the events report."; reason.focus(); return; }
      try {
        const result = await api("POST", "/api/v1/mailboxes/" + encodeURIComponent(mailbox) + "/unblock",
          { reason: reason.value.trim(), reset_count: reset.checked, client: client || undefined });
        announce(result.permanent_block_lifted ? `Permanent block of ${mailbox} lifted` : `Lockout count of ${mailbox} reset`);
        await route();
      } catch (failure) { message.textContent = failure.message; }
    } },
      field("Reason (recorded)", reason),
      h("div", { class: "field check" }, reset, h("label", { for: "unblock-reset" }, "Also reset the lockout count to zero")),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "danger" },
        block && block.permanent ? "Lift permanent block" : "Reset lockout count")),
      message);
    if (!(block && block.permanent)) {
      reset.checked = true;
      reset.disabled = true;
    }
  } else {
    action = h("p", { class: "muted" }, "Only the support token lifts a permanent block or resets a lockout count. Log in with the support token to do it.");
  }
  const owner = ledger.owner ? `${ledger.owner.name} (${ledger.owner.id})` : "not in the directory";
  return h("div", {},
    h("p", {}, h("a", { href: "#/overview" }, "← Overview")),
    h("h1", {}, ledger.mailbox, ledger.key_client ? ` from ${ledger.key_client}` : ""),
    truncatedNotice(history),
    h("div", { class: "two-col" },
      h("section", { class: "panel", "aria-labelledby": "h-status" },
        h("h2", { id: "h-status" }, "Status"), blockView,
        h("dl", { class: "facts" },
          h("dt", {}, "Lockouts so far"), h("dd", {}, ledger.lockouts),
          h("dt", {}, "Next trigger"), h("dd", {}, next),
          h("dt", {}, "Strikes in the window"), h("dd", {}, `${ledger.strikes.length} of ${ledger.threshold} in ${ledger.window}`),
          h("dt", {}, "Exemptions"), h("dd", {}, ledger.exemptions.length ? ledger.exemptions.map((e) => `${e.match} ${e.value} until ${formatTime(e.expires)}`).join("; ") : "none"))),
      h("section", { class: "panel", "aria-labelledby": "h-owner" },
        h("h2", { id: "h-owner" }, "Owner and devices"),
        h("dl", { class: "facts" }, h("dt", {}, "Owner"), h("dd", {}, owner)),
        ledger.devices.length
          ? h("ul", {}, ledger.devices.map((device) => h("li", {}, `${device.name} (${device.id})`)))
          : h("p", { class: "empty" }, "No devices in the directory."))),
    h("section", { class: "panel", "aria-labelledby": "h-action" },
      h("h2", { id: "h-action" }, "Support actions"), action),
    h("section", { class: "panel", "aria-labelledby": "h-strikes" },
      h("h2", { id: "h-strikes" }, "Strike ledger"),
      table("Strikes inside the window", ["Time", "Verdict", "Transaction", "Message-ID"], strikeRows,
        "No strikes inside the window. A lockout empties the window, so the strikes that caused it are listed below."),
      h("h3", {}, "Recent bad messages"),
      table("Bad messages from this mailbox, newest first", ["Time", "Verdict", "Counted", "Transaction or note"], badRows,
        "No bad message has been recorded for this mailbox.")),
    h("section", { class: "panel", "aria-labelledby": "h-history" },
      h("h2", { id: "h-history" }, "Lockout history"),
      table("Lockouts, ends and lifts, newest first", ["Time", "Event", "Details"], historyRows,
        "No lockout has been recorded for this mailbox.")));
}

// ---- devices -------------------------------------------------------------

function stateBadge(device) {
  return badge(device.state, device.state);
}

/** Names the source of an exclusion in the configuration file. */
function fileSourceLabel(source) {
  return source === "role" ? "role, by default" : "configuration file";
}

/** Describes which roles are excluded by default, as one sentence. */
function roleExclusionText(updateCaches, messageRelays) {
  if (updateCaches && messageRelays) return "Update caches and message relays are excluded by their role. ";
  if (updateCaches) return "Update caches are excluded by their role, message relays are not. ";
  if (messageRelays) return "Message relays are excluded by their role, update caches are not. ";
  return "No role is excluded by default. ";
}

async function exclusionsSection() {
  const exclusions = await api("GET", "/api/v1/device-exclusions");
  // "Your name" and "Reason" are recorded with each exclusion the admin
  // adds, lifts or removes.
  const author = h("input", { id: "exclude-author", name: "author", type: "text", required: true, autocomplete: "name" });
  const reason = h("input", { id: "exclude-reason", name: "reason", type: "text", required: true });
  const message = h("p", { class: "error", role: "alert" });
  const lifted = exclusions.lifted || [];
  // An exclusion added through the API stays stored when its device leaves
  // the devices file, and applies again if the device comes back, so it is
  // listed to be removed. A lift is kept and listed the same way.
  const listed = new Set(exclusions.excluded.map((device) => device.id));
  const unknown = exclusions.added.filter((row) => !listed.has(row.device))
    .map((row) => ({ id: row.device, name: "not in the devices file" }));
  const liftedDevices = lifted.map((row) => ({ id: row.device, name: row.name || "not in the devices file", lift: row }));

  // Sends `change` once the fields it records are filled in, then shows
  // the page again.
  const changeButton = (label, text, needsReason, missingText, change) =>
    h("button", { type: "button", class: "secondary", "aria-label": label, onclick: async () => {
      message.textContent = "";
      const by = author.value.trim();
      const why = reason.value.trim();
      if (!by || (needsReason && !why)) {
        message.textContent = missingText;
        (by ? reason : author).focus();
        return;
      }
      try {
        await change(by, why);
        await route();
      } catch (failure) { message.textContent = failure.message; }
    } }, text);
  const removeButton = (id) => changeButton(`Remove the exclusion of ${id}`, "Remove", false,
    "Enter your name under “Your name” first; it is recorded with the removal.",
    async (by) => {
      await api("DELETE", "/api/v1/device-exclusions/" + encodeURIComponent(id) + "?by=" + encodeURIComponent(by));
      announce(`Exclusion of ${id} removed`);
    });
  const liftButton = (id) => changeButton(`Lift the exclusion of ${id}`, "Lift", true,
    "Enter a reason under “Reason” and your name under “Your name” first; both are recorded with the lift.",
    async (by, why) => {
      await api("POST", "/api/v1/device-exclusions", { device: id, excluded: false, reason: why, author: by });
      announce(`Exclusion of ${id} lifted`);
    });
  const resetButton = (id) => changeButton(`Reset the exclusion of ${id} to the configuration file`, "Reset", false,
    "Enter your name under “Your name” first; it is recorded with the reset.",
    async (by) => {
      await api("DELETE", "/api/v1/device-exclusions/" + encodeURIComponent(id) + "?by=" + encodeURIComponent(by));
      announce(`Exclusion of ${id} set back to the configuration file`);
    });

  const admin = state.role === "admin";
  const rows = [...exclusions.excluded, ...unknown, ...liftedDevices].map((device) => {
    const added = exclusions.added.find((row) => row.device === device.id);
    let reasonText = device.reason || "–";
    let source = badge(fileSourceLabel(device.source));
    let action = null;
    if (device.lift) {
      const lift = device.lift;
      const lifts = lift.file_source ? `lifts the ${fileSourceLabel(lift.file_source)} exclusion` : "the configuration file no longer excludes it";
      reasonText = `${lift.reason} (lifted by ${lift.author}, ${formatTime(lift.created)}); ${lifts}`;
      source = badge("lifted", "warn");
      action = admin ? resetButton(device.id) : null;
    } else if (added) {
      reasonText = `${added.reason} (by ${added.author})`;
      source = badge("dashboard or API", "api");
      action = admin ? removeButton(device.id) : null;
    } else if (device.source === "file" || device.source === "role") {
      action = admin ? liftButton(device.id) : null;
    }
    return h("tr", {}, h("td", {}, device.id), h("td", {}, device.name || "–"),
      h("td", {}, reasonText), h("td", {}, source), h("td", {}, action || ""));
  });
  let form = h("p", { class: "muted" }, "Exclusions are changed with the admin token.");
  if (admin) {
    const device = h("input", { id: "exclude-device", name: "device", type: "text", required: true, autocomplete: "off" });
    form = h("form", { class: "grid", "aria-label": "Add an exclusion", onsubmit: async (event) => {
      event.preventDefault();
      message.textContent = "";
      try {
        await api("POST", "/api/v1/device-exclusions", { device: device.value.trim(), reason: reason.value.trim(), author: author.value.trim() });
        announce(`Device ${device.value.trim()} excluded`);
        await route();
      } catch (failure) { message.textContent = failure.message; }
    } }, field("Device id", device), field("Reason", reason), field("Your name", author),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Add exclusion")), message);
  }
  return h("section", { class: "panel", "aria-labelledby": "h-exclusions" },
    h("h2", { id: "h-exclusions" }, "Exclusions"),
    h("p", { class: "muted" }, "Excluded servers are always reachable and always accepted, even when unsafe. ",
      roleExclusionText(exclusions.exclude_update_caches, exclusions.exclude_message_relays),
      "Lift removes an exclusion of the configuration file until it is reset; give a reason and your name below first."),
    table("Excluded devices", ["Device", "Name", "Reason", "Source", "Action"], rows, "No device is excluded."),
    form);
}

async function renderDevices() {
  const [list, exclusions] = await Promise.all([api("GET", "/api/v1/devices"), exclusionsSection()]);
  const subnets = new Map();
  for (const device of list.devices) {
    const keys = device.subnets.length ? device.subnets : ["no address reported"];
    for (const subnet of keys) {
      if (!subnets.has(subnet)) subnets.set(subnet, []);
      subnets.get(subnet).push(device);
    }
  }
  const count = (devices, predicate) => devices.filter(predicate).length;
  const subnetRows = [...subnets.entries()].sort().map(([subnet, devices]) => h("tr", {},
    h("th", { scope: "row" }, subnet),
    h("td", { class: "num" }, devices.length),
    h("td", { class: "num" }, count(devices, (d) => d.state === "green")),
    h("td", { class: "num" }, count(devices, (d) => d.state === "yellow")),
    h("td", { class: "num" }, count(devices, (d) => d.state === "red")),
    h("td", { class: "num" }, count(devices, (d) => d.state === "missing")),
    h("td", { class: "num" }, count(devices, (d) => d.state === "offline")),
    h("td", {}, count(devices, (d) => d.unsafe) ? badge(`${count(devices, (d) => d.unsafe)} unsafe`, "danger") : badge("healthy", "ok"))));
  const missing = list.devices.filter((device) => device.state === "missing");
  const deviceRows = list.devices.map((device) => h("tr", {},
    h("td", {}, device.id), h("td", {}, device.name), h("td", { class: "hide-narrow" }, device.role),
    h("td", {}, stateBadge(device), device.excluded ? " " : "", device.excluded ? badge("excluded") : "",
      device.exclusion_lifted ? " " : "", device.exclusion_lifted ? badge("exclusion lifted", "warn") : ""),
    h("td", { class: "hide-narrow" }, device.addresses.join(", ") || "–"),
    timeCell(device.last_heartbeat)));
  return h("div", {},
    h("h1", {}, "Devices"),
    h("div", { class: "cards" },
      h("div", { class: "card" }, h("div", { class: "value" }, list.devices.length), h("div", { class: "label" }, "Devices")),
      h("div", { class: "card alert" }, h("div", { class: "value" }, count(list.devices, (d) => d.unsafe)), h("div", { class: "label" }, "Unsafe")),
      h("div", { class: "card warn" }, h("div", { class: "value" }, missing.length), h("div", { class: "label" }, "Missing heartbeats")),
      h("div", { class: "card" }, h("div", { class: "value" }, list.reject_unsafe ? "On" : "Off"), h("div", { class: "label" }, "Reject unsafe devices"))),
    h("section", { class: "panel", "aria-labelledby": "h-subnets" },
      h("h2", { id: "h-subnets" }, "Health by subnet"),
      table("Device health by subnet", ["Subnet", { label: "Devices", class: "num" }, { label: "Green", class: "num" },
        { label: "Yellow", class: "num" }, { label: "Red", class: "num" }, { label: "Missing", class: "num" },
        { label: "Offline", class: "num" }, "Status"], subnetRows, "No devices are defined.")),
    h("section", { class: "panel", "aria-labelledby": "h-missing" },
      h("h2", { id: "h-missing" }, "Missing heartbeats"),
      h("p", { class: "muted" }, `A device is missing after ${list.heartbeat_timeout} without a heartbeat.`),
      table("Devices whose heartbeats stopped", ["Device", "Name", "Last heartbeat", "Missing since"],
        missing.map((device) => h("tr", {}, h("td", {}, device.id), h("td", {}, device.name),
          timeCell(device.last_heartbeat), timeCell(device.missing_at || device.state_since))),
        "Every device reports on time.")),
    h("section", { class: "panel", "aria-labelledby": "h-all" },
      h("h2", { id: "h-all" }, "All devices"),
      table("All devices", ["Id", "Name", { label: "Role", class: "hide-narrow" }, "State",
        { label: "Addresses", class: "hide-narrow" }, "Last heartbeat"], deviceRows, "No devices are defined.")),
    exclusions);
}

// ---- settings ------------------------------------------------------------

function settingForm(name, title, explanation, setting) {
  const source = setting.source === "api"
    ? h("p", {}, badge("set in the dashboard or API", "api"),
      ` by ${setting.author} on ${formatTime(setting.changed)}: ${setting.reason}. The file says ${setting.file_value ? "on" : "off"}.`)
    : h("p", {}, badge("from the configuration file"));
  const current = h("p", { class: "current" }, "In force: ",
    h("strong", { "data-setting": name }, setting.value ? "on" : "off"));
  if (state.role !== "admin") {
    return h("section", { class: "panel", "aria-labelledby": "h-" + name },
      h("h2", { id: "h-" + name }, title), h("p", { class: "muted" }, explanation), current, source,
      h("p", { class: "muted" }, "Settings are changed with the admin token."));
  }
  const choice = h("select", { id: name + "-value", name: "value" },
    h("option", { value: "true", selected: setting.value === true }, "On"),
    h("option", { value: "false", selected: setting.value === false }, "Off"),
    h("option", { value: "null" }, "Use the configuration file's value"));
  const reason = h("input", { id: name + "-reason", type: "text", name: "reason", required: true });
  const author = h("input", { id: name + "-author", type: "text", name: "author", required: true, autocomplete: "name" });
  const message = h("p", { class: "error", role: "alert" });
  const form = h("form", { class: "grid", "aria-label": "Change " + title.toLowerCase(), onsubmit: async (event) => {
    event.preventDefault();
    message.textContent = "";
    const body = { reason: reason.value.trim(), author: author.value.trim() };
    body[name] = JSON.parse(choice.value);
    try {
      await api("PUT", "/api/v1/settings", body);
      announce(`${title} saved`);
      await route();
    } catch (failure) { message.textContent = failure.message; }
  } }, field("New value", choice), field("Reason (recorded)", reason), field("Your name", author),
  h("div", { class: "actions" }, h("button", { type: "submit" }, "Save")), message);
  return h("section", { class: "panel", "aria-labelledby": "h-" + name },
    h("h2", { id: "h-" + name }, title), h("p", { class: "muted" }, explanation), current, source, form);
}

async function renderSettings() {
  const [settings, exclusions] = await Promise.all([api("GET", "/api/v1/settings"), exclusionsSection()]);
  return h("div", {},
    h("h1", {}, "Settings"),
    h("p", { class: "notice" }, "A setting changed here is stored and recorded in the events report. It overrides the configuration file, also after a reload or a restart, until it is set back to the file's value."),
    settingForm("synchronized_security", "Synchronized security",
      "On a lockout, request an endpoint scan of the owner's devices. Turning it off stops the scan requests, never the blocking." +
      (settings.endpoint_scan_url_configured ? "" : " No endpoint_scan_url is configured, so scan requests reach only devices that run sendguard agent."),
      settings.synchronized_security),
    settingForm("reject_unsafe", "Reject unsafe devices",
      "Refuse connections from and to devices whose health is red or whose heartbeats are missing.",
      settings.reject_unsafe),
    exclusions);
}

// ---- start ---------------------------------------------------------------

async function start() {
  document.getElementById("login-form").addEventListener("submit", login);
  document.getElementById("logout").addEventListener("click", logout);
  // The page's address is its hash, so the skip link moves the focus itself
  // instead of setting the hash to #main, which would leave the page.
  document.querySelector(".skip-link").addEventListener("click", (event) => {
    event.preventDefault();
    document.getElementById("main").focus();
  });
  window.addEventListener("hashchange", () => { route().then(focusMain); });
  try {
    const session = await api("GET", "/api/v1/session");
    startSession(session);
    if (!location.hash) location.hash = "#/overview";
    else await route();
  } catch (_) {
    showLogin("");
  }
}

document.addEventListener("DOMContentLoaded", start);
