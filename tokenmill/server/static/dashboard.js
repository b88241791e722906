"use strict";
// Polls dashboard/data each second and draws one SVG line chart per figure, a line per model (and per kind).
// Counters arrive cumulative, so rates and hit ratios come from their change over the last WINDOW_S seconds. Each
// chart's points stay in its data-series attribute (JSON: line name -> values, null for a gap), for tests.

const POLL_MS = 1000;
const KEEP = 120;  // points per chart: two minutes at one poll a second
// Counters move only when requests finish, so a rate between two polls would be a spike per request.
const WINDOW_S = 10;
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const W = 400, H = 160, LEFT = 44, BOTTOM = 4, TOP = 8;
// An API key set on the server travels in the URL fragment (/dashboard#key=...), which browsers never send. Read at
// each poll: adding it to an open page's URL does not reload the page. Not URLSearchParams: it reads '+' (common in
// base64 keys) as a space.
function apiKey() {
  const found = /(?:^#|&)key=([^&]*)/.exec(location.hash);
  if (!found) return null;
  try {
    return decodeURIComponent(found[1]);
  } catch {
    return found[1];  // a stray '%' in a key typed by hand
  }
}

// A counter that fell was reset (a replica restarted or left the sum): a gap, as Prometheus' rate() sees a reset,
// not a negative rate.
const change = (before, after, dt) => after >= before ? (after - before) / dt : null;
const rate = (name) => (a, b, dt) => change(a[name], b[name], dt);
const ratio = (part, whole) => (a, b) => {
  const d = b[whole] - a[whole], p = b[part] - a[part];
  return d > 0 && p >= 0 ? 100 * p / d : null;  // nothing looked up between polls: a gap, not 0%
};
const percentiles = (name) => ({
  p50: (a, b) => b[name].p50, p90: (a, b) => b[name].p90, p99: (a, b) => b[name].p99,
});
const cost = (kind) => (a, b) => b.cost_per_1m_tokens_usd[kind] ?? null;
const routedTotal = (m) => Object.values(m.routed).reduce((x, y) => x + y, 0);

// Each chart: its lines, each a function (a model's snapshot at the window's start, its latest, seconds between)
// -> a value or null (a gap), or `across`, a function of whole snapshots -> {line: value}; `when` hides a chart
// until some model (or the whole snapshot, for `across`) has what it shows.
const CHARTS = [
  {id: "requests", title: `Requests/s finished (last ${WINDOW_S} s)`, lines: {"": rate("requests")}},
  {id: "tokens", title: `Tokens/s of finished requests (last ${WINDOW_S} s)`,
   lines: {prompt: rate("prompt_tokens"), output: rate("generation_tokens")}},
  {id: "ttft", title: "TTFT percentiles since start (s)", lines: percentiles("ttft")},
  {id: "tpot", title: "TPOT percentiles since start (s)", lines: percentiles("tpot")},
  {id: "load", title: "Requests running / waiting",
   lines: {running: (a, b) => b.running, waiting: (a, b) => b.waiting}},
  {id: "kv", title: "KV cache use (%)", lines: {"": (a, b) => 100 * b.kv_cache_usage}},
  {id: "prefix", title: `Prefix-cache hits (% of prompt tokens looked up, last ${WINDOW_S} s)`,
   lines: {"": ratio("prefix_hits", "prefix_queries")}},
  {id: "cost", title: "Cost per 1M tokens (USD; busy time, and billed time with idle)", lines: {
    "prompt busy": cost("prompt_full"), "output busy": cost("completion_full"),
    "prompt billed": cost("prompt_current"), "output billed": cost("completion_current"),
  }},
  {id: "routed", title: `Requests/s routed from model auto (last ${WINDOW_S} s)`, when: (m) => routedTotal(m) > 0,
   lines: {"": (a, b, dt) => change(routedTotal(a), routedTotal(b), dt)}},
  {id: "routing", title: `Requests/s routed to a replica, by reason (last ${WINDOW_S} s)`,
   when: (snapshot) => Object.keys(snapshot.routing).length > 0,
   across: (a, b, dt) => Object.fromEntries(Object.entries(b.routing).map(
     ([reason, n]) => [reason, change(a.routing[reason] ?? 0, n, dt)]))},
  {id: "spec", title: `Draft tokens accepted (%, last ${WINDOW_S} s)`, when: (m) => m.draft_tokens > 0,
   lines: {"": ratio("accepted_tokens", "draft_tokens")}},
];

const state = CHARTS.map(() => ({times: [], series: {}}));
const recent = [];  // the snapshots of the last WINDOW_S seconds, and one older

function setUp() {
  const root = document.getElementById("charts");
  for (const chart of CHARTS) {
    const div = document.createElement("div");
    div.className = "chart";
    div.id = `chart-${chart.id}`;
    div.hidden = Boolean(chart.when);
    div.innerHTML = `<h2>${chart.title}</h2><svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none"></svg>` +
      `<div class="legend"></div>`;
    root.appendChild(div);
  }
}

function record(snapshot) {
  const models = snapshot.served.filter((name) => name in snapshot.models);
  recent.push(snapshot);
  while (recent.length > 2 && snapshot.time - recent[1].time >= WINDOW_S) recent.shift();
  const base = recent[0], dt = snapshot.time - base.time;
  CHARTS.forEach((chart, i) => {
    push(state[i], snapshot.time, dt > 0 ? pointsOf(chart, base, snapshot, dt, models) : {});
    const div = document.getElementById(`chart-${chart.id}`);
    const shown = chart.across ? chart.when?.(snapshot) : models.some((m) => chart.when?.(snapshot.models[m]));
    if (shown) div.hidden = false;
    draw(div, state[i]);
  });
}

function pointsOf(chart, base, snapshot, dt, models) {
  if (chart.across) return chart.across(base, snapshot, dt);
  const points = {};
  for (const model of models) {
    const now = snapshot.models[model], before = base.models[model];
    for (const [label, value] of Object.entries(chart.lines)) {
      const name = models.length > 1 ? `${model} ${label}`.trim() : label || model;
      points[name] = before ? value(before, now, dt) : null;  // a model that just appeared has no window yet
    }
  }
  return points;
}

function push(history, time, points) {
  history.times.push(time);
  for (const name of Object.keys(points)) history.series[name] ??= history.times.slice(1).map(() => null);
  for (const [name, values] of Object.entries(history.series)) values.push(points[name] ?? null);
  if (history.times.length > KEEP) {
    history.times.shift();
    for (const values of Object.values(history.series)) values.shift();
  }
}

function draw(div, history) {
  const {times, series} = history;
  const all = Object.values(series).flat().filter((v) => v !== null);
  const top = niceCeiling(Math.max(0, ...all));
  const x = (i) => LEFT + (W - LEFT - 2) * (times.length > 1 ? (times[i] - times[0]) / (times.at(-1) - times[0]) : 1);
  const y = (v) => TOP + (H - TOP - BOTTOM) * (1 - v / top);
  let svg = "";
  for (const v of [0, top / 2, top]) {
    svg += `<line class="grid" x1="${LEFT}" x2="${W}" y1="${y(v)}" y2="${y(v)}"/>` +
      `<text class="axis" x="${LEFT - 4}" y="${y(v) + 3}" text-anchor="end">${format(v)}</text>`;
  }
  let legend = "";
  Object.entries(series).forEach(([name, values], n) => {
    const color = COLORS[n % COLORS.length];
    // A null splits the line, so a gap in the data shows as one.
    let run = [];
    const flush = () => {
      if (run.length) svg += `<polyline stroke="${color}" points="${run.join(" ")}"/>`;
      run = [];
    };
    values.forEach((v, i) => (v === null ? flush() : run.push(`${x(i).toFixed(1)},${y(v).toFixed(1)}`)));
    flush();
    const last = values.findLast((v) => v !== null);
    legend += `<span><i style="background:${color}"></i>${escapeHtml(name)} ${last === undefined ? "–" : format(last)}</span>`;
  });
  div.querySelector("svg").innerHTML = svg;
  div.querySelector(".legend").innerHTML = legend;
  div.dataset.series = JSON.stringify(series);
}

// Model names and route reasons come from the operator's flags and the requests: text, never markup.
function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function niceCeiling(v) {
  if (!(v > 0)) return 1;
  const step = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 5, 10].map((m) => m * step).find((c) => c >= v);
}

function format(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 10 ? v.toFixed(0) : a >= 1 ? v.toFixed(1) : v.toPrecision(2);
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const key = apiKey();
    const response = await fetch("dashboard/data", {headers: key ? {Authorization: `Bearer ${key}`} : {}});
    if (response.status === 401) throw new Error("this server needs its API key: open /dashboard#key=YOUR_KEY");
    if (!response.ok) throw new Error(`dashboard/data answered HTTP ${response.status}`);
    const snapshot = await response.json();
    record(snapshot);
    status.className = "";
    const updated = new Date(snapshot.time * 1000).toLocaleTimeString();
    status.textContent = `${snapshot.served.join(", ")} · updated ${updated}`;
  } catch (error) {
    status.className = "error";
    status.textContent = error.message;
  }
  setTimeout(poll, POLL_MS);
}

setUp();
poll();
