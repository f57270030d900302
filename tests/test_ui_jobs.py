"""`llamatailor ui`: the New run form (schema-driven, checked by the server, planned as it is edited) and
starting, stopping and resuming a real `llamatailor run` from the browser, in headless Chromium against the
real server."""

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx2 as httpx
import pytest
import yaml
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from helpers import alpaca_rows, write_jsonl
from llamatailor.config import RunConfig, load_config
from llamatailor.rundir import RunDir, now_iso
from llamatailor.ui.jobs import LOG_NAME, Job, Jobs, group_alive
from ui_support import UiServer, console_errors, screenshot, wait_for

GIB = 1024**3
NAME = "tiny-job"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_groups(groups: set[int]) -> None:
    """SIGKILL each process group (a run the UI started: its own session) that is still there."""
    for pgid in groups:
        if pgid != os.getpgrp():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ui(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("ui-jobs")
    runs = folder / "runs"
    runs.mkdir()
    data = write_jsonl(folder / "train.jsonl", alpaca_rows(30))
    server = UiServer(runs, log=folder / "ui.log")
    groups: set[int] = set()
    try:
        yield SimpleNamespace(
            url=server.url, runs=runs, data=data, model=tiny_models["chatml"], groups=groups
        )
    finally:
        server.stop()
        for manifest in runs.glob("*/manifest.json"):  # anything a run recorded as running, too
            for record in json.loads(manifest.read_text()).get("stages", {}).values():
                with contextlib.suppress(ProcessLookupError, TypeError):
                    groups.add(os.getpgid(record.get("pid")))
        _kill_groups(groups)


def _input(browser, field):
    return browser.find_element(By.NAME, "root[" + "][".join(field.split(".")) + "]")


def _fill(browser, field, value):
    """Type `value` into the form's field (a dotted key path), ticking its opt-in box where it is optional."""
    element = _input(browser, field)
    if not element.is_enabled():
        container = browser.find_element(By.CSS_SELECTOR, f'[data-schemapath="root.{field}"]')
        container.find_element(By.CSS_SELECTOR, "input[type=checkbox]").click()
    element.clear()
    element.send_keys(str(value), Keys.TAB)


def _open_form(browser, ui):
    browser.get(ui.url + "/new")
    wait_for(lambda: browser.find_element(By.ID, "run-form").get_attribute("data-ready"), 20, "the form")


def _problems(browser):
    return {
        item.get_attribute("data-field"): item.text
        for item in browser.find_elements(By.CSS_SELECTOR, "#form-errors li")
    }


def _plan_cell(browser, term, method):
    return browser.find_element(
        By.CSS_SELECTOR, f'#plan-table tr[data-term="{term}"] td[data-method="{method}"]'
    ).text


def _fill_minimum(browser, ui, name):
    """The form with the fields a run cannot do without filled: the tiny model and the data file."""
    _open_form(browser, ui)
    _fill(browser, "name", name)
    _fill(browser, "model.base", str(ui.model))
    _fill(browser, "data.train.0.path", str(ui.data))
    wait_for(
        lambda: browser.find_element(By.ID, "form-state").get_attribute("data-count") == "0",
        20,
        "no problems",
    )


def test_form_shows_plans_verdict_as_it_is_edited(ui, browser):
    from llamatailor.plan.options import build_plan
    from llamatailor.plan.verdict import plan_as_dict

    _fill_minimum(browser, ui, "form-plan")
    config = {"name": "form-plan", "output_dir": str(ui.runs), "model": {"base": str(ui.model)}}
    config = RunConfig.model_validate({**config, "data": {"train": [str(ui.data)]}})
    plan = plan_as_dict(build_plan(config, model=None, gpu_mem_gib=24, gpus=1, sharding="none"))
    lora = plan["methods"]["lora"]
    wait_for(lambda: browser.find_element(By.ID, "plan-verdict").text, 20, "the plan's verdict")
    assert (
        browser.find_element(By.ID, "plan-verdict").text
        == f"lora fits: {lora['total_bytes'] / GIB:.4g} GiB of 24 GiB"
    )
    assert _plan_cell(browser, "total", "lora") == f"{lora['total_bytes'] / GIB:.4g}"
    for term in ("weights", "optimizer states", "activations", "logits and loss"):
        assert (
            _plan_cell(browser, term, "full") == f"{plan['methods']['full']['terms_bytes'][term] / GIB:.4g}"
        )

    gpu = browser.find_element(By.ID, "gpu-mem")  # smaller than every method's total: nothing fits
    gpu.clear()
    gpu.send_keys("0.3")
    wait_for(
        lambda: "does not fit" in browser.find_element(By.ID, "plan-verdict").text,
        10,
        "the verdict for 0.3 GiB",
    )
    assert browser.find_element(By.ID, "plan-verdict").text.endswith("no method fits one such GPU")
    assert [_plan_cell(browser, "fits", method) for method in ("full", "lora", "qlora")] == ["no", "no", "no"]

    missing = ui.model.parent / "no-such-model"  # neither planned nor started: a problem of its field
    _fill(browser, "model.base", str(missing))
    # Clearing the field asks about '' first: wait for the answer about the whole path.
    expected = {"model.base": f"model.base: {UNKNOWN_MODEL.format(repr(str(missing)))}"}
    wait_for(lambda: _problems(browser) == expected, 15, "the model's problem")
    assert (
        browser.find_element(By.ID, "plan-error").text
        == "the plan appears when model.base names a model it can read (see Problems)"
    )
    assert not browser.find_element(By.ID, "start-run").is_enabled()
    assert console_errors(browser) == []


def test_form_names_the_field_of_each_problem(ui, browser):
    _fill_minimum(browser, ui, "form-check")
    _fill(browser, "train.learning_rate", "-1")
    _fill(browser, "train.lora.r", "0")
    wait_for(
        lambda: {"train.learning_rate", "train.lora.r"} <= set(_problems(browser)), 10, "the two problems"
    )
    problems = _problems(browser)
    assert problems["train.learning_rate"] == "train.learning_rate: got -1: Input should be greater than 0"
    assert problems["train.lora.r"] == "train.lora.r: got 0: Input should be greater than or equal to 1"
    note = browser.find_element(By.CSS_SELECTOR, '[data-schemapath="root.train.lora.r"] .field-error')
    assert note.text == problems["train.lora.r"]  # beside its field too
    assert browser.find_element(By.ID, "plan-error").text == "the plan appears when the run file is valid"
    _fill(browser, "train.learning_rate", "0.001")
    _fill(browser, "train.lora.r", "8")
    missing = ui.data.with_name("missing.jsonl")
    _fill(browser, "data.train.0.path", str(missing))
    not_found = f"data.train.0.path: {missing}: data file not found (working directory: "
    wait_for(  # clearing the field asks about '' first: wait for the answer about the whole path
        lambda: (
            list(problems := _problems(browser)) == ["data.train.0.path"]
            and problems["data.train.0.path"].startswith(not_found)
        ),
        10,
        "the missing file alone",
    )
    _fill(browser, "data.train.0.path", str(ui.data))
    wait_for(
        lambda: browser.find_element(By.ID, "form-state").get_attribute("data-count") == "0", 10, "fixed"
    )
    assert not browser.find_elements(By.CSS_SELECTOR, ".field-error")
    assert console_errors(browser) == []
    assert not list(ui.runs.iterdir())  # checking writes nothing


UNKNOWN_MODEL = (
    "{} is not a known alias (smollm2-135m-instruct), an existing folder, a .gguf file, or a hub id of the "
    "form organisation/name"
)
UNSUPPORTED = "{}: unsupported file type {!r}; expected .jsonl, .ndjson, .json, .csv, .parquet"


def _ready(browser):
    return browser.find_element(By.ID, "form-state").get_attribute("data-count") == "0"


def test_unknown_model_and_unsupported_file_are_refused_with_the_schemas_problems(ui, browser):
    _fill_minimum(browser, ui, "form-refused")
    assert browser.find_element(By.ID, "start-run").is_enabled()
    _fill(browser, "model.base", "no-such-model-xyz")
    _fill(browser, "data.train.0.path", "/etc/passwd")
    _fill(browser, "train.lora.r", "0")  # a schema problem: the checks above are still listed beside it
    fields = {"model.base", "data.train.0.path", "train.lora.r"}
    expected = {
        "model.base": f"model.base: {UNKNOWN_MODEL.format(repr('no-such-model-xyz'))}",
        "data.train.0.path": f"data.train.0.path: {UNSUPPORTED.format('/etc/passwd', '')}",
    }
    wait_for(  # the answers about half-typed values come first: wait for the final ones
        lambda: (
            set(problems := _problems(browser)) == fields
            and all(problems[field] == message for field, message in expected.items())
        ),
        20,
        "the three problems",
    )
    problems = _problems(browser)
    for field in ("model.base", "data.train.0.path"):
        note = browser.find_element(By.CSS_SELECTOR, f'[data-schemapath="root.{field}"] .field-error')
        assert note.text == problems[field]  # beside its field too
    assert browser.find_element(By.ID, "form-state").text == "3 to fix"
    assert not browser.find_element(By.ID, "start-run").is_enabled()

    _fill(browser, "train.lora.r", "8")  # the schema accepts it now: the server still refuses the start
    wait_for(lambda: set(_problems(browser)) == fields - {"train.lora.r"}, 10, "two problems left")
    assert not browser.find_element(By.ID, "start-run").is_enabled()
    value = {"name": "form-refused", "model": {"base": "no-such-model-xyz"}}
    refused = httpx.post(
        f"{ui.url}/api/runs", json={"config": {**value, "data": {"train": ["/etc/passwd"]}}}, timeout=30
    )
    assert refused.status_code == 400
    assert {error["field"]: error["message"] for error in refused.json()["errors"]} == {
        "model.base": UNKNOWN_MODEL.format(repr("no-such-model-xyz")),
        "data.train.0.path": UNSUPPORTED.format("/etc/passwd", ""),
    }
    assert not (ui.runs / "form-refused.yaml").exists() and not (ui.runs / "form-refused").exists()
    assert console_errors(browser) == []


def test_a_hub_id_is_accepted_with_a_note(ui):
    value = {
        "name": "form-hub",
        "model": {"base": "some-org/some-model-7b"},
        "data": {"train": [str(ui.data)]},
    }
    answer = httpx.post(f"{ui.url}/api/run-form/validate", json={"config": value}, timeout=30).json()
    assert answer["errors"] == [] and answer["exists"] is False
    assert [note["field"] for note in answer["notes"]] == ["model.base"]
    assert "downloads it from the Hugging Face Hub" in answer["notes"][0]["message"]
    assert answer["plan_error"].startswith("no architecture for 'some-org/some-model-7b'")  # not cached here


def test_a_sections_own_rule_names_its_field_and_only_the_keys_involved(ui):
    """A rule across fields of one section (train: save_steps a multiple of eval_steps) is shown under the
    field its message opens with, with the keys it names, not the section's every value (the form sends all
    25 train keys); one naming keys together (val_ratio + test_ratio) stays on its section."""
    schedule = {"save_steps": 7, "eval_steps": 5, "logging_steps": 1, "learning_rate": 0.001}
    value = {"name": "form-rules", "model": {"base": str(ui.model)}, "train": schedule}
    value["data"] = {"train": [str(ui.data)], "val_ratio": 0.5, "test_ratio": 0.4}
    answer = httpx.post(f"{ui.url}/api/run-form/validate", json={"config": value}, timeout=30).json()
    assert {error["field"]: error["message"] for error in answer["errors"]} == {
        "train.save_steps": "got {'save_steps': 7, 'eval_steps': 5}: save_steps (7) must be a multiple of "
        "eval_steps (5): checkpoints are kept by their val loss",
        "data": "got {'val_ratio': 0.5, 'test_ratio': 0.4}: val_ratio + test_ratio is 0.9; keep it below 0.9 "
        "so training data remains",
    }


def test_the_page_says_it_needs_javascript(ui):
    page = httpx.get(f"{ui.url}/new", timeout=10).text
    note = re.search(r"<noscript>(.*?)</noscript>", page, re.DOTALL)
    assert note and "needs JavaScript" in note[1] and "<code>llamatailor run RUN.yaml</code>" in note[1]


def test_resuming_is_offered_only_for_a_name_that_exists(ui, browser):
    taken = ui.runs / "form-taken.yaml"
    _fill_minimum(browser, ui, "form-new")
    offer = browser.find_element(By.ID, "resume-existing").find_element(By.XPATH, "..")
    assert not offer.is_displayed()
    taken.write_text("name: form-taken\n")
    try:
        _fill(browser, "name", "form-taken")
        taken_message = f"name: a run named 'form-taken' exists ({taken})"
        wait_for(
            lambda: _problems(browser).get("name", "").startswith(taken_message), 10, "the name's problem"
        )
        assert offer.is_displayed() and not browser.find_element(By.ID, "start-run").is_enabled()
        offer.click()  # ticked: the name may be reused, the run file replaced
        wait_for(lambda: _ready(browser), 10, "no problems once resuming")
        assert offer.is_displayed() and browser.find_element(By.ID, "start-run").is_enabled()
        _fill(browser, "name", "form-new-2")
        wait_for(lambda: not offer.is_displayed(), 10, "the offer hidden for a new name")
        assert not browser.find_element(By.ID, "resume-existing").is_selected()
        assert console_errors(browser) == []
    finally:
        taken.unlink()


def _log_text(browser):
    return browser.find_element(By.ID, "job-log").text


def _job_state(browser):
    return browser.find_element(By.ID, "job-state").get_attribute("data-state")


def _steps(run: Path) -> list[int]:
    """The train-loss steps of metrics.jsonl's complete lines (the trainer may be writing the last one)."""
    lines = (run / "metrics.jsonl").read_text().split("\n")[:-1]
    return [row["step"] for row in map(json.loads, lines) if "loss" in row]


TRAIN = {"max_steps": 2000, "batch_size": 4, "learning_rate": 0.005, "logging_steps": 1, "save_steps": 2}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
DATA = {"val_ratio": 0.2, "test_ratio": 0.2, "max_seq_len": 128}


def _start_from_form(browser, ui):
    """Fill the form for a tiny run long enough to stop half-way, start it; the run file it wrote. The model
    and data paths are typed relative to the working directory (the UI's too: it inherits the tests')."""
    _open_form(browser, ui)
    _fill(browser, "name", NAME)
    _fill(browser, "model.base", os.path.relpath(ui.model))
    _fill(browser, "data.train.0.path", os.path.relpath(ui.data))
    for section, values in (("data", DATA), ("train", TRAIN), ("train.lora", LORA)):
        for key, value in values.items():
            _fill(browser, f"{section}.{key}", value)
    wait_for(
        lambda: browser.find_element(By.ID, "form-state").get_attribute("data-count") == "0",
        20,
        "no problems",
    )
    wait_for(lambda: browser.find_element(By.ID, "plan-verdict").text.startswith("lora fits"), 20, "the plan")
    browser.execute_script("window.scrollTo(0, 0)")
    screenshot(browser, "new-run")
    browser.find_element(By.ID, "start-run").click()
    wait_for(lambda: browser.current_url.endswith(f"/runs/{NAME}/job"), 20, "the job page")
    return ui.runs / f"{NAME}.yaml"


def _stop(browser, ui, pid):
    browser.find_element(By.ID, "stop-run").click()
    wait_for(lambda: _job_state(browser) == "stopped", 30, "the job stopped")
    wait_for(lambda: not _group_alive(pid), 10, "the process group gone")
    stop_asked = httpx.get(f"{ui.url}/api/runs/{NAME}/log", timeout=10).json()["job"]["stop_asked_at"]
    said = f"=== stop asked at {stop_asked}: SIGINT sent to the run's processes (as Ctrl-C)"
    wait_for(lambda: said in _log_text(browser), 10, "the stop in the log")  # the log tells it too
    record = json.loads((ui.runs / NAME / "manifest.json").read_text())["stages"]["train"]
    assert record["status"] == "failed" and record["error"].startswith("KeyboardInterrupt")
    assert browser.find_element(By.ID, "run-status").text == "failed"
    assert browser.find_element(By.CSS_SELECTOR, '#job-stages [data-stage="train"]').text == "train: failed"


def _running_pid(ui):
    job = httpx.get(f"{ui.url}/api/runs/{NAME}/log", params={"offset": 0}, timeout=10).json()["job"]
    assert job["state"] == "running"
    ui.groups.add(job["pid"])
    return job["pid"]


def test_start_stop_and_resume_a_run_from_the_form(ui, browser):
    run_file = _start_from_form(browser, ui)
    model, data = str(ui.model.resolve()), str(ui.data.resolve())
    expected = {"name": NAME, "output_dir": str(ui.runs), "model": {"base": model}}
    expected |= {"data": {"train": [{"path": data}], **DATA}, "train": {**TRAIN, "lora": LORA}}
    assert load_config(run_file).model_dump() == RunConfig.model_validate(expected).model_dump()
    # Typed relative, written absolute: the run file reads the same files from any working directory.
    written = yaml.safe_load(run_file.read_text())
    assert (written["model"]["base"], written["data"]["train"][0]["path"]) == (model, data)
    assert Path(model).is_dir() and Path(data).is_file()
    pid = _running_pid(ui)
    run = ui.runs / NAME

    wait_for(lambda: "Prepared data" in _log_text(browser), 60, "prepare's report in the log")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(_steps(run)) >= 6, 60, "six training steps")
    wait_for(lambda: "/2000 [" in _log_text(browser), 10, "the trainer's progress in the log")
    assert _job_state(browser) == "running"
    assert browser.find_element(By.ID, "run-status").text == "running"
    again = httpx.post(f"{ui.url}/api/runs/{NAME}/resume", timeout=10)
    assert again.status_code == 409 and "already running" in again.json()["error"]
    written = run_file.read_text()
    taken = httpx.post(f"{ui.url}/api/runs", json={"config": expected}, timeout=10)
    assert taken.status_code == 400 and [error["field"] for error in taken.json()["errors"]] == ["name"]
    replacing = httpx.post(f"{ui.url}/api/runs", json={"config": expected, "resume": True}, timeout=10)
    assert replacing.status_code == 409 and "already running" in replacing.json()["error"]
    assert run_file.read_text() == written  # refused before anything was written
    browser.execute_script("window.scrollTo(0, 0)")
    screenshot(browser, "job")

    _stop(browser, ui, pid)
    stopped_at = max(_steps(run))
    browser.find_element(By.ID, "resume-run").click()
    wait_for(lambda: "Resuming from" in _log_text(browser), 60, "training resuming")
    pid = _running_pid(ui)
    found = re.search(r"Resumingfrom\S*/checkpoint-(\d+)", "".join(_log_text(browser).split()))
    assert found and 2 <= int(found[1]) <= stopped_at
    wait_for(lambda: max(_steps(run)) > stopped_at, 60, "steps after the stop")
    steps = _steps(run)
    assert steps == list(
        range(1, len(steps) + 1)
    )  # metrics.jsonl continues from the checkpoint, no step twice
    _stop(browser, ui, pid)
    assert console_errors(browser) == []


def test_a_run_started_elsewhere_is_seen_and_not_started_twice(ui):
    run = ui.runs / "elsewhere"  # a stage recorded running by a live process: this test's own
    run.mkdir()
    record = {"status": "running", "pid": os.getpid(), "host": platform.node()}
    (run / "manifest.json").write_text(json.dumps({"name": "elsewhere", "stages": {"train": record}}))
    try:
        answer = httpx.get(f"{ui.url}/api/runs/elsewhere/log", params={"offset": 0}, timeout=10).json()
        assert answer["job"] == {
            "state": "elsewhere",
            "pid": os.getpid(),
            "label": f"running outside this UI (pid {os.getpid()})",
        }
        assert answer["status"] == "running" and answer["text"] == ""
        resumed = httpx.post(f"{ui.url}/api/runs/elsewhere/resume", timeout=10)
        assert (
            resumed.status_code == 409 and f"outside this UI (pid {os.getpid()})" in resumed.json()["error"]
        )
        stopped = httpx.post(f"{ui.url}/api/runs/elsewhere/stop", timeout=10)
        assert stopped.status_code == 409 and "nothing to stop" in stopped.json()["error"]
        for path in ("/runs/..%2Felsewhere/job", "/api/runs/no-such-run/log", "/runs/.hidden/job"):
            assert httpx.get(ui.url + path, timeout=10).status_code == 404, path
    finally:
        shutil.rmtree(run)


def test_resume_writes_into_the_runs_folder_whatever_the_config_says(ui, ui_finished_run, tmp_path):
    """A copied run's config.yaml names the folder it was made in (or any other): Resume still runs it as
    <runs>/<name> and writes nothing elsewhere."""
    run = ui.runs / "moved"
    shutil.copytree(ui_finished_run, run)
    elsewhere = tmp_path / "elsewhere"
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(
        yaml.safe_dump({**config, "output_dir": str(elsewhere), "name": "other"})
    )
    try:
        started = httpx.post(f"{ui.url}/api/runs/moved/resume", timeout=10)
        assert started.status_code == 200, started.text
        answer = wait_for(
            lambda: (
                (a := httpx.get(f"{ui.url}/api/runs/moved/log", params={"offset": 0}, timeout=10).json())
                and a["job"]["state"] not in ("running", "stopping")
                and a
            ),
            timeout=90,
            what="the resumed run to end",
        )
        assert answer["job"]["state"] == "finished", answer
        assert f'output_dir="{ui.runs.resolve()}"' in answer["text"] and 'name="moved"' in answer["text"]
        stages = json.loads((run / "manifest.json").read_text())["stages"]
        assert {stage: record["status"] for stage, record in stages.items()} == {
            "prepare": "complete",
            "train": "complete",
            "eval": "complete",
        }
        assert not elsewhere.exists()
        assert not (ui.runs / "other").exists()
        page = httpx.get(f"{ui.url}/runs/moved", timeout=10)
        assert page.status_code == 200
    finally:
        shutil.rmtree(run)


def test_the_log_box_scrolls_sideways_rather_than_wrap(ui, browser):
    """A rule 160 columns wide (LOG_ENVIRONMENT's COLUMNS, as rich draws it) stays one line in the job
    page's log box, which scrolls sideways, in a window narrower than the rule."""
    run = ui.runs / "wide"
    run.mkdir()
    rule = "─" * 160
    (run / LOG_NAME).write_text(f"{rule}\nafter the rule\n")
    size = browser.get_window_size()
    browser.set_window_size(1000, size["height"])
    try:
        browser.get(f"{ui.url}/runs/wide/job")
        wait_for(lambda: "after the rule" in _log_text(browser), 10, "the log")
        lines, scrolls = browser.execute_script(
            """const log = document.getElementById("job-log");
            const range = document.createRange();
            range.selectNodeContents(log);
            const tops = Array.from(range.getClientRects()).filter((r) => r.width > 0).map((r) => Math.round(r.top));
            return [new Set(tops).size, log.scrollWidth > log.clientWidth];"""
        )
        assert (lines, scrolls) == (2, True)  # the rule and the line after it; wider than the box
        assert console_errors(browser) == []
    finally:
        browser.set_window_size(size["width"], size["height"])
        shutil.rmtree(run)


def test_a_run_just_started_has_its_pages_before_its_manifest(ui):
    run = ui.runs / "fresh"
    run.mkdir()
    (run / "ui-run.log").write_text("=== started\n")
    try:
        assert "fresh" in [row["name"] for row in httpx.get(f"{ui.url}/api/runs", timeout=10).json()]
        page = httpx.get(f"{ui.url}/runs/fresh", timeout=10)
        assert page.status_code == 200 and "No stage has run yet." in page.text
        assert httpx.get(f"{ui.url}/api/runs/fresh/metrics", timeout=10).json()["status"] == "new"
    finally:
        shutil.rmtree(run)


GRACE = (1.0, 2.5)  # the stop's SIGTERM and SIGKILL marks, seconds after its SIGINT (the UI's: 10, 20)
# A process that ignores the signals named in argv[2:]; argv[1] "leader" first starts a member of its process
# group (the same program) and names its pid; each says when it is ready, then waits to be ended.
GROUP_PROGRAM = """
import signal, subprocess, sys, time
member = None
if sys.argv[1] == "leader":
    member = subprocess.Popen([sys.executable, __file__, "member", *sys.argv[2:]], stdout=subprocess.PIPE)
    assert member.stdout.readline() == b"ready\\n"
for name in sys.argv[2:]:
    signal.signal(getattr(signal, name), signal.SIG_IGN)
print("ready" if member is None else f"ready {member.pid}", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize(
    ("ignored", "ender"),
    [((), signal.SIGINT), (("SIGINT",), signal.SIGTERM), (("SIGINT", "SIGTERM"), signal.SIGKILL)],
)
def test_stop_escalates_until_the_process_group_is_gone(tmp_path, ignored, ender):
    """A real group of two processes (a leader in its own session, as Jobs.start makes it, and its child)
    that ignore `ignored`: Stop's SIGINT, then SIGTERM and SIGKILL at the GRACE marks, until the group ends
    (the member, an orphan once its leader ends, may stay a zombie: an init that reaps no orphans, as in
    some containers, and group_alive counts it ended); the job then says it stopped and which signal ended
    it, as the job page shows it."""
    program = tmp_path / "group.py"
    program.write_text(GROUP_PROGRAM)
    leader = subprocess.Popen(
        [sys.executable, str(program), "leader", *ignored],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        word, member = leader.stdout.readline().split()
        assert word == b"ready"
        member_pid = int(member)
        jobs = Jobs(stop_grace=GRACE)
        job = Job("group", tmp_path / "run.yaml", tmp_path / LOG_NAME, leader, now_iso())
        jobs.jobs["group"] = job
        jobs.stop("group")
        wait_for(
            lambda: job.exit_code is not None and not group_alive(leader.pid), GRACE[1] + 20, "the group gone"
        )
        ended_after = time.monotonic() - job.stop_asked
        signals = ["SIGINT", "SIGTERM", "SIGKILL"]
        assert job.signals_sent == signals[: signals.index(ender.name) + 1]
        assert leader.returncode == -ender
        assert not group_alive(member_pid)  # gone, or a zombie of the same group
        view = jobs.view("group", RunDir(tmp_path))
        assert view["state"] == "stopped" and view["ended_by"] == ender.name
        assert view["label"] == f"stopped (pid {leader.pid}, ended by {ender.name})"
        assert ended_after >= [0.0, *GRACE][len(job.signals_sent) - 1]  # no signal before its mark
        # The run's log tells each signal, as the job page shows it.
        log = tmp_path / LOG_NAME
        notes = wait_for(
            lambda: (
                (found := re.findall(r"^=== .*$", log.read_text(), re.MULTILINE))
                and len(found) == len(job.signals_sent)
                and found
            ),
            5,
            "a log line per signal",
        )
        sigint = f"=== stop asked at {job.stop_asked_at}: SIGINT sent to the run's processes (as Ctrl-C)"
        escalations = [
            rf"=== \S+: {name} sent to the run's processes: some were still there {mark:g} s after the SIGINT"
            for name, mark in zip(("SIGTERM", "SIGKILL"), GRACE, strict=True)
        ]
        assert notes[0] == sigint
        for pattern, note in zip(escalations[: len(notes) - 1], notes[1:], strict=True):
            assert re.fullmatch(pattern, note), note
    finally:
        _kill_groups({leader.pid})
        leader.stdout.close()
        leader.wait(10)


def test_a_group_of_only_zombies_has_ended():
    """A process that ended but was not reaped (a zombie, as orphans stay in a container whose init reaps
    none) leaves the group; a live one keeps it."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    ended = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    try:
        wait_for(
            lambda: Path(f"/proc/{ended.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
            10,
            "a zombie",
        )
        assert _group_alive(ended.pid)  # the kernel still counts it a member
        assert not group_alive(ended.pid)
        assert group_alive(live.pid)
    finally:
        live.kill()
        live.wait()
        ended.wait()


def test_the_forms_plan_names_the_model_as_the_run_file_does(tmp_path):
    """The embedded alias resolves to a converted folder named after its GGUF file; the form's plan says the
    alias, as `llamatailor plan` does."""
    from llamatailor.models.source import resolve_source
    from llamatailor.ui.run_form import plan_verdict

    data = tmp_path / "train.jsonl"
    write_jsonl(data, alpaca_rows(4))
    config = RunConfig.model_validate(
        {"name": "alias", "model": {"base": "smollm2-135m-instruct"}, "data": {"train": [str(data)]}}
    )
    location = resolve_source("smollm2-135m-instruct").location
    assert location != "smollm2-135m-instruct"
    assert plan_verdict(config, 24, location)["model"] == "smollm2-135m-instruct"
