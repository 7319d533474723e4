// What the chat and the cluster view share: node names and colours, and where requests went.

import { events } from "./api.js";

const PALETTE = ["#6366f1", "#0ea5e9", "#10b981", "#f59e0b", "#ec4899", "#8b5cf6", "#14b8a6", "#ef4444",
  "#84cc16", "#f97316", "#06b6d4", "#a855f7"];

const names = new Map(); // node id -> name
const colors = new Map(); // node id -> colour, stable for the life of the page

export const route = { local: null, server: null, serverRaw: "" }; // {header, at} each

/** Remember the names of the nodes in a cluster view (its nodes, placements, plan and spares):
 * ids travel in headers and in some texts, people read names. Returns true when a name is new. */
export function learnNodes(nodes, view = null) {
  let learned = false;
  const learn = (id, name) => {
    if (!id || !name) return;
    const key = String(id);
    if (names.get(key) !== String(name)) learned = true;
    names.set(key, String(name));
    nodeColor(key);
  };
  for (const node of nodes || []) {
    if (node && node.id) learn(node.id, node.name || node.address || node.id);
  }
  if (view && typeof view === "object") {
    const placement = view.placement && typeof view.placement === "object" ? view.placement : {};
    for (const p of [...(view.placements || []), ...(placement.plan || [])]) {
      for (const s of (p && p.stages) || []) if (s && s.node && s.name && !names.has(String(s.node))) learn(s.node, s.name);
    }
    for (const s of placement.spares || []) if (s && s.node && s.name && !names.has(String(s.node))) learn(s.node, s.name);
  }
  if (learned) events.dispatchEvent(new CustomEvent("names"));
  return learned;
}

/** Whether every id has a known name. */
export function knowsNodes(ids) {
  return (ids || []).every((id) => names.has(String(id)));
}

/** A node's name; an id not (yet) known shows shortened. */
export function nodeName(id) {
  return names.get(String(id)) || String(id).slice(0, 8);
}

function escapeRegExp(text) {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** A text from the gateway with every known node id in it replaced by the node's name. */
export function withNames(text) {
  let out = String(text ?? "");
  const ids = [...names.keys()].filter((id) => id.length >= 4 && id !== names.get(id))
    .sort((a, b) => b.length - a.length);
  for (const id of ids) {
    if (!out.includes(id)) continue;
    out = out.replace(new RegExp(`(^|[^0-9A-Za-z_-])${escapeRegExp(id)}(?![0-9A-Za-z_-])`, "g"),
      (_match, before) => `${before}${names.get(id)}`);
  }
  return out;
}

/** Whether a string is the id of a node this page has seen. */
export function isNodeId(value) {
  return names.has(String(value));
}

export function nodeColor(id) {
  const key = String(id);
  if (!colors.has(key)) colors.set(key, PALETTE[colors.size % PALETTE.length]);
  return colors.get(key);
}

/** A route header ("cloud", or node ids joined by commas) -> {target, nodes, label}. */
export function describeRoute(header) {
  const text = String(header || "").trim();
  if (!text) return null;
  if (text.toLowerCase() === "cloud" || text.toLowerCase().startsWith("cloud")) {
    return { target: "cloud", nodes: [], label: "cloud" };
  }
  if (["mesh", "local"].includes(text.toLowerCase())) return { target: "mesh", nodes: [], label: "the local mesh" };
  const ids = text.split(",").map((s) => s.trim()).filter(Boolean);
  return { target: "mesh", nodes: ids, label: ids.map(nodeName).join(" → ") };
}

/** Called by the chat for every X-EdgeMesh-Route header it sees. */
export function noteRoute(header) {
  route.local = { header, at: Date.now() / 1000, source: "page" };
  events.dispatchEvent(new CustomEvent("route", { detail: route.local }));
}

/** Called by the cluster poller with `routing.last_route` (any shape, or absent). */
export function noteServerRoute(value) {
  let header = null;
  if (typeof value === "string") header = value;
  else if (Array.isArray(value)) header = value.join(",");
  else if (value && typeof value === "object") {
    const v = value.header ?? value.route ?? value.target ?? value.kind ??
      (Array.isArray(value.nodes) ? value.nodes.join(",") : null);
    if (v !== null && v !== undefined) header = Array.isArray(v) ? v.join(",") : String(v);
  }
  const raw = JSON.stringify(value ?? null);
  if (header && raw !== route.serverRaw) route.server = { header, at: Date.now() / 1000, source: "gateway" };
  route.serverRaw = raw;
}

/** The most recent route seen, from this page's answers or from the gateway's report. */
export function currentRoute() {
  const { local, server } = route;
  if (!local || !server) return local || server;
  if (local.at >= server.at) return local;
  // The gateway only names the target ("mesh"/"cloud"); this page's own header names the nodes.
  const fromGateway = describeRoute(server.header);
  if (fromGateway && !fromGateway.nodes.length && describeRoute(local.header)?.target === fromGateway.target) {
    return local;
  }
  return server;
}
