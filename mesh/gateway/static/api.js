// Settings kept in this browser, and the one fetch wrapper every API call goes through.

const PREFIX = "edgemesh.";

function load(key, fallback = "") {
  try {
    const value = window.localStorage.getItem(PREFIX + key);
    return value === null ? fallback : value;
  } catch {
    return fallback; // storage disabled (private mode, file://): settings last for this page only
  }
}

function save(key, value) {
  try {
    if (value === "" || value === null || value === undefined) window.localStorage.removeItem(PREFIX + key);
    else window.localStorage.setItem(PREFIX + key, String(value));
  } catch {
    /* see load() */
  }
}

/** Settings with defaults; every field persists in localStorage under "edgemesh.<name>". */
export const settings = {
  get apiKey() { return load("apiKey"); },
  set apiKey(v) { save("apiKey", v.trim()); },
  get maxTokens() { return load("maxTokens", "512"); },
  set maxTokens(v) { save("maxTokens", v); },
  get temperature() { return load("temperature", "0.7"); },
  set temperature(v) { save("temperature", v); },
  get system() { return load("system"); },
  set system(v) { save("system", v); },
  get model() { return load("model"); },
  set model(v) { save("model", v); },
};

export const events = new EventTarget();

/** Error raised for a non-2xx answer, carrying the gateway's own message. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

export async function errorMessage(response) {
  let text = "";
  try {
    text = await response.text();
    const body = JSON.parse(text);
    if (body && body.error) return String(body.error.message || body.error);
  } catch {
    /* not JSON: use the raw text */
  }
  const detail = text.trim() && text.trim() !== response.statusText ? `: ${text.trim().slice(0, 300)}` : "";
  return `${response.status} ${response.statusText}`.trim() + detail;
}

/** fetch() relative to the page, with the API key attached; signals "auth-required" on 401. */
export async function apiFetch(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = settings.apiKey;
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { cache: "no-store", ...options, headers });
  if (response.status === 401) events.dispatchEvent(new CustomEvent("auth-required", { detail: { path } }));
  else if (response.ok) events.dispatchEvent(new CustomEvent("auth-ok"));
  return response;
}

export async function apiJson(path) {
  const response = await apiFetch(path);
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response.json();
}

// ---------------------------------------------------------------- formatting

export function fmtBytes(bytes) {
  if (bytes === null || bytes === undefined || !Number.isFinite(Number(bytes))) return "–";
  let value = Number(bytes);
  const units = ["B", "KB", "MB", "GB", "TB"];
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
  return `${value >= 100 || unit === 0 ? value.toFixed(0) : value.toFixed(1)} ${units[unit]}`;
}

export function fmtAgo(epochSeconds) {
  if (!Number.isFinite(Number(epochSeconds))) return "";
  const s = Math.max(0, Date.now() / 1000 - Number(epochSeconds));
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}

/** Build an element: h("div", {class: "x", dataset: {testid: "y"}}, child, "text", ...). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "style" && typeof value === "object") {
      for (const [prop, v] of Object.entries(value)) el.style.setProperty(prop, v);
    }
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}
