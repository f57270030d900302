// Training curves drawn with uPlot (vendored): one chart per quantity, x = optimizer step.
// A Curves object merges metrics.jsonl rows by step (a val-loss row and a train row share a step) and
// redraws its charts; window[registry] (llamatailorCharts for SFT, llamatailorDpoCharts for DPO) holds them so
// tests and users can read the plotted values.
"use strict";

const CURVES = [
  {id: "loss", title: "Loss", series: [["loss", "train loss"], ["eval_loss", "val loss"]]},
  {id: "lr", title: "Learning rate", series: [["lr", "learning rate"]]},
  {id: "grad_norm", title: "Gradient norm", series: [["grad_norm", "grad norm"]]},
  {id: "tokens_per_s", title: "Tokens per second", series: [["tokens_per_s", "tokens/s"]]},
  {id: "memory", title: "Memory (MiB)", series: [["rss_mb", "process RSS"], ["cuda_max_allocated_mb", "GPU peak"]]},
  {id: "reward_margin", title: "DPO reward margin", series: [["reward_margin", "train"], ["eval_reward_margin", "val"]]},
  {id: "reward_accuracy", title: "DPO reward accuracy", series: [["reward_accuracy", "train"], ["eval_reward_accuracy", "val"]]},
];
const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#65a30d"];

// Tick labels: whole steps only on x. On y as many decimals as the ticks' spacing needs (10.80 and 10.82
// stay apart), small values (a learning rate of 2e-4) in exponent form rather than rounded to 0.
function stepTicks(u, values) {
  return values.map((v) => (Number.isInteger(v) ? String(v) : ""));
}

function valueTicks(u, values) {
  const spacing = values.length > 1 ? Math.abs(values[1] - values[0]) : Math.abs(values[0] || 1);
  const largest = Math.max(...values.map((v) => Math.abs(v)));
  if (largest > 0 && (largest < 1e-3 || largest >= 1e6)) {
    const digits = Math.max(1, Math.min(6, Math.ceil(Math.log10(largest / spacing))));
    return values.map((v) => (v === 0 ? "0" : v.toExponential(digits)));
  }
  const decimals = spacing > 0 ? Math.max(0, Math.min(8, Math.ceil(-Math.log10(spacing)))) : 0;
  return values.map((v) => v.toFixed(decimals));
}

function chartOptions(title, labels, width) {
  return {
    title: title,
    width: width,
    height: 220,
    scales: {x: {time: false}},
    axes: [{label: "step", values: stepTicks}, {values: valueTicks, size: 60}],
    series: [{label: "step"}].concat(labels.map((label, i) => ({
      label: label, stroke: PALETTE[i % PALETTE.length], width: 2, spanGaps: true,
      points: {show: true, size: 4},
    }))),
  };
}

function chartWidth(container) {
  return Math.max(320, Math.min(560, container.clientWidth - 16));
}

class Curves {
  constructor(container, registry) {
    this.container = container;
    this.byStep = new Map();
    this.charts = {};
    window[registry] = this.charts;
  }

  reset() {
    this.byStep.clear();
  }

  add(rows) {
    for (const row of rows) {
      if (row.reset) { this.reset(); continue; }
      if (typeof row.step !== "number") continue;
      this.byStep.set(row.step, Object.assign(this.byStep.get(row.step) || {}, row));
    }
    this.draw();
  }

  draw() {
    const steps = Array.from(this.byStep.keys()).sort((a, b) => a - b);
    const rows = steps.map((step) => this.byStep.get(step));
    for (const curve of CURVES) {
      const present = curve.series.filter(([key]) => rows.some((row) => typeof row[key] === "number"));
      if (present.length === 0) continue;
      const data = [steps].concat(present.map(([key]) => rows.map((row) => (typeof row[key] === "number" ? row[key] : null))));
      this.drawOne(curve, present, data);
    }
  }

  drawOne(curve, present, data) {
    const existing = this.charts[curve.id];
    if (existing && existing.series.length === present.length + 1) {
      existing.setData(data);
      return;
    }
    if (existing) existing.destroy();
    const id = this.container.id + "-" + curve.id;
    let holder = document.getElementById(id);
    if (!holder) {  // a new chart goes last; a redrawn one keeps its place
      holder = document.createElement("div");
      holder.id = id;
      holder.className = "chart";
      this.container.appendChild(holder);
    }
    this.charts[curve.id] = new uPlot(chartOptions(curve.title, present.map(([, label]) => label), chartWidth(this.container)), data, holder);
  }
}

// Several runs' loss on one chart: `series` is [[label, Map(step -> value)], ...].
function overlaidChart(container, title, series) {
  const steps = Array.from(new Set(series.flatMap(([, values]) => Array.from(values.keys())))).sort((a, b) => a - b);
  const data = [steps].concat(series.map(([, values]) => steps.map((step) => (values.has(step) ? values.get(step) : null))));
  const holder = document.createElement("div");
  holder.className = "chart";
  container.appendChild(holder);
  return new uPlot(chartOptions(title, series.map(([label]) => label), Math.max(320, container.clientWidth - 16)), data, holder);
}
