"""`llamatailor ui` chat side by side: base, tuned and GGUF columns in a real headless Chromium against the
real server, each answer equal to what llamatailor's own in-process generation path answers."""

import json
import shutil
import threading
import time
import weakref
from pathlib import Path

import httpx2 as httpx
import pytest
from selenium.webdriver.common.by import By

from llamatailor.chat import ChatSession
from llamatailor.config import load_config
from llamatailor.errors import CheckFailed
from llamatailor.export.merge import merge_run
from llamatailor.export.stage import export_run
from llamatailor.generation.answers import stream_answer
from llamatailor.generation.engines import GREEDY, LlamaCppEngine
from llamatailor.generation.prompts import TokenizerPrompter
from llamatailor.models.loading import load_saved_tokenizer
from llamatailor.rundir import write_json
from llamatailor.serve.target import DEFAULT_CONTEXT, trained_context
from llamatailor.ui.chat import ChatModel, LoadedModels, ModelsInUse, answer_events
from ui_support import DEMO, XSS, UiServer, console_errors, needs_demo_screenshots, screenshot, wait_for

PROMPT = f"What comes after 7? {XSS}"
MAX_NEW_TOKENS = 24
SINGLE_THREAD = {"OMP_NUM_THREADS": "1"}  # as the test process (conftest): the same float sums, same argmax


@pytest.fixture(scope="module")
def chat_ui(tmp_path_factory, ui_finished_run):
    """A copy of the tiny run, merged and exported as f32 (its gates fail: a random model never stops), with
    a broken q8_0 file added to its export report; a copy without a trained model; the UI over both."""
    folder = tmp_path_factory.mktemp("ui-chat")
    runs = folder / "runs"
    shutil.copytree(ui_finished_run, runs / "tiny")
    config = load_config(runs / "tiny" / "config.yaml").model_copy(update={"output_dir": runs})
    merge_run(config)
    with pytest.raises(CheckFailed):
        export_run(config.model_copy(update={"export": config.export.model_copy(update={"gguf": ["f32"]})}))
    report_path = runs / "tiny" / "gguf" / "export_report.json"
    report = json.loads(report_path.read_text())
    (runs / "tiny" / "gguf" / "tiny-q8_0.gguf").write_bytes(b"GGUF not really")
    report["files"].append({**report["files"][0], "gguf_type": "q8_0", "path": "gguf/tiny-q8_0.gguf"})
    write_json(report_path, report)
    (runs / "untrained").mkdir()
    for name in ("config.yaml", "manifest.json"):
        shutil.copy(runs / "tiny" / name, runs / "untrained" / name)
    server = UiServer(runs, log=folder / "ui.log", env=SINGLE_THREAD)
    yield server, config, report
    server.stop()


def llama_cpp_answer(config, path: Path, prompt: str, max_new_tokens: int) -> str:
    """The GGUF's answer in this process: llama.cpp with the run's prompter, as eval and serve run it."""
    chat = load_saved_tokenizer(config.run_dir.final(config.dpo.enabled), config.model)
    prompter = TokenizerPrompter(chat, config.data.system_prompt)
    engine = LlamaCppEngine("gguf", path, min(DEFAULT_CONTEXT, trained_context(path)))
    ids = prompter.chat_ids([{"role": "user", "content": prompt}])
    deltas = stream_answer(engine, prompter, ids, GREEDY, max_new_tokens, cancelled=threading.Event())
    text = "".join(delta.text for delta in deltas).strip()
    engine.close()
    return text


def ask(browser, url: str, prompt: str, max_new_tokens: int, timeout: float) -> dict[str, object]:
    """Type `prompt` on the chat page at `url`, send it, wait for every column to finish; the columns by key."""
    browser.get(url)
    browser.find_element(By.ID, "chat-prompt").send_keys(prompt)
    tokens = browser.find_element(By.ID, "chat-max-new-tokens")
    tokens.clear()
    tokens.send_keys(str(max_new_tokens))
    browser.find_element(By.ID, "chat-send").click()
    columns = {
        c.get_attribute("data-model"): c for c in browser.find_elements(By.CSS_SELECTOR, ".chat-column")
    }
    wait_for(
        lambda: all(c.get_attribute("data-state") in ("done", "error") for c in columns.values()),
        timeout=timeout,
        what="every column to finish",
    )
    return columns


def test_columns_answer_as_the_one_generation_path(chat_ui, browser):
    server, config, report = chat_ui
    columns = ask(browser, server.url + "/runs/tiny/chat", PROMPT, MAX_NEW_TOKENS, timeout=60)
    assert list(columns) == ["base", "tuned", "gguf/tiny-f32.gguf", "gguf/tiny-q8_0.gguf"]

    def answer(key):
        return columns[key].find_element(By.CSS_SELECTOR, ".chat-answer").get_property("textContent")

    for key, use_base in (("base", True), ("tuned", False)):
        expected = ChatSession(config, use_base=use_base, max_new_tokens=MAX_NEW_TOKENS).reply(PROMPT)
        assert answer(key) == expected and expected
        status = columns[key].find_element(By.CSS_SELECTOR, ".chat-status").text
        assert status.startswith(f"length · {MAX_NEW_TOKENS} tokens in ")  # a random model never stops
    gguf = config.run_dir.gguf_file("tiny", "f32")
    assert answer("gguf/tiny-f32.gguf") == llama_cpp_answer(config, gguf, PROMPT, MAX_NEW_TOKENS)
    note = columns["gguf/tiny-f32.gguf"].find_element(By.CSS_SELECTOR, ".chat-note").text
    assert note == "gates failed: " + "; ".join(report["files"][0]["failures"])
    broken = columns["gguf/tiny-q8_0.gguf"]
    assert broken.get_attribute("data-state") == "error" and answer("gguf/tiny-q8_0.gguf") == ""
    message = broken.find_element(By.CSS_SELECTOR, ".chat-status").text
    assert message.startswith("gguf/tiny-q8_0.gguf: cannot load it")
    # The prompt's markup is text on the page: no element made from it, no script run
    assert browser.find_element(By.ID, "chat-asked").get_property("textContent") == PROMPT
    assert browser.find_elements(By.CSS_SELECTOR, "#chat-asked-row img, .chat-column img") == []
    assert browser.title != "pwned"
    assert console_errors(browser) == []
    if not DEMO.is_dir():
        screenshot(browser, "chat")


def test_answers_stream_and_stop_when_the_client_leaves(chat_ui):
    server, _, _ = chat_ui
    url = f"{server.url}/api/runs/tiny/chat"

    def tuned_tokens():
        models = httpx.get(url).json()["models"]
        return next(model for model in models if model["key"] == "tuned")

    body = {"prompt": "Count on", "max_new_tokens": 64, "models": ["tuned"]}
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        events = [json.loads(line) for line in response.iter_lines()]
    assert [event["event"] for event in events[:2]] == ["loading", "start"]
    texts = [event["text"] for event in events if event["event"] == "text"]
    assert len(texts) > 1 and events[-1]["event"] == "done" and events[-1]["tokens"] == 64
    before = tuned_tokens()["tokens_generated"]
    body["max_new_tokens"] = 1500  # about 5 s of tokens: cut off after the first
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        for line in response.iter_lines():
            if json.loads(line)["event"] == "text":
                break
    wait_for(lambda: not tuned_tokens()["busy"], timeout=10, what="the generation to stop")
    stopped_at = tuned_tokens()["tokens_generated"] - before
    time.sleep(0.5)
    assert 1 <= stopped_at < 200 and tuned_tokens()["tokens_generated"] - before == stopped_at


def test_free_memory_drops_the_columns_and_a_prompt_loads_them_again(chat_ui, browser):
    server, _, _ = chat_ui
    api = f"{server.url}/api/runs/tiny/chat"
    columns = ask(browser, server.url + "/runs/tiny/chat", "Count on", 8, timeout=60)

    def answers():
        return {
            key: c.find_element(By.CSS_SELECTOR, ".chat-answer").get_property("textContent")
            for key, c in columns.items()
        }

    def loaded_on_page():
        return {
            key: c.find_element(By.CSS_SELECTOR, ".chat-loaded").get_attribute("data-loaded")
            for key, c in columns.items()
        }

    def loaded_by_the_server():
        return {model["key"]: model["loaded"] for model in httpx.get(api).json()["models"]}

    first = answers()
    assert first["tuned"] and first["gguf/tiny-f32.gguf"]
    loaded = {"base": "true", "tuned": "true", "gguf/tiny-f32.gguf": "true", "gguf/tiny-q8_0.gguf": "false"}
    wait_for(lambda: loaded_on_page() == loaded, what="the page to show the loaded columns")
    assert loaded_by_the_server() == {key: value == "true" for key, value in loaded.items()}
    tuned_loaded = columns["tuned"].find_element(By.CSS_SELECTOR, ".chat-loaded").text
    assert tuned_loaded.startswith("loaded · ") and tuned_loaded.endswith(" tokens generated")

    browser.find_element(By.ID, "chat-free").click()
    wait_for(lambda: set(loaded_on_page().values()) == {"false"}, what="the page to show no column loaded")
    assert browser.find_element(By.ID, "chat-memory").text == "freed: base, tuned, GGUF f32"
    assert set(loaded_by_the_server().values()) == {False}
    assert columns["tuned"].find_element(By.CSS_SELECTOR, ".chat-loaded").text.startswith("not loaded")

    browser.find_element(By.ID, "chat-send").click()  # the same prompt again: each model loads anew
    wait_for(
        lambda: all(c.get_attribute("data-state") in ("done", "error") for c in columns.values()),
        timeout=60,
        what="every column to finish again",
    )
    assert answers() == first
    wait_for(lambda: loaded_on_page() == loaded, what="the page to show the columns loaded again")
    assert console_errors(browser) == []


def test_free_memory_is_refused_while_a_column_generates(chat_ui):
    server, _, _ = chat_ui
    url = f"{server.url}/api/runs/tiny/chat"
    body = {"prompt": "Count on", "max_new_tokens": 1500, "models": ["tuned"]}  # about 5 s of tokens
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        lines = response.iter_lines()  # kept: a generator dropped mid-way would close the response
        while json.loads(next(lines))["event"] != "text":
            pass
        refused = httpx.post(f"{url}/free")
    assert refused.status_code == 409 and refused.json()["busy"] == ["tuned"]
    assert refused.json()["detail"].startswith("tuned generating: stop it")

    def models():
        return {model["key"]: model for model in httpx.get(url).json()["models"]}

    wait_for(lambda: not models()["tuned"]["busy"], timeout=10, what="the generation to stop")
    assert models()["tuned"]["loaded"]
    cross_site = httpx.post(f"{url}/free", headers={"Origin": "http://elsewhere.example"})
    assert cross_site.status_code == 403 and models()["tuned"]["loaded"]
    freed = httpx.post(f"{url}/free")
    assert freed.status_code == 200 and "tuned" in freed.json()["released"]
    assert not any(model["loaded"] for model in models().values())
    again = httpx.post(f"{url}/free")
    assert again.status_code == 200 and again.json() == {"released": []}
    assert httpx.post(f"{server.url}/api/runs/nope/chat/free").status_code == 404


def test_idle_models_are_dropped_by_the_timer_never_while_in_use(chat_ui):
    _, config, _ = chat_ui
    model = ChatModel("gguf/tiny-f32.gguf", "GGUF f32", "", config.run_dir.gguf_file("tiny", "f32"))
    loaded = LoadedModels(idle_release_s=1.0)

    def answer():
        events = list(answer_events(loaded, config, [model], "Count on", 8, threading.Event()))
        assert events[-1]["event"] == "done", events
        return "".join(event.get("text", "") for event in events)

    first = answer()
    assert loaded.state(config) == {model.key: {"tokens_generated": 8, "busy": False}}
    assert loaded.release(config.run_dir.root.parent / "another") == []  # another run's: nothing dropped
    with loaded.use(config, model) as used:
        engine = weakref.ref(used.engine)
        with pytest.raises(ModelsInUse) as refused:
            loaded.release()
        assert refused.value.keys == [model.key]
        time.sleep(1.5)  # past idle_release_s, but in use
        assert loaded.state(config)[model.key]["busy"] is True
    del used
    let_go = time.monotonic()
    wait_for(lambda: loaded.state(config) == {}, timeout=10, what="the idle timer to drop the model")
    assert time.monotonic() - let_go >= 0.9  # a second after its last use, not at once
    assert engine() is None  # no reference left anywhere: llama.cpp's buffers are gone
    assert answer() == first  # loads again on the next prompt
    assert loaded.release() == [model.key] and loaded.state(config) == {}


def test_chat_runs_page_and_a_run_without_a_trained_model(chat_ui, browser):
    server, _, _ = chat_ui
    browser.get(server.url + "/chat")
    rows = browser.find_elements(By.CSS_SELECTOR, "#chat-runs tbody tr")
    assert [row.get_attribute("data-run") for row in rows] == ["tiny"]
    assert rows[0].find_element(By.CSS_SELECTOR, ".ggufs").text == "2"
    rows[0].find_element(By.CSS_SELECTOR, "a.chat-link").click()
    wait_for(lambda: browser.current_url.endswith("/runs/tiny/chat"), what="the run's chat page")
    browser.get(server.url + "/runs/untrained/chat")
    assert "no trained model yet" in browser.find_element(By.ID, "chat-problem").text
    assert console_errors(browser) == []
    response = httpx.post(f"{server.url}/api/runs/untrained/chat", json={"prompt": "hi", "max_new_tokens": 4})
    assert response.status_code == 200
    events = [json.loads(line) for line in response.text.splitlines()]
    errors = {event["model"]: event["message"] for event in events if event["event"] == "error"}
    assert list(errors) == ["base", "tuned"]
    assert all(
        message.endswith("no trained adapter or model here; run `llamatailor train` first")
        for message in errors.values()
    )
    unknown = httpx.post(f"{server.url}/api/runs/tiny/chat", json={"prompt": "hi", "models": ["nope"]})
    assert unknown.status_code == 400 and unknown.json()["detail"] == "run 'tiny' has no model 'nope'"


@needs_demo_screenshots
def test_demo_chat_screenshot(tmp_path, browser):
    runs = tmp_path / "runs"
    (runs / "demo").mkdir(parents=True)
    shutil.copytree(DEMO / "adapter", runs / "demo" / "adapter")
    for name in ("config.yaml", "manifest.json"):
        shutil.copy(DEMO / name, runs / "demo" / name)
    server = UiServer(runs, log=tmp_path / "ui.log", env=SINGLE_THREAD)
    try:
        prompt = "Describe this Python function signature as JSON.\n\njson.dumps(obj, *, skipkeys=False, indent=None)"
        columns = ask(browser, server.url + "/runs/demo/chat", prompt, 32, timeout=90)
        tuned = columns["tuned"].find_element(By.CSS_SELECTOR, ".chat-answer").get_property("textContent")
        assert set(json.loads(tuned)) == {"module", "function", "required", "optional"}
        assert console_errors(browser) == []
        screenshot(browser, "chat")
    finally:
        server.stop()
