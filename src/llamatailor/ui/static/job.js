// A run's start / stop page: follows ui-run.log from a byte offset each second (as text, never markup),
// shows the process's state and the stages', and sends stop and resume.
"use strict";

(function () {
  const section = document.getElementById("job");
  if (!section) return;
  const name = section.dataset.run;
  const api = `/api/runs/${encodeURIComponent(name)}`;
  const log = document.getElementById("job-log");
  const stopButton = document.getElementById("stop-run");
  const resumeButton = document.getElementById("resume-run");
  const message = document.getElementById("job-message");
  const ACTIVE = new Set(["running", "stopping", "elsewhere"]);
  // The log's end as a terminal would show it: progress bars redraw their line after \r and move up to it
  // with ESC [ n A; lines more than SCREEN_ROWS above the cursor are final and move to `finished`.
  const SCREEN_ROWS = 12;
  const finished = document.createTextNode("");
  const last = document.createTextNode("");
  log.append(finished, last);
  let screen = [""];
  let row = 0;
  let column = 0;
  let carried = ""; // an escape sequence cut by the end of a chunk
  let offset = 0;

  function put(part) {
    if (part === "\n") {
      row += 1;
      column = 0;
      if (row === screen.length) screen.push("");
    } else if (part === "\r") {
      column = 0;
    } else if (part.startsWith("\x1b[")) {
      if (part.endsWith("A")) row = Math.max(0, row - (Number(part.slice(2, -1)) || 1));
    } else {
      const line = screen[row];
      screen[row] = line.slice(0, column).padEnd(column) + part + line.slice(column + part.length);
      column += part.length;
    }
  }

  function addText(text) {
    const cut = (carried + text).match(/^([\s\S]*?)(\x1b(\[[0-9;?]*)?)?$/);
    carried = cut[2] || "";
    for (const part of cut[1].split(/(\x1b\[[0-9;?]*[A-Za-z]|\r|\n)/)) if (part) put(part);
    while (row > SCREEN_ROWS) {
      finished.appendData(screen.shift().trimEnd() + "\n");
      row -= 1;
    }
    last.data = screen.map((line) => line.trimEnd()).join("\n");
  }

  function clear() {
    finished.data = last.data = carried = "";
    screen = [""];
    row = column = 0;
  }

  // `refused`: why Resume is off for this run (a malformed manifest), null when it is not; undefined keeps
  // what the last poll said (an answer to a button carries no run state).
  function showJob(job, status, stages, refused) {
    const state = document.getElementById("job-state");
    state.textContent = job.label;
    state.className = "state " + job.state;
    state.dataset.state = job.state;
    document.getElementById("job-started").textContent = job.started_at ? `started ${job.started_at}` : "";
    const badge = document.getElementById("run-status");
    badge.textContent = status;
    badge.className = "status " + status;
    const list = document.getElementById("job-stages");
    if (stages) list.replaceChildren();
    for (const [stage, stageState] of Object.entries(stages || {})) {
      const item = document.createElement("span");
      item.className = "state " + stageState;
      item.dataset.stage = stage;
      item.textContent = `${stage}: ${stageState}`;
      list.append(item, document.createTextNode(" "));
    }
    if (refused !== undefined) {
      const reason = document.getElementById("resume-refused");
      reason.textContent = refused || "";
      reason.hidden = !refused;
    }
    stopButton.disabled = job.state !== "running";
    resumeButton.disabled = ACTIVE.has(job.state) || !document.getElementById("resume-refused").hidden;
  }

  async function poll() {
    let delay = 1000;
    try {
      const response = await fetch(`${api}/log?offset=${offset}`);
      if (response.ok) {
        const chunk = await response.json();
        const following = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
        if (chunk.reset) clear();
        if (chunk.text) addText(chunk.text);
        if (following) log.scrollTop = log.scrollHeight;
        offset = chunk.offset;
        log.dataset.offset = String(offset);
        showJob(chunk.job, chunk.status, chunk.stages, chunk.resume_refused);
        if (chunk.more) delay = 0;
      }
    } catch (error) {
      message.textContent = "cannot reach the UI server: " + error;
    }
    setTimeout(poll, delay);
  }

  async function send(action) {
    stopButton.disabled = resumeButton.disabled = true;
    const response = await fetch(`${api}/${action}`, {method: "POST"});
    const answer = await response.json();
    message.textContent = response.ok ? `${action}: sent` : answer.error;
    if (answer.job) showJob(answer.job, document.getElementById("run-status").textContent, null);
  }

  stopButton.addEventListener("click", () => send("stop"));
  resumeButton.addEventListener("click", () => send("resume"));
  poll();
})();
