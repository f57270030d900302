// The New run page: json-editor draws the form from the run file's schema (/api/run-form/schema); each edit
// (debounced) asks the server to check the value with the schema and to plan it for the GPU size given;
// problems are listed by field and shown under their fields (notes under theirs); the button, enabled only
// without problems, writes the run file and starts it; resuming is offered only for a name that is taken.
"use strict";

(function () {
  const holder = document.getElementById("run-form");
  if (!holder) return;
  const gpu = document.getElementById("gpu-mem");
  const resume = document.getElementById("resume-existing");
  const resumeLabel = resume.closest("label");
  const startButton = document.getElementById("start-run");
  const DEBOUNCE_MS = 400;
  let editor = null;
  let timer = null;
  let asked = 0;

  async function postJson(url, body) {
    const response = await fetch(url, {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify(body),
    });
    let data = {};
    try {
      data = await response.json();
    } catch (error) {
      data = {error: `${response.status} ${response.statusText}`};
    }
    return {ok: response.ok, status: response.status, data};
  }

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  // The editor of a field path such as train.lora.r, or of its nearest ancestor the form draws.
  function editorOf(field) {
    const parts = field.split(".");
    while (parts.length) {
      const found = editor.getEditor("root." + parts.join("."));
      if (found) return found;
      parts.pop();
    }
    return null;
  }

  // A note under its field's editor (or its nearest drawn ancestor's).
  function noteUnder(field, text, className) {
    const fieldEditor = editorOf(field);
    if (!fieldEditor || !fieldEditor.container) return;
    const note = element("p", `${field}: ${text}`, className);
    note.dataset.field = field;
    fieldEditor.container.append(note);
  }

  function showProblems(errors, notes) {
    document.querySelectorAll(".field-error, .field-note").forEach((node) => node.remove());
    for (const note of notes) noteUnder(note.field, note.message, "field-note muted");
    const list = document.getElementById("form-errors");
    list.replaceChildren();
    for (const problem of errors) {
      const item = element("li");
      item.dataset.field = problem.field;
      item.append(element("code", problem.field), document.createTextNode(": " + problem.message));
      list.append(item);
      noteUnder(problem.field, problem.message, "field-error");
    }
    startButton.disabled = errors.length > 0;
    const state = document.getElementById("form-state");
    state.textContent = errors.length ? `${errors.length} to fix` : "none: ready to start";
    state.dataset.count = String(errors.length);
  }

  function showPlan(plan, problem) {
    const verdict = document.getElementById("plan-verdict");
    const error = document.getElementById("plan-error");
    const table = document.getElementById("plan-table");
    const advice = document.getElementById("plan-advice");
    error.hidden = !problem;
    error.textContent = problem || "";
    table.hidden = !plan;
    advice.replaceChildren();
    verdict.textContent = plan ? plan.verdict : "";
    verdict.className = "verdict " + (plan ? (plan.fits ? "pass" : "fail") : "");
    document.getElementById("plan-state").textContent = plan ? `${plan.model}, ${(plan.parameters / 1e6).toFixed(1)} M parameters` : "";
    if (!plan) return;
    const head = table.querySelector("thead tr");
    head.replaceChildren(element("th", "GiB per GPU"));
    for (const method of plan.methods) {
      const cell = element("th", method.label + (method.label === plan.method ? " (chosen)" : ""), "num");
      if (method.label === plan.method) cell.classList.add("chosen");
      head.append(cell);
    }
    const body = table.querySelector("tbody");
    body.replaceChildren();
    const terms = Object.keys(plan.methods[0].terms_gib);
    const rows = terms.map((term) => [term, (method) => method.terms_gib[term]]);
    rows.push(["total", (method) => method.total_gib], ["fits", (method) => (method.fits ? "yes" : "no")]);
    rows.push(["largest micro-batch", (method) => String(method.max_micro_batch)]);
    for (const [label, value] of rows) {
      const row = element("tr");
      row.dataset.term = label;
      row.append(element("th", label));
      for (const method of plan.methods) {
        const cell = element("td", value(method), "num");
        cell.dataset.method = method.label;
        if (method.label === plan.method) cell.classList.add("chosen");
        row.append(cell);
      }
      body.append(row);
    }
    for (const line of plan.advice) advice.append(element("li", line));
  }

  async function check() {
    const mine = ++asked;
    document.getElementById("form-state").textContent = "checking…";
    const body = {config: editor.getValue(), gpu_mem_gib: gpu.value === "" ? null : Number(gpu.value), resume: resume.checked};
    try {
      const answer = await postJson("/api/run-form/validate", body);
      if (mine !== asked) return; // a newer check is on its way
      if (!answer.ok) throw new Error(answer.data.error || `HTTP ${answer.status}`);
      showProblems(answer.data.errors, answer.data.notes);
      showPlan(answer.data.plan, answer.data.plan_error);
      showResume(answer.data.exists);
    } catch (error) {
      if (mine === asked) document.getElementById("form-state").textContent = "cannot check: " + error.message;
    }
  }

  // The offer to resume appears only while a run of the form's name exists; hidden, it is not asked.
  function showResume(exists) {
    resumeLabel.hidden = !exists;
    if (!exists && resume.checked) {
      resume.checked = false;
      schedule();
    }
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(check, DEBOUNCE_MS);
  }

  async function start() {
    startButton.disabled = true;
    const failure = document.getElementById("start-error");
    failure.hidden = true;
    const answer = await postJson("/api/runs", {config: editor.getValue(), gpu_mem_gib: null, resume: resume.checked});
    if (answer.ok) {
      window.location.assign(answer.data.url);
      return;
    }
    failure.textContent = answer.data.error || "the run file has problems: see the list above";
    failure.hidden = false;
    startButton.disabled = false;
    if (answer.data.errors) showProblems(answer.data.errors, []);
  }

  async function load() {
    const response = await fetch("/api/run-form/schema");
    const {schema, start: startValue} = await response.json();
    holder.replaceChildren();
    editor = new JSONEditor(holder, {
      schema,
      startval: startValue,
      theme: "html",
      iconlib: null,
      show_errors: "never", // the server's messages (the run file's own wording) are shown instead
      disable_edit_json: true,
      disable_properties: true,
      disable_array_reorder: true,
      disable_array_delete_last_row: true,
      disable_array_delete_all_rows: true,
      prompt_before_delete: false,
      no_additional_properties: true,
    });
    editor.on("ready", () => {
      editor.on("change", schedule);
      holder.dataset.ready = "true";
      schedule();
    });
  }

  gpu.addEventListener("input", schedule);
  resume.addEventListener("change", schedule);
  startButton.addEventListener("click", start);
  load();
})();
