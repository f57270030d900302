// The chat page: posts one prompt to /api/runs/NAME/chat and fills each model's column from the NDJSON
// events as they arrive (fetch + ReadableStream). Every text goes in with textContent: markup in a prompt
// or an answer shows as text. Stop aborts the request; the server then stops generating. Each column says
// whether its model is loaded (from /api/runs/NAME/chat, asked on load, after each prompt and every 10 s:
// the server drops idle models on its own); Free memory posts /api/runs/NAME/chat/free.
"use strict";

(function () {
  const form = document.getElementById("chat-form");
  if (!form) return;
  const run = form.dataset.run;
  const send = document.getElementById("chat-send");
  const stop = document.getElementById("chat-stop");
  const errorBox = document.getElementById("chat-error");
  const free = document.getElementById("chat-free");
  const memory = document.getElementById("chat-memory");
  const api = `/api/runs/${encodeURIComponent(run)}/chat`;
  const columns = new Map();
  for (const section of document.querySelectorAll(".chat-column")) columns.set(section.dataset.model, section);
  let controller = null;
  let refreshing = false;

  function showLoaded(column, model) {
    const loaded = column.querySelector(".chat-loaded");
    loaded.dataset.loaded = model.loaded ? "true" : "false";
    loaded.textContent = model.loaded
      ? `loaded · ${model.tokens_generated} tokens generated${model.busy ? " · in use" : ""}`
      : "not loaded (loads on the next prompt)";
  }

  async function refreshState() {
    if (refreshing) return;
    refreshing = true;
    try {
      const response = await fetch(api);
      if (!response.ok) return;
      for (const model of (await response.json()).models) {
        const column = columns.get(model.key);
        if (column) showLoaded(column, model);
      }
    } catch (error) {
      /* the server is away: the next refresh tries again */
    } finally {
      refreshing = false;
    }
  }

  function setState(column, state, status) {
    column.dataset.state = state;
    column.querySelector(".chat-status").textContent = status;
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  function handle(event) {
    const column = columns.get(event.model);
    if (!column) return;
    const answer = column.querySelector(".chat-answer");
    if (event.event === "loading") setState(column, "loading", "loading the model…");
    else if (event.event === "start") setState(column, "generating", `generating (prompt: ${event.prompt_tokens} tokens)…`);
    else if (event.event === "text") answer.textContent += event.text;
    else if (event.event === "error") {
      answer.textContent = "";
      column.querySelector(".chat-status").classList.add("fail");
      setState(column, "error", event.message);
    } else if (event.event === "done") {
      // as `llamatailor chat` prints it: the answer without outer whitespace
      answer.textContent = answer.textContent.trim();
      const rate = event.seconds > 0 ? `, ${(event.tokens / event.seconds).toFixed(1)} tokens/s` : "";
      setState(column, "done", `${event.finish_reason} · ${event.tokens} tokens in ${event.seconds.toFixed(2)} s${rate}`);
    }
  }

  async function readLines(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, end);
        buffered = buffered.slice(end + 1);
        if (line.trim()) handle(JSON.parse(line));
      }
    }
  }

  function errorText(status, body) {
    try {
      const detail = JSON.parse(body).detail;
      if (typeof detail === "string") return detail;
      if (Array.isArray(detail)) return detail.map((item) => `${(item.loc || []).slice(1).join(".")}: ${item.msg}`).join("; ");
    } catch (error) { /* not JSON: shown as it is */ }
    return `${status}: ${body}`;
  }

  async function ask(prompt, maxNewTokens, models) {
    controller = new AbortController();
    const response = await fetch(api, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt: prompt, max_new_tokens: maxNewTokens, models: models }),
      signal: controller.signal,
    });
    if (!response.ok) {
      showError(errorText(response.status, await response.text()));
      return;
    }
    await readLines(response);
  }

  form.addEventListener("submit", async (submitted) => {
    submitted.preventDefault();
    const prompt = document.getElementById("chat-prompt").value;
    const maxNewTokens = Number(document.getElementById("chat-max-new-tokens").value);
    const models = Array.from(document.querySelectorAll(".chat-model:checked"), (box) => box.value);
    errorBox.hidden = true;
    document.getElementById("chat-asked").textContent = prompt;
    document.getElementById("chat-asked-row").hidden = false;
    for (const [key, column] of columns) {
      column.hidden = !models.includes(key);
      column.querySelector(".chat-answer").textContent = "";
      column.querySelector(".chat-status").classList.remove("fail");
      setState(column, models.includes(key) ? "waiting" : "idle", models.includes(key) ? "waiting for its turn" : "");
    }
    send.disabled = true;
    stop.disabled = false;
    free.disabled = true;
    memory.textContent = "";
    try {
      await ask(prompt, maxNewTokens, models);
    } catch (error) {
      if (error.name !== "AbortError") showError("cannot reach the UI server: " + error);
    } finally {
      for (const column of columns.values()) {
        if (["waiting", "loading", "generating"].includes(column.dataset.state)) setState(column, "stopped", "stopped");
      }
      send.disabled = false;
      stop.disabled = true;
      free.disabled = false;
      controller = null;
      await refreshState();
    }
  });

  free.addEventListener("click", async () => {
    errorBox.hidden = true;
    free.disabled = true;
    try {
      const response = await fetch(`${api}/free`, { method: "POST" });
      const body = await response.text();
      if (!response.ok) showError(errorText(response.status, body));
      else {
        const released = JSON.parse(body).released;
        const labels = released.map((key) => (columns.has(key) ? columns.get(key).querySelector("h3").textContent : key));
        memory.textContent = labels.length ? `freed: ${labels.join(", ")}` : "no model was loaded";
      }
    } catch (error) {
      showError("cannot reach the UI server: " + error);
    } finally {
      free.disabled = controller !== null;
      await refreshState();
    }
  });

  refreshState();
  setInterval(() => {
    if (controller === null) refreshState();
  }, 10000);

  stop.addEventListener("click", () => {
    if (controller) controller.abort();
  });
})();
