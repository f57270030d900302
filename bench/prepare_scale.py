"""Benchmark: time and peak memory of `llamatailor prepare` on many short records.

Writes N synthetic short conversations (~200 bytes of JSONL each, with 1% exact and 1% near duplicates
and some e-mail addresses), runs `llamatailor prepare` on them in a subprocess with the embedded model's
tokenizer, and prints a table: records, input size, wall time, records/s and the subprocess's peak RSS.

    .venv/bin/python bench/prepare_scale.py              # 100,000 and 1,000,000 records
    .venv/bin/python bench/prepare_scale.py --sizes 20000
"""

import argparse
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


def run_prepare(folder: Path, data: Path) -> tuple[float, float]:
    run_file = folder / "bench.yaml"
    run_file.write_text(
        f"name: bench\noutput_dir: {folder / 'runs'}\ndata:\n  train: [{data}]\n  max_seq_len: 256\n",
        encoding="utf-8",
    )
    cli = Path(sys.executable).parent / "llamatailor"
    started = time.perf_counter()
    process = subprocess.Popen([str(cli), "prepare", str(run_file)], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)  # the resource usage of this child alone
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prepare failed with exit code {os.waitstatus_to_exitcode(status)}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, OMP_NUM_THREADS={threads}"
    )
    print(
        f"{'records':>10} {'input MB':>9} {'seconds':>8} {'records/s':>10} {'peak RSS MiB':>13} {'kept':>9}"
    )
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            data = folder / "records.jsonl"
            write_records(data, size)
            seconds, peak = run_prepare(folder, data)
            report = json.loads((folder / "runs" / "bench" / "data" / "report.json").read_text())
            kept = sum(report["splits"]["sft"].values())
            mb = data.stat().st_size / 1e6
            print(
                f"{size:>10,} {mb:>9.1f} {seconds:>8.1f} {size / seconds:>10,.0f} {peak:>13,.0f} {kept:>9,}"
            )


if __name__ == "__main__":
    main()
