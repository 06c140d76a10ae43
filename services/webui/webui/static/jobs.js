// Dashboard: the jobs list (with jobs' curves compared on shared charts), and a job's page with
// live log, live charts, its report card and cancel.
import { listOf, request } from "./api.js";
import { lineChart, multiChart } from "./chart.js";
import { formatNumber, formatTime, h } from "./dom.js";
import { jobReport, renderReport } from "./report_card.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 2000;
const FOLLOW_RETRY_MS = 5000;
// The figures shown beside the job's facts; every metric is in the folded list below the charts.
const HEADLINE = new Set(["loss", "val_bpb", "core", "chatcore", "tok_per_s", "mfu"]);

const jobId = (job) => job.id ?? job.job_id;
const whatOf = (job) => job.pipeline ? `${job.pipeline} pipeline${job.preset ? ` (${job.preset})` : ""}` : job.stage || "job";

// The trainer reports `progress` as the percent of the whole job done.
export function progressOf(job) {
  if (typeof job.progress === "number") return Math.min(1, Math.max(0, job.progress / 100));
  return job.status === "succeeded" ? 1 : 0;
}

function progressBar(job) {
  const fraction = progressOf(job);
  const fill = h("div", { class: "fill" });
  fill.style.width = `${(fraction * 100).toFixed(1)}%`;
  return h("div", { class: `progress ${job.status}`, role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
    "aria-valuenow": Math.round(fraction * 100), "aria-label": `progress of ${jobId(job)}`, "data-testid": "progress" }, fill);
}

const pairs = (rows) => rows.flatMap(([key, value]) => [h("dt", {}, key), h("dd", {}, value)]);
const statusPill = (status) => h("span", { class: `pill ${status}`, "data-testid": "status" }, status || "unknown");

// The trainer retries a job lost with its worker or node: each attempt's row, once it reports them.
function attemptsTable(job) {
  const attempts = Array.isArray(job.attempts) ? job.attempts : [];
  if (!attempts.length) return null;
  const cell = (value) => h("td", {}, value ?? "");
  return h("div", { class: "table-wrap attempts" }, h("table", { "data-testid": "attempts" },
    h("thead", {}, h("tr", {}, ...["Attempt", "Status", "Worker", "Started", "Finished", "Resumed from", "Error"].map((t) => h("th", {}, t)))),
    h("tbody", {}, ...attempts.map((a) => h("tr", { "data-testid": "attempt-row", "data-attempt": a.attempt },
      cell(a.attempt),
      h("td", {}, h("span", { class: `pill ${a.status}` }, a.status || "unknown")),
      cell(a.worker),
      cell(formatTime(a.started_at)),
      cell(formatTime(a.finished_at)),
      cell(typeof a.resumed_from_step === "number" ? `step ${a.resumed_from_step}` : ""),
      cell(a.error))))));
}

// A pipeline's steps: done before the current one, the job's own state at it, waiting after;
// each with the registry versions it made (JobOut's produced records the step's index).
function stepsList(job) {
  const steps = Array.isArray(job.steps) ? job.steps : [];
  if (steps.length < 2) return null;
  const at = typeof job.step_index === "number" ? job.step_index : 0;
  const stateOf = (i) => {
    if (job.status === "succeeded" || i < at) return "succeeded";
    return i === at ? job.status : "pending";
  };
  return h("ol", { class: "steps", "data-testid": "steps" }, ...steps.map((step, i) => {
    const made = (job.produced ?? []).filter((p) => (p.step_index ?? -1) === i || (p.step_index === undefined && p.made_by === step.stage));
    return h("li", { class: `step ${stateOf(i)}`, "data-testid": "step", "data-state": stateOf(i) },
      h("span", { class: `pill ${stateOf(i)}` }, stateOf(i)), h("strong", {}, step.stage),
      ...made.map((p) => h("a", { class: "pill alias", href: "#/models", "data-testid": "step-version" }, `${p.name} v${p.version} (${p.stage})`)));
  }));
}

// The trainer's log interleaves the stages' JSON event lines (stdout) with their human lines.
function isEventLine(text) {
  if (!text.startsWith("{")) return false;
  try {
    return typeof JSON.parse(text).type === "string";
  } catch {
    return false;
  }
}

// Series that are no training curve are evaluations (val_bpb, core, ...): the latest of each.
const CURVES = new Set(["loss", "lr", "tok_per_s", "mfu", "eta_s", "val_bpb"]);
function evalScores(series) {
  const rows = Object.entries(series ?? {}).filter(([key, points]) => !CURVES.has(key) && Array.isArray(points) && points.length);
  if (!rows.length) return [];
  return [h("figure", { class: "chart evals", "data-testid": "evals" }, h("figcaption", {}, h("span", {}, "eval scores")),
    h("dl", { class: "details" }, ...rows.flatMap(([key, points]) => [h("dt", {}, key),
      h("dd", { "data-testid": `eval-${key}` }, `${formatNumber(points.at(-1)[1])} (step ${formatNumber(points.at(-1)[0])})`)])))];
}

function latestLoss(job) {
  const value = job.metrics?.loss ?? job.latest_metrics?.loss;
  return typeof value === "number" ? formatNumber(value) : "";
}

// Jobs ticked for comparison stay ticked while the list repaints, and across visits to the page.
const compared = new Set();
const MAX_COMPARED = 6; // one colour each in the stylesheet
const COMPARED_CURVES = ["loss", "val_bpb"];

// Each ticked job's curves (the trainer's default stage: the current one, or the last that
// trained) as one labelled series per job on a shared chart per curve.
function compareView() {
  const charts = COMPARED_CURVES.map((name) => multiChart(name));
  const note = h("p", { class: "muted", "data-testid": "compare-note" });
  const el = h("section", { class: "compare", "data-testid": "compare", "aria-label": "Compared jobs" },
    h("h3", {}, "Compare"), note, h("div", { class: "charts" }, ...charts.map((c) => c.el)));

  async function update(jobs) {
    const picked = jobs.filter((job) => compared.has(String(jobId(job))));
    note.textContent = picked.length < 2 ? "Tick two or more jobs to compare their loss and val_bpb curves." : "";
    const paths = picked.map((job) => `/api/trainer/v1/jobs/${encodeURIComponent(jobId(job))}/metrics`);
    const first = await Promise.all(paths.map((path) => request(path)));
    // Pipelines draw a curve per training stage: all are compared at one stage they share (the
    // first job's own when the others have it), so a pipeline's base_train meets a base_train.
    const common = first.map((m) => m?.stages ?? []).reduce((a, b) => a.filter((st) => b.includes(st)), first[0]?.stages ?? []);
    const want = common.includes(first[0]?.stage) ? first[0].stage : common[0];
    const metrics = await Promise.all(first.map((m, i) => (!want || m?.stage === want ? m : request(`${paths[i]}?stage=${encodeURIComponent(want)}`))));
    const label = (job, m) => `${String(jobId(job)).slice(0, 12)} ${whatOf(job)}${m?.stage && m.stage !== job.stage ? ` · ${m.stage}` : ""}`;
    charts.forEach((chart, k) => chart.update(picked.map((job, i) => ({ label: label(job, metrics[i]), points: metrics[i]?.series?.[COMPARED_CURVES[k]] }))));
  }

  return { el, update };
}

function compareBox(job, onChange) {
  const id = String(jobId(job));
  const box = h("input", { type: "checkbox", "data-testid": "compare-pick", "aria-label": `Compare job ${id}`, checked: compared.has(id) });
  box.disabled = !box.checked && compared.size >= MAX_COMPARED;
  box.addEventListener("change", () => {
    if (box.checked) compared.add(id);
    else compared.delete(id);
    onChange();
  });
  return box;
}

export function mountJobs(root, app) {
  const body = h("tbody");
  const note = h("p", { class: "muted" });
  const compare = compareView();
  root.replaceChildren(h("section", { class: "page" },
    h("div", { class: "page-head" }, h("h2", {}, "Jobs"), h("a", { class: "button primary", href: "#/launch" }, "Launch")),
    note,
    h("div", { class: "table-wrap" }, h("table", { class: "jobs", "data-testid": "jobs-table" },
      h("thead", {}, h("tr", {}, ...["Compare", "Job", "What", "Status", "Progress", "Loss", "Created"].map((t) => h("th", {}, t)))),
      body)),
    compare.el));

  let jobs = [];
  const paint = () => {
    body.replaceChildren(...jobs.map((job) => h("tr", { "data-testid": "job-row", "data-job": jobId(job) },
      h("td", {}, compareBox(job, () => { paint(); compare.update(jobs).catch((err) => app.banner("trainer", err.message)); })),
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(jobId(job))}` }, String(jobId(job)).slice(0, 12))),
      h("td", {}, whatOf(job)),
      h("td", {}, statusPill(job.status)),
      h("td", {}, progressBar(job)),
      h("td", {}, latestLoss(job)),
      h("td", {}, formatTime(job.created_at ?? job.created)))));
  };

  async function refresh() {
    try {
      jobs = listOf(await request("/api/trainer/v1/jobs"), "items");
      note.textContent = jobs.length ? "" : "No jobs yet. Launch a stage or the speedrun pipeline.";
      paint();
      await compare.update(jobs);
      app.clearBanner("trainer");
    } catch (err) {
      app.banner("trainer", err.message);
    }
  }
  refresh();
  const timer = setInterval(refresh, POLL_MS);
  return { unmount: () => clearInterval(timer) };
}

export function mountJob(root, app, id) {
  const path = `/api/trainer/v1/jobs/${encodeURIComponent(id)}`;
  const status = h("span");
  const progressSlot = h("div", { class: "progress-slot" });
  const details = h("dl", { class: "details" });
  const attemptsSlot = h("div");
  // A pipeline's latest metrics run to dozens of rows (data, tokenizer, evals): folded under
  // the charts so that the charts and the log stay in view.
  const metricRows = h("dl", { class: "details" });
  const metricCount = h("span", { class: "muted" });
  const metricBox = h("details", { class: "metrics-box", hidden: true }, h("summary", {}, "Latest metrics ", metricCount), metricRows);
  const cancel = h("button", { type: "button", class: "danger", "data-testid": "cancel", hidden: true }, "Cancel job");
  const charts = { loss: lineChart("loss"), val_bpb: lineChart("val_bpb"), lr: lineChart("lr"), tok_per_s: lineChart("tok_per_s") };
  const evalSlot = h("div", { class: "eval-slot" });
  const stepsSlot = h("div");
  // A pipeline has a curve per training stage: the trainer picks the current (or last trained)
  // one; picking another pins it.
  const stagePick = h("select", { "data-testid": "curve-stage", "aria-label": "Stage of the curves", hidden: true });
  let pinnedStage = null;
  stagePick.addEventListener("change", () => { pinnedStage = stagePick.value; refresh(); });
  const log = h("pre", { class: "log", role: "log", "data-testid": "log", tabindex: 0, "aria-label": "Job log" });
  const logState = h("span", { class: "muted", "data-testid": "log-state" }, "connecting…");
  const reportBox = h("div", { class: "report", "data-testid": "job-report", hidden: true });
  let reportState = "none"; // "checking" while a look is under way, "shown" once drawn
  const showEvents = h("input", { type: "checkbox", "data-testid": "show-events" });
  showEvents.addEventListener("change", () => log.classList.toggle("with-events", showEvents.checked));
  root.replaceChildren(h("section", { class: "page" },
    h("div", { class: "page-head" }, h("h2", {}, `Job ${id}`), status, cancel),
    progressSlot, details, stepsSlot, attemptsSlot,
    h("div", { class: "curves-head" }, stagePick),
    h("div", { class: "charts" }, charts.loss.el, charts.val_bpb.el, evalSlot, charts.lr.el, charts.tok_per_s.el),
    metricBox, reportBox,
    h("div", { class: "log-head" }, h("h3", {}, "Log"), logState,
      h("label", { class: "muted" }, showEvents, " show event lines")), log));

  let job = null;
  let timer = null;
  let source = null;
  let retry = null;
  let lastOffset = -1;

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      await request(`${path}/cancel`, { method: "POST" });
      await refresh();
    } catch (err) {
      app.banner("trainer", err.message);
    } finally {
      cancel.disabled = false;
    }
  });

  async function refresh() {
    try {
      const query = pinnedStage ? `?stage=${encodeURIComponent(pinnedStage)}` : "";
      const [fresh, metrics] = await Promise.all([request(path), request(`${path}/metrics${query}`)]);
      job = fresh;
      status.replaceChildren(statusPill(job.status));
      progressSlot.replaceChildren(progressBar(job), h("span", { class: "muted" }, `${whatOf(job)} · ${Math.round(progressOf(job) * 100)}%`));
      const rows = [["created", formatTime(job.created_at ?? job.created)]];
      if (typeof job.attempt === "number" && typeof job.max_attempts === "number") rows.push(["attempt", `${job.attempt} of ${job.max_attempts}`]);
      if (job.current_stage && job.pipeline) rows.push(["stage", `${job.current_stage}${job.step != null && job.total ? ` · step ${job.step}/${job.total}` : ""}`]);
      for (const made of job.produced ?? []) rows.push(["produced", `${made.name} v${made.version} (${made.stage})`]);
      // A job that is queued again or running says why it was re-queued; only an ended one failed.
      if (job.error) rows.push([TERMINAL.has(job.status) ? "error" : "note", String(job.error)]);
      const latest = Object.entries(job.metrics ?? job.latest_metrics ?? {});
      for (const [key, value] of latest) if (HEADLINE.has(key)) rows.push([key, formatNumber(value)]);
      details.replaceChildren(...pairs(rows));
      attemptsSlot.replaceChildren(...[attemptsTable(job)].filter(Boolean));
      stepsSlot.replaceChildren(...[stepsList(job)].filter(Boolean));
      evalSlot.replaceChildren(...evalScores(metrics?.series));
      metricRows.replaceChildren(...pairs(latest.map(([key, value]) => [key, formatNumber(value)])));
      metricCount.textContent = `(${latest.length})`;
      metricBox.hidden = latest.length === 0;
      cancel.hidden = TERMINAL.has(job.status) || !app.isAdmin();
      for (const [name, chart] of Object.entries(charts)) chart.update(metrics?.series?.[name]);
      const stages = metrics?.stages ?? [];
      if (stages.join() !== [...stagePick.options].map((o) => o.value).join()) {
        stagePick.replaceChildren(...stages.map((st) => h("option", { value: st }, `curves of ${st}`)));
      }
      if (metrics?.stage && stages.includes(metrics.stage)) stagePick.value = metrics.stage;
      stagePick.hidden = stages.length < 2;
      app.clearBanner("trainer");
      if (TERMINAL.has(job.status)) clearInterval(timer);
    } catch (err) {
      app.banner("trainer", err.message);
    }
    await showReport();
  }

  // Once the job's report step is done: its card, from the version it is attached to.
  async function showReport() {
    if (reportState !== "none" || !job) return;
    reportState = "checking";
    try {
      const card = await jobReport(job);
      if (!card) { reportState = "none"; return; }
      reportState = "shown";
      reportBox.hidden = false;
      await renderReport(reportBox, card.name, card.version, card.files, `Report card · ${card.name} v${card.version}`);
      app.clearBanner("registry");
    } catch (err) {
      reportState = "none";
      app.banner("registry", err.message);
    }
  }

  // EventSource reconnects by itself and sends Last-Event-ID (a byte offset), so the trainer
  // resumes exactly where the stream broke; offsets already shown are skipped as well.
  function follow() {
    source = new EventSource(`${path}/logs?follow=true`);
    const onLine = (event) => {
      const offset = Number.parseInt(event.lastEventId, 10);
      if (Number.isFinite(offset)) {
        if (offset <= lastOffset) return;
        lastOffset = offset;
      }
      const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      const text = event.data.endsWith("\n") ? event.data : `${event.data}\n`;
      log.append(isEventLine(text.trim()) ? h("span", { class: "event-line" }, text) : document.createTextNode(text));
      if (atBottom) log.scrollTop = log.scrollHeight;
    };
    source.addEventListener("message", onLine);
    source.addEventListener("log", onLine);
    source.addEventListener("open", () => { logState.textContent = "following"; });
    // The trainer sends `end` once the job is over and its log is read to the end.
    source.addEventListener("end", () => { source.close(); logState.textContent = "ended"; });
    source.addEventListener("error", () => {
      if (job && TERMINAL.has(job.status)) {
        source.close();
        logState.textContent = "ended";
        return;
      }
      logState.textContent = "reconnecting…";
      // Refused (a 429 while the UI has too many streams open): EventSource gives up for good
      // on an answer that is no stream, so try again later.
      if (source.readyState === EventSource.CLOSED) retry = setTimeout(follow, FOLLOW_RETRY_MS);
    });
  }

  refresh();
  timer = setInterval(refresh, POLL_MS);
  follow();
  return { unmount: () => { clearInterval(timer); clearTimeout(retry); source?.close(); } };
}
