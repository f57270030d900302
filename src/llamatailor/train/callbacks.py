"""Trainer callbacks: one `metrics.jsonl` line per logging step, and a quieter progress bar."""

import json
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
}

BAR_KEYS = {"loss": "loss", "eval_loss": "val_loss", "learning_rate": "lr"}


class MetricsLogger(TrainerCallback):
    """Appends a JSON line per log event: step, loss, lr, grad_norm, tokens/s, memory.

    The file is a log: each line is written whole and flushed, so it can be followed while training runs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last_time = time.perf_counter()
        self._last_tokens = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("", encoding="utf-8")
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
