"""The `train` stage: supervised fine-tuning (LoRA, DoRA, rsLoRA, QLoRA or full) with TRL's SFTTrainer.

Samples arrive already rendered with labels (see `data.templating`): TRL keeps prebuilt labels as they
are, so the loss covers exactly the assistant answers and their end-of-turn tokens.

One optimizer step, in order (transformers 5.23 `Trainer._run_epoch`, TRL 1.16 `SFTTrainer`):

1. Batches: `AnswerLossTrainer._get_train_sampler` (`batching.LengthBuckets`) groups rows of similar
   length; TRL's collator right-pads them into `input_ids`, `labels` (-100 outside the answers) and
   `attention_mask`, each (batch, seq). `Trainer.get_batch_samples` takes `train.grad_accum` batches and
   counts `num_items_in_batch`: the labelled tokens of `labels[:, 1:]` over all of them, summed over
   processes (`average_tokens_across_devices`).
2. Micro-batches: `AnswerLossTrainer.training_step` runs each batch as passes of at most
   `train.micro_batch_tokens` padded tokens (`batching.micro_batches`; auto: 2,048 on CPU, unsplit on
   GPUs), each joined into one row when `train.packing` is on (`batching.padding_free`).
3. Forward and loss: `AnswerLossTrainer.compute_loss` calls the forward that `answer_loss.add_answer_loss`
   installed: hidden states kept at the positions whose next token is labelled (prompts and system turns
   are masked by `data.templating.render_for_training`, padding by the collator), then
   `answer_loss.chunked_cross_entropy`
   summed in nats and divided by `num_items_in_batch`, so every answer token weighs the same across
   micro-batches, accumulated batches and processes; times the process count, as DDP averages gradients.
4. Backward: `Trainer.training_step` (inside SFTTrainer's activation-offload context) calls
   `accelerator.backward` without dividing by `grad_accum` (the loss is already normalised over the
   accumulated batches). The chunked loss computed its gradients in the forward; backward only scales them.
5. Gradient accumulation: every pass but a batch's last runs under `batching.accumulating`, and the Trainer
   runs every batch but the step's last under `accelerator.no_sync`: one all-reduce per process per step.
6. Clipping: `Trainer._clip_grad_norm` to `train.max_grad_norm`; the norm before clipping is logged.
7. Optimizer: `optimizer.step()`, AdamW or a bitsandbytes variant (`train.optimizer`), then
   `model.zero_grad()`.
8. Scheduler: `lr_scheduler.step()` (`train.lr_scheduler`, warmup from `train.warmup_ratio`).
9. Step end: `callbacks.NanGuard` stops at non-finite trainable weights, before anything is saved.
10. Logging, every `train.logging_steps`: `callbacks.MetricsLogger` (metrics.jsonl), TensorBoard,
    `callbacks.CompactProgress`, `NanGuard` (non-finite loss), `callbacks.OverfitWatch`; evaluation, every
    `train.eval_steps`, scores val through the same `compute_loss` (answer tokens only).
11. Checkpoint, every `train.save_steps`: the Trainer's save, then `checkpoints.CheckpointMarker` marks it
    complete with `sft_checkpoint_key`'s settings; `session.starting_checkpoint` resumes from it.

Changing the step (the hooks below, `answer_loss`, `batching`, `arguments`) needs the same results,
before and after, from:
- the parity tests: tests/test_answer_loss.py (chunked = plain cross-entropy, answer loss = the model's own,
  micro-batches and padding-free rows = the whole padded batch), tests/test_training_methods.py
  (`test_memory_and_padding_options_give_the_same_losses`), tests/test_training_resilience.py (resumed =
  uninterrupted), tests/test_export.py and tests/test_fidelity_matrix.py (merged = adapter);
- the DDP test: tests/test_distributed.py (two processes = one, also with unequal micro-batch splits);
- a planner re-measure: bench/plan_memory.py (plan/memory.py's loss and activation terms were measured on
  this step).
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
from llamatailor.hardware import available_memory, micro_batch_tokens, resolve_precision, torch_threads
from llamatailor.models.loading import ChatTokenizer, load_tokenizer
from llamatailor.models.moe import check_run_model
from llamatailor.plan.run_setup import fit_warning, planned_peak
from llamatailor.rundir import RunDir
from llamatailor.stage_contract import Stage, chat_template_file, weights
from llamatailor.train.answer_loss import add_answer_loss
from llamatailor.train.arguments import trainer_arguments
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
from llamatailor.vocabulary import TRAIN_SPLIT, VAL_SPLIT, Precision

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
    """Run the `train` stage: fine-tune on data/train.jsonl and save the adapter (or the whole model).

    The methods are PEFT's: LoRA (Hu et al. 2021), rsLoRA's alpha/sqrt(r) scaling (Kalajdzievski 2023),
    DoRA (Liu et al. 2024), QLoRA on a 4-bit NF4 or 8-bit bitsandbytes base (Dettmers et al. 2023), or
    every weight (`train.method: full`); the loop is TRL's SFTTrainer (see "One optimizer step" above).

    Args:
        config: The resolved run file; reads `seed`, `model`, `data.max_seq_len` and `train`.
        resume: Continue from the newest complete checkpoint in checkpoints/.
        fresh: Delete checkpoints/ first and start at step 0 (excludes `resume`).

    Returns:
        TrainResult: the output folder (adapter/, or model/ for full), steps, first/last train loss and
        best val loss (nats per answer token), wall time in seconds, trainable and total parameter counts,
        the precision, the process count, the planner's peak in bytes per device (None when the model's
        shape is unknown), the checkpoint resumed from, and warnings (memory, overfitting).

    Raises:
        StageError: FSDP/DeepSpeed asked for on CPU; checkpoints exist and neither `resume` nor `fresh`
            is given, or the newest one was written under other settings; a split is missing or the train
            split is empty; a sample no longer renders; an optimizer or tracker this machine lacks.
        ModelLoadError: the base model or its tokenizer cannot be loaded.
        TrainingDiverged: the loss or the weights became NaN/inf (the last good checkpoint is kept).
        ValueError: both `resume` and `fresh`.
    """
    run, train = config.run_dir, config.train
    check_launch()
    torch.set_num_threads(torch_threads(train.threads))
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


STAGE = Stage(
    "train",
    config_keys=("seed", "model", "data.max_seq_len", "train"),
    # data/report.json: the planned peak memory takes the longest sample from it
    inputs=lambda config: [
        config.run_dir.split(TRAIN_SPLIT),
        config.run_dir.split(VAL_SPLIT),
        config.run_dir.data_report,
        *chat_template_file(config),
    ],
    outputs=lambda config: [
        *(
            [config.run_dir.model / "config.json", *weights(config.run_dir.model)]
            if config.train.method == "full"
            else [
                config.run_dir.adapter / "adapter_config.json",
                config.run_dir.adapter / "adapter_model.safetensors",
            ]
        ),
        config.run_dir.metrics,
    ],
    action=train_sft,
    precheck=check_run_model,  # routed experts refused or missing, before the weights load
    trains=True,
)


def sft_checkpoint_key(config: RunConfig) -> CheckpointKey:
    """What SFT checkpoints depend on: the stage's declared config keys (less the resume-neutral ones) and
    input files, but the data report, which only sizes the memory warning."""
    files = [path for path in STAGE.inputs(config) if path != config.run_dir.data_report]
    return computation_key(config, STAGE.config_keys, files)


def build_trainer(
    config: RunConfig,
    chat: ChatTokenizer,
    model: torch.nn.Module,
    precision: Precision,
    resumed_at: int | None = None,
) -> SFTTrainer:
    """TRL's SFTTrainer over the run's rendered train and val splits, logging to metrics.jsonl and TensorBoard.

    Args:
        config: The resolved run file.
        chat: The tokenizer and chat template the samples are rendered with.
        model: From `model_setup.trainable_model`; its (base) forward gets `answer_loss.add_answer_loss`.
        precision: "fp32", "bf16" or "fp16": the Trainer's mixed precision.
        resumed_at: The step resumed from (metrics.jsonl keeps its lines up to it); None from step 0.

    Returns:
        An `AnswerLossTrainer` with the run's callbacks and the compact progress bar.

    Raises:
        StageError: a split is missing, the train split is empty, a record no longer renders, or an
            argument this machine cannot honour (see `arguments.trainer_arguments`).
    """
    run, train = config.run_dir, config.train
    train_set = tokenized_split(run, TRAIN_SPLIT, chat, config.data.max_seq_len)
    if len(train_set) == 0:
        raise StageError(
            f"{run.split('train')} has no samples: see {run.data / 'report.md'} for what was rejected"
        )
    val_set = tokenized_split(run, VAL_SPLIT, chat, config.data.max_seq_len)
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
        micro_batch_tokens=micro_batch_tokens(train.micro_batch_tokens),
        packing=train.packing,
    )
    return with_compact_progress(trainer)


class AnswerLossTrainer(SFTTrainer):
    """SFTTrainer whose loss covers the answer tokens only, in chunks (see `answer_loss`), over batches of
    similar lengths, run as micro-batches under a token budget and optionally padding-free (see `batching`).
    On CPU, TRL's own fused head scores every position, prompts and padding included, and its entropy
    besides.

    Its methods override transformers 5.23 Trainer hooks as TRL 1.16's SFTTrainer leaves them (the private
    `_get_train_sampler`, `training_step`, `compute_loss`, and `model_accepts_loss_kwargs`), and
    `training_step` calls the private `_get_num_items_in_batch`; changing any of them, or either
    library's version, needs the parity tests, the DDP test and a planner re-measure listed in this
    module's docstring.
    """

    def __init__(
        self, *args: Any, micro_batch_tokens: int | None = None, packing: bool = False, **kwargs: Any
    ) -> None:
        """TRL's SFTTrainer, plus `micro_batch_tokens` (padded tokens per forward pass; None: no split) and
        `packing` (padding-free rows, see `batching.padding_free`).

        Sets transformers' `Trainer.model_accepts_loss_kwargs`: with it the Trainer counts
        `num_items_in_batch` and does not divide the loss by `gradient_accumulation_steps` (5.23's
        `training_step`), which `compute_loss` below relies on.
        """
        super().__init__(*args, **kwargs)
        self.micro_batch_tokens, self.packing = micro_batch_tokens, packing
        self.model_accepts_loss_kwargs = True  # compute_loss below normalises by num_items_in_batch

    def _get_train_sampler(self, train_dataset: Any = None) -> LengthBuckets:
        """Override of transformers 5.23's private `Trainer._get_train_sampler`: the row order of an epoch.

        Args:
            train_dataset: The tokenized train split (an `input_ids` column); None: `self.train_dataset`.

        Returns:
            LengthBuckets over row indices, seeded by `args.seed` and the epoch, in whole global batches
            (per-device batch x processes), so that N processes train on the same rows per step as one.

        Changing it needs the parity tests, the DDP test and a planner re-measure (module docstring).
        """
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
        the number of passes its own batch needs.

        Override of transformers 5.23's `Trainer.training_step` (called once per batch by `_run_epoch`);
        each pass goes through TRL 1.16's `SFTTrainer.training_step` and the Trainer's own.

        Args:
            model: The (DDP-wrapped) model being trained.
            inputs: The collated batch: `input_ids`, `labels` (-100 where unscored) and `attention_mask`,
                each (batch, seq) int64, right-padded.
            num_items_in_batch: Scored tokens (labelled positions of `labels[:, 1:]`) of the optimizer
                step: all accumulated batches, summed over processes; a 0-dim int64 tensor or an int.
                None: counted here for this batch alone (still summed over processes).

        Returns:
            0-dim float tensor, detached: this batch's summed token losses (nats) over
            `num_items_in_batch`, times the process count (the Trainer averages it over processes).

        Changing it needs the parity tests, the DDP test and a planner re-measure (module docstring).
        """
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
        """The answer-token loss of one pass, in place of TRL 1.16's `SFTTrainer.compute_loss`.

        Follows transformers 5.23's `Trainer.compute_loss` with `model_accepts_loss_kwargs`: the model
        divides the summed loss by `num_items_in_batch`, and the result is multiplied by the process count
        when `average_tokens_across_devices` (DDP then averages the gradients back). TRL's own version
        (token accuracy, entropy, its fused head) is not run. Evaluation calls it too, without a count.

        Args:
            model: The model, whose forward `answer_loss.add_answer_loss` patched.
            inputs: `input_ids` and `labels` (batch, seq) int64, with `attention_mask` (batch, seq) or, for
                padding-free rows, `position_ids` (1, tokens).
            return_outputs: Also return the model's output (a CausalLMOutput with no logits, unless
                the LM head is adapted and the model's own forward ran).
            num_items_in_batch: As for `training_step`; None: the pass's own scored-token count.

        Returns:
            The 0-dim loss in nats per scored token (times the process count, see above), and the output
            when `return_outputs`.

        Changing it needs the parity tests, the DDP test and a planner re-measure (module docstring).
        """
        outputs = model(**inputs, answer_loss=True, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages; the token count spans all processes
        return (loss, outputs) if return_outputs else loss


def tokenized_split(run: RunDir, name: str, chat: ChatTokenizer, max_len: int) -> Dataset:
    """A prepared split rendered for training (`data.templating.render_for_training`).

    Args:
        run: The run directory.
        name: "train", "val" or "test".
        chat: The tokenizer and chat template.
        max_len: Tokens per sample at most (`data.max_seq_len`).

    Returns:
        A Dataset with `input_ids` and `labels` (lists of int of one length per row, labels -100 outside
        the answers and their end-of-turn tokens); empty, with both columns, for an empty split.

    Raises:
        StageError: the split file is missing, or a record does not render (named by id and source).
    """
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
