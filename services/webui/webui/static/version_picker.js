// Which version a chat talks to: the served one (it follows the `serving` alias), a version
// alias, or one registry version pinned. The picked value is the request's `model`, spelled as
// inference reads it: `nanochat` (served), `nanochat@best` (an alias, resolved per request),
// `nanochat:3` (exactly version 3).
import { listOf, request } from "./api.js";
import { h } from "./dom.js";

// What a `model` string may be (the registry's name and alias rules); anything else is dropped.
export const MODEL_REF = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(:[1-9]\d*|@[A-Za-z][A-Za-z0-9._-]{0,63})?$/;
const CHAT_STAGES = new Set(["base", "mid", "sft", "rl"]);

export const isPinned = (model) => typeof model === "string" && /[:@]/.test(model);

export function versionPicker(onPick) {
  const select = h("select", { "data-testid": "chat-version", "aria-label": "Model version for this chat" });
  const el = h("label", { class: "version-pick" }, h("span", { class: "muted" }, "Model"), select);
  let name = "nanochat";
  let picked = "";
  select.addEventListener("change", () => { picked = select.value; onPick(picked || null); });

  const option = (value, label) => h("option", { value }, label);
  let listed = [];

  function paint() {
    const known = new Set(listed.map((o) => o.value));
    const extra = picked && !known.has(picked) ? [option(picked, picked)] : [];
    select.replaceChildren(option("", `${name} · served version`), ...listed, ...extra);
    select.value = picked;
  }

  // The registry's versions and aliases of the served model's name, through this origin's proxy.
  async function load(servedName) {
    name = servedName || "nanochat";
    try {
      const path = `/api/registry/v1/models/${encodeURIComponent(name)}`;
      const [models, page] = await Promise.all([request("/api/registry/v1/models"), request(`${path}/versions?limit=500`)]);
      const aliases = Object.entries(listOf(models, "items").find((m) => m.name === name)?.aliases ?? {}).sort();
      const versions = listOf(page, "items").filter((v) => CHAT_STAGES.has(v.stage) && (v.state ?? "ready") === "ready")
        .sort((a, b) => b.version - a.version);
      listed = [
        ...aliases.map(([alias, version]) => option(`${name}@${alias}`, `${name}@${alias} (now v${version})`)),
        ...versions.map((v) => option(`${name}:${v.version}`, `${name}:${v.version} · ${v.stage}`)),
      ];
      select.title = "";
    } catch (err) {
      select.title = `The registry's versions could not be listed: ${err.message}`;
    }
    paint();
  }

  // The chat shown now and the model it talks to (null: the served version).
  function show(model) {
    picked = model || "";
    paint();
  }

  return { el, load, show };
}
