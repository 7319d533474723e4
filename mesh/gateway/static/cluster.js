// The cluster view: polls /api/cluster and draws nodes, layer ranges, placements, the placement
// controller's plan (and why each node has its role) and routing. People read node names here:
// ids are only in tooltips and data attributes.
// Tolerant of missing keys: every optional field of the view may be absent or null.

import { ApiError, apiJson, events, fmtAgo, fmtBytes, h } from "./api.js";
import {
  currentRoute, describeRoute, isNodeId, learnNodes, nodeColor, nodeName, noteServerRoute, withNames,
} from "./mesh-state.js";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);

let last = null; // the last view received
let lastOkAt = 0;
let lastError = "";
let timer = 0;

const STATE_LABEL = {
  ready: "ready", joining: "joining", draining: "draining", down: "down",
  unauthenticated: "unauthenticated", incompatible: "incompatible",
};

// ---------------------------------------------------------------- layers

/** How many layers the model has: from the view's model, a node's models, or the placements. */
function modelLayers(view) {
  const model = view.model || {};
  if (Number(model.n_layers) > 0) return Number(model.n_layers);
  for (const node of view.nodes || []) {
    for (const m of node.models || []) {
      if (m && Number(m.n_layers) > 0 && (!model.sha256 || m.sha256 === model.sha256)) return Number(m.n_layers);
    }
  }
  let max = 0;
  for (const p of view.placements || []) {
    for (const s of p.stages || []) if (Array.isArray(s.layers)) max = Math.max(max, Number(s.layers[1]) || 0);
  }
  for (const node of view.nodes || []) if (Array.isArray(node.layers)) max = Math.max(max, Number(node.layers[1]) || 0);
  return max || 0;
}

function validRange(r) {
  return Array.isArray(r) && r.length >= 2 && Number.isFinite(Number(r[0])) && Number.isFinite(Number(r[1])) &&
    Number(r[1]) > Number(r[0]);
}

/** Every layer range a node serves: its own `layers`, its `stages`, and the placements naming it. */
function nodeRanges(node, view) {
  const seen = new Set();
  const ranges = [];
  const add = (r) => {
    if (!validRange(r)) return;
    const key = `${Number(r[0])}:${Number(r[1])}`;
    if (seen.has(key)) return;
    seen.add(key);
    ranges.push([Number(r[0]), Number(r[1])]);
  };
  add(node.layers);
  for (const s of node.stages || []) add(s && s.layers);
  for (const p of view.placements || []) for (const s of p.stages || []) if (s.node === node.id) add(s.layers);
  return ranges.sort((a, b) => a[0] - b[0]);
}

/** "layers 0–9" (inclusive numbering, as people count); the tooltip has the half-open range. */
function rangeText(r) {
  return r[1] - r[0] === 1 ? `layer ${r[0]}` : `${r[0]}–${r[1] - 1}`;
}

function layersLabel(ranges, total) {
  if (!ranges.length) return "no layers";
  const count = ranges.reduce((sum, r) => sum + r[1] - r[0], 0);
  const list = ranges.map(rangeText).join(", ");
  const prefix = ranges.length === 1 && ranges[0][1] - ranges[0][0] === 1 ? "" : "layers ";
  const share = total ? (count >= total ? ` · all ${total}` : ` · ${count} of ${total}`) : "";
  return `${prefix}${list}${share}`;
}

function layerBar(segments, total, { labels = false, testid = null } = {}) {
  const bar = h("div", {
    class: "layer-bar", role: "img", dataset: testid ? { testid } : {},
    style: { "--layers": String(total > 0 && total <= 64 ? total : 1) },
  });
  if (!total) return bar;
  for (const seg of segments) {
    const [first, last] = seg.range;
    const el = h("div", {
      class: "seg",
      title: seg.title,
      dataset: seg.testid ? { testid: seg.testid } : {},
      style: {
        left: `${(first / total) * 100}%`,
        width: `${((last - first) / total) * 100}%`,
        background: seg.color,
      },
    }, labels ? h("span", {}, seg.label) : null);
    bar.append(el);
  }
  bar.setAttribute("aria-label", segments.map((s) => s.title).join("; ") || "no layers");
  return bar;
}

function axis(total) {
  return h("div", { class: "axis" }, h("span", {}, "0"), h("span", {}, total ? `${total} layers` : ""));
}

// ---------------------------------------------------------------- parts

function statCard(label, value, sub, testid, extra = "") {
  return h("div", { class: `stat ${extra}`.trim(), dataset: testid ? { testid } : {} },
    h("div", { class: "stat-label" }, label),
    h("div", { class: "stat-value" }, value),
    sub ? h("div", { class: "stat-sub" }, sub) : null);
}

function summary(view, total) {
  const nodes = view.nodes || [];
  const ready = nodes.filter((n) => n.state === "ready").length;
  const placements = view.placements || [];
  const kinds = {};
  for (const p of placements) kinds[p.kind || "?"] = (kinds[p.kind || "?"] || 0) + 1;
  const spares = Array.isArray(view.placement?.spares) ? view.placement.spares.length : 0;
  const inFlight = nodes.reduce((s, n) => s + (Number(n.in_flight) || 0), 0);
  const capacity = nodes.reduce((s, n) => s + (n.state === "ready" ? Number(n.capacity) || 0 : 0), 0);
  const model = view.model || {};
  const size = (nodes.flatMap((n) => n.models || []).find((m) => m.sha256 === model.sha256) || {}).bytes;
  const modelSub = [total ? `${total} layers` : null, size ? fmtBytes(size) : null,
    model.sha256 ? `sha ${String(model.sha256).slice(0, 10)}` : null].filter(Boolean).join(" · ");
  return [
    statCard("Model", model.name || "–", modelSub, "cluster-model", "model"),
    statCard("Nodes ready", `${ready} / ${nodes.length}`, nodes.length ? null : "waiting for nodes…", "nodes-ready"),
    statCard("Placements", String(placements.length),
      [...Object.entries(kinds).map(([k, n]) => `${n} ${k}${n === 1 ? "" : "s"}`),
        spares ? `${spares} spare${spares === 1 ? "" : "s"}` : null].filter(Boolean).join(" · ") || "none yet",
      "placements-count"),
    statCard("In flight", `${inFlight} / ${capacity}`, "of capacity"),
  ];
}

function chip(text, tone = "", testid = null) {
  return h("span", { class: `chip ${tone}`.trim(), dataset: testid ? { testid } : {} }, text);
}

function routingCard(view) {
  const routing = view.routing || null;
  const current = currentRoute();
  const route = current ? describeRoute(current.header) : null;
  const target = route ? route.target : null;
  const headline = target === "cloud" ? "Cloud" : target === "mesh" ? "Local mesh" : "No requests yet";
  let detail = "the next answer will show where it was served";
  if (route && current.source === "page") {
    detail = `last answer here came from ${route.target === "cloud" ? "the cloud API" : route.label} · ${fmtAgo(current.at)}`;
  } else if (route) {
    detail = `the gateway's latest request went to ${route.target === "cloud" ? "the cloud API" : "the local mesh"}`;
  }
  const chips = [];
  if (routing) {
    if (routing.policy) chips.push(chip(`policy: ${routing.policy}`, "", "routing-policy"));
    const cloud = routing.cloud;
    if (cloud && typeof cloud === "object") {
      if (cloud.url) {
        let host = String(cloud.url);
        try { host = new URL(host).host; } catch { /* not a URL: show as is */ }
        chips.push(chip(`cloud ${host}`));
      }
      if ("up" in cloud && cloud.up !== null) chips.push(chip(cloud.up ? "cloud up" : "cloud down", cloud.up ? "good" : "bad"));
      if (cloud.breaker !== undefined && cloud.breaker !== null) {
        const breaker = typeof cloud.breaker === "object"
          ? String(cloud.breaker.state ?? JSON.stringify(cloud.breaker)) : String(cloud.breaker);
        chips.push(chip(`breaker ${breaker}`, /open/i.test(breaker) && !/half/i.test(breaker) ? "bad" :
          /half/i.test(breaker) ? "warn" : "good"));
      }
    } else if (cloud === null) {
      chips.push(chip("no cloud configured"));
    }
  }
  const icon = target === "cloud" ? "☁" : "⬡";
  return h("div", { class: `route-card ${target || "none"}`, dataset: { testid: "routing" } },
    h("div", { class: "route-icon", "aria-hidden": "true" }, icon),
    h("div", { class: "route-text" },
      h("div", { class: "stat-label" }, "Requests are going to"),
      h("div", { class: "route-target", dataset: { testid: "route-target" } }, headline),
      h("div", { class: "stat-sub" }, detail)),
    chips.length ? h("div", { class: "chips" }, chips) : null);
}

/** A value of the failover report as a person reads it: times as clock times, node ids as names. */
function formatValue(key, value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number" && value > 1e9 && value < 1e11 && /(^|_)(at|time|since|when|ts)$/i.test(key)) {
    return `${new Date(value * 1000).toLocaleTimeString()} (${fmtAgo(value)})`;
  }
  if (typeof value === "string" && isNodeId(value)) return nodeName(value);
  if (Array.isArray(value)) return value.map((v) => formatValue(key, v)).join(", ");
  if (typeof value === "object") {
    if (validRange(value.layers) && value.node) return `${nodeName(value.node)} ${rangeText(value.layers)}`;
    return withNames(JSON.stringify(value));
  }
  return withNames(String(value));
}

const FAILOVER_KEYS = { at: "when", from: "from", to: "to", reason: "reason", detail: "detail" };

function failoverCard(view) {
  const f = view.last_failover;
  if (!f) return null;
  const rows = typeof f === "object"
    ? Object.entries(f).map(([k, v]) => h("div", { class: "kv" },
      h("dt", {}, FAILOVER_KEYS[k] || k.replace(/_/g, " ")), h("dd", {}, formatValue(k, v))))
    : [h("div", { class: "kv" }, h("dd", {}, withNames(String(f))))];
  return h("div", { class: "failover", dataset: { testid: "last-failover" } },
    h("div", { class: "failover-title" }, "⚠ Last failover"),
    h("dl", {}, rows));
}

/** A number from the view, or NaN when it is absent (null must not read as 0). */
function num(value) {
  return value === null || value === undefined || value === "" ? NaN : Number(value);
}

function memoryBlock(node) {
  const total = num(node.memory_total);
  const free = num(node.memory_free);
  if (!(total > 0)) return h("div", { class: "mem unknown" }, "memory unknown");
  const used = Number.isFinite(free) ? Math.max(0, total - free) : null;
  const pct = used === null ? 0 : Math.min(100, (used / total) * 100);
  const limit = Number(node.memory_limit) > 0 ? ` · limit ${fmtBytes(node.memory_limit)}` : "";
  return h("div", { class: "mem", dataset: { testid: "node-memory" } },
    h("div", { class: "row-label" }, h("span", {}, "Memory"),
      h("span", {}, Number.isFinite(free) ? `${fmtBytes(free)} free of ${fmtBytes(total)}${limit}`
        : `${fmtBytes(total)} total${limit}`)),
    h("div", { class: "meter" }, h("div", { style: { width: `${pct}%` } })),
    Number(node.memory_budget) > 0
      ? h("div", { class: "budget", dataset: { testid: "node-budget" },
        title: "the memory the planner may fill on this node (its limit, else what is free)" },
      `budget for the model: ${fmtBytes(node.memory_budget)}`)
      : null);
}

const SPEED_SOURCE = {
  "start-up probe": "measured once when the node started",
  "idle probe": "measured again while the node was idle",
};

/** The node's decode speed, which the planner plans with, and where the number comes from. */
function speedChip(node) {
  const tps = num(node.decode_tokens_per_second);
  if (!(tps > 0)) return null;
  const source = node.speed_source ? String(node.speed_source) : "";
  return h("span", {
    class: "chip speed", dataset: { testid: "node-speed" },
    title: `decode speed on the whole model${source ? `, ${SPEED_SOURCE[source] || source}` : ""}`,
  }, `${tps} tok/s`, source ? h("span", { class: "chip-note" }, `\u00a0· ${source}`) : null);
}

/** What the node is busy with (a shard transfer with its progress, a load), if anything. */
function activityLine(node) {
  const act = node.activity;
  if (!act || !act.what) return null;
  const pct = typeof act.progress === "number" ? Math.round(act.progress * 100) : null;
  return h("div", { class: "activity", dataset: { testid: "node-activity" } },
    h("span", {}, withNames(String(act.what))),
    pct === null ? h("span", { class: "chip-note" }, " …")
      : h("progress", { max: "100", value: String(pct), title: `${pct}%` }),
    pct === null ? null : h("span", { class: "chip-note" }, ` ${pct}%`));
}

function nodeCard(node, view, total) {
  const color = node.id ? nodeColor(node.id) : "#94a3b8";
  const ranges = nodeRanges(node, view);
  const state = String(node.state || "unknown");
  const role = node.role || (ranges.length ? "stage" : "idle");
  const load = `${Number(node.in_flight) || 0} / ${Number(node.capacity) || 0}`;
  const facts = [
    node.address,
    node.pid ? `pid ${node.pid}` : null,
    node.version ? `v${node.version}` : null,
    node.threads ? `${node.threads} thread${Number(node.threads) === 1 ? "" : "s"}` : null,
  ].filter(Boolean).join(" · ");
  const segments = ranges.map((r) => ({
    range: r, color, title: `${node.name}: layers [${r[0]}, ${r[1]})`, label: rangeText(r),
  }));
  const routeNow = currentRoute();
  const served = routeNow && describeRoute(routeNow.header)?.nodes.includes(node.id);
  const why = node.role_reason ? withNames(node.role_reason) : "";
  const trouble = node.reason && withNames(node.reason) !== why ? withNames(node.reason) : "";
  return h("article", {
    class: `node-card state-${state}${served ? " served" : ""}`,
    dataset: { testid: "node", nodeId: node.id || "", state },
    style: { "--node-color": color },
  },
  h("header", {},
    h("span", { class: "swatch", "aria-hidden": "true" }),
    h("span", { class: "node-name", dataset: { testid: "node-name" } }, node.name || node.address || "node"),
    h("span", { class: `pill ${state}`, dataset: { testid: "node-state" } }, STATE_LABEL[state] || state)),
  h("div", { class: "facts", title: node.id ? `node id ${node.id}` : null }, facts),
  trouble ? h("div", { class: "reason" }, trouble) : null,
  h("div", { class: "badges" },
    chip(role, `role ${role}`, "node-role"),
    node.stage_only ? chip("layer ranges only", "", "node-stage-only") : null,
    Number(node.capacity) > 0 ? chip(`in flight ${load}`) : null,
    speedChip(node),
    served ? chip("served last answer", "accent") : null),
  why ? h("div", { class: `role-reason${state === "ready" ? "" : " off"}`, dataset: { testid: "node-role-reason" } },
    h("span", { class: "why" }, "Why: "), why) : null,
  activityLine(node),
  memoryBlock(node),
  h("div", { class: "layers" },
    h("div", { class: "row-label" }, h("span", {}, "Layers"),
      h("span", { dataset: { testid: "node-layers" }, title: ranges.map((r) => `[${r[0]}, ${r[1]})`).join(" ") },
        layersLabel(ranges, total))),
    layerBar(segments, total, { testid: "node-layer-bar" })));
}

function stageName(stage) {
  return stage.name ? String(stage.name) : nodeName(stage.node);
}

// ---------------------------------------------------------------- the controller's plan

const CHANGE_LABEL = {
  initial: "first placement", extend: "new nodes put to use", repair: "repaired after a failure",
  replan: "re-planned", better: "switched to a faster plan", capacity: "more capacity", keep: "kept what runs",
};

function changeText(change) {
  return CHANGE_LABEL[change] || String(change || "");
}

/** One placement of the plan as a sentence: "Pipeline of 3: node-1 layers 0–9 → node-2 …". */
function planLine(p, total) {
  const stages = (p && p.stages) || [];
  const kind = String(p.kind || "placement");
  if (kind === "replica") {
    const names = stages.map(stageName).join(", ");
    return `Replica: ${names}${total ? ` serves all ${total} layers` : " serves the whole model"}`;
  }
  const parts = stages.map((s) => (validRange(s.layers)
    ? `${stageName(s)} (layers ${rangeText([Number(s.layers[0]), Number(s.layers[1])])})` : stageName(s)));
  const title = kind === "pipeline" ? `Pipeline of ${stages.length} stage${stages.length === 1 ? "" : "s"}`
    : `${kind[0].toUpperCase()}${kind.slice(1)}`;
  return `${title}: ${parts.join(" → ")}`;
}

function modeLine(p) {
  if (p.active) {
    return ["This gateway places the model: it holds every ready node's claim and converges them to the plan.",
      "good"];
  }
  if (p.rival) {
    return [`This gateway only routes: gateway ${p.rival} places the model, and this one serves what the nodes hold.`,
      "warn"];
  }
  return ["This gateway only routes to what the nodes hold (it does not place the model now).", ""];
}

function historyEntry(entry) {
  const at = Number(entry.at);
  const when = Number.isFinite(at) && at > 0 ? new Date(at * 1000).toLocaleTimeString() : "";
  const seconds = Number(entry.seconds);
  const plan = (entry.plan || []).map((line) => withNames(line)).join("; ");
  return h("li", { dataset: { testid: "plan-history-entry", change: String(entry.change || "") } },
    h("span", { class: "when", title: Number.isFinite(at) ? fmtAgo(at) : null }, when),
    h("span", { class: "what", title: String(entry.change || "") }, changeText(entry.change)),
    h("span", { class: "muted" },
      [entry.trigger ? `after ${withNames(entry.trigger)}` : null,
        Number.isFinite(seconds) ? `${seconds.toFixed(seconds < 10 ? 2 : 1)} s` : null,
        entry.loaded === false ? "nothing loaded" : null].filter(Boolean).join(" · ")),
    plan ? h("div", { class: "history-plan" }, plan) : null);
}

function placementPanel(view, total) {
  const p = view.placement;
  if (!p || typeof p !== "object") return null;
  const [mode, tone] = modeLine(p);
  const chips = [];
  if (p.strategy) chips.push(chip(`strategy: ${p.strategy}`, "", "plan-strategy"));
  if (p.active) chips.push(p.converged ? chip("converged", "good", "plan-converged")
    : chip("converging…", "warn", "plan-converged"));
  if (p.change) chips.push(chip(`last decision: ${changeText(p.change)}`, "", "plan-change"));
  if (Number(p.n_ctx) > 0) chips.push(chip(`context ${p.n_ctx} tokens`));
  const plan = Array.isArray(p.plan) ? p.plan : [];
  const spares = Array.isArray(p.spares) ? p.spares : [];
  const reasons = (Array.isArray(p.reasons) ? p.reasons : []).map((r) => withNames(r));
  const history = (Array.isArray(p.history) ? p.history : []).slice(-5).reverse();
  return h("section", { class: "plan-card", dataset: { testid: "placement-panel", active: String(Boolean(p.active)) } },
    h("div", { class: "plan-head" },
      h("span", { class: "plan-title" }, "Placement"),
      chips.length ? h("div", { class: "chips" }, chips) : null),
    h("div", { class: `plan-mode ${tone}`.trim(), dataset: { testid: "plan-mode" },
      title: p.controller ? `this gateway's controller: ${p.controller}` : null }, mode),
    plan.length
      ? h("ul", { class: "plan-lines" },
        plan.map((entry) => h("li", { dataset: { testid: "plan-line", kind: String(entry.kind || "") } },
          planLine(entry, total))))
      : h("p", { class: "empty-note", dataset: { testid: "plan-line-none" } },
        "No plan yet: nothing can be placed on the ready nodes."),
    spares.length
      ? h("div", { class: "plan-spares", dataset: { testid: "plan-spares" } },
        h("span", { class: "muted" }, "Spares, standing by to take over: "),
        spares.map((s) => stageName(s)).join(", "))
      : null,
    reasons.length
      ? h("details", { class: "plan-reasons" }, h("summary", {}, "The planner's notes"),
        h("ul", {}, reasons.map((r) => h("li", { dataset: { testid: "plan-reason" } }, r))))
      : null,
    history.length
      ? h("div", { class: "plan-history" },
        h("div", { class: "stat-label" }, "Recent changes"),
        h("ol", { dataset: { testid: "plan-history" } }, history.map(historyEntry)))
      : null);
}

function placementRow(p, index, view, total) {
  const stages = (p.stages || []).filter((s) => s && validRange(s.layers));
  const kind = p.kind || "placement";
  const segments = stages.map((s, i) => ({
    range: [Number(s.layers[0]), Number(s.layers[1])],
    color: nodeColor(s.node),
    title: `stage ${i}: ${stageName(s)} layers [${s.layers[0]}, ${s.layers[1]})`,
    label: `${stageName(s)} · ${rangeText([Number(s.layers[0]), Number(s.layers[1])])}`,
    testid: "placement-stage",
  }));
  const routeNow = currentRoute();
  const lastIds = routeNow ? describeRoute(routeNow.header)?.nodes || [] : [];
  const active = lastIds.length > 0 && stages.length === lastIds.length && stages.every((s) => lastIds.includes(s.node));
  const title = kind === "pipeline"
    ? `Pipeline · ${stages.length} stage${stages.length === 1 ? "" : "s"}`
    : `${kind[0].toUpperCase()}${kind.slice(1)} ${index + 1}`;
  return h("div", { class: `placement${active ? " active" : ""}`, dataset: { testid: "placement", kind } },
    h("div", { class: "placement-head" },
      h("span", { class: "placement-title" }, title),
      h("span", { class: "muted" }, stages.map(stageName).join(" → ")),
      active ? chip("last used", "accent") : null),
    layerBar(segments, total, { labels: true }),
    axis(total));
}

// ---------------------------------------------------------------- render + poll

/** Nodes in the order of the layers they serve (a pipeline reads left to right), then by name. */
function sortedNodes(view) {
  const nodes = Array.isArray(view.nodes) ? view.nodes.filter((n) => n && typeof n === "object") : [];
  const key = (n) => {
    const ranges = nodeRanges(n, view);
    return ranges.length ? ranges[0][0] : Number.MAX_SAFE_INTEGER;
  };
  const name = (n) => String(n.name || n.address || "");
  return nodes.sort((a, b) => key(a) - key(b) || name(a).localeCompare(name(b), undefined, { numeric: true }));
}

function setStatus(view) {
  const status = $("mesh-status");
  const label = status.querySelector(".label");
  if (!view) {
    status.dataset.tone = "bad";
    label.textContent = lastError ? "gateway unreachable" : "connecting…";
    return;
  }
  const nodes = view.nodes || [];
  const ready = nodes.filter((n) => n.state === "ready").length;
  status.dataset.tone = ready === 0 ? "bad" : ready < nodes.length ? "warn" : "good";
  label.textContent = `${ready}/${nodes.length} node${nodes.length === 1 ? "" : "s"} ready`;
  $("nodes-badge").textContent = String(nodes.length);
}

export function render() {
  const view = last;
  const error = $("cluster-error");
  error.hidden = !lastError;
  error.textContent = lastError;
  $("cluster-updated").textContent = lastOkAt ? `updated ${fmtAgo(lastOkAt / 1000)}` : "";
  setStatus(view);
  if (!view) return;
  const total = modelLayers(view);
  $("cluster-summary").replaceChildren(...summary(view, total));
  $("cluster-routing").replaceChildren(routingCard(view));
  const failover = failoverCard(view);
  $("cluster-failover").replaceChildren(...(failover ? [failover] : []));
  const plan = placementPanel(view, total);
  $("cluster-plan").replaceChildren(...(plan ? [plan] : []));
  const nodes = view.nodes || [];
  $("nodes").replaceChildren(...(nodes.length
    ? nodes.map((n) => nodeCard(n, view, total))
    : [h("p", { class: "empty-note" }, "No nodes yet. Start one with ", h("code", {}, "edgemesh node"), ".")]));
  const placements = view.placements || [];
  $("placements").replaceChildren(...(placements.length
    ? placements.map((p, i) => placementRow(p, i, view, total))
    : [h("p", { class: "empty-note" }, "Nothing placed yet: the planner places the model once nodes are ready.")]));
}

async function poll() {
  clearTimeout(timer);
  try {
    const view = await apiJson("api/cluster");
    view.nodes = sortedNodes(view);
    learnNodes(view.nodes, view);
    if (view.routing) noteServerRoute(view.routing.last_route);
    last = view;
    lastOkAt = Date.now();
    lastError = "";
  } catch (err) {
    lastError = err instanceof ApiError && err.status === 401
      ? "The gateway needs an API key: set it in Settings."
      : `Cannot load the cluster view: ${err && err.message ? err.message : err}`;
  }
  render();
  timer = setTimeout(poll, document.hidden ? POLL_MS * 3 : POLL_MS);
}

export function initCluster() {
  events.addEventListener("route", render);
  events.addEventListener("settings-changed", poll);
  poll();
}
