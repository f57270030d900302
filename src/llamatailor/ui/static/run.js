// The run page: follows metrics.jsonl and dpo/metrics.jsonl (byte offset and line number kept between polls)
// and redraws the curves; polls every second while a stage runs, every 5 s otherwise.
"use strict";

function follow(container, source, registry, onChunk) {
  const name = container.dataset.run;
  const curves = new Curves(container, registry);
  let offset = 0;
  let line = 1;
  async function poll() {
    let delay = 5000;
    try {
      const response = await fetch(`/api/runs/${encodeURIComponent(name)}/metrics?source=${source}&offset=${offset}&line=${line}`);
      if (response.ok) {
        const chunk = await response.json();
        offset = chunk.offset;
        line = chunk.line;
        if (chunk.rows.length) curves.add(chunk.rows);
        container.dataset.points = String(curves.byStep.size);
        onChunk(chunk, curves);
        if (chunk.status === "running") delay = 1000;
      }
    } catch (error) {
      document.getElementById("curves-note").textContent = "cannot reach the UI server: " + error;
    }
    setTimeout(poll, delay);
  }
  poll();
}

(function () {
  const sft = document.getElementById("charts");
  if (!sft) return;
  const statusBadge = document.getElementById("run-status");
  const note = document.getElementById("curves-note");
  follow(sft, "sft", "llamatailorCharts", (chunk, curves) => {
    document.getElementById("no-metrics").hidden = curves.byStep.size > 0;
    statusBadge.textContent = chunk.status;
    statusBadge.className = "status " + chunk.status;
    const bad = chunk.bad_lines.length ? `metrics.jsonl lines not JSON: ${chunk.bad_lines.join(", ")}` : "";
    note.textContent = bad || (chunk.status === "running" ? "live" : "");
  });
  const dpo = document.getElementById("dpo-charts");
  follow(dpo, "dpo", "llamatailorDpoCharts", (chunk, curves) => {
    document.getElementById("dpo-curves").hidden = curves.byStep.size === 0;
  });
})();
