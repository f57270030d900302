"""What the SFT and DPO stages share around `trainer.train()`: resuming, guards, saving the result."""

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
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
    RESUME_NEUTRAL_KEYS,
    TRAINER_STATE,
    CheckpointKey,
    CheckpointMarker,
    checkpoint_folders,
    drop_checkpoints_after,
    newest_complete,
    read_marker,
    resumable_checkpoint,
    settings_differences,
    step_of,
    training_finished,
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


def starting_checkpoint(
    checkpoints: Path, key: CheckpointKey, resume: bool, fresh: bool = False
) -> Path | None:
    """Where training starts: the checkpoint to resume from, or None for step 0.

    fresh: this stage's checkpoints are deleted first. resume: the newest complete checkpoint; newer partial
    or damaged ones are passed over (with a warning) and removed, since training writes those steps again;
    when there is no complete one and only partial saves, those are removed and training starts at step 0.
    Neither: training starts at step 0 where there are no checkpoints. Raises StageError, deleting nothing,
    when checkpoints exist and neither is asked, when the newest complete checkpoint was written under
    other settings (each named with both values), or when resuming finds only damaged checkpoints.
    """
    if resume and fresh:
        raise ValueError("resume and fresh exclude each other")
    if fresh:
        if is_main_process() and checkpoints.exists():
            names = ", ".join(folder.name for folder in checkpoint_folders(checkpoints)) or "no checkpoint"
            log.warning("--fresh: deleting %s (%s); training starts at step 0", checkpoints, names)
            remove_path(checkpoints)
        barrier()
        return None
    folders = checkpoint_folders(checkpoints)
    if not folders:
        if resume:
            log.info("No checkpoint to resume from in %s: training starts at step 0", checkpoints)
        return None
    if not resume:
        raise StageError(_checkpoints_there(checkpoints, folders))
    found, skipped = newest_complete(checkpoints)
    for reason in skipped:
        log.warning("Not resuming from %s", reason)
    if found is None:
        if any(read_marker(folder) is not None for folder in folders):
            raise StageError(
                f"no complete checkpoint to resume from in {checkpoints}: {'; '.join(skipped)}. Pass "
                "--fresh to delete them and start over."
            )
        log.warning("No complete checkpoint in %s, only unfinished saves: starting at step 0", checkpoints)
    elif differences := settings_differences(found, key):
        raise StageError(_other_settings(checkpoints, found, differences))
    if is_main_process():
        drop_checkpoints_after(checkpoints, step_of(found) if found is not None else 0)
        if found is not None:
            log.info("Resuming from %s", found)
    barrier()
    return found


def _checkpoints_there(checkpoints: Path, folders: list[Path]) -> str:
    found, _ = newest_complete(checkpoints)
    newest = f"the newest complete one is {found.name}" if found else "none of them is complete"
    return (
        f"{checkpoints} already holds checkpoints of an earlier training "
        f"({', '.join(folder.name for folder in reversed(folders))}; {newest}). Pass --resume to continue "
        "from the newest complete one, or --fresh to delete them and start over."
    )


def _other_settings(checkpoints: Path, found: Path, differences: list[str]) -> str:
    lines = "\n".join(f"  {line}" for line in differences)
    return (
        f"cannot resume: the newest complete checkpoint, {found} (step {step_of(found)}), was written under "
        f"other settings:\n{lines}\nResume with the checkpoint's settings (a resume may change only "
        f"{', '.join(RESUME_NEUTRAL_KEYS)}), or pass --fresh to delete {checkpoints} and start over. "
        "No checkpoint was deleted."
    )


class RunFileIntervals(TrainerCallback):
    """Logging, evaluation and save intervals from this run's settings, also on resume: transformers keeps
    the checkpoint's (from trainer_state.json), but a resume may change them (RESUME_NEUTRAL_KEYS)."""

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        state.compute_steps(args, state.max_steps)


TRACKERS = ("mlflow", "wandb")


def run_trainer(
    trainer: Trainer, section: str, key: CheckpointKey, resume_from: Path | None, metrics: Path
) -> Outcome:
    """Train with checkpoint markers and the guards on; raise TrainingDiverged (the last good checkpoint
    kept) on NaN/inf. `key` holds the settings the checkpoints' markers record.

    Args:
        trainer: The stage's SFT or DPO trainer.
        section: "train" or "dpo": the run-file section named in messages.
        key: The settings and input hashes recorded in each checkpoint's marker.
        resume_from: The checkpoint folder to resume from (`starting_checkpoint`); None from step 0.
        metrics: The stage's metrics.jsonl; loss.png is drawn beside it.

    Returns:
        Outcome: optimizer steps, wall time in seconds, the checkpoint resumed from, the first and last
        logged train loss, the best (else the last) val loss, and overfitting warnings.

    Raises:
        TrainingDiverged: the loss or the trainable weights became NaN/inf.
        StageError: a tracker (mlflow, wandb) failed to start or log.
    """
    guard, watch = NanGuard(), OverfitWatch()
    for callback in (RunFileIntervals(), CheckpointMarker(key), guard, watch):
        trainer.add_callback(callback)
    started = time.perf_counter()
    try:
        if resume_from is not None and _ended_at(trainer, resume_from):
            finish_from_checkpoint(trainer, resume_from)
        else:
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


def finish_from_checkpoint(trainer: Trainer, folder: Path) -> None:
    """Leave `trainer` as `trainer.train()` leaves it at the end of the training whose last step `folder`
    saved: that state, and the result's weights (the best checkpoint's where the best is kept). Resumed
    there, `trainer.train()` would take one step past max_steps (transformers 5.23 checks the end only
    after a step), and the result would change.

    It calls transformers 5.23's private `Trainer._load_from_checkpoint` and `Trainer._load_best_model`,
    as `Trainer.train` does. Changing it, or the transformers version, needs the resume parity tests
    (tests/test_training_resilience.py) and the rest listed in train/sft.py's docstring.
    """
    trainer.state = TrainerState.load_from_json(str(folder / TRAINER_STATE))
    best = trainer.state.best_model_checkpoint
    if best is not None and not Path(best).is_dir():  # as trainer.train() does on resume
        trainer.state.best_model_checkpoint = None
    trainer._load_from_checkpoint(str(folder))
    if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint is not None:
        trainer._load_best_model()


def _ended_at(trainer: Trainer, folder: Path) -> bool:
    """Whether training ended at `folder` (and can be finished without trainer.train()). FSDP and DeepSpeed
    load checkpoints into the wrapped model, which only trainer.train() builds: they resume as usual."""
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        return False
    stoppers = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EarlyStoppingCallback)]
    return training_finished(folder, stoppers[0].early_stopping_patience if stoppers else None)


def _diverged_message(trainer: Trainer, section: str, key: CheckpointKey, step: int) -> str:
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
