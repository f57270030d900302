"""How fast `llamatailor ui`'s runs page loads with many runs in the folder.

    .venv/bin/python bench/ui_runs_page.py [--source runs/demo] [--runs 1 10 100] [--repeats 10]

Copies the small files of a finished run (`--source`: manifest.json, config.yaml, metrics.jsonl,
eval/metrics.json) into a temporary runs folder `--runs` times over, starts the real `llamatailor ui` on it
and measures the runs page: the server's answer (HTTP GET /, median and worst of `--repeats`) and the page in
headless Chromium (navigation start to the load event, from the browser's own Navigation Timing), for each
folder size; the 1-run folder is the baseline in the same run. Goal (issue 20): under 1 s with 100 runs.
"""

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from ui_support import UiServer, start_browser  # noqa: E402 - the tests' own server and browser

RUN_FILES = ("manifest.json", "config.yaml", "metrics.jsonl", "eval/metrics.json")
GOAL_S = 1.0


def make_runs(source: Path, folder: Path, count: int) -> None:
    """`count` runs named run-000... in `folder`, each a copy of `source`'s small files."""
    for index in range(count):
        target = folder / f"run-{index:03d}"
        for name in RUN_FILES:
            if (source / name).is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / name, target / name)


def http_times(url: str, repeats: int) -> list[float]:
    times = []
    with httpx.Client(timeout=30) as client:
        client.get(url)  # warm: the first request imports the page's modules
        for _ in range(repeats):
            started = time.perf_counter()
            response = client.get(url)
            times.append(time.perf_counter() - started)
            response.raise_for_status()
    return times


def browser_times(driver: Any, url: str, repeats: int) -> list[float]:
    """Navigation start to the load event, as the browser measured it (seconds)."""
    times = []
    for _ in range(repeats):
        driver.get(url)
        timing = driver.execute_script(
            "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime;"
        )
        times.append(timing / 1000)
    return times


def measure(source: Path, count: int, repeats: int, driver: Any) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ui-bench-") as tmp:
        runs = Path(tmp) / "runs"
        make_runs(source, runs, count)
        server = UiServer(runs, log=Path(tmp) / "ui.log")
        try:
            served = http_times(server.url + "/", repeats)
            shown = browser_times(driver, server.url + "/", repeats) if driver else []
            rows = len(httpx.get(server.url + "/api/runs").json())
        finally:
            server.stop()
    return {"runs": count, "rows": rows, "http": served, "browser": shown}


def row(result: dict[str, object]) -> str:
    http = result["http"]
    shown = result["browser"]
    assert isinstance(http, list) and isinstance(shown, list)
    worst = max(shown or http)
    cells = [
        str(result["runs"]),
        str(result["rows"]),
        f"{statistics.median(http):.3f}",
        f"{max(http):.3f}",
        f"{statistics.median(shown):.3f}" if shown else "-",
        f"{max(shown):.3f}" if shown else "-",
        "yes" if worst < GOAL_S else "NO",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-browser", action="store_true", help="Only the server's answer time.")
    args = parser.parse_args()
    if not (args.source / "manifest.json").is_file():
        print(
            f"{args.source}: not a run directory (run `make demo` first, or pass --source)", file=sys.stderr
        )
        return 2
    driver = None if args.no_browser else start_browser()
    try:
        results = [measure(args.source, count, args.repeats, driver) for count in args.runs]
    finally:
        if driver:
            driver.quit()
    names = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    cpu = names[0] if names else platform.machine()
    print(
        f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, one `llamatailor ui` process, "
        f"load average {os.getloadavg()[0]:.2f}; source {args.source}; {args.repeats} loads each"
    )
    print()
    print(
        "| runs in folder | rows shown | HTTP median s | HTTP worst s | browser load median s "
        "| browser load worst s | under 1 s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    for result in results:
        print(row(result))
    return 0 if all(max(r["browser"] or r["http"]) < GOAL_S for r in results) else 1  # type: ignore[type-var]


if __name__ == "__main__":
    raise SystemExit(main())
