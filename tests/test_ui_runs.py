"""`llamatailor ui`: the runs page, a run's overview with live curves, comparison, and path safety, in a real
headless Chromium against the real server."""

import json
import shutil

import pytest
from selenium.webdriver.common.by import By

from ui_support import UiServer, console_errors, screenshot


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
