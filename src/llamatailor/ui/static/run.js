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

// The stage table, rebuilt from the metrics answer's `stages` rows (text only) when they change.
function showStages(rows) {
  const table = document.getElementById("stage-table");
  const body = table.querySelector("tbody");
  const key = JSON.stringify(rows);
  if (body.dataset.shown === key) return;
  body.dataset.shown = key;
  body.replaceChildren(...rows.map((row) => {
    const tr = document.createElement("tr");
    tr.dataset.stage = row.name;
    const cells = [["", row.name], ["badge", row.state], ["time", row.started_at], ["time", row.finished_at], ["num", row.time], ["error", row.error]];
    for (const [cls, text] of cells) {
      const td = document.createElement("td");
      if (cls && cls !== "badge") td.className = cls;
      if (cls === "badge") {
        const badge = document.createElement("span");
        badge.className = "state " + row.state;
        badge.textContent = text;
        td.appendChild(badge);
      } else {
        td.textContent = text;
      }
      tr.appendChild(td);
    }
    return tr;
  }));
  table.hidden = rows.length === 0;
  document.getElementById("no-stages").hidden = rows.length > 0;
}

(function () {
  const sft = document.getElementById("charts");
  if (!sft) return;
  const statusBadge = document.getElementById("run-status");
  const note = document.getElementById("curves-note");
  // What the reader left out, over every poll (each chunk names only its own lines); cleared on a reset.
  let badLines = [];
  let badValues = [];
  follow(sft, "sft", "llamatailorCharts", (chunk, curves) => {
    document.getElementById("no-metrics").hidden = curves.byStep.size > 0;
    showStages(chunk.stages);
    statusBadge.textContent = chunk.status;
    statusBadge.className = "status " + chunk.status;
    if (chunk.rows.length && chunk.rows[0].reset) badLines = badValues = [];
    badLines = badLines.concat(chunk.bad_lines);
    badValues = badValues.concat(chunk.bad_values.map((bad) => `line ${bad.line} ${bad.key}: ${bad.value}`));
    const notes = [];
    if (badLines.length) notes.push(`metrics.jsonl lines not JSON: ${badLines.join(", ")}`);
    if (badValues.length) notes.push(`values not plotted, not numbers: ${badValues.join("; ")}`);
    note.textContent = notes.join("; ") || (chunk.status === "running" ? "live" : "");
    note.dataset.badValues = String(badValues.length);
  });
  const dpo = document.getElementById("dpo-charts");
  follow(dpo, "dpo", "llamatailorDpoCharts", (chunk, curves) => {
    document.getElementById("dpo-curves").hidden = curves.byStep.size === 0;
  });
})();
