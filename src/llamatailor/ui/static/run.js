// The run page: follows metrics.jsonl (byte offset and line number kept between polls) and redraws the
// curves; polls every second while a stage runs, every 5 s otherwise.
"use strict";

(function () {
  const container = document.getElementById("charts");
  if (!container) return;
  const name = container.dataset.run;
  const curves = new Curves(container);
  const statusBadge = document.getElementById("run-status");
  const note = document.getElementById("curves-note");
  let offset = 0;
  let line = 1;
  let seen = 0;

  async function poll() {
    let delay = 5000;
    try {
      const response = await fetch(`/api/runs/${encodeURIComponent(name)}/metrics?offset=${offset}&line=${line}`);
      if (response.ok) {
        const chunk = await response.json();
        offset = chunk.offset;
        line = chunk.line;
        if (chunk.rows.length) {
          seen += chunk.rows.filter((row) => !row.reset).length;
          curves.add(chunk.rows);
        }
        document.getElementById("no-metrics").hidden = seen > 0;
        statusBadge.textContent = chunk.status;
        statusBadge.className = "status " + chunk.status;
        note.textContent = chunk.bad_lines.length ? `metrics.jsonl lines not JSON: ${chunk.bad_lines.join(", ")}` : (chunk.status === "running" ? "live" : "");
        container.dataset.points = String(curves.byStep.size);
        if (chunk.status === "running") delay = 1000;
      }
    } catch (error) {
      note.textContent = "cannot reach the UI server: " + error;
    }
    setTimeout(poll, delay);
  }
  poll();
})();
