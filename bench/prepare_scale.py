"""Benchmark: time and peak memory of `llamatailor prepare` on many short records.

Writes N synthetic short conversations (~200 bytes of JSONL each, with 1% exact and 1% near duplicates
and some e-mail addresses), runs `llamatailor prepare` on them in a subprocess with the embedded model's
tokenizer, and prints a table: records, input size, wall and CPU time, records/s and the subprocess's
peak RSS.
With `--baseline SRC` the same inputs are also prepared by the package under SRC (e.g. the `src` folder
of a worktree of an earlier commit), alternating with this checkout's, so that both are timed in the
same run on the same machine.

    .venv/bin/python bench/prepare_scale.py              # 100,000 and 1,000,000 records
    .venv/bin/python bench/prepare_scale.py --sizes 20000
    git worktree add /tmp/base HEAD~1 && .venv/bin/python bench/prepare_scale.py --baseline /tmp/base/src
"""

import argparse
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "account billing invoice refund password login error screen button update install version server "
    "network timeout payment card address order shipping delivery return warranty battery charger cable "
    "display keyboard mouse printer driver window setting profile email message notification report"
).split()


def write_records(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        previous = None
        for n in range(count):
            if previous is not None and n % 100 == 0:  # exact duplicate
                record = previous
            elif previous is not None and n % 100 == 50:  # near duplicate: one word changed
                record = json.loads(json.dumps(previous))
                record["messages"][1]["content"] += " thanks"
            else:
                question = " ".join(rng.choices(WORDS, k=9))
                answer = " ".join(rng.choices(WORDS, k=12))
                if n % 97 == 0:
                    answer += f" Contact user{n}@example.com."
                record = {
                    "messages": [
                        {"role": "user", "content": f"Ticket {n}: {question}?"},
                        {"role": "assistant", "content": f"{answer}."},
                    ]
                }
            handle.write(json.dumps(record) + "\n")
            previous = record


def run_prepare(folder: Path, data: Path, source: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of `llamatailor prepare` run by the
    package under `source` (a folder put first on PYTHONPATH); outputs go to folder/runs/bench. On a
    shared machine CPU seconds vary less than wall seconds."""
    run_file = folder / "bench.yaml"
    run_file.write_text(
        f"name: bench\noutput_dir: {folder / 'runs'}\ndata:\n  train: [{data}]\n  max_seq_len: 256\n",
        encoding="utf-8",
    )
    cli = Path(sys.executable).parent / "llamatailor"
    env = dict(os.environ, PYTHONPATH=str(source))
    started = time.perf_counter()
    process = subprocess.Popen([str(cli), "prepare", str(run_file)], stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(process.pid, 0)  # the resource usage of this child alone
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prepare failed with exit code {os.waitstatus_to_exitcode(status)}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--baseline", type=Path, help="also time the package under this src folder")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each code per size, alternating")
    args = parser.parse_args()
    this = Path(__file__).resolve().parent.parent / "src"
    codes = [("this", this)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, OMP_NUM_THREADS={threads}"
    )
    for label, source in codes:
        print(f"{label}: {source}")
    print(
        f"{'code':>8} {'records':>10} {'input MB':>9} {'seconds':>8} {'CPU s':>8} {'records/s':>10}"
        f" {'peak RSS MiB':>13} {'kept':>9}"
    )
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "records.jsonl"
            write_records(data, size)
            mb = data.stat().st_size / 1e6
            for _, (label, source) in itertools.product(range(args.repeat), codes):
                folder = Path(tmp) / label
                folder.mkdir(exist_ok=True)
                seconds, cpu, peak = run_prepare(folder, data, source)
                report = json.loads((folder / "runs" / "bench" / "data" / "report.json").read_text())
                kept = sum(report["splits"]["sft"].values())
                print(
                    f"{label:>8} {size:>10,} {mb:>9.1f} {seconds:>8.1f} {cpu:>8.1f} {size / seconds:>10,.0f}"
                    f" {peak:>13,.0f} {kept:>9,}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
