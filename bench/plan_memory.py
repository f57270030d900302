"""Benchmark: the planner's predicted peak memory against measured training runs.

Trains real configurations (LoRA, QLoRA and full fine-tuning, each with gradient checkpointing on and off,
at two sequence lengths, on a tiny random Llama and on the embedded SmolLM2-135M) for two steps through
llamatailor's own trainer, each in a fresh process, and prints predicted against measured peak memory.

The measurement is the peak of memory held by tensors, which is what the planner predicts: on CUDA
`torch.cuda.max_memory_allocated()`; on CPU, where torch keeps no such counter, the peak of the torch
profiler's memory timeline (parameters, gradients, optimizer states, activations and temporaries). On CPU
the table also shows the process's peak resident memory (Linux VmHWM from the model load on, over the
resident memory before it): the C allocator keeps freed heap memory, so it runs above the tensor peak.

    .venv/bin/python bench/plan_memory.py            # all configurations
    .venv/bin/python bench/plan_memory.py --quick    # the tiny model only
    .venv/bin/python bench/plan_memory.py --embedded # the embedded model only

Each measurement holds the torch profiler's records of two steps: up to about 18 GB of resident memory for
the embedded model at sequence 1024, so run nothing large beside it on a 24 GB machine.
"""

import argparse
import ctypes
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

MIB = 2**20


def process_memory(field: str) -> int:
    with Path("/proc/self/status").open(encoding="ascii") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(run_file: Path) -> dict:
    """In a fresh process: build the run's model and trainer, then train while watching peak memory."""
    torch.set_num_threads(1)
    from torch.profiler import ProfilerActivity, profile

    from llamatailor.config import load_config
    from llamatailor.models.loading import load_tokenizer, resolve_precision
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


def write_run(folder: Path, model: str, method: str, checkpointing: bool, seq_len: int, batch: int) -> Path:
    from llamatailor.config import load_config
    from llamatailor.data.prepare import prepare

    data = folder / "data.jsonl"
    words = " ".join(["alpha beta gamma delta"] * 1000)  # every sample is truncated to exactly seq_len
    rows = [{"instruction": f"Repeat item {n}.", "output": words} for n in range(batch * 3)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    run = {
        "name": "bench",
        "output_dir": str(folder / "runs"),
        "model": {"base": model},
        "data": {
            "train": [str(data)],
            "val_ratio": 0,
            "test_ratio": 0,
            "max_seq_len": seq_len,
            "dedup": {"exact": False, "near": False},
        },
        "train": {
            "method": method,
            "max_steps": 2,
            "batch_size": batch,
            "gradient_checkpointing": checkpointing,
            "save_steps": 1000,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        },
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(run), encoding="utf-8")
    prepare(load_config(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--embedded", action="store_true", help="the embedded model only")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    from llamatailor.cache import cache_dir
    from llamatailor.models.tiny import build_tiny_model
    from llamatailor.plan.memory import estimate

    tiny = str(build_tiny_model("chatml", cache_dir() / "bench" / "tiny-chatml"))
    models = [("tiny", tiny, 4), ("smollm2-135m", "smollm2-135m-instruct", 2)]
    if args.quick or args.embedded:
        models = models[:1] if args.quick else models[1:]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, device {device}, torch threads 1, torch {torch.__version__}"
    )
    print(
        f"{'model':<13} {'method':<6} {'ckpt':<5} {'seq':>5} {'batch':>5} {'predicted MiB':>14} {'measured MiB':>13} {'error':>7}"
    )
    errors = []
    for (label, model, batch), method, checkpointing, seq_len in itertools.product(
        models, ("lora", "qlora", "full"), (False, True), (256, 1024)
    ):
        with tempfile.TemporaryDirectory() as tmp:
            run_file = write_run(Path(tmp), model, method, checkpointing, seq_len, batch)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            child = subprocess.run(
                [sys.executable, __file__, "--measure", str(run_file)],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if child.returncode != 0:
                raise SystemExit(child.stderr[-3000:])
            measured = json.loads(child.stdout.strip().splitlines()[-1])
            resident = measured["resident"]
            measured = measured["tensors"]
            arch, setup = setup_for(run_file)
            predicted = estimate(arch, setup).total
        error = (predicted - measured) / measured
        errors.append(abs(error))
        print(
            f"{label:<13} {method:<6} {checkpointing!s:<5} {seq_len:>5} {batch:>5} "
            f"{predicted / MIB:>14,.0f} {measured / MIB:>13,.0f} {error:>+7.1%} "
            f"{resident / MIB if resident else 0:>16,.0f}"
        )
    print(f"largest error: {max(errors):.1%} over {len(errors)} configurations")


if __name__ == "__main__":
    main()
