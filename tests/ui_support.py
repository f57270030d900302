"""Test support for `llamatailor ui`: the real server as a subprocess on 127.0.0.1, Debian's headless
Chromium driven by Selenium (through Debian's chromedriver: nothing downloaded), and screenshots.

Without chromium/chromedriver the browser tests skip, except in CI (CI=true), where .ci/run installs them.
Screenshots go to $LLAMATAILOR_UI_SCREENSHOTS when set (`make ui-screenshots` sets docs/ui), else nowhere.
"""

import http.client
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from helpers import alpaca_rows, free_port, write_jsonl, write_run_file

CHROMIUM = os.environ.get("LLAMATAILOR_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LLAMATAILOR_CHROMEDRIVER", "/usr/bin/chromedriver")


class UiServer:
    """`llamatailor ui --runs FOLDER --host HOST` on a free port; `url` is its address (with no key asked)."""

    def __init__(
        self,
        runs: Path,
        *options: str,
        log: Path,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        command = [sys.executable, "-m", "llamatailor", "ui", "--runs", str(runs), "--port", str(self.port)]
        command += ["--host", host]
        self.log = log
        self.process = subprocess.Popen(
            [*command, *options],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ui exited: {log.read_text()}")
            try:
                httpx.get(f"{self.url}/static/app.css", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"ui did not start: {log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def raw_get(port: int, path: str) -> tuple[int, str]:
    """GET `path` from 127.0.0.1:`port` exactly as written (status, body): httpx would resolve `..` and
    %2E%2E before sending, and the server would never see them."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


VOID_TAGS = frozenset(
    ("area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr")
)


@dataclass
class Element:
    """One element of a page as the server sent it: tag, attributes, its text (descendants' too, spaces
    collapsed) and its child elements."""

    tag: str
    attrs: dict[str, str]
    text: str = ""
    children: list["Element"] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return self.attrs.get("class", "").split()

    def find(self, tag: str) -> list["Element"]:
        """The descendants with tag `tag`, in document order."""
        found = []
        for child in self.children:
            found += ([child] if child.tag == tag else []) + child.find(tag)
        return found


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[Element] = []
        self.open: list[Element] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {key: value or "" for key, value in attrs})
        if self.open:
            self.open[-1].children.append(element)
        self.found.append(element)
        if tag not in VOID_TAGS:
            self.open.append(element)

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self.open) - 1, -1, -1):
            if self.open[index].tag == tag:
                del self.open[index:]
                return

    def handle_data(self, data: str) -> None:
        for element in self.open:
            element.text += data


def page_elements(html: str) -> list[Element]:
    """Every element of `html` in document order (the standard library's parser: what a plain HTTP answer
    holds, without a browser)."""
    parser = _Elements()
    parser.feed(html)
    parser.close()
    for element in parser.found:
        element.text = re.sub(r"\s+", " ", element.text).strip()
    return parser.found


def by_id(html: str) -> dict[str, Element]:
    """The elements of `html` that have an id, by id."""
    return {element.attrs["id"]: element for element in page_elements(html) if "id" in element.attrs}


DEMO = Path(__file__).resolve().parents[1] / "runs" / "demo"
# The tests that copy `make demo`'s run exist for docs/ui.md's pictures: they run under `make ui-screenshots`
# (and never in CI, which has no demo run), sparing the suite two real 135M models.
needs_demo_screenshots = pytest.mark.skipif(
    not (os.environ.get("LLAMATAILOR_UI_SCREENSHOTS") and (DEMO / "manifest.json").is_file()),
    reason="takes docs/ui.md's pictures of the demo run: `make demo`, then `make ui-screenshots`",
)


def require_browser() -> None:
    """Skip (fail in CI) when Debian's chromium or chromedriver is missing."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        message = f"needs {' and '.join(missing)} (Debian: apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; .ci/run installs them in CI")
        pytest.skip(message)


def start_browser(width: int = 1400, height: int = 1000):  # type: ignore[no-untyped-def]
    """A headless Chromium under Selenium, isolated from any network but loopback."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-sync",
        "--no-first-run",
        "--metrics-recording-only",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    return driver


def wait_for(condition: Callable[[], object], timeout: float = 10, what: str = "condition") -> object:
    """Poll `condition` until it returns something truthy; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # a page still loading raises many kinds
            last_error = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_error})")


def click_and_load(driver, element) -> None:  # type: ignore[no-untyped-def]
    """Click a link or submit button and wait until the next page has loaded: reading the page right after
    a click could still find the old one's elements on a busy machine."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    old_page = driver.find_element("tag name", "html")
    element.click()
    WebDriverWait(driver, 20).until(expected_conditions.staleness_of(old_page))
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")


def console_errors(driver) -> list[str]:  # type: ignore[no-untyped-def]
    """The page's console errors (a failed script, a CSP refusal), for tests to assert there are none."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver, name: str) -> Path | None:  # type: ignore[no-untyped-def]
    """Save the whole page, from its top, as <$LLAMATAILOR_UI_SCREENSHOTS>/<name>.png when that is set; the
    window is grown to the page's height for the picture and given back its size after."""
    folder = os.environ.get("LLAMATAILOR_UI_SCREENSHOTS")
    if not folder:
        return None
    path = Path(folder) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    size = driver.get_window_size()
    driver.execute_script("window.scrollTo(0, 0)")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size["width"], min(max(height + 120, 600), 4000))
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(size["width"], size["height"])
    return path


XSS = '<script>document.title="pwned"</script><img src=x onerror="document.title=\'pwned\'">'


def ui_rows() -> list[dict[str, str]]:
    """The UI tests' training data: successor records, one whose answer carries markup (XSS), one with an
    e-mail address (a PII finding), and one with an empty answer (a rejected record, line 31)."""
    rows = alpaca_rows(30)
    rows[3]["input"] = f"n = 3 {XSS}"
    rows[5]["input"] = "n = 5, mail ana.lopez@example.com"
    return [*rows, {"instruction": f"Say nothing {XSS}", "input": "", "output": ""}]


def finished_run(folder: Path, model: Path, name: str = "tiny", **sections: Any) -> Path:
    """`llamatailor run` of a tiny run into folder/runs/<name> (prepare, train, eval); its run directory."""
    from typer.testing import CliRunner

    from llamatailor.cli import app

    data = write_jsonl(folder / f"{name}-train.jsonl", ui_rows())
    run_file = write_run_file(folder, model, [data], name=name, **sections)  # type: ignore[arg-type]
    run_file = run_file.rename(folder / f"{name}.yaml")
    result = CliRunner().invoke(app, ["run", str(run_file)])
    assert result.exit_code == 0, result.output
    return folder / "runs" / name
