"""Benchmark: wall-clock seconds of `llamatailor --help` and `llamatailor --version`, median of 5 runs each.

Each run is a fresh interpreter (`python -m llamatailor`, as the `llamatailor` script starts it) with the
package under SRC first on its path. With `--baseline SRC` the same commands are timed for another tree
too (e.g. the `src` folder of a worktree of an earlier commit), alternating, so both see the same load.

    .venv/bin/python bench/cli_startup.py
    git worktree add /tmp/base HEAD && .venv/bin/python bench/cli_startup.py --baseline /tmp/base/src
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNS = 5
OPTIONS = ("--help", "--version")
THREADS = "1"


def seconds(source: Path, option: str) -> float:
    """One run of `python -m llamatailor OPTION` with the package under `source`; exits on failure."""
    env = dict(os.environ, PYTHONPATH=str(source), OMP_NUM_THREADS=THREADS, COLUMNS="100")
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "llamatailor", option], env=env, capture_output=True, text=True, check=False
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"llamatailor {option} under {source} failed:\n{result.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="also time the package under this src folder")
    args = parser.parse_args()
    trees = {"this": Path(__file__).resolve().parents[1] / "src"}
    if args.baseline:
        trees["baseline"] = args.baseline.resolve()
    times: dict[tuple[str, str], list[float]] = {(tree, option): [] for tree in trees for option in OPTIONS}
    for _ in range(RUNS):
        for option in OPTIONS:
            for tree, source in trees.items():
                times[(tree, option)].append(seconds(source, option))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"OMP_NUM_THREADS={THREADS}, {RUNS} runs of each\n"
    )
    print("| code | command | median s | min s | max s |")
    print("|---|---|---:|---:|---:|")
    for (tree, option), runs in times.items():
        print(
            f"| {tree} | llamatailor {option} | {statistics.median(runs):.2f} | {min(runs):.2f} | {max(runs):.2f} |"
        )


if __name__ == "__main__":
    main()
