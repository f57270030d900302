"""Two CPU processes under torchrun train like one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import alpaca_rows, prepared_run, read_rows

CLI = str(Path(sys.executable).parent / "llamatailor")


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
