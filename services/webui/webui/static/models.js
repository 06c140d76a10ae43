// Dashboard: registered model versions with stage and metrics, their lineage as a picture (each
// version with the job that made it), report cards, a chat with one version, and aliases
// (`serving` is what inference serves), editable when signed in as admin.
import { listOf, request } from "./api.js";
import { formatNumber, formatTime, h } from "./dom.js";
import { attachmentName, renderReport } from "./report_card.js";

const versionOf = (v) => v.version;

// A version's headline metrics, the first few plain ones; the rest (per-stage copies, counts,
// intervals: a speedrun's RL version carries ~90) folded under "N more".
function metricsCell(metrics) {
  const entries = Object.entries(metrics || {});
  const main = entries.filter(([k]) => !k.includes("/")).slice(0, 6);
  const rest = entries.filter((e) => !main.includes(e));
  const chip = ([k, val]) => h("span", { class: "metric" }, `${k} ${formatNumber(val)}`);
  return [...main.map(chip), rest.length ? h("details", { class: "more-metrics" }, h("summary", {}, `${rest.length} more`), ...rest.map(chip)) : null];
}

function aliasesFrom(model, versions) {
  const aliases = { ...(model?.aliases ?? {}) };
  for (const v of versions) for (const a of v.aliases || []) aliases[a] = versionOf(v);
  return aliases;
}

// The registry walks the parents, across models (an sft version's parent is often another
// model's base version), root first once reversed.
async function lineage(path, version) {
  const body = await request(`${path}/versions/${version}/lineage`);
  return [...body.parents].reverse().concat([body.version]);
}

export function mountModels(root, app) {
  const picker = h("select", { "data-testid": "model-name", "aria-label": "Model name" });
  const tableBody = h("tbody");
  const lineageBox = h("div", { class: "lineage", "data-testid": "lineage" });
  const report = h("div", { class: "report", "data-testid": "report" });
  root.replaceChildren(h("section", { class: "page" },
    h("div", { class: "page-head" }, h("h2", {}, "Models"), picker),
    h("div", { class: "table-wrap" }, h("table", { class: "versions", "data-testid": "versions-table" },
      h("thead", {}, h("tr", {}, ...["Version", "Stage", "Step", "Metrics", "Created", "Aliases", ""].map((t) => h("th", {}, t)))),
      tableBody)),
    h("h3", {}, "Lineage"), lineageBox, report));

  let name = null;
  let selected = null;

  // Signed in as admin, an alias is removed with its ✕ and one is added (or moved here) by name.
  function aliasCell(path, version, names) {
    const change = async (method, alias, body) => {
      try {
        await request(`${path}/aliases/${encodeURIComponent(alias)}`, { method, body });
        await load();
      } catch (err) {
        app.banner("registry", err.message);
      }
    };
    const cell = names.map((a) => h("span", { class: "alias-item" }, h("span", { class: "pill alias", "data-testid": "alias" }, a),
      app.isAdmin() ? h("button", { type: "button", class: "icon", "aria-label": `Remove alias ${a}`, "data-testid": "alias-remove",
        onclick: () => change("DELETE", a) }, "✕") : null));
    if (!app.isAdmin()) return cell;
    const add = h("button", { type: "button", class: "link", "data-testid": "alias-add" }, "+ alias");
    add.addEventListener("click", () => {
      const input = h("input", { type: "text", size: 10, "aria-label": `New alias for v${version}`, "data-testid": "alias-input", placeholder: "alias" });
      input.addEventListener("keydown", (e) => {
        if (e.key === "Escape") load();
        if (e.key !== "Enter" || !input.value.trim()) return;
        e.preventDefault();
        change("PUT", input.value.trim(), { version });
      });
      add.replaceWith(input);
      input.focus();
    });
    return [...cell, add];
  }

  async function load() {
    try {
      const listed = listOf(await request("/api/registry/v1/models"), "items");
      const models = listed.map((m) => m.name);
      if (!models.length) {
        tableBody.replaceChildren(h("tr", {}, h("td", { colspan: 7 }, "No models registered yet.")));
        return;
      }
      if (!name || !models.includes(name)) name = models.includes("nanochat") ? "nanochat" : models[0];
      picker.replaceChildren(...models.map((m) => h("option", { value: m, selected: m === name }, m)));
      const path = `/api/registry/v1/models/${encodeURIComponent(name)}`;
      const versions = listOf(await request(`${path}/versions?limit=500`), "items").sort((a, b) => versionOf(b) - versionOf(a));
      const aliases = aliasesFrom(listed.find((m) => m.name === name), versions);
      if (selected === null || !versions.some((v) => versionOf(v) === selected)) selected = aliases.serving ?? versionOf(versions[0]);
      tableBody.replaceChildren(...versions.map((v) => {
        const aliasNames = Object.entries(aliases).filter(([, ver]) => ver === versionOf(v)).map(([a]) => a);
        const files = (v.attachments || []).map(attachmentName).filter(Boolean);
        const actions = h("td", { class: "row-actions" });
        // A new chat pinned to exactly this version (inference loads it beside the served one).
        if (v.stage !== "tokenizer") {
          actions.append(h("a", { class: "button", href: `#/chat/${encodeURIComponent(`${name}:${versionOf(v)}`)}`, "data-testid": "chat-version-link",
            "aria-label": `Chat with v${versionOf(v)}` }, "Chat"));
        }
        if (files.length) actions.append(h("button", { type: "button", class: "link", onclick: () => renderReport(report, name, versionOf(v), files) }, "Report card"));
        if (app.isAdmin() && aliases.serving !== versionOf(v)) {
          const serve = h("button", { type: "button", "data-testid": "set-serving" }, "Serve this");
          serve.addEventListener("click", async () => {
            serve.disabled = true;
            try {
              await request(`${path}/aliases/serving`, { method: "PUT", body: { version: versionOf(v) } });
              await load();
            } catch (err) {
              app.banner("registry", err.message);
              serve.disabled = false;
            }
          });
          actions.append(serve);
        }
        const row = h("tr", { class: versionOf(v) === selected ? "selected" : "", "data-testid": "version-row", "data-version": versionOf(v) },
          h("td", {}, `v${versionOf(v)}`),
          h("td", {}, h("span", { class: `pill stage-${v.stage}` }, v.stage)),
          h("td", {}, v.step !== undefined && v.step !== null ? formatNumber(v.step) : ""),
          h("td", { class: "metrics" }, metricsCell(v.metrics)),
          h("td", {}, formatTime(v.created_at ?? v.created)),
          h("td", { class: "aliases" }, aliasCell(path, versionOf(v), aliasNames)),
          actions);
        row.addEventListener("click", (e) => {
          if (e.target.closest("button, a, details")) return;
          selected = versionOf(v);
          load();
        });
        return row;
      }));
      const chain = await lineage(path, selected);
      lineageBox.replaceChildren(...chain.flatMap((v, i) => [
        ...(i ? [h("span", { class: "arrow", "aria-hidden": "true" }, "→")] : []),
        h("div", { class: `node stage-${v.stage}`, "data-testid": "lineage-node" }, h("strong", {}, v.stage),
          h("span", {}, v.name === name ? `v${versionOf(v)}` : `${v.name} v${versionOf(v)}`),
          // Which job made it, when a trainer job registered it.
          v.job_id ? h("a", { href: `#/jobs/${encodeURIComponent(v.job_id)}`, class: "muted", "data-testid": "lineage-job" }, `job ${String(v.job_id).slice(0, 12)}`) : null),
      ]));
      app.clearBanner("registry");
    } catch (err) {
      app.banner("registry", err.message);
    }
  }

  picker.addEventListener("change", () => { name = picker.value; selected = null; report.replaceChildren(); load(); });
  load();
  return { unmount() {} };
}
