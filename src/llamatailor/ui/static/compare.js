// The comparison page: each selected run's train and val loss overlaid on one chart each.
"use strict";

(async function () {
  const container = document.getElementById("compare-charts");
  if (!container || !container.dataset.runs) return;
  const names = container.dataset.runs.split(",");
  const train = [];
  const val = [];
  for (const name of names) {
    const response = await fetch(`/api/runs/${encodeURIComponent(name)}/metrics?source=sft`);
    if (!response.ok) continue;
    const chunk = await response.json();
    const trainLoss = new Map();
    const valLoss = new Map();
    for (const row of chunk.rows) {
      if (typeof row.loss === "number") trainLoss.set(row.step, row.loss);
      if (typeof row.eval_loss === "number") valLoss.set(row.step, row.eval_loss);
    }
    train.push([name, trainLoss]);
    val.push([name, valLoss]);
  }
  window.llamatailorCharts = {
    train: overlaidChart(container, "Train loss", train),
    val: overlaidChart(container, "Val loss", val),
  };
  container.dataset.ready = "true";
})();
