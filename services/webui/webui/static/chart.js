// Line charts of [step, value] points as SVG, redrawn in place as the series grow: one series
// (a job's own curve) or several on shared axes, each labelled (jobs compared).
import { formatNumber, h, svg } from "./dom.js";

const W = 320;
const H = 150;
const PAD = { left: 46, right: 8, top: 10, bottom: 22 };

const finitePoints = (points) => (points || []).filter((p) => Array.isArray(p) && Number.isFinite(p[0]) && Number.isFinite(p[1]));

// The axes span every series; each series is a path (a dot when it has one point).
function draw(plot, series) {
  const all = series.flatMap((s) => s.data);
  if (all.length === 0) { plot.replaceChildren(); return; }
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const sy = (y) => H - PAD.bottom - ((y - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);
  const lines = series.filter((s) => s.data.length).map((s, i) => {
    const d = s.data.map((p, k) => `${k ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    const attrs = { class: `line series-${s.index ?? i}`, d, "data-testid": "series", "data-label": s.label ?? "",
      "data-points": s.data.length, "data-first": s.data[0].join(","), "data-last": s.data.at(-1).join(",") };
    const path = svg("path", attrs);
    if (s.label) path.append(svg("title", {}, s.label));
    return s.data.length === 1 ? [path, svg("circle", { class: `dot series-${s.index ?? i}`, cx: sx(s.data[0][0]), cy: sy(s.data[0][1]), r: 3 })] : [path];
  });
  plot.replaceChildren(
    svg("line", { class: "axis", x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom }),
    svg("line", { class: "axis", x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: H - PAD.bottom }),
    svg("text", { class: "tick", x: PAD.left - 4, y: PAD.top + 8, "text-anchor": "end" }, formatNumber(y1)),
    svg("text", { class: "tick", x: PAD.left - 4, y: H - PAD.bottom, "text-anchor": "end" }, formatNumber(y0)),
    svg("text", { class: "tick", x: PAD.left, y: H - 6 }, `step ${formatNumber(x0)}`),
    svg("text", { class: "tick", x: W - PAD.right, y: H - 6, "text-anchor": "end" }, formatNumber(x1)),
    ...lines.flat(),
  );
}

function frame(title) {
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, preserveAspectRatio: "none" });
  const latest = h("span", { class: "latest" });
  const el = h("figure", { class: "chart", "data-testid": `chart-${title}`, "data-points": 0 },
    h("figcaption", {}, h("span", {}, title), latest), plot);
  return { el, plot, latest };
}

export function lineChart(title) {
  const { el, plot, latest } = frame(title);

  function update(points) {
    const data = finitePoints(points);
    el.dataset.points = data.length;
    latest.textContent = data.length ? formatNumber(data[data.length - 1][1]) : "no data yet";
    draw(plot, [{ data }]);
  }

  return { el, update };
}

// Several labelled series (say one job each) on one chart, with a legend naming each by colour.
export function multiChart(title) {
  const { el, plot, latest } = frame(title);
  const legend = h("ul", { class: "legend", "data-testid": "legend" });
  el.append(legend);

  function update(list) {
    const series = list.map((s, index) => ({ label: s.label, index, data: finitePoints(s.points) }));
    el.dataset.series = series.filter((s) => s.data.length).length;
    el.dataset.points = series.reduce((n, s) => n + s.data.length, 0);
    latest.textContent = series.some((s) => s.data.length) ? "" : "no data yet";
    legend.replaceChildren(...series.map((s) => h("li", { "data-testid": "legend-item" },
      h("span", { class: `swatch series-${s.index}`, "aria-hidden": "true" }),
      `${s.label}${s.data.length ? ` · ${formatNumber(s.data.at(-1)[1])}` : " · no data"}`)));
    draw(plot, series);
  }

  return { el, update };
}
