"""`llamatailor ui`: the runs page, a run's overview with live curves, comparison, and path safety, in a real
headless Chromium against the real server."""

import json
import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import quote

import httpx2 as httpx
import pytest
import yaml
from selenium.webdriver.common.by import By
from typer.testing import CliRunner

from helpers import alpaca_rows, write_jsonl, write_run_file
from llamatailor.cli import app
from llamatailor.ui.security import is_loopback
from ui_support import (
    DEMO,
    XSS,
    UiServer,
    by_id,
    console_errors,
    needs_demo_screenshots,
    page_elements,
    raw_get,
    screenshot,
    wait_for,
)


@pytest.fixture(scope="module")
def ui(tmp_path_factory, ui_finished_run):
    folder = tmp_path_factory.mktemp("ui-runs-page")
    runs = folder / "runs"
    shutil.copytree(ui_finished_run, runs / "tiny")
    server = UiServer(runs, log=folder / "ui.log")
    yield server, runs
    server.stop()


def test_runs_page_shows_the_manifest_numbers(ui, browser):
    server, runs = ui
    browser.get(server.url + "/")
    row = browser.find_element(By.CSS_SELECTOR, 'tr[data-run="tiny"]')
    manifest = json.loads((runs / "tiny" / "manifest.json").read_text())
    metrics = json.loads((runs / "tiny" / "eval" / "metrics.json").read_text())
    headline = metrics["headline"]
    assert row.find_element(By.CSS_SELECTOR, ".metric-name").text == headline
    assert row.find_element(By.CSS_SELECTOR, ".base-score").text == f"{metrics['base'][headline]:.4g}"
    assert row.find_element(By.CSS_SELECTOR, ".tuned-score").text == f"{metrics['tuned'][headline]:.4g}"
    for stage in ("prepare", "train", "eval"):
        assert manifest["stages"][stage]["status"] == "complete"
        assert row.find_element(By.CSS_SELECTOR, f'span[title^="{stage}:"]').text == "complete"
    assert console_errors(browser) == []
    screenshot(browser, "runs")


def _copy_run(source, runs, name):
    """A copy of a finished run under another name (its manifest's name too)."""
    target = runs / name
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**manifest, "name": name}))
    return target


def test_runs_sort_by_headline_delta_and_compare(ui, browser, ui_finished_run):
    server, runs = ui
    second = _copy_run(ui_finished_run, runs, "tiny-b")
    metrics = json.loads((second / "eval" / "metrics.json").read_text())
    headline = metrics["headline"]
    metrics["tuned"][headline] = metrics["base"][headline] + 0.5  # the bigger gain
    (second / "eval" / "metrics.json").write_text(json.dumps(metrics))
    browser.get(server.url + "/?sort=delta&desc=true")
    order = [row.get_attribute("data-run") for row in browser.find_elements(By.CSS_SELECTOR, "tr[data-run]")]
    assert order[:2] == ["tiny-b", "tiny"]
    browser.get(server.url + "/?sort=delta&desc=false")
    order = [row.get_attribute("data-run") for row in browser.find_elements(By.CSS_SELECTOR, "tr[data-run]")]
    assert order[:2] == ["tiny", "tiny-b"]
    for name in ("tiny", "tiny-b"):
        browser.find_element(By.CSS_SELECTOR, f'input[value="{name}"]').click()
    browser.find_element(By.ID, "compare-button").click()
    wait_for(lambda: browser.find_element(By.ID, "compare-charts").get_attribute("data-ready"), what="charts")
    plotted = browser.execute_script("return window.llamatailorCharts.train.data")
    rows = [json.loads(line) for line in (runs / "tiny" / "metrics.jsonl").read_text().splitlines()]
    train = {row["step"]: row["loss"] for row in rows if "loss" in row}
    assert plotted[0] == sorted(train) and plotted[1] == [train[step] for step in sorted(train)]
    assert plotted[2] == plotted[1]  # the copy's curve lies on the original's
    cell = browser.find_element(By.CSS_SELECTOR, f'tr[data-metric="{headline}"] td:nth-of-type(2)')
    assert cell.text == f"{metrics['tuned'][headline]:.4g}"
    assert console_errors(browser) == []
    screenshot(browser, "compare")
    shutil.rmtree(second)


SORTS = "'name', 'status', 'created_at', 'updated_at', 'seconds', 'base_model', 'method' or 'delta'"
BAD_QUERIES = {
    "/?sort=delta&desc=bogus": ["desc: expected true or false, got 'bogus'"],
    "/?sort=size&desc=1": [f"sort: expected one of {SORTS}, got 'size'"],
    "/runs/tiny/eval?order=random&page=0": [
        "order: expected one of 'worst', 'best' or 'file', got 'random'",
        "page: expected a number ≥ 1, got '0'",
    ],
    "/runs/tiny/eval?only=everything": [
        "only: expected one of 'all', 'regressions' or 'runaway', got 'everything'"
    ],
    "/runs/tiny/data?kind=invalid&page=two": ["page: expected a whole number, got 'two'"],
    f"/?desc={quote(XSS)}": [f"desc: expected true or false, got {XSS!r}"],
}


def test_bad_query_values_answer_a_page_naming_the_parameter(ui):
    server, _ = ui
    for address, problems in BAD_QUERIES.items():
        response = httpx.get(server.url + address, timeout=30)
        assert response.status_code == 400 and response.headers["content-type"].startswith("text/html"), (
            address
        )
        page = by_id(response.text)
        assert [item.text for item in page["query-problems"].find("li")] == problems
        assert page["without-query"].attrs["href"] == address.split("?")[0]
        assert "<script>" not in response.text
    api = httpx.get(
        f"{server.url}/api/runs/tiny/metrics", params={"offset": "x", "source": "sft"}, timeout=30
    )
    assert api.status_code == 422 and api.json() == {"detail": "offset: expected a whole number, got 'x'"}
    for address in (
        "/?sort=delta&desc=false",
        "/runs/tiny/eval?order=best&only=regressions&page=9",
        "/runs/tiny/data?page=9",
    ):
        assert httpx.get(server.url + address, timeout=30).status_code == 200, address


def test_run_page_shows_stages_config_and_curves(ui, browser):
    server, runs = ui
    browser.get(server.url + "/runs/tiny")
    wait_for(lambda: browser.find_element(By.ID, "charts").get_attribute("data-points"), what="curves")
    rows = [json.loads(line) for line in (runs / "tiny" / "metrics.jsonl").read_text().splitlines()]
    loss = browser.execute_script("return window.llamatailorCharts.loss.data")
    steps = sorted({row["step"] for row in rows})
    assert loss[0] == steps
    assert loss[1] == [next((r["loss"] for r in rows if r["step"] == s and "loss" in r), None) for s in steps]
    assert loss[2] == [
        next((r["eval_loss"] for r in rows if r["step"] == s and "eval_loss" in r), None) for s in steps
    ]
    config_text = browser.find_element(By.ID, "config-text").text
    assert config_text.strip() == (runs / "tiny" / "config.yaml").read_text().strip()
    manifest = json.loads((runs / "tiny" / "manifest.json").read_text())
    for stage, record in manifest["stages"].items():
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-stage="{stage}"]')
        assert row.find_element(By.CSS_SELECTOR, ".state").text == record["status"]
    assert console_errors(browser) == []
    screenshot(browser, "run")


def test_markup_in_a_run_file_renders_as_text(ui, browser, ui_finished_run):
    server, runs = ui
    run = _copy_run(ui_finished_run, runs, "marked")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["base"] = XSS
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    browser.get(server.url + "/")
    cell = browser.find_element(By.CSS_SELECTOR, 'tr[data-run="marked"] td.model')
    assert cell.text == XSS
    assert cell.find_elements(By.CSS_SELECTOR, "script, img") == []
    browser.get(server.url + "/runs/marked")
    assert XSS in browser.find_element(By.ID, "config-text").text
    assert browser.title != "pwned"
    shutil.rmtree(run)


def test_paths_outside_the_runs_folder_are_refused(ui, tmp_path):
    server, runs = ui
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the UI")
    (runs / "tiny" / "leak.txt").symlink_to(secret)
    outside_run = tmp_path / "outside"
    shutil.copytree(runs / "tiny", outside_run, symlinks=True)
    (runs / "linked").symlink_to(outside_run)
    try:
        for path in (
            "/runs/tiny/files/leak.txt",
            "/runs/tiny/files/%2E%2E/%2E%2E/secret.txt",
            "/runs/tiny/files/..%2F..%2Fsecret.txt",
            "/runs/linked",
            "/runs/..",
            "/api/runs/linked/metrics",
            "/runs/%2E%2E/files/secret.txt",
        ):
            status, body = raw_get(server.port, path)
            assert status == 404, path
            assert "not for the UI" not in body
        assert "linked" not in [row["name"] for row in httpx.get(server.url + "/api/runs").json()]
        image = httpx.get(server.url + "/runs/tiny/files/loss.png")
        assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
        text = httpx.get(server.url + "/runs/tiny/files/config.yaml")
        assert text.headers["content-type"].startswith("text/plain")
    finally:
        (runs / "tiny" / "leak.txt").unlink()
        (runs / "linked").unlink()


def test_host_origin_and_key_checks(ui, tmp_path):
    server, runs = ui
    assert httpx.get(server.url + "/", headers={"Host": "attacker.example"}).status_code == 421
    # Every loopback address is this machine: answered as 127.0.0.1 is (is_loopback, the one rule).
    for host in ("127.0.0.2", "127.255.0.1", "localhost", "[::1]", "[::ffff:127.0.0.1]"):
        assert httpx.get(server.url + "/", headers={"Host": f"{host}:{server.port}"}).status_code == 200, host
    for host in ("10.0.0.1", "0.0.0.0", "[::2]", "localhost.example", "127.0.0.1.nip.io"):
        assert httpx.get(server.url + "/", headers={"Host": f"{host}:{server.port}"}).status_code == 421, host
    assert [is_loopback(host) for host in ("127.0.0.2", "::1", "[::1]", "LOCALHOST", "0.0.0.0", "::")] == [
        True, True, True, True, False, False
    ]  # fmt: skip
    refused = httpx.post(server.url + "/api/runs/tiny/stop", headers={"Origin": "http://attacker.example"})
    assert refused.status_code == 403
    page = httpx.get(server.url + "/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    keyed = UiServer(runs, "--api-key", "sesame", log=tmp_path / "keyed.log")
    try:
        assert httpx.get(keyed.url + "/").status_code == 401
        assert (
            httpx.get(keyed.url + "/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        )
        rows = httpx.get(keyed.url + "/api/runs", headers={"Authorization": "Bearer sesame"}).json()
        assert "tiny" in [row["name"] for row in rows]
        with httpx.Client(base_url=keyed.url, follow_redirects=True) as client:
            landed = client.get("/runs/tiny?key=sesame")
            assert landed.status_code == 200 and "key=" not in str(landed.url)
            assert client.get("/api/runs").status_code == 200  # the cookie carries the key now
    finally:
        keyed.stop()


def test_ui_refuses_another_address_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMATAILOR_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["ui", "--runs", str(tmp_path), "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "binding beyond this machine needs --api-key" in result.output


def _steps_in(path):
    """The distinct steps of metrics.jsonl's complete lines now."""
    text = path.read_text() if path.is_file() else ""
    return {json.loads(line)["step"] for line in text[: text.rfind("\n") + 1].splitlines()}


def test_chart_gains_points_while_training(ui, browser, tiny_models, tmp_path):
    server, runs = ui
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(40))
    run_file = write_run_file(
        tmp_path,
        tiny_models["chatml"],
        [data],
        name="live",
        output_dir=str(runs),
        train={"max_steps": 100, "save_steps": 50, "eval_steps": 25, "batch_size": 2},
        eval={"max_new_tokens": 2},
    )
    log = (tmp_path / "run.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "llamatailor", "run", str(run_file)], stdout=log, stderr=subprocess.STDOUT
    )
    metrics = runs / "live" / "metrics.jsonl"
    try:
        # The page is open from the run folder's creation, before the first point: a page that loads slowly
        # on a busy machine must not miss the start of training.
        wait_for(lambda: metrics.parent.is_dir(), timeout=120, what="the run to start")
        browser.get(server.url + "/runs/live")
        wait_for(lambda: metrics.is_file(), timeout=120, what="training to start")
        observed = []
        while process.poll() is None and len(observed) < 6:
            steps = _steps_in(metrics)
            # Within 2 s of a line reaching the file, its point is on the chart.
            shown = wait_for(
                lambda steps=steps: _chart_steps(browser) >= steps and _chart_steps(browser), timeout=2.5
            )
            observed.append(len(shown))
            time.sleep(0.7)
        assert len(set(observed)) >= 3, f"the chart grew only through {observed} points"
        assert browser.find_element(By.ID, "run-status").text in ("running", "complete")
        process.wait(timeout=180)
        final = _steps_in(metrics)
        wait_for(lambda: _chart_steps(browser) == final, timeout=6, what="the last points")
        # The stage table follows too, without a reload: eval appears and finishes.
        wait_for(
            lambda: browser.find_element(By.CSS_SELECTOR, 'tr[data-stage="eval"] .state').text == "complete",
            timeout=8,
            what="the eval row",
        )
    finally:
        process.kill()
        process.wait()
        log.close()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    loss = browser.execute_script("return window.llamatailorCharts.loss.data")
    assert loss[1] == [
        next((r["loss"] for r in rows if r["step"] == s and "loss" in r), None) for s in loss[0]
    ]
    assert console_errors(browser) == []
    shutil.rmtree(runs / "live")


def _chart_steps(browser):
    return set(
        browser.execute_script(
            "return window.llamatailorCharts.loss ? window.llamatailorCharts.loss.data[0] : []"
        )
    )


DEMO_FILES = (
    "manifest.json",
    "config.yaml",
    "metrics.jsonl",
    "loss.png",
    "data/report.json",
    "data/lengths.png",
    "data/rejected.jsonl",
    "eval/metrics.json",
    "eval/samples.jsonl",
    "gguf/export_report.json",
    "gguf/Modelfile",
    "merged/merge_report.json",
)


@needs_demo_screenshots
def test_the_demo_run_as_shown(browser, tmp_path):
    """`make demo`'s run: the headline and every GGUF's retention as the files say; the pictures docs/ui.md
    shows for the runs, run, data and export pages."""
    runs = tmp_path / "runs"
    for name in DEMO_FILES:
        if (DEMO / name).is_file():
            (runs / "demo" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(DEMO / name, runs / "demo" / name)
    server = UiServer(runs, log=tmp_path / "ui.log")
    try:
        browser.get(server.url + "/")
        metrics = json.loads((DEMO / "eval" / "metrics.json").read_text())
        headline = metrics["headline"]
        row = browser.find_element(By.CSS_SELECTOR, 'tr[data-run="demo"]')
        assert row.find_element(By.CSS_SELECTOR, ".tuned-score").text == f"{metrics['tuned'][headline]:.4g}"
        screenshot(browser, "demo-runs")
        browser.get(server.url + "/runs/demo")
        wait_for(lambda: browser.find_element(By.ID, "charts").get_attribute("data-points"), what="curves")
        screenshot(browser, "demo-run")
        browser.get(server.url + "/runs/demo/data")
        screenshot(browser, "demo-data")
        browser.get(server.url + "/runs/demo/export")
        report = json.loads((DEMO / "gguf" / "export_report.json").read_text())
        for check in report["files"]:
            row = browser.find_element(By.CSS_SELECTOR, f'tr.gguf[data-type="{check["gguf_type"]}"]')
            assert row.find_element(By.CSS_SELECTOR, "td.retention").text == f"{check['retention']:.4g}"
        screenshot(browser, "demo-export")
        assert console_errors(browser) == []
    finally:
        server.stop()


ODD_MANIFESTS = {
    "text": '"text"',
    "list": "[1, 2, 3]",
    "flat": '{"stages": {"train": "complete"}}',
    "typed": '{"stages": {"train": {"status": 5, "seconds": "abc"}, "prepare": {"status": "complete", "seconds": "x"}}}',
    "cut": '{"stages": {"train": {"sta',
}


def test_malformed_manifests_are_named_not_a_500(ui, browser):
    server, runs = ui
    for name, text in ODD_MANIFESTS.items():
        (runs / f"odd-{name}").mkdir()
        (runs / f"odd-{name}" / "manifest.json").write_text(text)
    (runs / "odd-flat" / "config.yaml").write_text("model: [unclosed\n")
    try:
        rows = {row["name"]: row for row in httpx.get(server.url + "/api/runs").json()}
        assert rows["odd-list"]["status"] == "unreadable"
        assert rows["odd-list"]["problems"] == ["manifest.json: is a JSON array, not an object"]
        assert rows["odd-flat"]["problems"] == [
            'manifest.json: stages.train is "complete", not a stage record (an object with a status)',
            "config.yaml: not a YAML mapping",
        ]
        assert rows["odd-typed"]["stages"] == {"prepare": "complete"} and rows["odd-typed"]["seconds"] == 0
        assert rows["odd-typed"]["problems"] == ["manifest.json: stages.train.status is 5, not a status word"]
        assert {rows[f"odd-{name}"]["status"] for name in ODD_MANIFESTS} == {"unreadable"}
        assert rows["odd-cut"]["problems"][0].startswith("manifest.json: not readable JSON")
        browser.get(server.url + "/")
        cell = browser.find_element(By.CSS_SELECTOR, 'tr[data-run="odd-text"]')
        assert "manifest.json: is a JSON string, not an object" in cell.text
        for name in ODD_MANIFESTS:
            assert httpx.get(f"{server.url}/runs/odd-{name}").status_code == 200
            assert httpx.get(f"{server.url}/api/runs/odd-{name}/metrics").status_code == 200
        browser.get(server.url + "/runs/odd-flat")
        assert "config.yaml: not a YAML mapping" in browser.find_element(By.ID, "run-problems").text
        assert console_errors(browser) == []
    finally:
        for name in ODD_MANIFESTS:
            shutil.rmtree(runs / f"odd-{name}")


BROKEN_RECORDS = [
    "manifest.json: stages.train.status is 7, not a status word",
    'manifest.json: stages.eval is "oops", not a stage record (an object with a status)',
]


def test_malformed_stage_records_make_a_run_unreadable_and_not_resumable(ui, browser, ui_finished_run):
    """A finished run whose train and eval records are malformed is neither complete nor resumable: every
    page says unreadable and names the records; Resume is off with the reason, and refused by the server."""
    server, runs = ui
    run = _copy_run(ui_finished_run, runs, "broken")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["train"]["status"] = 7
    manifest["stages"]["eval"] = "oops"
    (run / "manifest.json").write_text(json.dumps(manifest))
    manifest_path = (run / "manifest.json").resolve()
    refused = f"Resume is off: {'; '.join(BROKEN_RECORDS)}. Repair {manifest_path} first (moving it away makes every stage run again, training included)."
    try:
        row = next(row for row in httpx.get(server.url + "/api/runs").json() if row["name"] == "broken")
        assert (row["status"], row["problems"], row["stages"]) == (
            "unreadable",
            BROKEN_RECORDS,
            {"prepare": "complete"},
        )
        runs_page = page_elements(httpx.get(server.url + "/").text)
        listed = next(e for e in runs_page if e.tag == "tr" and e.attrs.get("data-run") == "broken")
        assert [e.text for e in listed.find("span") if "status" in e.classes] == ["unreadable"]
        assert [e.text for e in listed.find("div") if "problem" in e.classes] == BROKEN_RECORDS
        page = by_id(httpx.get(f"{server.url}/runs/broken").text)
        assert page["run-status"].text == "unreadable"
        assert [item.text for item in page["run-problems"].find("li")] == BROKEN_RECORDS
        job = by_id(httpx.get(f"{server.url}/runs/broken/job").text)
        assert "disabled" in job["resume-run"].attrs and job["resume-refused"].text == refused
        resumed = httpx.post(f"{server.url}/api/runs/broken/resume", timeout=10)
        assert resumed.status_code == 409 and resumed.json() == {"error": refused}
        assert not (run / "ui-run.log").exists()  # nothing was started
        browser.get(f"{server.url}/runs/broken/job")
        wait_for(lambda: browser.find_element(By.ID, "job-log").get_attribute("data-offset"), what="a poll")
        assert browser.find_element(By.ID, "run-status").text == "unreadable"
        assert not browser.find_element(By.ID, "resume-run").is_enabled()
        assert browser.find_element(By.ID, "resume-refused").text == refused
        assert console_errors(browser) == []
    finally:
        shutil.rmtree(run)


def test_metric_values_that_are_not_numbers_are_left_out_and_named(ui, browser, ui_finished_run):
    """metrics.jsonl lines with a value that is not a finite number: the value is left out of its row (a
    row without a numeric step entirely), listed in the poll's bad_values and named in the curves' note."""
    server, runs = ui
    run = _copy_run(ui_finished_run, runs, "odd-values")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    first = len(lines) + 1
    lines += ['{"step": 900, "loss": "high", "lr": 0.001}', '{"step": 901, "loss": NaN, "grad_norm": null}',
              '{"step": "x", "loss": 1.0}', "not JSON"]  # fmt: skip
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    try:
        answer = httpx.get(f"{server.url}/api/runs/odd-values/metrics", timeout=10).json()
        assert answer["rows"][-2:] == [{"step": 900, "lr": 0.001}, {"step": 901}]
        assert all(isinstance(value, (int, float)) for row in answer["rows"] for value in row.values())
        bad = [(first, "loss", '"high"'), (first + 1, "loss", "NaN"), (first + 1, "grad_norm", "null"),
               (first + 2, "step", '"x"')]  # fmt: skip
        assert answer["bad_values"] == [
            {"line": line, "key": key, "value": value} for line, key, value in bad
        ]
        assert answer["bad_lines"] == [first + 3] and answer["line"] == first + 4
        browser.get(f"{server.url}/runs/odd-values")
        wait_for(lambda: browser.find_element(By.ID, "charts").get_attribute("data-points"), what="curves")
        note = browser.find_element(By.ID, "curves-note").text
        values = "; ".join(f"line {line} {key}: {value}" for line, key, value in bad)
        assert note == f"metrics.jsonl lines not JSON: {first + 3}; values not plotted, not numbers: {values}"
        loss = browser.execute_script("return window.llamatailorCharts.loss.data")
        assert loss[0][-2:] == [900, 901] and loss[1][-2:] == [None, None]
        assert console_errors(browser) == []
    finally:
        shutil.rmtree(run)


def test_ui_refuses_a_port_in_use_and_a_file_as_runs_folder(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["ui", "--runs", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 2
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in result.output
    assert "open http" not in result.output
    afile = tmp_path / "data.jsonl"
    afile.write_text("{}\n")
    result = CliRunner().invoke(app, ["ui", "--runs", str(afile)])
    assert result.exit_code == 2 and "a file, not a folder of runs" in result.output


def test_ui_binds_any_loopback_address_without_a_key(tmp_path):
    """127.0.0.0/8 is all this machine: `--host 127.0.0.2` needs no key (serve and ui share the rule)."""
    server = UiServer(tmp_path, host="127.0.0.2", log=tmp_path / "ui.log")
    try:
        assert httpx.get(server.url + "/", timeout=10).status_code == 200
        assert server.url.startswith("http://127.0.0.2:")
    finally:
        server.stop()
