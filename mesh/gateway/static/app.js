// EdgeMesh web UI: one page with a chat and a cluster view. `/` puts the chat first,
// `/cluster` puts the cluster view first; on narrow screens only the first one shows.

import { events, settings } from "./api.js";
import { initChat } from "./chat.js";
import { initCluster, render as renderCluster } from "./cluster.js";

const $ = (id) => document.getElementById(id);

function viewOf(pathname) {
  return /\/cluster\/?$/.test(pathname) ? "cluster" : "chat";
}

function showView(view) {
  document.body.dataset.view = view;
  for (const link of document.querySelectorAll("[data-nav]")) {
    const current = link.dataset.nav === view;
    link.classList.toggle("current", current);
    if (link.closest(".tabs")) link.setAttribute("aria-current", current ? "page" : "false");
  }
  document.title = view === "cluster" ? "Cluster · EdgeMesh" : "EdgeMesh";
}

function initNavigation() {
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.addEventListener("click", (event) => {
      if (event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
      event.preventDefault();
      const view = link.dataset.nav;
      const url = new URL(link.getAttribute("href"), window.location.href);
      if (url.pathname !== window.location.pathname) window.history.pushState({ view }, "", url);
      showView(view);
      if (view === "chat") $("chat-input").focus();
    });
  }
  window.addEventListener("popstate", () => showView(viewOf(window.location.pathname)));
  showView(viewOf(window.location.pathname));
}

function initSettings() {
  const panel = $("settings");
  const toggle = $("settings-toggle");
  const fields = {
    apiKey: $("api-key"), maxTokens: $("max-tokens"), temperature: $("temperature"), system: $("system-prompt"),
  };
  const fill = () => { for (const [name, el] of Object.entries(fields)) el.value = settings[name]; };
  const open = (show) => {
    panel.hidden = !show;
    toggle.setAttribute("aria-expanded", String(show));
    if (show) fill();
  };
  toggle.addEventListener("click", () => open(panel.hidden));
  $("settings-close").addEventListener("click", () => open(false));
  $("settings-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const keyChanged = fields.apiKey.value.trim() !== settings.apiKey;
    for (const [name, el] of Object.entries(fields)) settings[name] = el.value;
    open(false);
    if (keyChanged) {
      $("notice").hidden = true;
      events.dispatchEvent(new CustomEvent("settings-changed"));
    }
  });
  $("show-key").addEventListener("change", (event) => {
    fields.apiKey.type = event.target.checked ? "text" : "password";
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !panel.hidden) open(false);
  });

  events.addEventListener("auth-required", () => {
    const notice = $("notice");
    notice.textContent = settings.apiKey
      ? "The gateway refused the API key. Check it in Settings."
      : "This gateway needs an API key. Open Settings to enter it; it is kept in this browser only.";
    notice.hidden = false;
  });
  events.addEventListener("auth-ok", () => { $("notice").hidden = true; });
  $("notice").addEventListener("click", () => open(true));
}

initNavigation();
initSettings();
initChat();
initCluster();
// Relative times ("updated 3 s ago") stay fresh between polls.
setInterval(renderCluster, 5000);
