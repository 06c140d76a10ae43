// A line chart of [step, value] points as SVG, redrawn in place as the series grows.
import { formatNumber, h, svg } from "./dom.js";

const W = 320;
const H = 150;
const PAD = { left: 46, right: 8, top: 10, bottom: 22 };

export function lineChart(title) {
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, preserveAspectRatio: "none" });
  const latest = h("span", { class: "latest" });
  const el = h("figure", { class: "chart", "data-testid": `chart-${title}`, "data-points": 0 },
    h("figcaption", {}, h("span", {}, title), latest), plot);

  function update(points) {
    const data = (points || []).filter((p) => Array.isArray(p) && Number.isFinite(p[0]) && Number.isFinite(p[1]));
    el.dataset.points = data.length;
    latest.textContent = data.length ? formatNumber(data[data.length - 1][1]) : "no data yet";
    if (data.length === 0) { plot.replaceChildren(); return; }
    const xs = data.map((p) => p[0]);
    const ys = data.map((p) => p[1]);
    let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
    const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
    const sy = (y) => H - PAD.bottom - ((y - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);
    const path = data.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    plot.replaceChildren(
      svg("line", { class: "axis", x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom }),
      svg("line", { class: "axis", x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: H - PAD.bottom }),
      svg("text", { class: "tick", x: PAD.left - 4, y: PAD.top + 8, "text-anchor": "end" }, formatNumber(y1)),
      svg("text", { class: "tick", x: PAD.left - 4, y: H - PAD.bottom, "text-anchor": "end" }, formatNumber(y0)),
      svg("text", { class: "tick", x: PAD.left, y: H - 6 }, `step ${formatNumber(x0)}`),
      svg("text", { class: "tick", x: W - PAD.right, y: H - 6, "text-anchor": "end" }, formatNumber(x1)),
      svg("path", { class: "line", d: path }),
      data.length === 1 ? svg("circle", { class: "dot", cx: sx(xs[0]), cy: sy(ys[0]), r: 3 }) : null,
    );
  }

  return { el, update };
}
