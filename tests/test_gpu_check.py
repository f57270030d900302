"""bench/gpu_check.sh (issue 16): its CPU dry run runs every part end to end, and a failing part fails it."""

import importlib.metadata
import math
import os
import re
import subprocess
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
OUT_FILES = ["check.log", "gpu_tests.log", "gpu_tests.xml", "plan.log", "summary.md", "throughput.log"]


def run_check(*options: str, timeout: int = 2400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", str(SCRIPT), *options], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def table(text: str, header_start: str) -> list[dict[str, str]]:
    """The rows of the first markdown table whose header line starts with `header_start`, by column."""
    lines = text.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith(header_start))
    header = [cell.strip() for cell in lines[start].strip().strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip().strip("|").split("|")), strict=True)))
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%x"))


@pytest.mark.slow
def test_dry_run_runs_every_part_and_reports_its_values(tmp_path):
    """One test for the whole dry run (about 2 minutes on 2 cores): split, pytest-xdist would run it once
    per worker."""
    result = run_check("--dry-run", str(tmp_path))
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    check_parts_and_versions(result, tmp_path, summary)
    if (ROOT / "tests" / "test_gpu.py").is_file():
        check_gpu_tests_skipped(tmp_path, summary)
    check_throughput_table(summary)
    check_plan_table(summary)


def check_parts_and_versions(result: subprocess.CompletedProcess, out: Path, summary: str) -> None:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == OUT_FILES  # flat: the six files gpu_check.sh writes
    assert result.stdout.endswith(summary)  # the summary is also what the command prints last
    first = summary.splitlines()[0]
    assert first.startswith("no CUDA device, dry run on CPU; torch ")
    for name in ("transformers", "peft", "trl", "bitsandbytes"):
        assert f"{name} {importlib.metadata.version(name)}" in first
    parts = table(summary, "| part |")
    assert [row["part"] for row in parts] == ["tests", "data", "throughput", "plan"]
    assert all(row["result"] == "ok" and 0 <= int(row["seconds"]) <= int(row["limit"]) for row in parts)
    assert "Result: passed" in summary


def check_gpu_tests_skipped(out: Path, summary: str) -> None:
    """Every gpu test is listed as skipped with the reason tests/conftest.py gives where no GPU is."""
    from conftest import GPU_SKIP_REASON

    suite = ElementTree.parse(out / "gpu_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 0 and suite.get("skipped") == suite.get("tests")
    rows = table(summary, "| test |")
    assert len(rows) == int(suite.get("tests"))
    assert all(row["test"].startswith("test_gpu::test_") for row in rows)
    assert {(row["result"], row["reason"]) for row in rows} == {("skipped", GPU_SKIP_REASON)}
    assert f"{len(rows)} skipped" in summary


def check_throughput_table(summary: str) -> None:
    rows = {row["method"][:3]: row for row in table(summary, "| method |")}
    assert list(rows) == ["(a)", "(b)", "(c)"]
    for row in rows.values():
        assert number(row["real tokens/s"]) > 0 and number(row["peak RSS MiB"]) > 100  # torch alone is more
        assert 0 < number(row["held-out loss"]) < 2 * math.log(128_256)  # random weights: about log(vocab)
        assert 0 < number(row["MFU"]) < 100
    # (a) pads every row to 512 tokens; the conversations are far shorter (dynamic padding in (b) and (c)).
    assert number(rows["(a)"]["padding"]) > 50 > number(rows["(c)"]["padding"])
    assert number(rows["(b)"]["vs (b)"]) == 1.0 and number(rows["(a)"]["vs (a)"]) == 1.0
    assert re.search(r"Goal, \(c\) >= 1\.5x \(b\) .*: (met|NOT met) \(\d+\.\d\dx the speed", summary)
    losses = table(summary, "| loss |")
    assert len(losses) == 3 and all(number(row["peak MiB above inputs"]) > 0 for row in losses)


def check_plan_table(summary: str) -> None:
    rows = {row["method"]: row for row in table(summary, "| model |")}
    assert list(rows) == ["lora", "qlora", "full"]
    for row in rows.values():
        predicted, measured = number(row["predicted MiB"]), number(row["measured MiB"])
        assert row["model"] == "tiny-llama3" and predicted > 0 and measured > 0
        assert number(row["error"]) == pytest.approx(100 * (predicted - measured) / measured, abs=1.0)
        assert row["within ±10%"] == ("yes" if abs(number(row["error"])) <= 10 else "no")
    # Full fine-tuning also holds the gradients and Adam's two states of every weight.
    assert number(rows["full"]["measured MiB"]) > number(rows["lora"]["measured MiB"])
    assert "within ±10% on every row: " in summary


def test_a_failing_part_is_recorded_the_others_still_run_and_the_check_fails(tmp_path):
    result = run_check("--dry-run", "--python", "false", str(tmp_path), timeout=120)
    assert result.returncode == 1
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert summary.startswith("environment unknown")
    parts = {row["part"]: row["result"] for row in table(summary, "| part |")}
    expected = "exit 1" if (ROOT / "tests" / "test_gpu.py").is_file() else "no tests/test_gpu.py"
    assert parts == {"tests": expected, "data": "exit 1", "throughput": "exit 1", "plan": "exit 1"}
    assert "Result: FAILED: " in summary and "plan (exit 1)" in summary


def test_usage_errors_exit_2(tmp_path):
    assert run_check(timeout=30).returncode == 2
    assert run_check("--bogus", str(tmp_path), timeout=30).returncode == 2
