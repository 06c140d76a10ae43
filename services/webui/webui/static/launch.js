// Dashboard: launch a stage or a pipeline (speedrun). The form is generated from the option
// schemas the trainer serves at GET /v1/stages; errors are shown at the field they belong to.
// A pipeline starts every step from its size preset; each stage's options can be overridden.
import { ApiError, listOf, request } from "./api.js";
import { h } from "./dom.js";

const PIPELINE_PREFIX = "pipeline:";
const PIPELINE_TEXT = {
  speedrun: "The whole nanochat recipe in order: data, tokenizer, base, mid, SFT, RL, with an eval after each stage and a report card.",
};

// Resolve $ref and Optional (anyOf [..., null]) so each field is one plain schema.
function plain(schema, root) {
  let s = schema || {};
  if (s.$ref) s = { ...(root.$defs || root.definitions || {})[s.$ref.split("/").pop()], ...s, $ref: undefined };
  const branches = s.anyOf || s.oneOf;
  if (branches) {
    const real = branches.filter((b) => b.type !== "null");
    if (real.length === 1) s = { ...plain(real[0], root), ...s, anyOf: undefined, oneOf: undefined, nullable: real.length < branches.length };
  }
  if (s.allOf && s.allOf.length === 1) s = { ...plain(s.allOf[0], root), ...s, allOf: undefined };
  return s;
}

// `prefix` keeps the fields of a pipeline's stages apart (opt-base_train-depth).
function fieldFor(name, schema, required, prefix = "") {
  const key = `${prefix}${name}`;
  const id = `opt-${key}`;
  let input;
  if (schema.enum) {
    input = h("select", { id, name }, ...(required ? [] : [h("option", { value: "" }, "(default)")]),
      ...schema.enum.map((v) => h("option", { value: JSON.stringify(v) }, String(v))));
    if (schema.default !== undefined) input.value = JSON.stringify(schema.default);
  } else if (schema.type === "boolean") {
    input = h("input", { id, name, type: "checkbox" });
    input.checked = schema.default === true;
  } else if (schema.type === "integer" || schema.type === "number") {
    input = h("input", { id, name, type: "number", step: schema.type === "integer" ? 1 : "any",
      min: schema.minimum ?? schema.exclusiveMinimum, max: schema.maximum ?? schema.exclusiveMaximum });
    if (schema.default !== undefined && schema.default !== null) input.value = schema.default;
  } else {
    input = h("input", { id, name, type: "text" });
    if (typeof schema.default === "string") input.value = schema.default;
  }
  const error = h("span", { class: "field-error", "data-testid": `error-${key}` });
  const wrap = h("div", { class: "field", "data-field": name },
    h("label", { for: id }, schema.title || name, required ? " *" : ""), input,
    schema.description ? h("small", { class: "muted" }, schema.description) : null, error);
  return { name, key, schema, required, input, error, wrap };
}

// A pipeline stage's field: blank means the preset's value, so nothing is pre-filled and a
// boolean is a three-way choice.
function overrideFor(stage, name, schema) {
  const s = { ...schema, default: undefined };
  if (s.type === "boolean") { s.enum = [true, false]; delete s.type; }
  const f = fieldFor(name, s, false, `${stage}-`);
  f.stage = stage;
  if (!s.enum) f.input.placeholder = "preset";
  return f;
}

// The value of a field, or an error message a person can act on.
function readField(f) {
  const { schema, input } = f;
  if (schema.type === "boolean" && !schema.enum) return { value: input.checked };
  const raw = input.value.trim();
  if (raw === "") return f.required ? { error: "Required." } : { skip: true };
  if (schema.enum) return { value: JSON.parse(raw) };
  if (schema.type === "integer" || schema.type === "number") {
    const n = Number(raw);
    if (!Number.isFinite(n)) return { error: "Enter a number." };
    if (schema.type === "integer" && !Number.isInteger(n)) return { error: "Enter a whole number." };
    if (schema.minimum !== undefined && n < schema.minimum) return { error: `Must be at least ${schema.minimum}.` };
    if (schema.maximum !== undefined && n > schema.maximum) return { error: `Must be at most ${schema.maximum}.` };
    if (schema.exclusiveMinimum !== undefined && n <= schema.exclusiveMinimum) return { error: `Must be more than ${schema.exclusiveMinimum}.` };
    if (schema.exclusiveMaximum !== undefined && n >= schema.exclusiveMaximum) return { error: `Must be less than ${schema.exclusiveMaximum}.` };
    return { value: n };
  }
  return { value: raw };
}

export function mountLaunch(root, app) {
  const what = h("select", { id: "launch-what", "data-testid": "launch-what" });
  const description = h("p", { class: "muted" });
  const optionsBox = h("fieldset", { class: "options" });
  const inputBox = h("fieldset", { class: "options" });
  const formError = h("div", { class: "form-error", role: "alert", "data-testid": "form-error", hidden: true });
  const submit = h("button", { type: "submit", class: "primary", "data-testid": "launch-submit" }, "Launch");
  const form = h("form", { class: "launch", novalidate: true }, h("label", { for: "launch-what" }, "Run"), what, description,
    inputBox, optionsBox, formError, submit);
  root.replaceChildren(h("section", { class: "page" }, h("h2", {}, "Launch"), form));

  let stages = [];
  let pipelines = {};
  let presets = ["tiny", "d20"];
  let fields = [];
  const common = {};

  function commonField(name, schema, required = false) {
    const f = fieldFor(name, schema, required);
    common[name] = f;
    return f.wrap;
  }

  function build() {
    const choice = what.value;
    const stage = stages.find((s) => s.name === choice);
    formError.hidden = true;
    if (choice.startsWith(PIPELINE_PREFIX)) {
      const pipeline = choice.slice(PIPELINE_PREFIX.length);
      const order = [...new Set(pipelines[pipeline] || [])];
      description.textContent = `${PIPELINE_TEXT[pipeline] || ""} Steps: ${(pipelines[pipeline] || []).join(" → ")}.`.trim();
      const preset = fieldFor("preset", { enum: presets, default: presets[0], description: "tiny runs on a CPU; d20 is the original 8-GPU speedrun" }, true);
      const perStage = order.map((name) => {
        const stageInfo = stages.find((st) => st.name === name);
        const schema = stageInfo?.options_schema || {};
        const own = Object.entries(schema.properties || {}).map(([opt, sch]) => overrideFor(name, opt, plain(sch, schema)));
        return { name, own };
      });
      fields = [preset, ...perStage.flatMap((p) => p.own)];
      optionsBox.replaceChildren(h("legend", {}, "Pipeline"), preset.wrap,
        ...perStage.filter((p) => p.own.length).map((p) => h("details", { class: "stage-options", "data-testid": `stage-options-${p.name}` },
          h("summary", {}, `${p.name} options`, h("span", { class: "muted" }, " (blank: the preset's value)")),
          ...p.own.map((f) => f.wrap))));
      inputBox.replaceChildren(h("legend", {}, "Output and resources"),
        commonField("output_name", { type: "string", default: "nanochat" }, true),
        commonField("nproc_per_node", { type: "integer", minimum: 1, default: 1 }, true),
        commonField("nnodes", { type: "integer", minimum: 1, default: 1 }, true));
      return;
    }
    if (!stage) return;
    description.textContent = stage.description || "";
    const schema = stage.options_schema || stage.schema || stage.options || {};
    const required = new Set(schema.required || []);
    fields = Object.entries(schema.properties || {}).map(([name, s]) => fieldFor(name, plain(s, schema), required.has(name)));
    optionsBox.replaceChildren(h("legend", {}, `${stage.name} options`), ...fields.map((f) => f.wrap));
    const inputStage = stage.input_stage ?? stage.input;
    inputBox.replaceChildren(h("legend", {}, "Input, output and resources"),
      inputStage ? h("p", { class: "muted" }, `Takes a ${inputStage} model as input.`) : null,
      inputStage ? commonField("input_name", { type: "string", default: "nanochat" }, true) : null,
      inputStage ? commonField("input_ref", { type: "string", default: `stage:${inputStage}`,
        description: "A version number (3), an alias (alias:serving) or the newest of a stage (stage:mid)." }, true) : null,
      commonField("output_name", { type: "string", default: "nanochat" }, true),
      commonField("nproc_per_node", { type: "integer", minimum: 1, default: 1 }, true),
      commonField("nnodes", { type: "integer", minimum: 1, default: 1 }, true));
  }

  function showErrors(errors, general) {
    for (const f of [...fields, ...Object.values(common)]) {
      f.error.textContent = errors[f.key] || "";
      f.wrap.classList.toggle("invalid", Boolean(errors[f.key]));
      // An error inside a folded stage must be seen.
      if (errors[f.key]) f.wrap.closest("details")?.setAttribute("open", "");
    }
    formError.textContent = general || "";
    formError.hidden = !general;
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const errors = {};
    const options = {};
    for (const f of fields) {
      const r = readField(f);
      if (r.error) errors[f.key] = r.error;
      else if (r.skip) continue;
      else if (f.stage) (options[f.stage] ??= {})[f.name] = r.value;
      else options[f.name] = r.value;
    }
    const c = {};
    for (const [name, f] of Object.entries(common)) {
      if (!f.wrap.isConnected) continue;
      const r = readField(f);
      if (r.error) errors[name] = r.error;
      else c[name] = r.value;
    }
    if (Object.keys(errors).length) { showErrors(errors, "Fix the fields marked below."); return; }
    const resources = { nproc_per_node: c.nproc_per_node, nnodes: c.nnodes };
    let body;
    if (what.value.startsWith(PIPELINE_PREFIX)) {
      const { preset, ...perStage } = options;
      body = { pipeline: what.value.slice(PIPELINE_PREFIX.length), preset, options: perStage, output_name: c.output_name, resources };
    } else {
      body = { stage: what.value, options, output_name: c.output_name, resources };
      if (c.input_name !== undefined) {
        const ref = String(c.input_ref);
        const input = { name: c.input_name };
        if (/^\d+$/.test(ref)) input.version = Number(ref);
        else if (ref.startsWith("alias:")) input.alias = ref.slice(6);
        else if (ref.startsWith("stage:")) input.stage = ref.slice(6);
        else { showErrors({ input_ref: "Write a version number, alias:NAME or stage:NAME." }, "Fix the fields marked below."); return; }
        body.input = input;
      }
    }
    showErrors({}, "");
    submit.disabled = true;
    try {
      const created = await request("/api/trainer/v1/jobs", { method: "POST", body });
      const id = created?.id ?? created?.job_id;
      location.hash = id ? `#/jobs/${encodeURIComponent(id)}` : "#/jobs";
    } catch (err) {
      if (err instanceof ApiError && err.status === 422 && err.param) {
        // The trainer's 422 names the first field at fault in `param`: "options.depth", or
        // "options.base_train.depth" for a pipeline's stage; the message lists every problem.
        const known = new Set([...fields.map((f) => f.key), ...Object.keys(common)]);
        const path = err.param.split(".");
        const staged = path[0] === "options" && known.has(`${path[1]}-${path[2]}`) ? `${path[1]}-${path[2]}` : null;
        const name = staged ?? [...path].reverse().find((part) => known.has(part));
        if (name) showErrors({ [name]: err.message }, "The trainer rejected a field: see below.");
        else showErrors({}, err.message);
      } else {
        showErrors({}, err.message);
      }
    } finally {
      submit.disabled = false;
    }
  });
  what.addEventListener("change", build);

  (async () => {
    try {
      const offered = await request("/api/trainer/v1/stages");
      stages = listOf(offered, "stages");
      if (Array.isArray(offered?.presets) && offered.presets.length) presets = offered.presets;
      pipelines = offered?.pipelines ?? {};
      what.replaceChildren(...Object.keys(pipelines).map((p) => h("option", { value: `${PIPELINE_PREFIX}${p}` }, `${p} pipeline`)),
        ...stages.map((s) => h("option", { value: s.name }, s.name)));
      build();
      if (!app.isAdmin()) showErrors({}, "Launching needs the admin token: sign in first.");
    } catch (err) {
      app.banner("trainer", err.message);
    }
  })();
  return { unmount() {} };
}
