"""Benchmark: the planner's predicted peak memory against measured training runs.

Trains real configurations (LoRA, QLoRA and full fine-tuning at two sequence lengths) for two steps through
llamatailor's own trainer, each in a fresh process, and prints predicted against measured peak memory, with
whether each row is within ±10% (the planner's goal).

The measurement is the peak of memory held by tensors, which is what the planner predicts: on CUDA
`torch.cuda.max_memory_allocated()`; on CPU, where torch keeps no such counter, the peak of the torch
profiler's memory timeline (parameters, gradients, optimizer states, activations and temporaries). On CPU
the table also shows the process's peak resident memory (Linux VmHWM from the model load on, over the
resident memory before it): the C allocator keeps freed heap memory, so it runs above the tensor peak.

    .venv/bin/python bench/plan_memory.py            # tiny and smollm2-135m (CPU here)
    .venv/bin/python bench/plan_memory.py --quick    # the tiny model only
    .venv/bin/python bench/plan_memory.py --embedded # the embedded model only
    python bench/plan_memory.py --device cuda --model llama-3.2-1b-shaped --jobs 3 --markdown plan.md

Models (`--model`, repeatable), each with its own batch, sequence lengths and gradient checkpointing:
- tiny: a 2-layer hidden-64 Llama with the SmolLM2 tokenizer; batch 4, sequences 256 and 1024, checkpointing
  off and on;
- smollm2-135m: the embedded SmolLM2-135M-Instruct, the same grid at batch 2;
- tiny-llama3: the tiny Llama with the Llama 3 tokenizer (vocabulary 128,256); batch 2, sequences 128 and
  256, checkpointing as a run gets it (auto: off on CPU, on on CUDA) — the smallest run of the GPU's grid;
- tiny-llama4: the tiny Llama 4 of tests/tiny_models.py (4 layers, hidden 64, 4 routed experts and a shared
  one in layers 1 and 3, dense MLPs in 0 and 2); LoRA on all-linear and on the experts too (targets: experts,
  rank 16 // 4 per expert); batch 4, sequences 256 and 1024, checkpointing off and on;
- llama-3.2-1b-shaped: built as bench/train_throughput.py builds it (the same folder under `--work`); batch
  2 at sequences 1024 and 4096, checkpointing auto (on on CUDA: what a user's run gets) and off (where the
  saved activations, about 12 GB at 4096 for LoRA, outgrow the weights: the planner's activation terms on
  CUDA). Each run is two steps of at most 8,192 tokens, well under a second of H200 compute, so a row costs
  its process start and model load (about 15-20 s).

Each CPU measurement holds the torch profiler's records of two steps: up to about 18 GB of resident memory for
the embedded model at sequence 1024, so run nothing large beside it on a 24 GB machine. `--jobs N` measures N
configurations at once; on CUDA each process's `max_memory_allocated` counts its own tensors only, so the
numbers do not change (any six shaped rows at once need at most about 75 GiB of GPU memory by the planner's
estimates).
"""

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

# tests/tiny_models.py (tiny random Llamas with real tokenizers) is test support, outside the package.
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))

MIB = 2**20
SHAPED, TINY_LLAMA3, TINY_LLAMA4 = "llama-3.2-1b-shaped", "tiny-llama3", "tiny-llama4"
GOAL = 0.10  # the planner's goal: within ±10% of the measured peak


EVERY_METHOD = (("lora", "all-linear"), ("qlora", "all-linear"), ("full", "all-linear"))


class Grid(NamedTuple):
    batch: int
    seq_lens: tuple[int, ...]
    checkpointing: tuple[bool | str, ...]
    methods: tuple[tuple[str, str], ...] = EVERY_METHOD  # (train.method, train.lora.targets)


GRIDS = {
    "tiny": Grid(4, (256, 1024), (False, True)),
    "smollm2-135m": Grid(2, (256, 1024), (False, True)),
    TINY_LLAMA3: Grid(2, (128, 256), ("auto",)),
    SHAPED: Grid(2, (1024, 4096), ("auto", False)),
    TINY_LLAMA4: Grid(4, (256, 1024), (False, True), (("lora", "all-linear"), ("lora", "experts"))),
}


class Row(NamedTuple):
    label: str
    model: str  # what the run file's model.base says
    method: str
    checkpointing: bool | str
    seq_len: int
    batch: int
    targets: str = "all-linear"


def measure(run_file: Path) -> dict:
    """In a fresh process: build the run's model and trainer, then train while watching peak memory."""
    torch.set_num_threads(1)
    from torch.profiler import ProfilerActivity, profile
    from train_throughput import memory as process_memory  # /proc/self/status fields, in bytes

    from llamatailor.config import load_config
    from llamatailor.hardware import resolve_precision
    from llamatailor.models.loading import load_tokenizer
    from llamatailor.train.model_setup import trainable_model
    from llamatailor.train.sft import build_trainer

    config = load_config(run_file)
    before_model = process_memory("VmRSS")
    chat = load_tokenizer(config.model)
    precision = resolve_precision(config.train.precision)
    model = trainable_model(config, chat, precision)
    trainer = build_trainer(config, chat, model, precision)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
        return {"tensors": torch.cuda.max_memory_allocated(), "resident": None}
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")  # peak RSS := current RSS
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        trainer.train()
    resident = process_memory("VmHWM") - before_model
    timeline = run_file.with_name("timeline.json")
    prof.export_memory_timeline(str(timeline), device="cpu")
    sizes = json.loads(timeline.read_text(encoding="utf-8"))[1]
    return {"tensors": max(sum(at_time) for at_time in sizes), "resident": resident}


def setup_for(config_path: Path) -> tuple:
    from llamatailor.config import load_config
    from llamatailor.models.source import resolve_source
    from llamatailor.plan.architectures import load_architecture
    from llamatailor.plan.run_setup import setup_from_config

    config = load_config(config_path)
    arch = load_architecture(resolve_source(config.model.base).location)
    return arch, setup_from_config(config, arch)


def write_run(folder: Path, row: Row) -> Path:
    """A run file training `row` for two steps on samples that are all cut to exactly `row.seq_len`."""
    from llamatailor.config import load_config
    from llamatailor.data.prepare import prepare

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    words = " ".join(["alpha beta gamma delta"] * max(1000, row.seq_len // 2))  # > seq_len tokens
    rows = [{"instruction": f"Repeat item {n}.", "output": words} for n in range(row.batch * 3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run = {
        "name": "bench",
        "output_dir": str(folder / "runs"),
        "model": {"base": row.model},
        "data": {
            "train": [str(data)],
            "val_ratio": 0,
            "test_ratio": 0,
            "max_seq_len": row.seq_len,
            "dedup": {"exact": False, "near": False},
        },
        "train": {
            "method": row.method,
            "max_steps": 2,
            "batch_size": row.batch,
            "gradient_checkpointing": row.checkpointing,
            "save_steps": 1000,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": row.targets},
        },
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(run), encoding="utf-8")
    prepare(load_config(path))
    return path


def model_base(label: str, work: Path) -> str:
    """What a run file names as model.base for `label`, the model built first where it is a random one."""
    if label == "smollm2-135m":
        return "smollm2-135m-instruct"
    if label in ("tiny", TINY_LLAMA4):
        from llamatailor.cache import cache_dir
        from tiny_models import build_tiny_llama4, build_tiny_model

        if label == TINY_LLAMA4:
            return str(build_tiny_llama4(cache_dir() / "bench" / TINY_LLAMA4))
        return str(build_tiny_model("chatml", cache_dir() / "bench" / "tiny-chatml"))
    from train_throughput import model_folder  # bench/ is this script's folder: one builder for both benches

    return model_folder(label, work)


def run_child(run_file: Path) -> dict[str, Any]:
    """`measure(run_file)` in a fresh process; {"error": its stderr's tail} when it fails."""
    child = subprocess.run(
        [sys.executable, __file__, "--measure", str(run_file)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    if child.returncode != 0:
        return {"error": child.stderr[-3000:]}
    return json.loads(child.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--embedded", action="store_true", help="the embedded model only")
    parser.add_argument("--model", action="append", choices=list(GRIDS), help="repeatable; see above")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when torch sees one")
    parser.add_argument(
        "--work", type=Path, default=Path("bench/.train_throughput"), help="random models' folders"
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        action="append",
        help="repeatable: these sequence lengths instead of the grid's",
    )
    parser.add_argument("--jobs", type=int, default=1, help="configurations measured at once")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        args.model = (
            ["tiny"] if args.quick else ["smollm2-135m"] if args.embedded else ["tiny", "smollm2-135m"]
        )
    return args


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first asks; the children inherit it
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [
        Row(label, model_base(label, args.work), method, checkpointing, seq_len, GRIDS[label].batch, targets)
        for label in args.model
        for method, targets in GRIDS[label].methods
        for checkpointing in GRIDS[label].checkpointing
        for seq_len in args.seq_len or GRIDS[label].seq_lens
    ]
    lines = [environment(device), "", *table_head(device)]
    print("\n".join(lines), flush=True)
    errors: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        measuring = []
        for n, row in enumerate(rows):  # each measurement starts while the next run is prepared
            run_file = write_run(Path(tmp) / str(n), row)
            measuring.append((row, run_file, pool.submit(run_child, run_file)))
        for row, run_file, measured in measuring:
            lines.append(table_row(row, run_file, measured.result(), device, errors))
            print(lines[-1], flush=True)
            write_markdown(args.markdown, lines)  # row by row: a run stopped midway keeps its rows
    failed = len(rows) - len(errors)
    verdict = "yes" if not failed and max(errors) <= GOAL else "no"
    largest = f"{max(errors):.1%}" if errors else "-"
    lines += [
        "",
        f"Largest error {largest} over {len(errors)} configurations; within ±10% on every row: {verdict}"
        + (f" ({failed} failed)" if failed else ""),
    ]
    print("\n" + lines[-1])
    write_markdown(args.markdown, lines)
    if failed:
        raise SystemExit(f"{failed} of {len(rows)} measurements failed")


def write_markdown(path: Path | None, lines: list[str]) -> None:
    if path is not None:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def environment(device: str) -> str:
    where = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} cores"
    return (
        f"{platform.machine()}, {where}, device {device}, torch threads 1, torch {torch.__version__}; "
        f"measured: {'torch.cuda.max_memory_allocated' if device == 'cuda' else 'profiler tensor peak'}, "
        "two training steps"
    )


def table_head(device: str) -> list[str]:
    extra = " peak RSS above start MiB |" if device == "cpu" else ""
    return [
        f"| model | method | ckpt | seq | batch | predicted MiB | measured MiB | error | within ±10% |{extra}",
        "|---|---|---|---:|---:|---:|---:|---:|---|" + ("---:|" if device == "cpu" else ""),
    ]


def table_row(row: Row, run_file: Path, measured: dict[str, Any], device: str, errors: list[float]) -> str:
    """One markdown row; appends the row's absolute relative error to `errors` unless it failed."""
    from llamatailor.plan.memory import estimate

    arch, setup = setup_for(run_file)
    predicted = estimate(arch, setup).total
    method = row.method if row.targets == "all-linear" else f"{row.method} ({row.targets})"
    head = f"| {row.label} | {method} | {setup.gradient_checkpointing} | {row.seq_len} | {row.batch} "
    if "error" in measured:
        print(f"{row}: the measurement failed:\n{measured['error']}", file=sys.stderr)
        return head + f"| {predicted / MIB:,.0f} | failed | - | - |" + (" - |" if device == "cpu" else "")
    error = (predicted - measured["tensors"]) / measured["tensors"]
    errors.append(abs(error))
    resident = f" {measured['resident'] / MIB:,.0f} |" if device == "cpu" else ""
    return (
        head + f"| {predicted / MIB:,.0f} | {measured['tensors'] / MIB:,.0f} | {error:+.1%} | "
        f"{'yes' if abs(error) <= GOAL else 'no'} |{resident}"
    )


if __name__ == "__main__":
    main()
