"""`llamatailor ui`: a run's Data page (data/report.json, the rejected records paged and filtered) and Export
page (a real export of the tiny run: retention table, every gate's value, limit and verdict, failures,
Modelfile, merge checks) in a real headless Chromium against the real server; and paths that lead out."""

import json
import math
import shutil
from urllib.parse import urljoin, urlparse

import httpx2 as httpx
import pytest
import yaml
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from typer.testing import CliRunner

from llamatailor.cli import app
from llamatailor.ui.reports import NOT_JSON, PER_PAGE
from ui_support import (
    XSS,
    UiServer,
    by_id,
    click_and_load,
    console_errors,
    raw_get,
    screenshot,
)

EXTRA_REJECTIONS = 120  # rows appended to the paged run's rejected.jsonl, kinds alternating
BAD_LINE = 30  # the paged run's rejected.jsonl line that is not JSON
F16_GATE_OVERRIDE = 2.5  # the run file's export.gates f16, used where the report records no gate_pct


def shown(value):
    """A number as the pages print it (the `number` filter)."""
    if value is None:
        return "—"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def export_copy(runs, folder):
    """Merge and export (f16, q8_0) the copy runs/tiny, in process; then edit its report so that q8_0's
    perplexity gate fails, f16's chat gate passes, and f16's gate_pct is not recorded (the page computes it
    from the run file's export.gates)."""
    config = yaml.safe_load((runs / "tiny" / "config.yaml").read_text())
    config["output_dir"] = str(runs)
    config["export"] = {**config["export"], "gguf": ["f16", "q8_0"], "gates": {"f16": F16_GATE_OVERRIDE}}
    (folder / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (runs / "tiny" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    merged = CliRunner().invoke(app, ["merge", str(folder / "run.yaml")])
    assert merged.exit_code == 0, merged.output
    exported = CliRunner().invoke(app, ["export", str(folder / "run.yaml")])
    assert "export gates failed" in exported.output or exported.exit_code == 0, exported.output
    path = runs / "tiny" / "gguf" / "export_report.json"
    report = json.loads(path.read_text())
    f16, q8_0 = report["files"]
    q8_0["perplexity_increase_pct"] = q8_0["gate_pct"] + 0.5
    f16["chat_finish_reason"] = "stop"
    del f16["gate_pct"]
    path.write_text(json.dumps(report))


def paged_copy(runs, folder):
    """runs/paged: the tiny run's manifest and data, with EXTRA_REJECTIONS more rejections, one line that is
    not JSON, and a lengths.png that is a symlink leading out of the runs folder."""
    shutil.copytree(runs / "tiny" / "data", runs / "paged" / "data")
    shutil.copy(runs / "tiny" / "manifest.json", runs / "paged" / "manifest.json")
    lines = (runs / "paged" / "data" / "rejected.jsonl").read_text().splitlines()
    for index in range(EXTRA_REJECTIONS):
        row = {"source": f"extra.jsonl:{index + 1}", "kind": ("invalid", "too_long")[index % 2], "field": "x",
               "reason": f"reason {index}", "record": {"n": index}}  # fmt: skip
        lines.append(json.dumps(row))
    lines.insert(BAD_LINE - 1, "this line { is not JSON")
    (runs / "paged" / "data" / "rejected.jsonl").write_text("\n".join(lines) + "\n")
    outside = folder / "outside.png"
    shutil.move(runs / "paged" / "data" / "lengths.png", outside)
    (runs / "paged" / "data" / "lengths.png").symlink_to(outside)


def clean_copy(runs):
    """runs/clean: the tiny run's manifest and data as prepare writes them when nothing is rejected, cleaned,
    found or removed (an empty rejected.jsonl, empty counts per split, kept-by-policy counts of 0), and an
    export report that lists no GGUF file."""
    shutil.copytree(runs / "tiny" / "data", runs / "clean" / "data")
    shutil.copy(runs / "tiny" / "manifest.json", runs / "clean" / "manifest.json")
    path = runs / "clean" / "data" / "report.json"
    report = json.loads(path.read_text())
    report["rejected"] = {split: {} for split in report["rejected"]}
    report["inputs"] = [{**source, "rejected": 0} for source in report["inputs"]]
    report["pii"] = {**report["pii"], "records": {}, "findings": {}}
    report["dedup"] = {**report["dedup"], "removed": {}}
    report["cleaned"], report["kept_by_policy"] = {}, {"empty": 0, "too_short": 0}
    path.write_text(json.dumps(report))
    (runs / "clean" / "data" / "rejected.jsonl").write_text("")
    (runs / "clean" / "gguf").mkdir()
    (runs / "clean" / "gguf" / "export_report.json").write_text(
        json.dumps({"headline": "chrf", "files": [], "failures": []})
    )


@pytest.fixture(scope="module")
def ui(tmp_path_factory, ui_finished_run):
    folder = tmp_path_factory.mktemp("ui-reports")
    runs = folder / "runs"
    shutil.copytree(ui_finished_run, runs / "tiny")
    paged_copy(runs, folder)
    clean_copy(runs)
    export_copy(runs, folder)
    server = UiServer(runs, log=folder / "ui.log")
    yield server, runs, folder
    server.stop()


def cells(row, *classes):
    return [row.find_element(By.CSS_SELECTOR, f"td.{name}").text for name in classes]


def assert_links_inside(browser, server):
    """Every link and image of the page points into the UI itself, with no `..`."""
    for element in browser.find_elements(By.CSS_SELECTOR, "a[href], img[src]"):
        target = urljoin(browser.current_url, element.get_attribute("href") or element.get_attribute("src"))
        assert target.startswith(server.url + "/") and ".." not in urlparse(target).path, target


def test_data_page_shows_the_report_and_the_rejected_record(ui, browser):
    server, runs, _ = ui
    report = json.loads((runs / "tiny" / "data" / "report.json").read_text())
    browser.get(f"{server.url}/runs/tiny/data")
    sft = report["tokens"]["sft"]
    assert [
        r.get_attribute("data-split") for r in browser.find_elements(By.CSS_SELECTOR, "#token-table tbody tr")
    ] == list(sft)
    for split, stats in sft.items():
        row = browser.find_element(By.CSS_SELECTOR, f'#token-table tr[data-kind="sft"][data-split="{split}"]')
        assert cells(row, "samples", "min", "median", "p95", "max", "total", "truncated") == [
            shown(v) for v in (report["splits"]["sft"][split], *(stats[k] for k in ("min", "median", "p95", "max", "total")),
                               report["truncated"]["sft"][split])
        ]  # fmt: skip
    (source,) = report["inputs"]
    row = browser.find_element(By.CSS_SELECTOR, "#input-table tbody tr")
    assert cells(row, "file", "accepted", "rejected") == [
        source["input"],
        str(source["accepted"]),
        str(source["rejected"]),
    ]
    email = browser.find_element(By.CSS_SELECTOR, '#pii-table tr[data-kind="email"]')
    assert cells(email, "records", "findings") == [
        str(report["pii"]["records"]["email"]),
        str(report["pii"]["findings"]["email"]),
    ]
    assert browser.find_element(By.ID, "dedup-threshold").text == shown(report["dedup"]["threshold"])
    (rejected,) = [
        json.loads(line) for line in (runs / "tiny" / "data" / "rejected.jsonl").read_text().splitlines()
    ]
    file, line = rejected["source"].rsplit(":", 1)
    shown_row = browser.find_element(By.CSS_SELECTOR, "#rejection-list tr.rejection")
    assert cells(shown_row, "file", "line", "kind", "field", "reason") == [
        file,
        line,
        rejected["kind"],
        rejected["field"],
        rejected["reason"],
    ]
    record = shown_row.find_element(By.CSS_SELECTOR, "pre.record").text
    assert json.loads(record) == rejected["record"] and XSS in json.loads(record)["instruction"]
    assert "<script>" in record
    assert browser.find_elements(By.CSS_SELECTOR, "#rejection-list script, #rejection-list img") == []
    assert browser.title != "pwned"
    histogram = browser.find_element(By.ID, "length-histogram")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", histogram) > 0
    assert_links_inside(browser, server)
    assert console_errors(browser) == []
    screenshot(browser, "data")


def test_rejected_records_are_paged_and_filtered(ui, browser):
    server = ui[0]
    total = 1 + EXTRA_REJECTIONS + 1
    browser.get(f"{server.url}/runs/paged/data")
    numbers = [
        int(r.get_attribute("data-number")) for r in browser.find_elements(By.CSS_SELECTOR, "tr.rejection")
    ]
    assert numbers == list(range(1, PER_PAGE + 1))
    assert browser.find_element(By.ID, "page-count").text == str(math.ceil(total / PER_PAGE))
    bad = browser.find_element(By.CSS_SELECTOR, f'tr.rejection[data-number="{BAD_LINE}"]')
    assert cells(bad, "kind") == [NOT_JSON]
    assert bad.find_element(By.CSS_SELECTOR, "pre.record").text == "this line { is not JSON"
    assert f"line {BAD_LINE} of rejected.jsonl" in cells(bad, "reason")[0]
    click_and_load(browser, browser.find_element(By.ID, "page-next"))
    assert browser.find_element(By.ID, "page-number").text == "2"
    second = [
        int(r.get_attribute("data-number")) for r in browser.find_elements(By.CSS_SELECTOR, "tr.rejection")
    ]
    assert second == list(range(PER_PAGE + 1, 2 * PER_PAGE + 1))
    click_and_load(browser, browser.find_element(By.ID, "page-last"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.rejection")) == total - 2 * PER_PAGE
    Select(browser.find_element(By.ID, "kind-filter")).select_by_value("too_long")
    browser.find_element(By.ID, "text-filter").send_keys("reason 11")
    click_and_load(browser, browser.find_element(By.CSS_SELECTOR, "#rejection-filter button"))
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.rejection")
    wanted = [
        f"reason {i}" for i in range(EXTRA_REJECTIONS) if i % 2 and f"reason {i}".startswith("reason 11")
    ]
    assert [cells(r, "reason")[0] for r in rows] == wanted and len(wanted) == 6
    assert cells(rows[0], "file", "line") == ["extra.jsonl", "12"]
    assert "page=" not in browser.current_url and browser.find_element(By.ID, "page-count").text == "1"
    assert browser.find_elements(By.ID, "length-histogram") == []  # its file is a symlink leading out
    assert console_errors(browser) == []


EMPTY_BLOCKS = ("pii-table", "dedup-table", "cleaning-table", "rejected-table", "rejection-filter",
                "rejection-list", "pager", "retention-table", "gate-table")  # fmt: skip


def test_sections_with_nothing_to_list_say_so_in_one_line(ui):
    server = ui[0]
    page = by_id(httpx.get(f"{server.url}/runs/clean/data", timeout=30).text)
    assert page["rejected-none"].text == "Rejected per input split and reason: nothing rejected"
    assert page["pii-none"].text == "PII mode report: no findings"
    assert page["dedup-none"].text.startswith("Deduplication exact on") and page["dedup-none"].text.endswith(
        ": none removed"
    )
    assert page["cleaning-none"].text == "Cleaning records changed per step: nothing changed"
    assert page["no-rejections"].text == "Nothing rejected: data/rejected.jsonl holds no record."
    assert [key for key in EMPTY_BLOCKS if key in page] == []
    export = by_id(httpx.get(f"{server.url}/runs/clean/export", timeout=30).text)
    assert export["no-files"].text == "The report lists no GGUF file."
    assert export["no-gates"].text == "No gate: the report checks no GGUF file."
    assert export["no-failures"].text == "The report records no failure."
    assert [key for key in EMPTY_BLOCKS if key in export] == []
    # a filter that matches nothing keeps the filter, and says so instead of an empty table
    filtered = by_id(
        httpx.get(f"{server.url}/runs/paged/data", params={"q": "no such text"}, timeout=30).text
    )
    assert filtered["no-match"].text == "No rejected record matches this filter."
    assert "rejection-filter" in filtered and "rejection-list" not in filtered and "pager" not in filtered


def test_the_rejected_counts_show_when_something_was_rejected(ui):
    server, runs, _ = ui
    report = json.loads((runs / "tiny" / "data" / "report.json").read_text())
    page = by_id(httpx.get(f"{server.url}/runs/tiny/data", timeout=30).text)
    rows = [
        (row.attrs["data-split"], row.attrs["data-kind"], row.children[-1].text)
        for row in page["rejected-table"].find("tr")
    ]
    expected = [
        (split, kind, str(n)) for split, kinds in report["rejected"].items() for kind, n in kinds.items()
    ]
    assert rows == expected and expected
    assert "rejected-none" not in page


def expected_gates(check):
    """Per gate of export.gguf_check.apply_gates: (value, limit, passed), read from the report's numbers."""
    limit = check.get("gate_pct", F16_GATE_OVERRIDE)
    increase = check["perplexity_increase_pct"]
    return {
        "metadata problems": (shown(len(check["metadata_problems"])), "0", not check["metadata_problems"]),
        "tokenizer mismatches": (
            shown(check["tokenizer_mismatches"]),
            "0",
            check["tokenizer_mismatches"] == 0,
        ),
        "perplexity increase vs merged": (shown(increase), shown(limit), increase <= limit),
        "chat finish reason": (check["chat_finish_reason"], "stop", check["chat_finish_reason"] == "stop"),
    }


RETENTION_KEYS = ("size_mb", "perplexity", "perplexity_merged", "perplexity_increase_pct", "task_metric",
                  "task_metric_merged", "retention", "top1_agreement", "tokenizer_mismatches")  # fmt: skip


def test_export_page_shows_every_file_and_gate(ui, browser):
    server, runs, _ = ui
    report = json.loads((runs / "tiny" / "gguf" / "export_report.json").read_text())
    browser.get(f"{server.url}/runs/tiny/export")
    verdicts = {}
    for check in report["files"]:
        row = browser.find_element(By.CSS_SELECTOR, f'tr.gguf[data-type="{check["gguf_type"]}"]')
        assert cells(row, *RETENTION_KEYS) == [shown(check[key]) for key in RETENTION_KEYS]
        assert cells(row, "file", "chat_finish_reason") == [
            check["path"].rsplit("/", 1)[1],
            check["chat_finish_reason"],
        ]
        for name, (value, limit, passed) in expected_gates(check).items():
            gate = browser.find_element(
                By.CSS_SELECTOR, f'tr.gate[data-file="{check["gguf_type"]}"][data-gate="{name}"]'
            )
            assert cells(gate, "value")[0] == value
            assert gate.find_element(By.CSS_SELECTOR, ".limit").text == limit
            assert gate.find_element(By.CSS_SELECTOR, ".verdict").text == ("pass" if passed else "fail"), name
            verdicts[(check["gguf_type"], name)] = passed
        assert row.find_element(By.CSS_SELECTOR, ".row-verdict").text == (
            "pass"
            if all(expected_gates(check)[n][2] for n in expected_gates(check)) and not check["failures"]
            else "fail"
        )
    assert not verdicts[("q8_0", "perplexity increase vs merged")] and verdicts[("f16", "chat finish reason")]
    failures = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#failure-list li")]
    assert failures == report["failures"] and failures
    modelfile = (runs / "tiny" / "gguf" / "Modelfile").read_text()
    assert browser.find_element(By.ID, "modelfile-text").text == modelfile.strip()
    merge = json.loads((runs / "tiny" / "merged" / "merge_report.json").read_text())
    gate = browser.find_element(By.CSS_SELECTOR, 'tr.gate[data-gate="max |Δlogit|, merged vs adapter model"]')
    assert cells(gate, "value")[0] == shown(merge["max_abs_logit_diff"])
    assert gate.find_element(By.CSS_SELECTOR, ".limit").text == shown(merge["tolerance"])
    assert_links_inside(browser, server)
    assert console_errors(browser) == []
    screenshot(browser, "export")


MIB = 2**20


def test_export_sizes_are_labelled_mib(ui):
    """export_report.json's sizes are MiB (st_size / 2**20, as the export and `llamatailor export`'s table
    count them): a file of 3.5 MiB (3.67 MB) shows 3.5 under "Size MiB", the LoRA files' sizes say MiB."""
    server, runs, _ = ui
    gguf = runs / "sized" / "gguf"
    gguf.mkdir(parents=True)
    shutil.copy(runs / "tiny" / "manifest.json", runs / "sized" / "manifest.json")
    sizes = {"model-q8_0.gguf": 3 * MIB + MIB // 2, "model-f16.gguf": 5 * MIB, "adapter.gguf": MIB // 4}
    for file, size in sizes.items():
        with (gguf / file).open("wb") as handle:
            handle.truncate(size)
    mib = {file: (gguf / file).stat().st_size / MIB for file in sizes}
    check = {"gguf_type": "q8_0", "path": str(gguf / "model-q8_0.gguf"), "size_mb": mib["model-q8_0.gguf"]}
    lora = {"base": "model-f16.gguf", "adapter": "adapter.gguf", "base_size_mb": mib["model-f16.gguf"],
            "adapter_size_mb": mib["adapter.gguf"]}  # fmt: skip
    report = {"headline": "chrf", "files": [check], "failures": [], "lora": lora}
    (gguf / "export_report.json").write_text(json.dumps(report))
    try:
        page = by_id(httpx.get(f"{server.url}/runs/sized/export", timeout=30).text)
        table = page["retention-table"]
        header = [cell.text for cell in table.find("th")]
        row = next(r for r in table.find("tr") if r.attrs.get("data-type") == "q8_0")
        size = next(cell.text for cell in row.find("td") if "size_mb" in cell.classes)
        assert (header[2], size) == ("Size MiB", "3.5")
        shown_sizes = [row.find("td")[-1].text for row in page["lora-table"].find("tr")[:2]]
        assert shown_sizes == ["5 MiB", "0.25 MiB"]
        assert not any(" MB" in element.text for element in page.values())
    finally:
        shutil.rmtree(runs / "sized")


def test_paths_leading_out_are_refused(ui):
    server, runs, folder = ui
    (folder / "secret.txt").write_text("not for the UI")
    (runs / "tiny" / "gguf" / "leak.txt").symlink_to(folder / "secret.txt")
    for path in (
        "/runs/tiny/files/../../x",
        "/runs/tiny/files/../../secret.txt",
        "/runs/tiny/files/gguf/leak.txt",
        "/runs/paged/files/data/lengths.png",
        "/runs/../data",
        "/runs/%2E%2E/export",
    ):
        status, body = raw_get(server.port, path)
        assert status == 404, path
        assert "not for the UI" not in body and "PNG" not in body
    assert raw_get(server.port, "/runs/tiny/files/gguf/Modelfile")[0] == 200
