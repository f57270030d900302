"""Trainer callbacks: metrics.jsonl, a quieter progress bar, a stop on non-finite weights, an overfitting watch."""

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ProgressCallback

LOGGED_KEYS = {
    "loss": "loss",
    "learning_rate": "lr",
    "grad_norm": "grad_norm",
    "mean_token_accuracy": "token_accuracy",
    "eval_loss": "eval_loss",
    "eval_mean_token_accuracy": "eval_token_accuracy",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
    "eval_rewards/margins": "eval_reward_margin",
    "eval_rewards/accuracies": "eval_reward_accuracy",
}

log = logging.getLogger(__name__)
BAR_KEYS = {"loss": "loss", "eval_loss": "val_loss", "learning_rate": "lr"}


class MetricsLogger(TrainerCallback):
    """Appends a JSON line per log event: step, loss, lr, grad_norm, tokens/s, memory.

    The file is a log: each line is written whole and flushed, so it can be followed while training runs.
    """

    def __init__(self, path: Path, resumed_at: int | None = None) -> None:
        self.path = path
        self.resumed_at = resumed_at
        self._last_time = time.perf_counter()
        self._last_tokens = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = ""
            if self.resumed_at is not None and self.path.is_file():  # the lines up to the resumed checkpoint
                lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
                kept = "".join(line for line in lines if json.loads(line)["step"] <= self.resumed_at)
            self.path.write_text(kept, encoding="utf-8")
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        row.update({name: logs[key] for key, name in LOGGED_KEYS.items() if key in logs})
        if len(row) == 2:  # the trainer's closing summary: nothing per-step in it
            return
        if "loss" in row:
            now = time.perf_counter()
            tokens = state.num_input_tokens_seen
            row["tokens_per_s"] = round((tokens - self._last_tokens) / max(now - self._last_time, 1e-9), 1)
            row["tokens_seen"] = tokens
            self._last_time, self._last_tokens = now, tokens
        row.update(memory_now())
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def memory_now() -> dict[str, float]:
    memory = {"rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}
    if torch.cuda.is_available():
        memory["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return memory


class CompactProgress(ProgressCallback):
    """The trainer's progress bar, showing the latest losses on the bar instead of printing a dict per log."""

    def __init__(self) -> None:
        super().__init__()
        self.shown: dict[str, str] = {}

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not (state.is_world_process_zero and self.training_bar is not None and logs):
            return
        self.shown.update({name: f"{logs[key]:.4g}" for key, name in BAR_KEYS.items() if key in logs})
        if self.shown:
            self.training_bar.set_postfix(self.shown, refresh=False)


class NanGuard(TrainerCallback):
    """Stops at the first step whose trainable weights or logged loss are not finite, before that state can
    be saved, so the newest checkpoint stays a good one."""

    def __init__(self) -> None:
        self.bad_step: int | None = None

    def _stop(self, state: TrainerState, control: TrainerControl) -> None:
        self.bad_step = state.global_step if self.bad_step is None else self.bad_step
        control.should_save = False
        control.should_evaluate = False
        control.should_training_stop = True

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        trainable = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        if trainable and not torch.isfinite(torch.stack(torch._foreach_norm(trainable))).all():
            self._stop(state, control)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and "loss" in logs and not math.isfinite(logs["loss"]):
            self._stop(state, control)


class OverfitWatch(TrainerCallback):
    """Warns when val loss rises at two evaluations in a row while train loss keeps falling."""

    def __init__(self) -> None:
        self.evaluations: list[tuple[int, float, float]] = []  # (step, val loss, mean train loss since last)
        self.warnings: list[str] = []
        self._train_losses: list[float] = []

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and "loss" in logs:
            self._train_losses.append(logs["loss"])

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not metrics or "eval_loss" not in metrics or not self._train_losses:
            return
        train_loss = sum(self._train_losses) / len(self._train_losses)
        self._train_losses = []
        self.evaluations.append((state.global_step, metrics["eval_loss"], train_loss))
        if len(self.evaluations) < 3:
            return
        (_, val_a, train_a), (_, val_b, _), (step, val_c, train_c) = self.evaluations[-3:]
        if val_a < val_b < val_c and train_c < train_a:
            message = (
                f"possible overfitting at step {step}: val loss rose {val_a:.4f} -> {val_b:.4f} -> {val_c:.4f} "
                f"while train loss fell {train_a:.4f} -> {train_c:.4f}; consider fewer steps, a lower learning "
                "rate, early_stopping_patience, or more data"
            )
            self.warnings.append(message)
            log.warning(message)
