"""Two CPU processes under torchrun train like one process with the same global batch, also when their
batches split into different numbers of passes; a split batch trains like the whole batch."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import set_seed
from typer.testing import CliRunner

from helpers import alpaca_rows, prepared_run, read_rows
from llamatailor.cli import app
from llamatailor.config import load_config
from llamatailor.models.loading import load_tokenizer
from llamatailor.train.batching import LengthBuckets, micro_batches
from llamatailor.train.model_setup import trainable_model
from llamatailor.train.sft import build_trainer, tokenized_split

CLI = str(Path(sys.executable).parent / "llamatailor")
runner = CliRunner()


def losses(run: Path) -> list[float]:
    return [row["loss"] for row in read_rows(run / "metrics.jsonl") if "loss" in row]


def test_two_processes_follow_the_one_process_loss_curve(tmp_path, tiny_models):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # One epoch of 32 training samples in 4 global batches of 8: the same samples in each step either way.
    schedule = {"max_steps": 4, "save_steps": 100, "learning_rate": 1e-2, "logging_steps": 1}
    data = {"val_ratio": 0.1, "test_ratio": 0.1}
    rows = alpaca_rows(40)
    one = prepared_run(
        tmp_path / "one", tiny_models["chatml"], rows, data=data, train={**schedule, "batch_size": 8}
    )
    two = prepared_run(
        tmp_path / "two", tiny_models["chatml"], rows, data=data, train={**schedule, "batch_size": 4}
    )
    subprocess.run([CLI, "train", str(one)], check=True, env=env, capture_output=True)
    result = subprocess.run([CLI, "train", str(two), "--nproc", "2"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    run_one, run_two = tmp_path / "one" / "runs" / "tiny", tmp_path / "two" / "runs" / "tiny"
    summary = json.loads((run_two / "manifest.json").read_text())["stages"]["train"]["summary"]
    assert summary["processes"] == 2 and summary["steps"] == 4
    # Same samples per step (4 + 4 vs 8); only the order of float sums differs: stated tolerance 1e-4 relative.
    assert len(losses(run_one)) == 4
    assert losses(run_two) == pytest.approx(losses(run_one), rel=1e-4)
    assert (run_two / "adapter" / "adapter_model.safetensors").is_file()


def uneven_rows(count: int) -> list[dict[str, str]]:
    """Alpaca records of eight different lengths (about 50 to 140 tokens with the ChatML template)."""
    return [
        {
            "instruction": "Give the next number as JSON.",
            "input": f"n = {n}: " + " ".join(str(n * 1000 + 7 * i) for i in range(2 * (n % 8))),
            "output": json.dumps({"next": n + 1}),
        }
        for n in range(count)
    ]


def passes_per_process(
    run_file: Path, batch_size: int, processes: int, steps: int, budget: int
) -> list[list[int]]:
    """[step][rank] forward passes: the sampler's global batches, cut into consecutive per-process batches of
    `batch_size` (accelerate's BatchSamplerShard), each padded to its longest sample and split by `micro_batches`."""
    config = load_config(run_file)
    chat = load_tokenizer(config.model)
    split = tokenized_split(config.run_dir, "train", chat, config.data.max_seq_len)
    lengths = [len(ids) for ids in split["input_ids"]]
    order = list(LengthBuckets(lengths, batch_size * processes, config.seed))
    counts = []
    for step in range(steps):
        counts.append([])
        for rank in range(processes):
            start = (step * processes + rank) * batch_size
            rows = [lengths[i] for i in order[start : start + batch_size]]
            mask = torch.tensor([[1] * n + [0] * (max(rows) - n) for n in rows])
            inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": mask}
            counts[-1].append(len(micro_batches(inputs, budget)))
    return counts


def trained_lora(run_file: Path, forwards: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Train in this process; return the LoRA weights, and count the training forward passes."""
    config = load_config(run_file)
    chat = load_tokenizer(config.model)
    set_seed(config.seed)  # the LoRA initialisation, as `train_sft` seeds it
    model = trainable_model(config, chat, "fp32")
    if forwards is not None:
        model.register_forward_hook(
            lambda module, args, output: forwards.append(1) if module.training else None
        )
    build_trainer(config, chat, model, "fp32").train()
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[name] - b[name]).abs().max()) for name in a)


UNEVEN = {"data": {"val_ratio": 0.0, "test_ratio": 0.0, "max_seq_len": 256}}


def run_with_timeout(command: list[str], env: dict[str, str], seconds: float) -> subprocess.CompletedProcess:
    """Run `command`; on timeout kill it and every process under it (torchrun starts its workers in
    sessions of their own, so a process group would miss them). The result's return code is then None."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=seconds)
        return subprocess.CompletedProcess(command, process.returncode, out, err)
    except subprocess.TimeoutExpired:
        tree = psutil.Process(process.pid)
        for child in [*tree.children(recursive=True), tree]:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        out, err = process.communicate()
        return subprocess.CompletedProcess(command, None, out, err + f"\n(killed after {seconds} s)")


def test_processes_whose_batches_split_into_different_passes_match_one_process(tmp_path, tiny_models):
    """Rank 0's longer rows need more passes than rank 1's; each process must still all-reduce gradients
    exactly once per step, and the result must be the one-process result with the doubled batch."""
    schedule = {
        "max_steps": 3,
        "save_steps": 100,
        "learning_rate": 1e-2,
        "warmup_ratio": 0.0,
        "micro_batch_tokens": 500,
    }
    rows = uneven_rows(24)  # 3 global batches of 8
    one = prepared_run(
        tmp_path / "one", tiny_models["chatml"], rows, **UNEVEN, train={**schedule, "batch_size": 8}
    )
    two = prepared_run(
        tmp_path / "two", tiny_models["chatml"], rows, **UNEVEN, train={**schedule, "batch_size": 4}
    )
    counts = passes_per_process(two, batch_size=4, processes=2, steps=3, budget=500)
    assert any(len(set(step)) > 1 for step in counts), counts  # e.g. [[2, 1], ...]: uneven passes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = run_with_timeout([CLI, "train", str(two), "--nproc", "2"], env, seconds=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert runner.invoke(app, ["train", str(one)]).exit_code == 0
    adapters = [
        load_file(folder / "runs" / "tiny" / "adapter" / "adapter_model.safetensors")
        for folder in (tmp_path / "one", tmp_path / "two")
    ]
    assert largest_difference(*adapters) < 1e-5


def test_a_split_batch_trains_like_the_whole_batch(tmp_path, tiny_models):
    """One process: batches split into passes under a small token budget end with the unsplit adapter."""
    rows = uneven_rows(16)
    schedule = {
        "max_steps": 2,
        "save_steps": 100,
        "learning_rate": 1e-2,
        "warmup_ratio": 0.0,
        "batch_size": 8,
    }
    weights, forwards, run_files = {}, {}, {}
    for budget in (300, None):
        run_files[budget] = prepared_run(
            tmp_path / str(budget),
            tiny_models["chatml"],
            rows,
            **UNEVEN,
            train={**schedule, "micro_batch_tokens": budget},
        )
        forwards[budget] = []
        weights[budget] = trained_lora(run_files[budget], forwards[budget])
    passes = passes_per_process(run_files[300], batch_size=8, processes=1, steps=2, budget=300)
    assert len(forwards[None]) == 2  # one pass per step
    assert len(forwards[300]) == sum(map(sum, passes)) > 4, passes  # several passes per step
    assert largest_difference(weights[300], weights[None]) < 1e-5


@pytest.mark.parametrize(
    ("name", "kind", "stage"),
    [("fsdp", "FSDP", None), ("deepspeed_zero2", "DEEPSPEED", 2), ("deepspeed_zero3", "DEEPSPEED", 3)],
)
def test_example_accelerate_configs_are_valid(name, kind, stage):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(
        str(Path(__file__).parent.parent / "examples" / "accelerate" / f"{name}.yaml")
    )
    assert config.distributed_type.value == kind and not config.use_cpu
    assert config.deepspeed_config.get("zero_stage") == stage
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"


def test_deepspeed_is_refused_on_cpu(monkeypatch):
    from llamatailor.errors import StageError
    from llamatailor.train.launch import check_launch

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(StageError, match=r"DeepSpeed needs CUDA GPUs.*--nproc N"):
        check_launch()
