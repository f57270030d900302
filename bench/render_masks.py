"""Benchmark: time to render a long conversation for training (ids and answer labels) by its turn count.

Builds conversations of N turns (user and assistant alternating, short varied sentences), renders each
with `render_for_training` on three real tokenizers and templates (SmolLM2 ChatML, Llama 3 with Meta's
Llama 3.1 template, Llama 2) with no truncation and with `max_seq_len` 1,024, and prints a table of CPU
seconds. With `--baseline SRC` the same conversations are rendered by the package under SRC (e.g. the
`src` folder of a worktree of an earlier commit) in a subprocess, so that both are timed in the same run.

    .venv/bin/python bench/render_masks.py
    git worktree add /tmp/base HEAD~1 && .venv/bin/python bench/render_masks.py --baseline /tmp/base/src
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

TURNS = (152, 500, 538)
MAX_LENS = (10**9, 1024)
KINDS = ("chatml", "llama3", "llama2")

# Run in a fresh interpreter with the package under test first on sys.path, then tests/ (tiny_models.py, test
# support); prints one JSON line per case.
TIMER = """
import json, sys, time
import torch
torch.set_num_threads(1)
from llamatailor.config import ModelSection
from llamatailor.data.templating import render_for_training
from llamatailor.models.loading import prepare_tokenizer
from tiny_models import real_tokenizer

def conversation(turns):
    words = "refund order cable invoice screen battery update login server printer".split()
    messages = []
    for n in range(turns):
        role = "user" if n % 2 == 0 else "assistant"
        text = " ".join(words[(n * 7 + k) % len(words)] for k in range(8 + n % 5))
        messages.append({"role": role, "content": f"{text} ({n})."})
    return messages

turns, max_lens, kinds = json.loads(sys.argv[1])
for kind in kinds:
    chat = prepare_tokenizer(real_tokenizer(kind), ModelSection())
    render_for_training(chat, conversation(10), 10**9)  # warm caches (template compilation)
    for count in turns:
        for max_len in max_lens:
            started = time.process_time()
            sample = render_for_training(chat, conversation(count), max_len)
            seconds = time.process_time() - started
            print(json.dumps([kind, count, max_len, sample.full_length, seconds]), flush=True)
"""


def timings(source: Path) -> list[list]:
    tests = Path(__file__).resolve().parents[1] / "tests"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(source), str(tests)]), OMP_NUM_THREADS="1")
    argument = json.dumps([TURNS, MAX_LENS, KINDS])
    result = subprocess.run(
        [sys.executable, "-c", TIMER, argument], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"rendering under {source} failed:\n{result.stderr[-2000:]}")
    return [json.loads(line) for line in result.stdout.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="also time the package under this src folder")
    args = parser.parse_args()
    this = Path(__file__).resolve().parent.parent / "src"
    rows = {"this": timings(this)}
    if args.baseline:
        rows["baseline"] = timings(args.baseline.resolve())
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, 1 thread"
    )
    header = f"{'template':>8} {'turns':>6} {'max_seq_len':>11} {'tokens':>7} {'this s':>8}"
    print(header + (f" {'baseline s':>10}" if args.baseline else ""))
    for index, (kind, turns, max_len, tokens, seconds) in enumerate(rows["this"]):
        line = (
            f"{kind:>8} {turns:>6} {'none' if max_len >= 10**9 else max_len:>11} {tokens:>7} {seconds:>8.3f}"
        )
        if args.baseline:
            line += f" {rows['baseline'][index][4]:>10.3f}"
        print(line)


if __name__ == "__main__":
    main()
