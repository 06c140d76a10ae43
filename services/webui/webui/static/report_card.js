// A report card (the `report` stage's report.md and loss.svg, attached by the trainer to the
// version the report read): where a job's card lives, and the card drawn from markdown that
// never becomes HTML (markdown.js), with its plots loaded as images of the attachments.
import { request } from "./api.js";
import { h } from "./dom.js";
import { renderMarkdown } from "./markdown.js";

const IMAGE_TYPES = { png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", gif: "image/gif", webp: "image/webp", svg: "image/svg+xml" };
const typeOf = (file) => IMAGE_TYPES[file.split(".").pop().toLowerCase()];
export const attachmentName = (a) => (typeof a === "string" ? a : a.name ?? a.path);

// The report step's version: the newest one the job made before that step, else the job's input.
export function reportTarget(job) {
  const steps = Array.isArray(job.steps) && job.steps.length ? job.steps.map((s) => s.stage) : [job.stage];
  const at = steps.lastIndexOf("report");
  if (at < 0) return null;
  const before = (job.produced ?? []).filter((p) => typeof p.step_index !== "number" || p.step_index < at);
  const ref = before.at(-1) ?? job.input;
  return ref?.name && Number.isInteger(ref.version) ? { name: ref.name, version: ref.version, done: job.status === "succeeded" || (job.step_index ?? 0) > at } : null;
}

// The registry serves attachments as octet-stream (an SVG shown from there would not draw), so
// each image is fetched and shown from a blob of its own type; in an <img> an SVG runs no script.
async function imageOf(base, file, alt) {
  const response = await fetch(`${base}/${encodeURIComponent(file)}`, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`${file} could not be loaded (${response.status})`);
  const blob = new Blob([await response.arrayBuffer()], { type: typeOf(file) });
  return h("img", { src: URL.createObjectURL(blob), alt: alt || file, "data-testid": "report-image", "data-file": file });
}

// Fills `box` with the card of name:version from its attachment names `files`.
export async function renderReport(box, name, version, files, title = `Report card · v${version}`) {
  const base = `/api/registry/v1/models/${encodeURIComponent(name)}/versions/${version}/attachments`;
  const md = files.find((f) => f.endsWith(".md"));
  const images = files.filter((f) => typeOf(f));
  box.replaceChildren(h("h3", {}, title));
  try {
    const shown = new Set();
    if (md) {
      const response = await fetch(`${base}/${encodeURIComponent(md)}`, { credentials: "same-origin" });
      if (!response.ok) throw new Error(`the report could not be loaded (${response.status})`);
      // `![training loss](loss.svg)`: only a file attached beside the card becomes a picture.
      const slots = [];
      const image = (src, alt) => {
        if (!images.includes(src)) return null;
        const slot = h("span", { class: "report-figure" });
        slots.push([slot, src, alt]);
        shown.add(src);
        return slot;
      };
      box.append(renderMarkdown(await response.text(), { image }));
      await Promise.all(slots.map(async ([slot, src, alt]) => slot.append(await imageOf(base, src, alt))));
    }
    for (const file of images.filter((f) => !shown.has(f))) box.append(await imageOf(base, file, file));
  } catch (err) {
    box.append(h("p", { class: "form-error" }, String(err.message)));
  }
}

// A job's card once its report step is done and the card is attached; null until then.
export async function jobReport(job) {
  const target = reportTarget(job);
  if (!target?.done) return null;
  const path = `/api/registry/v1/models/${encodeURIComponent(target.name)}/versions/${target.version}`;
  const version = await request(path);
  const files = (version.attachments ?? []).map(attachmentName).filter(Boolean);
  return files.some((f) => f.endsWith(".md")) ? { ...target, files } : null;
}
