"""The `train` stage: supervised fine-tuning with a LoRA adapter through TRL's SFTTrainer.

Samples arrive already rendered with labels (see `data.templating`): TRL keeps prebuilt labels as they
are, so the loss covers exactly the assistant answers and their end-of-turn tokens.
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import set_seed
from transformers.trainer_callback import ProgressCallback
from trl import SFTConfig, SFTTrainer

from llamatailor.config import RunConfig, TrainSection
from llamatailor.data.templating import RenderError, render_for_training
from llamatailor.errors import StageError
from llamatailor.models.families import Family
from llamatailor.models.loading import (
    ChatTokenizer,
    Precision,
    load_base_model,
    load_tokenizer,
    resolve_precision,
    torch_dtype,
)
from llamatailor.plots import plot_loss
from llamatailor.rundir import RunDir, atomic_path, read_jsonl, remove_path, write_json
from llamatailor.train.callbacks import CompactProgress, MetricsLogger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    adapter: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None
    seconds: float
    trainable_parameters: int
    total_parameters: int
    precision: Precision


def train_sft(config: RunConfig) -> TrainResult:
    run = config.run_dir
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    set_seed(config.seed)
    precision = resolve_precision(config.train.precision)
    chat = load_tokenizer(config.model)
    model = load_lora_model(config, chat, precision)
    trainable, total = model.get_nb_trainable_parameters()
    if run.checkpoints.exists():
        log.info("Removing checkpoints of an earlier training run in %s", run.checkpoints)
        remove_path(run.checkpoints)
    trainer = build_trainer(config, chat, model, precision)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    save_adapter(model, chat, run, config)
    rows = read_jsonl(run.metrics)
    plot_loss(rows, run.loss_plot)
    losses = [row["loss"] for row in rows if "loss" in row]
    eval_losses = [row["eval_loss"] for row in rows if "eval_loss" in row]
    return TrainResult(
        adapter=run.adapter,
        steps=trainer.state.global_step,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        eval_loss=eval_losses[-1] if eval_losses else None,
        seconds=seconds,
        trainable_parameters=trainable,
        total_parameters=total,
        precision=precision,
    )


def load_lora_model(config: RunConfig, chat: ChatTokenizer, precision: Precision) -> PeftModel:
    """The base model with a fresh LoRA adapter; on GPUs the frozen base is stored in the compute dtype."""
    base_dtype = torch.float32 if precision == "fp32" else torch_dtype(precision)
    return get_peft_model(load_base_model(config.model, base_dtype), lora_config(config.train, chat.family))


def build_trainer(
    config: RunConfig, chat: ChatTokenizer, model: PeftModel, precision: Precision
) -> SFTTrainer:
    """TRL's SFTTrainer over the run's rendered train and val splits, logging to metrics.jsonl."""
    run = config.run_dir
    train_set = tokenized_split(run, "train", chat, config.data.max_seq_len)
    if len(train_set) == 0:
        raise StageError(
            f"{run.split('train')} has no samples: see {run.data / 'report.md'} for what was rejected"
        )
    val_set = tokenized_split(run, "val", chat, config.data.max_seq_len)
    trainer = SFTTrainer(
        model=model,
        args=sft_arguments(config, precision, has_val=len(val_set) > 0),
        train_dataset=train_set,
        eval_dataset=val_set if len(val_set) else None,
        processing_class=chat.tokenizer,
        callbacks=[MetricsLogger(run.metrics)],
    )
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(CompactProgress())
    return trainer


def tokenized_split(run: RunDir, name: str, chat: ChatTokenizer, max_len: int) -> Dataset:
    rows = []
    for record in run.read_split(name):
        try:
            sample = render_for_training(chat, record["messages"], max_len)
        except RenderError as exc:
            raise StageError(
                f"{run.split(name)}: record {record['id']} ({record['source']}): {exc}"
            ) from None
        rows.append({"input_ids": sample.input_ids, "labels": sample.labels})
    return Dataset.from_list(rows) if rows else Dataset.from_dict({"input_ids": [], "labels": []})


def lora_config(train: TrainSection, family: Family) -> LoraConfig:
    return LoraConfig(
        r=train.lora.r,
        lora_alpha=train.lora.alpha,
        lora_dropout=train.lora.dropout,
        target_modules=list(train.lora.targets or family.lora_targets),
        task_type="CAUSAL_LM",
    )


def sft_arguments(config: RunConfig, precision: Precision, has_val: bool) -> SFTConfig:
    train = config.train
    return SFTConfig(
        output_dir=str(config.run_dir.checkpoints),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        eval_strategy="steps" if has_val else "no",
        eval_steps=train.eval_steps or train.save_steps,
        activation_checkpointing=use_gradient_checkpointing(train),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        # Samples are rendered and truncated by llamatailor, which reports every truncation.
        max_length=None,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def use_gradient_checkpointing(train: TrainSection) -> bool:
    if train.gradient_checkpointing == "auto":
        return torch.cuda.is_available()
    return bool(train.gradient_checkpointing)


def save_adapter(model: PeftModel, chat: ChatTokenizer, run: RunDir, config: RunConfig) -> None:
    """The adapter in PEFT's format, with the exact tokenizer and chat template it was trained with."""
    with atomic_path(run.adapter) as tmp:
        model.save_pretrained(tmp)
        chat.tokenizer.save_pretrained(tmp)
        write_json(
            tmp / "llamatailor.json",
            {
                "base": config.model.base,
                "family": chat.family.name,
                "stop_tokens": [chat.tokenizer.convert_ids_to_tokens(i) for i in chat.stop_ids],
                "chat_template": chat.template_origin,
                "max_seq_len": config.data.max_seq_len,
            },
        )
