"""Trainer arguments shared by the SFT and DPO stages, from a run file's schedule."""

import importlib.util
from pathlib import Path
from typing import Any

import torch

from llamatailor.config import Schedule
from llamatailor.errors import ConfigError, StageError
from llamatailor.hardware import use_gradient_checkpointing
from llamatailor.vocabulary import BF16, CPU_OPTIMIZER, FP16, Optimizer, Precision, unknown_name

# transformers' `optim` name for each of llamatailor's optimizers.
TRAINER_OPTIMIZERS: dict[Optimizer, str] = {
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
}


def optimizer_name(schedule: Schedule, section: str) -> str:
    """transformers' `optim` name for `<section>.optimizer`.

    Raises ConfigError naming an optimizer the trainer has no name for, and the ones it has; StageError
    for a bitsandbytes optimizer without a CUDA GPU.
    """
    if schedule.optimizer not in TRAINER_OPTIMIZERS:
        raise ConfigError(
            f"{section}.optimizer: {unknown_name('optimizer', schedule.optimizer, TRAINER_OPTIMIZERS)}"
        )
    if schedule.optimizer != CPU_OPTIMIZER and not torch.cuda.is_available():
        raise StageError(
            f"{section}.optimizer {schedule.optimizer} needs a CUDA GPU; use {CPU_OPTIMIZER} on CPU"
        )
    return TRAINER_OPTIMIZERS[schedule.optimizer]


def check_trackers(schedule: Schedule, section: str) -> list[str]:
    for tracker in schedule.trackers:
        if importlib.util.find_spec(tracker) is None:
            raise StageError(
                f"{section}.trackers asks for {tracker}, which is not installed: pip install {tracker}"
            )
    return list(schedule.trackers)


def trainer_arguments(
    schedule: Schedule, section: str, output_dir: Path, precision: Precision, has_val: bool, seed: int
) -> dict[str, Any]:
    """Keyword arguments common to TRL's SFTConfig and DPOConfig."""
    if schedule.early_stopping_patience and not has_val:
        raise StageError(
            f"{section}.early_stopping_patience needs validation data, and the val split is empty"
        )
    eval_steps = schedule.eval_steps or schedule.save_steps
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": schedule.batch_size,
        "per_device_eval_batch_size": schedule.batch_size,
        "gradient_accumulation_steps": schedule.grad_accum,
        "learning_rate": schedule.learning_rate,
        "lr_scheduler_type": schedule.lr_scheduler,
        "warmup_steps": schedule.warmup_ratio,
        "weight_decay": schedule.weight_decay,
        "max_grad_norm": schedule.max_grad_norm,
        "optim": optimizer_name(schedule, section),
        "num_train_epochs": schedule.epochs,
        "max_steps": schedule.max_steps or -1,
        "activation_checkpointing": use_gradient_checkpointing(schedule.gradient_checkpointing),
        "bf16": precision == BF16,
        "fp16": precision == FP16,
        "logging_steps": schedule.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": schedule.save_steps,
        "save_total_limit": schedule.save_total_limit,
        "eval_strategy": "steps" if has_val else "no",
        "eval_steps": eval_steps,
        # The best checkpoint by val loss is kept from rotation and its weights are the result.
        "load_best_model_at_end": has_val,
        "metric_for_best_model": "eval_loss",
        "greater_is_better": False,
        "seed": seed,
        "data_seed": seed,
        "report_to": check_trackers(schedule, section),
        "include_num_input_tokens_seen": "non_padding",
        # Without use_cpu, accelerate leaves a torchrun group on CPU undistributed: each process trains alone.
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
    }
