"""Training that is hard to break: exact resume after SIGKILL, damaged checkpoints, NaN, overfitting."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import alpaca_rows, prepared_run, read_rows, write_jsonl, write_run_file
from llamatailor.cli import app
from llamatailor.config import RunConfig, load_config
from llamatailor.errors import StageError, TrainingDiverged
from llamatailor.models.loading import load_saved_tokenizer, load_tokenizer, load_tuned_model
from llamatailor.train.checkpoints import MARKER, resumable_checkpoint, step_of
from llamatailor.train.launch import torchrun_command
from llamatailor.train.model_setup import trainable_model
from llamatailor.train.session import run_trainer, starting_checkpoint
from llamatailor.train.sft import build_trainer, sft_checkpoint_key

runner = CliRunner()
CLI = str(Path(sys.executable).parent / "llamatailor")
RESUME_TRAIN = {
    "max_steps": 24,
    "save_steps": 4,
    "save_total_limit": 3,
    "learning_rate": 3e-3,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.1},  # dropout: the resumed RNG state matters
}


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_resume_after_sigkill_ends_with_the_uninterrupted_adapter(tmp_path, tiny_models):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name in ("straight", "killed"):
        folder = tmp_path / name
        runs[name] = prepared_run(folder, tiny_models["chatml"], alpaca_rows(64), train=RESUME_TRAIN)
    subprocess.run([CLI, "train", str(runs["straight"])], check=True, env=env, capture_output=True)

    killed_run = tmp_path / "killed" / "runs" / "tiny"
    process = subprocess.Popen(
        [CLI, "train", str(runs["killed"])], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marker = killed_run / "checkpoints" / "checkpoint-8" / MARKER
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_run / "adapter").exists(), "the run must be killed before it finished"
    assert json.loads((killed_run / "manifest.json").read_text())["stages"]["train"]["status"] == "running"

    # `run` resumes an interrupted training by default (`train --resume` does the same alone).
    resumed = subprocess.run([CLI, "run", str(runs["killed"])], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    straight, after_kill = (
        adapter_weights(tmp_path / "straight" / "runs" / "tiny"),
        adapter_weights(killed_run),
    )
    assert straight.keys() == after_kill.keys()
    worst = max(float((straight[k] - after_kill[k]).abs().max()) for k in straight)
    assert worst < 1e-5, worst
    steps = [row["step"] for row in read_rows(killed_run / "metrics.jsonl") if "loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == 24, "the log continues where the checkpoint left off"


def test_a_partial_or_damaged_newest_checkpoint_is_passed_over(tmp_path, tiny_models):
    run_file = prepared_run(
        tmp_path,
        tiny_models["chatml"],
        alpaca_rows(16),
        train={"max_steps": 6, "save_steps": 2, "save_total_limit": 3},
    )
    assert runner.invoke(app, ["train", str(run_file)]).exit_code == 0
    config = load_config(run_file)
    checkpoints, key = config.run_dir.checkpoints, sft_checkpoint_key(config)
    assert resumable_checkpoint(checkpoints, key) == (checkpoints / "checkpoint-6", [])

    weights = checkpoints / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a damaged file
    (checkpoints / "checkpoint-4" / MARKER).unlink()  # a save that never finished
    found, skipped = resumable_checkpoint(checkpoints, key)
    assert found == checkpoints / "checkpoint-2"
    assert skipped == [
        "checkpoint-6: its files no longer match what was written (damaged or changed)",
        "checkpoint-4: no completeness marker (the save did not finish)",
    ]
    assert starting_checkpoint(checkpoints, key, resume=True) == checkpoints / "checkpoint-2"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    other = sft_checkpoint_key(load_config(run_file, ["train.learning_rate=0.001"]))
    assert resumable_checkpoint(checkpoints, other) == (None, ["checkpoint-2: written under other settings"])

    weights = checkpoints / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # nothing complete is left, and one is damaged
    with pytest.raises(StageError) as refused:
        starting_checkpoint(checkpoints, key, resume=True)
    assert str(refused.value) == (
        f"no complete checkpoint to resume from in {checkpoints}: checkpoint-2: its files no longer match "
        "what was written (damaged or changed). Pass --fresh to delete them and start over."
    )
    assert weights.is_file(), "a damaged checkpoint is kept for its owner to look at"
    (checkpoints / "checkpoint-2" / MARKER).unlink()  # only a partial save: nothing to resume or keep
    assert starting_checkpoint(checkpoints, key, resume=True) is None
    assert list(checkpoints.glob("checkpoint-*")) == []


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (markers included), to compare before and after."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def loss_steps(run: Path) -> list[int]:
    return [row["step"] for row in read_rows(run / "metrics.jsonl") if "loss" in row]


def test_a_resume_may_change_logging_and_saving_and_continues_from_the_last_checkpoint(tmp_path, tiny_models):
    run_file = prepared_run(
        tmp_path,
        tiny_models["chatml"],
        alpaca_rows(32),
        data={"val_ratio": 0.0},  # no val: the result is the last step's weights, not a best checkpoint
        train={**RESUME_TRAIN, "max_steps": 8, "save_steps": 4, "logging_steps": 2},
    )
    run = tmp_path / "runs" / "tiny"
    assert runner.invoke(app, ["train", str(run_file)]).exit_code == 0
    uninterrupted = adapter_weights(run)
    (run / "checkpoints" / "checkpoint-8" / MARKER).unlink()  # killed while saving its last checkpoint

    neutral = ["train.logging_steps=1", "train.save_steps=2", "train.gradient_checkpointing=true"]
    result = runner.invoke(app, ["train", str(run_file), "--resume", *neutral])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "manifest.json").read_text())["stages"]["train"]["summary"]
    assert summary["resumed_from"] == str(run / "checkpoints" / "checkpoint-4")
    assert loss_steps(run) == [1, 2, 4, 5, 6, 7, 8], "the first run's log to step 4, then every step"
    saved = sorted(step_of(p) for p in (run / "checkpoints").glob("checkpoint-*"))
    assert saved == [4, 6, 8], "after the resume, a checkpoint every 2 steps"
    resumed = adapter_weights(run)
    worst = max(float((uninterrupted[k] - resumed[k]).abs().max()) for k in uninterrupted)
    assert worst < 1e-5, worst


def test_resuming_a_finished_training_takes_no_extra_step_and_keeps_the_result(tmp_path, tiny_models):
    """What `run --force`, or `run` after a change of logging, does: the last checkpoint is the end."""
    # 7 steps an epoch: step 4 ends the training inside an epoch, where transformers would take a 5th.
    schedule = {"max_steps": 4, "batch_size": 2}
    run_file = prepared_run(tmp_path, tiny_models["chatml"], alpaca_rows(24), train=schedule)
    run = tmp_path / "runs" / "tiny"
    assert runner.invoke(app, ["train", str(run_file)]).exit_code == 0
    assert len(read_rows(run / "data" / "train.jsonl")) == 14
    finished, log = adapter_weights(run), read_rows(run / "metrics.jsonl")
    result = runner.invoke(app, ["train", str(run_file), "--resume"])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "manifest.json").read_text())["stages"]["train"]["summary"]
    assert summary["resumed_from"] == str(run / "checkpoints" / "checkpoint-4") and summary["steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert read_rows(run / "metrics.jsonl") == log
    again = adapter_weights(run)
    assert all(torch.equal(finished[name], again[name]) for name in finished)


def test_a_resume_under_other_settings_names_each_and_keeps_every_checkpoint(tmp_path, tiny_models):
    run_file = prepared_run(
        tmp_path, tiny_models["chatml"], alpaca_rows(16), train={"max_steps": 4, "save_total_limit": 3}
    )
    assert runner.invoke(app, ["train", str(run_file)]).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    checkpoints = run / "checkpoints"
    before = files_of(checkpoints)
    assert {name.split("/")[0] for name in before} >= {"checkpoint-2", "checkpoint-4"}

    changed = ["train.learning_rate=0.001", "train.lora.dropout=0.1", "train.logging_steps=2"]
    for command in (["train", str(run_file), "--resume"], ["run", str(run_file)]):
        result = runner.invoke(app, [*command, *changed])
        assert result.exit_code == 1, result.output
        assert f"the newest complete checkpoint, {checkpoints / 'checkpoint-4'} (step 4)" in result.output
        assert "train.learning_rate: checkpoint 0.005, now 0.001" in result.output
        assert "train.lora.dropout: checkpoint 0.0, now 0.1" in result.output
        assert "logging_steps:" not in result.output, "a resume may change logging_steps"
        assert "--fresh" in result.output and "No checkpoint was deleted" in result.output
        assert files_of(checkpoints) == before


def test_training_over_checkpoints_asks_for_resume_or_fresh_and_fresh_starts_over(tmp_path, tiny_models):
    run_file = prepared_run(tmp_path, tiny_models["chatml"], alpaca_rows(16), train={"max_steps": 4})
    assert runner.invoke(app, ["train", str(run_file)]).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    checkpoints = run / "checkpoints"
    before = files_of(checkpoints)

    again = runner.invoke(app, ["train", str(run_file)])
    assert again.exit_code == 1
    assert (
        f"{checkpoints} already holds checkpoints of an earlier training (checkpoint-2, checkpoint-4; the "
        "newest complete one is checkpoint-4). Pass --resume to continue from the newest complete one, or "
        "--fresh to delete them and start over."
    ) in again.output
    assert files_of(checkpoints) == before
    both = runner.invoke(app, ["train", str(run_file), "--resume", "--fresh"])
    assert both.exit_code == 2 and "--resume and --fresh exclude each other" in both.output

    (checkpoints / "checkpoint-2" / "note.txt").write_text("from the earlier training")
    fresh = runner.invoke(app, ["train", str(run_file), "--fresh"])
    assert fresh.exit_code == 0, fresh.output
    summary = json.loads((run / "manifest.json").read_text())["stages"]["train"]["summary"]
    assert summary["resumed_from"] is None and summary["steps"] == 4
    assert not (checkpoints / "checkpoint-2" / "note.txt").exists(), "--fresh deleted the old checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert loss_steps(run) == [1, 2, 3, 4]


def test_nproc_passes_resume_and_fresh_to_each_process():
    fresh = torchrun_command("train", Path("run.yaml"), ["train.max_steps=2"], 2, resume=False, fresh=True)
    assert fresh[-4:] == ["train", "run.yaml", "train.max_steps=2", "--fresh"]
    resume = torchrun_command("dpo", Path("run.yaml"), [], 2, resume=True)
    assert resume[-3:] == ["dpo", "run.yaml", "--resume"] and "--fresh" not in resume


def test_nan_stops_the_run_keeps_the_last_good_checkpoint_and_says_what_to_change(tmp_path, tiny_models):
    run_file = prepared_run(
        tmp_path, tiny_models["chatml"], alpaca_rows(16), train={"max_steps": 8, "save_steps": 2}
    )
    config = load_config(run_file)
    chat = load_tokenizer(config.model)
    model = trainable_model(config, chat, "fp32")
    calls = {"training": 0}

    def poison_from_the_fifth_forward(module, args, output):  # what fp16 overflow or a bad batch does
        if module.training:
            calls["training"] += 1
            if calls["training"] >= 5:
                return output * float("nan")
        return output

    model.base_model.model.model.layers[0].register_forward_hook(poison_from_the_fifth_forward)
    trainer = build_trainer(config, chat, model, "fp32")
    key = sft_checkpoint_key(config)
    with pytest.raises(TrainingDiverged) as info:
        run_trainer(trainer, "train", key, None, config.run_dir.metrics)
    message = str(info.value)
    assert "became NaN/inf at step 5" in message and "Lower train.learning_rate" in message
    assert f"The last good checkpoint is {config.run_dir.checkpoints / 'checkpoint-4'}" in message
    assert sorted(p.name for p in config.run_dir.checkpoints.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    good = load_file(config.run_dir.checkpoints / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in good.values())


def test_rising_val_loss_stops_early_warns_and_is_in_the_manifest(tmp_path, tiny_models):
    train_rows = alpaca_rows(12)
    contradicting = [{**row, "output": json.dumps({"next": -1})} for row in alpaca_rows(4)]
    train_path = write_jsonl(tmp_path / "train.jsonl", train_rows)
    val_path = write_jsonl(tmp_path / "val.jsonl", contradicting)
    schedule = {
        "max_steps": 60,
        "eval_steps": 3,
        "save_steps": 3,
        "learning_rate": 2e-2,
        "logging_steps": 1,
        "lr_scheduler": "constant",
        "early_stopping_patience": 3,
    }
    # Each val record differs from its train twin in one word of 11 (word 3-gram Jaccard 0.8): not a
    # near-duplicate at threshold 0.9, so it stays in val to contradict train.
    data = {"val": [str(val_path)], "test_ratio": 0.0, "dedup": {"threshold": 0.9}}
    run_file = write_run_file(tmp_path, tiny_models["chatml"], [train_path], data=data, train=schedule)
    result = runner.invoke(app, ["run", str(run_file)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    summary = manifest["stages"]["train"]["summary"]
    assert summary["steps"] < 60, "early stopping ended the run"
    assert summary["warnings"] and summary["warnings"][0].startswith("possible overfitting at step")
    assert "warning: possible overfitting" in result.output
    rows = read_rows(tmp_path / "runs" / "tiny" / "metrics.jsonl")
    evaluated = [row["eval_loss"] for row in rows if "eval_loss" in row]
    # Early stopping ended on a worse evaluation, farther from the best than the tolerance used below.
    assert evaluated[-1] > min(evaluated) * (1 + 1e-4)
    events = list((tmp_path / "runs" / "tiny" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert saved_val_loss(load_config(run_file)) == pytest.approx(min(evaluated), rel=1e-5), (
        "the saved adapter is the best checkpoint's weights"
    )
    run = tmp_path / "runs" / "tiny"
    stopped = adapter_weights(run)
    resumed = runner.invoke(app, ["train", str(run_file), "--resume"])  # what `run --force` does
    assert resumed.exit_code == 0, resumed.output
    again = json.loads((run / "manifest.json").read_text())["stages"]["train"]["summary"]
    assert again["steps"] == summary["steps"], "the early stop stands: no more training"
    assert all(torch.equal(stopped[name], tensor) for name, tensor in adapter_weights(run).items())


def saved_val_loss(config: RunConfig) -> float:
    """The val loss of the saved adapter on the base, computed by the stage's own trainer (answer tokens,
    the same batches) as it did at each evaluation during training."""
    chat = load_saved_tokenizer(config.run_dir.adapter, config.model)
    model = load_tuned_model(config.model, config.run_dir.adapter)
    return build_trainer(config, chat, model, "fp32").evaluate()["eval_loss"]


def test_a_tracker_that_is_not_installed_is_named(tmp_path, tiny_models):
    run_file = prepared_run(tmp_path, tiny_models["chatml"], alpaca_rows(8), train={"trackers": ["wandb"]})
    result = runner.invoke(app, ["train", str(run_file)])
    assert result.exit_code == 1
    assert "train.trackers asks for wandb, which is not installed: pip install wandb" in result.output


def test_mlflow_tracker_receives_the_training_losses(tmp_path, tiny_models, monkeypatch):
    """With mlflow installed and asked for, the run's losses and parameters reach a local tracking store."""
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "llamatailor-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store stands in for a tracking server
    run_file = prepared_run(
        tmp_path, tiny_models["chatml"], alpaca_rows(8), train={"trackers": ["mlflow"], "max_steps": 3}
    )
    result = runner.invoke(app, ["train", str(run_file)])
    assert result.exit_code == 0, result.output
    logged = [
        json.loads(line)["loss"]
        for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("llamatailor-test")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(logged, rel=1e-6)
    assert run.data.params["learning_rate"] == "0.005"


def test_a_failing_tracker_is_a_clear_error(tmp_path, tiny_models, monkeypatch):
    """MLflow refusing its store stops the stage with one line naming the setting, not a traceback."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run_file = prepared_run(tmp_path, tiny_models["chatml"], alpaca_rows(8), train={"trackers": ["mlflow"]})
    result = runner.invoke(app, ["train", str(run_file)])
    assert result.exit_code == 1
    assert "train.trackers: mlflow failed: The filesystem tracking backend" in " ".join(result.output.split())
