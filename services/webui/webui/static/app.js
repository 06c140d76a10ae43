// Entry point: routes (#/chat, #/chat/MODEL: a new chat with that version, #/jobs, #/jobs/ID,
// #/launch, #/models), the sign-in session, the serving model's badge, and the error banner
// shared by every page.
import { listOf, request } from "./api.js";
import { mountChat, modelLabel } from "./chat.js";
import { h } from "./dom.js";
import { mountJob, mountJobs } from "./jobs.js";
import { mountLaunch } from "./launch.js";
import { mountModels } from "./models.js";

const MODEL_POLL_MS = 3000;
const view = document.getElementById("view");
const bannerEl = document.getElementById("banner");
const badge = document.getElementById("model-badge");
const loginButton = document.getElementById("login-button");
const dialog = document.getElementById("login-dialog");

const problems = new Map();
let session = { role: null, admin_enabled: false, chat_needs_login: false };
let model = null;
let page = null;

const app = {
  model: () => model,
  isAdmin: () => session.role === "admin",
  banner(source, message) {
    problems.set(source, message);
    paintBanner();
  },
  clearBanner(source) {
    if (problems.delete(source)) paintBanner();
  },
};

function paintBanner() {
  bannerEl.replaceChildren(...[...problems.values()].map((m) => h("div", {}, m)));
  bannerEl.hidden = problems.size === 0;
}

function sameModel(a, b) {
  return a && b && a.id === b.id && a.version === b.version && a.stage === b.stage;
}

async function pollModel() {
  try {
    const served = listOf(await request("/api/inference/v1/models"), "data")[0] ?? null;
    if (model && served && !sameModel(model, served)) page?.modelChanged?.(model, served);
    model = served;
    badge.textContent = modelLabel(model);
    badge.title = model?.context_length ? `context ${model.context_length} tokens` : "";
    badge.classList.remove("down");
    app.clearBanner("inference");
  } catch (err) {
    badge.textContent = err.status === 503 ? "no model loaded" : "inference unavailable";
    badge.classList.add("down");
    app.banner("inference", err.message);
  }
}

async function loadSession() {
  try {
    session = await request("/api/session");
  } catch (err) {
    app.banner("session", err.message);
  }
  loginButton.textContent = session.role ? `Sign out (${session.role})` : "Sign in";
  loginButton.hidden = !session.role && !session.admin_enabled && !session.chat_needs_login;
}

loginButton.addEventListener("click", async () => {
  if (session.role) {
    await request("/api/session", { method: "DELETE" });
    await loadSession();
    route();
    return;
  }
  dialog.querySelector(".form-error").textContent = "";
  dialog.showModal();
});
dialog.querySelector("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (e.submitter?.value === "cancel") { dialog.close(); return; }
  const input = dialog.querySelector("input");
  try {
    await request("/api/session", { method: "POST", body: { token: input.value } });
    input.value = "";
    dialog.close();
    await loadSession();
    route();
  } catch (err) {
    dialog.querySelector(".form-error").textContent = err.message;
  }
});

function route() {
  page?.unmount?.();
  const [, name = "chat", id] = location.hash.split("/");
  document.body.dataset.page = name;
  for (const link of document.querySelectorAll("[data-nav]")) link.classList.toggle("active", link.dataset.nav === name);
  if (name === "jobs" && id) page = mountJob(view, app, decodeURIComponent(id));
  else if (name === "jobs") page = mountJobs(view, app);
  else if (name === "launch") page = mountLaunch(view, app);
  else if (name === "models") page = mountModels(view, app);
  else page = mountChat(view, app, name === "chat" && id ? decodeURIComponent(id) : null);
}

// Dark mode follows the system until the toggle picks one; the pick is kept in this browser.
const THEME = "nanochat.theme";
const themeButton = document.getElementById("theme-toggle");
const systemDark = window.matchMedia("(prefers-color-scheme: dark)");
function applyTheme() {
  const picked = localStorage.getItem(THEME);
  const dark = picked ? picked === "dark" : systemDark.matches;
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  themeButton.setAttribute("aria-pressed", String(dark));
  themeButton.title = dark ? "Switch to light mode" : "Switch to dark mode";
}
themeButton.addEventListener("click", () => {
  localStorage.setItem(THEME, document.documentElement.dataset.theme === "dark" ? "light" : "dark");
  applyTheme();
});
systemDark.addEventListener("change", applyTheme);
applyTheme();

document.getElementById("menu-toggle").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
window.addEventListener("hashchange", route);

await Promise.all([loadSession(), pollModel()]);
route();
setInterval(pollModel, MODEL_POLL_MS);
document.body.dataset.ready = "true";
