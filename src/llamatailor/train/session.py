"""What the SFT and DPO stages share around `trainer.train()`: resuming, guards, saving the result."""

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import EarlyStoppingCallback, ProgressCallback

from llamatailor.config import Schedule
from llamatailor.distributed import barrier, is_main_process
from llamatailor.errors import StageError, TrainingDiverged
from llamatailor.models.loading import ChatTokenizer
from llamatailor.plots import plot_loss
from llamatailor.rundir import read_jsonl, remove_path, replace_path, write_json
from llamatailor.train.callbacks import CompactProgress, MetricsLogger, NanGuard, OverfitWatch
from llamatailor.train.checkpoints import (
    CheckpointMarker,
    drop_checkpoints_after,
    resumable_checkpoint,
    step_of,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    steps: int
    seconds: float
    resumed_from: str | None
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None
    warnings: list[str]


def stage_callbacks(
    schedule: Schedule, metrics: Path, tensorboard: Path, resumed_at: int | None
) -> list[TrainerCallback]:
    """metrics.jsonl, TensorBoard (main process), and early stopping when the schedule asks for it."""
    callbacks: list[TrainerCallback] = [MetricsLogger(metrics, resumed_at)]
    if is_main_process():
        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(logdir=str(tensorboard))))
    if schedule.early_stopping_patience:
        callbacks.append(
            EarlyStoppingCallback(schedule.early_stopping_patience, schedule.early_stopping_threshold)
        )
    return callbacks


def with_compact_progress(trainer: Trainer) -> Trainer:
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(CompactProgress())
    return trainer


def starting_checkpoint(checkpoints: Path, key: str, resume: bool) -> Path | None:
    """The checkpoint to resume from; without one, a fresh start (earlier checkpoints are removed)."""
    found, skipped = resumable_checkpoint(checkpoints, key) if resume else (None, [])
    for reason in skipped:
        log.warning("Not resuming from %s", reason)
    if is_main_process():
        if found is not None:
            drop_checkpoints_after(checkpoints, step_of(found))
            log.info("Resuming from %s", found)
        elif checkpoints.exists():
            if resume:
                log.warning(
                    "No complete checkpoint of this configuration in %s: starting afresh", checkpoints
                )
            remove_path(checkpoints)
    barrier()
    return found


TRACKERS = ("mlflow", "wandb")


def run_trainer(trainer: Trainer, section: str, key: str, resume_from: Path | None, metrics: Path) -> Outcome:
    """Train with checkpoint markers and the guards on; raise TrainingDiverged (the last good checkpoint
    kept) on NaN/inf. `key` identifies the configuration the checkpoints belong to."""
    guard, watch = NanGuard(), OverfitWatch()
    for callback in (CheckpointMarker(key), guard, watch):
        trainer.add_callback(callback)
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except Exception as exc:
        package = type(exc).__module__.split(".")[0]
        if package in TRACKERS:  # a tracker's setup or logging failed: name the setting, not a traceback
            raise StageError(f"{section}.trackers: {package} failed: {exc}") from exc
        raise
    seconds = time.perf_counter() - started
    if guard.bad_step is not None:
        raise TrainingDiverged(_diverged_message(trainer, section, key, guard.bad_step))
    rows = read_jsonl(metrics) if metrics.is_file() else []
    if is_main_process():
        plot_loss(rows, metrics.with_name("loss.png"))
    losses = [row["loss"] for row in rows if "loss" in row]
    eval_losses = [row["eval_loss"] for row in rows if "eval_loss" in row]
    return Outcome(
        steps=trainer.state.global_step,
        seconds=seconds,
        resumed_from=str(resume_from) if resume_from else None,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        eval_loss=trainer.state.best_metric
        if trainer.state.best_metric is not None
        else (eval_losses or [None])[-1],
        warnings=watch.warnings,
    )


def _diverged_message(trainer: Trainer, section: str, key: str, step: int) -> str:
    good, _ = resumable_checkpoint(Path(trainer.args.output_dir), key)
    kept = (
        f"The last good checkpoint is {good}; resume from it with --resume."
        if good
        else "No checkpoint was saved before it."
    )
    return (
        f"training diverged: the loss or the weights became NaN/inf at step {step} "
        f"({section}.learning_rate is {trainer.args.learning_rate:g}). Lower {section}.learning_rate, keep "
        f"{section}.max_grad_norm (gradient clipping), prefer bf16 or fp32 over fp16 ({section}.precision), and look "
        f"for unusual samples in data/report.md. {kept}"
    )


def save_trained(trainer: Trainer, chat: ChatTokenizer, folder: Path, info: dict[str, Any]) -> None:
    """The trainer's model as an adapter (PEFT format) or a whole model, with the exact tokenizer and chat
    template it was trained with and `llamatailor.json` describing the chat format. Every process takes part
    (FSDP and ZeRO-3 gather their shards); the main process writes, under a temporary name renamed at the end."""
    partial = folder.with_name(f".{folder.name}.partial")
    if is_main_process():
        remove_path(partial)
    barrier()
    trainer.save_model(str(partial))
    if is_main_process():
        chat.tokenizer.save_pretrained(partial)
        stop_tokens = [chat.tokenizer.convert_ids_to_tokens(i) for i in chat.stop_ids]
        info = {
            "family": chat.family.name,
            "stop_tokens": stop_tokens,
            "chat_template": chat.template_origin,
            **info,
        }
        write_json(partial / "llamatailor.json", info)
        replace_path(partial, folder)
    barrier()
