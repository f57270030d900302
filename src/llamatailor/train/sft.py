"""The `train` stage: supervised fine-tuning (LoRA, DoRA, rsLoRA, QLoRA or full) with TRL's SFTTrainer.

Samples arrive already rendered with labels (see `data.templating`): TRL keeps prebuilt labels as they
are, so the loss covers exactly the assistant answers and their end-of-turn tokens.
"""

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from llamatailor.config import RunConfig
from llamatailor.data.templating import RenderError, render_for_training
from llamatailor.distributed import world_size
from llamatailor.errors import StageError
from llamatailor.models.loading import ChatTokenizer, Precision, load_tokenizer, resolve_precision
from llamatailor.plan.run_setup import available_memory, fit_warning, planned_peak
from llamatailor.rundir import RunDir
from llamatailor.train.answer_loss import add_answer_loss
from llamatailor.train.arguments import micro_batch_tokens, trainer_arguments
from llamatailor.train.batching import LengthBuckets, accumulating, micro_batches, padding_free
from llamatailor.train.checkpoints import CheckpointKey, computation_key, step_of
from llamatailor.train.launch import check_launch
from llamatailor.train.model_setup import trainable_model
from llamatailor.train.session import (
    run_trainer,
    save_trained,
    stage_callbacks,
    starting_checkpoint,
    with_compact_progress,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    output: Path
    method: str
    steps: int
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None  # the best val loss, whose weights are the result
    seconds: float
    trainable_parameters: int
    total_parameters: int
    precision: Precision
    processes: int
    planned_peak_bytes: int | None
    resumed_from: str | None
    warnings: list[str]


def train_sft(config: RunConfig, resume: bool = False, fresh: bool = False) -> TrainResult:
    run, train = config.run_dir, config.train
    check_launch()
    if train.threads:
        torch.set_num_threads(train.threads)
    set_seed(config.seed)
    precision = resolve_precision(train.precision)
    peak = planned_peak(config)
    too_big = fit_warning(peak, available_memory())
    if too_big:
        log.warning(too_big)
    chat = load_tokenizer(config.model)
    key = sft_checkpoint_key(config)
    resume_from = starting_checkpoint(run.checkpoints, key, resume, fresh)
    model = trainable_model(config, chat, precision)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    trainer = build_trainer(
        config, chat, model, precision, resumed_at=step_of(resume_from) if resume_from else None
    )
    outcome = run_trainer(trainer, "train", key, resume_from, run.metrics)
    output = run.model if train.method == "full" else run.adapter
    save_trained(
        trainer,
        chat,
        output,
        {"base": config.model.base, "method": train.method, "max_seq_len": config.data.max_seq_len},
    )
    return TrainResult(
        output=output,
        method=train.method,
        steps=outcome.steps,
        first_loss=outcome.first_loss,
        last_loss=outcome.last_loss,
        eval_loss=outcome.eval_loss,
        seconds=outcome.seconds,
        trainable_parameters=trainable,
        total_parameters=total,
        precision=precision,
        processes=world_size(),
        planned_peak_bytes=peak,
        resumed_from=outcome.resumed_from,
        warnings=[too_big, *outcome.warnings] if too_big else outcome.warnings,
    )


def sft_checkpoint_key(config: RunConfig) -> CheckpointKey:
    """What SFT checkpoints depend on: the seed, the model, data.max_seq_len (samples are rendered and
    truncated here), the train section (less the resume-neutral keys), and by hash the rendered splits and
    the chat template file. Data keys read only by `prepare` reach training through the splits' hashes."""
    run = config.run_dir
    files = {str(run.split(name).relative_to(run.root)): run.split(name) for name in ("train", "val")}
    if config.model.chat_template:
        files["model.chat_template"] = config.model.chat_template
    return computation_key(config, ("seed", "model", "data.max_seq_len", "train"), files)


def build_trainer(
    config: RunConfig,
    chat: ChatTokenizer,
    model: torch.nn.Module,
    precision: Precision,
    resumed_at: int | None = None,
) -> SFTTrainer:
    """TRL's SFTTrainer over the run's rendered train and val splits, logging to metrics.jsonl and TensorBoard."""
    run, train = config.run_dir, config.train
    train_set = tokenized_split(run, "train", chat, config.data.max_seq_len)
    if len(train_set) == 0:
        raise StageError(
            f"{run.split('train')} has no samples: see {run.data / 'report.md'} for what was rejected"
        )
    val_set = tokenized_split(run, "val", chat, config.data.max_seq_len)
    arguments = trainer_arguments(train, "train", run.checkpoints, precision, len(val_set) > 0, config.seed)
    # Samples are rendered and truncated by llamatailor, which reports every truncation.
    args = SFTConfig(**arguments, max_length=None)
    callbacks = stage_callbacks(train, run.metrics, run.tensorboard, resumed_at)
    add_answer_loss(model.get_base_model() if isinstance(model, PeftModel) else model)
    trainer = AnswerLossTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set if len(val_set) else None,
        processing_class=chat.tokenizer,
        callbacks=callbacks,
        micro_batch_tokens=micro_batch_tokens(train),
        packing=train.packing,
    )
    return with_compact_progress(trainer)


class AnswerLossTrainer(SFTTrainer):
    """SFTTrainer whose loss covers the answer tokens only, in chunks (see `answer_loss`), over batches of
    similar lengths, run as micro-batches under a token budget and optionally padding-free (see `batching`).
    On CPU, TRL's own fused head scores every position, prompts and padding included, and its entropy
    besides."""

    def __init__(
        self, *args: Any, micro_batch_tokens: int | None = None, packing: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.micro_batch_tokens, self.packing = micro_batch_tokens, packing
        self.model_accepts_loss_kwargs = True  # compute_loss below normalises by num_items_in_batch

    def _get_train_sampler(self, train_dataset: Any = None) -> LengthBuckets:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = [len(ids) for ids in dataset["input_ids"]]
        # Buckets of whole global batches, so that N processes see the same samples per step as one process.
        global_batch = self.args.per_device_train_batch_size * self.args.world_size
        return LengthBuckets(lengths, global_batch, self.args.seed)

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Forward and backward over one batch, as one pass or as several under the token budget (see
        `batching.micro_batches`); returns the batch's loss, detached. Every pass is normalised by the
        whole batch's answer-token count, and all passes but the last only accumulate gradients
        (`batching.accumulating`): each process syncs once per call, as with an unsplit batch, whatever
        the number of passes its own batch needs."""
        if num_items_in_batch is None:
            # The count the Trainer's loop passes (transformers 5.23): labels[:, 1:] of the whole batch,
            # summed over processes with average_tokens_across_devices (compute_loss scales to match). A
            # local count there would make each process's gradient N times too large under DDP.
            num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)
        parts = micro_batches(inputs, self.micro_batch_tokens) if self.micro_batch_tokens else [inputs]
        if self.packing:
            parts = [padding_free(part) for part in parts]
        losses = []
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            with contextlib.nullcontext() if last else accumulating(self.accelerator, model):
                losses.append(super().training_step(model, part, num_items_in_batch))
        return torch.stack(losses).sum()

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        outputs = model(**inputs, answer_loss=True, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages; the token count spans all processes
        return (loss, outputs) if return_outputs else loss


def tokenized_split(run: RunDir, name: str, chat: ChatTokenizer, max_len: int) -> Dataset:
    rows = []
    for record in run.read_split(name):
        try:
            sample = render_for_training(chat, record["messages"], max_len, record.get("tools"))
        except RenderError as exc:
            raise StageError(
                f"{run.split(name)}: record {record['id']} ({record['source']}): {exc}"
            ) from None
        rows.append({"input_ids": sample.input_ids, "labels": sample.labels})
    return Dataset.from_list(rows) if rows else Dataset.from_dict({"input_ids": [], "labels": []})
