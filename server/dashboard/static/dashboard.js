// fedretina dashboard: draws each figure's spec with uPlot, shows times in local time, offers PNG / JSON
// downloads, and on a running run's page swaps in fresh content every few seconds (no reload).
"use strict";

const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

function draw(root) {
  root.querySelectorAll("figure.chart").forEach((fig) => {
    const spec = JSON.parse(fig.querySelector("script.spec").textContent);
    const target = fig.querySelector(".plot");
    target.innerHTML = "";
    const series = [{ label: "round" }].concat(spec.series.map((s, i) => ({
      label: s.label, stroke: COLOURS[i % COLOURS.length], width: 2, spanGaps: true,
      points: { show: spec.x.length < 40 },
    })));
    const data = [spec.x].concat(spec.series.map((s) => s.values));
    const plot = new uPlot({
      width: Math.max(target.clientWidth, 320), height: 220, series: series,
      scales: { x: { time: false } },
      axes: [
        { label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200] },
        { label: spec.ylabel || "", size: fitTicks },
      ],
    }, data, target);
    fig.querySelector("a.png").onclick = (e) => {
      e.preventDefault();
      save(plot.root.querySelector("canvas").toDataURL("image/png"), spec.id + ".png");
    };
    fig.querySelector("a.json").onclick = (e) => {
      e.preventDefault();
      save(URL.createObjectURL(new Blob([JSON.stringify(spec, null, 1)], { type: "application/json" })), spec.id + ".json");
    };
  });
  root.querySelectorAll("[data-epoch]").forEach((el) => {
    const t = parseFloat(el.dataset.epoch);
    el.textContent = isNaN(t) ? "" : new Date(t * 1000).toLocaleString();
  });
}

// The y axis as wide as its widest tick label: at uPlot's fixed 50 px, labels such as 18,800,000 (bytes)
// ran under the axis title.
function fitTicks(self, values, axisIdx, cycleNum) {
  const axis = self.axes[axisIdx];
  if (cycleNum > 1) return axis._size;  // uPlot asks again after laying out: keep the first answer
  self.ctx.font = axis.font[0];
  const widest = Math.max(0, ...(values || []).map((v) => self.ctx.measureText(String(v)).width));
  return Math.ceil(axis.ticks.size + axis.gap + widest / devicePixelRatio + 4);
}

function save(href, name) {
  const a = document.createElement("a");
  a.href = href; a.download = name; document.body.appendChild(a); a.click(); a.remove();
}

async function refresh(main) {
  const response = await fetch(location.href, { headers: { "X-Fragment": "1" } });
  if (!response.ok) return;
  const page = new DOMParser().parseFromString(await response.text(), "text/html");
  const fresh = page.getElementById("main");
  main.innerHTML = fresh.innerHTML;
  main.dataset.live = fresh.dataset.live;
  draw(main);
  main.dataset.refreshed = String(Date.now());
}

document.addEventListener("DOMContentLoaded", () => {
  const main = document.getElementById("main");
  draw(main);
  const every = parseFloat(main.dataset.refresh) * 1000;
  setInterval(() => { if (main.dataset.live === "yes") refresh(main).catch(() => {}); }, every);
});
