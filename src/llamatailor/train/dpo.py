"""The `dpo` stage: direct preference optimisation that continues the SFT adapter on data/preference/.

The reference policy is the SFT model itself: the SFT adapter is loaded as the trainable adapter, and
TRL's DPOTrainer keeps a frozen copy of it (named "ref") for the reference log-probabilities. The result is
one adapter, in `dpo/adapter/`, loadable like the SFT one.

The loss path is TRL 1.16's own `DPOTrainer.compute_loss` (no hook is overridden here): per pair, the
log-probabilities of the chosen and rejected answers summed over their tokens, under the policy and the
"ref" adapter, and for the default `dpo.loss_type: sigmoid` the loss
-log sigmoid(beta x ((chosen - ref chosen) - (rejected - ref rejected))) in nats, averaged over pairs
(Rafailov et al. 2023). The step around it is transformers' Trainer loop, as in train/sft.py (without
the answer-loss and micro-batch hooks). Moving to another TRL version needs tests/test_dpo.py and the
LoRA-then-DPO rows of tests/test_fidelity_matrix.py.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import set_seed
from trl import DPOConfig, DPOTrainer

from llamatailor.config import RunConfig
from llamatailor.errors import StageError
from llamatailor.hardware import resolve_precision, torch_threads
from llamatailor.models.loading import (
    ChatTokenizer,
    load_base_model,
    load_saved_tokenizer,
    torch_dtype,
)
from llamatailor.rundir import RunDir, read_jsonl
from llamatailor.stage_contract import Stage, files_in
from llamatailor.train.arguments import trainer_arguments
from llamatailor.train.checkpoints import CheckpointKey, computation_key, step_of
from llamatailor.train.launch import check_launch
from llamatailor.train.model_setup import quantized_base
from llamatailor.train.session import (
    run_trainer,
    save_trained,
    stage_callbacks,
    starting_checkpoint,
    with_compact_progress,
)
from llamatailor.vocabulary import FP32, TRAIN_SPLIT, VAL_SPLIT, Precision

REFERENCE = "ref"  # the name DPOTrainer gives its frozen copy of the adapter


@dataclass(frozen=True)
class DpoResult:
    output: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None
    first_margin: float | None
    last_margin: float | None
    seconds: float
    precision: Precision
    resumed_from: str | None
    warnings: list[str]


def train_dpo(config: RunConfig, resume: bool = False, fresh: bool = False) -> DpoResult:
    """Run the `dpo` stage: DPO (Rafailov et al. 2023) with TRL's DPOTrainer, from the SFT adapter.

    Args:
        config: The resolved run file; reads `seed`, `model`, `data.max_seq_len`, `train.method`,
            `train.quantization` and `dpo`.
        resume: Continue from the newest complete checkpoint in dpo/checkpoints/.
        fresh: Delete dpo/checkpoints/ first and start at step 0 (excludes `resume`).

    Returns:
        DpoResult: dpo/adapter/, steps, first/last train loss and best val loss (nats per pair), the
        first and last logged reward margin (beta x the chosen-minus-rejected log-ratio, nats), wall time
        in seconds, the precision, the checkpoint resumed from, and warnings.

    Raises:
        StageError: no SFT adapter (training missing, or full fine-tuning); FSDP/DeepSpeed asked for on
            CPU; checkpoints exist and neither `resume` nor `fresh`, or other settings; the preference
            split is missing or empty; an optimizer or tracker this machine lacks.
        ModelLoadError: the base model or the saved tokenizer cannot be loaded.
        TrainingDiverged: the loss or the weights became NaN/inf (the last good checkpoint is kept).
        ValueError: both `resume` and `fresh`.
    """
    run, dpo = config.run_dir, config.dpo
    check_launch()
    sft = run.trained
    if not (sft / "adapter_config.json").is_file():
        raise StageError(
            f"DPO continues an SFT adapter, and {sft} has none: run `llamatailor train` first "
            "(DPO after full fine-tuning is not supported)"
        )
    torch.set_num_threads(torch_threads(dpo.threads))
    set_seed(config.seed)
    precision = resolve_precision(dpo.precision)
    chat = load_saved_tokenizer(sft, config.model)
    key = dpo_checkpoint_key(config)
    checkpoints = run.dpo / "checkpoints"
    resume_from = starting_checkpoint(checkpoints, key, resume, fresh)
    model = policy_with_reference(config, sft, precision)
    trainer = build_dpo_trainer(config, chat, model, precision, step_of(resume_from) if resume_from else None)
    outcome = run_trainer(trainer, "dpo", key, resume_from, run.dpo / "metrics.jsonl")
    model.delete_adapter(REFERENCE)
    output = run.dpo / "adapter"
    save_trained(trainer, chat, output, {"base": config.model.base, "method": f"{config.train.method}+dpo"})
    margins = [
        row["reward_margin"] for row in read_jsonl(run.dpo / "metrics.jsonl") if "reward_margin" in row
    ]
    return DpoResult(
        output=output,
        steps=outcome.steps,
        first_loss=outcome.first_loss,
        last_loss=outcome.last_loss,
        eval_loss=outcome.eval_loss,
        first_margin=margins[0] if margins else None,
        last_margin=margins[-1] if margins else None,
        seconds=outcome.seconds,
        precision=precision,
        resumed_from=outcome.resumed_from,
        warnings=outcome.warnings,
    )


STAGE = Stage(
    "dpo",
    # train.gradient_checkpointing: a qlora base is prepared for training as SFT's was
    config_keys=(
        "seed",
        "model",
        "data.max_seq_len",
        "train.method",
        "train.quantization",
        "train.gradient_checkpointing",
        "dpo",
    ),
    inputs=lambda config: [
        config.run_dir.preference_split(TRAIN_SPLIT),
        config.run_dir.preference_split(VAL_SPLIT),
        *files_in(config.run_dir.trained),
    ],
    outputs=lambda config: [
        config.run_dir.dpo / "adapter" / "adapter_model.safetensors",
        config.run_dir.dpo / "metrics.jsonl",
    ],
    action=train_dpo,
    enabled=lambda config: config.dpo.enabled,
    trains=True,
)


def dpo_checkpoint_key(config: RunConfig) -> CheckpointKey:
    """What DPO checkpoints depend on: the stage's declared config keys (less the resume-neutral ones) and
    input files (the preference splits and every file of the SFT adapter folder). The rest of `train`
    reaches DPO through those files."""
    return computation_key(config, STAGE.config_keys, STAGE.inputs(config))


def policy_with_reference(config: RunConfig, sft: Path, precision: Precision) -> PeftModel:
    """The base with the SFT adapter, trainable (DPOTrainer adds its frozen "ref" copy).

    Args:
        config: The run file; `train.method: qlora` loads the base quantized as SFT did.
        sft: The SFT adapter folder (PEFT format).
        precision: "fp32", "bf16" or "fp16": the dtype the unquantized base is loaded in.

    Returns:
        A PeftModel with the SFT adapter as its trainable default adapter.

    Raises:
        ModelLoadError: the base model cannot be loaded.
    """
    dtype = torch.float32 if precision == FP32 else torch_dtype(precision)
    if config.train.method == "qlora":
        base = quantized_base(config, precision)
    else:
        base = load_base_model(config.model, dtype)
    return PeftModel.from_pretrained(base, sft, is_trainable=True)


def preference_split(run: RunDir, name: str) -> Dataset:
    """A prepared preference split in TRL's conversational preference format.

    Args:
        run: The run directory.
        name: "train" or "val" (data/preference/NAME.jsonl).

    Returns:
        A Dataset with `prompt` (the messages, ending with a user turn), `chosen` and `rejected` (one
        assistant message each); empty, with those columns, for an empty file.

    Raises:
        StageError: the file does not exist (no preference data was prepared).
    """
    path = run.preference_split(name)
    if not path.is_file():
        raise StageError(f"{path} does not exist: give preference data to `prepare` (see docs/data.md)")
    rows = [
        {
            "prompt": record["prompt"],
            "chosen": [{"role": "assistant", "content": record["chosen"]}],
            "rejected": [{"role": "assistant", "content": record["rejected"]}],
        }
        for record in read_jsonl(path)
    ]
    return (
        Dataset.from_list(rows) if rows else Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    )


def build_dpo_trainer(
    config: RunConfig, chat: ChatTokenizer, model: PeftModel, precision: Precision, resumed_at: int | None
) -> DPOTrainer:
    """TRL's DPOTrainer over the preference splits, its loss unchanged (see the module docstring).

    Args:
        config: The resolved run file; `dpo.beta` and `dpo.loss_type` go to DPOConfig, and samples are
            cut at `data.max_seq_len` tokens (prompt and answer).
        chat: The tokenizer and chat template saved with the SFT adapter.
        model: From `policy_with_reference`; `ref_model=None` makes DPOTrainer use a frozen "ref" copy
            of the adapter.
        precision: "fp32", "bf16" or "fp16": the Trainer's mixed precision.
        resumed_at: The step resumed from (metrics.jsonl keeps its lines up to it); None from step 0.

    Returns:
        The DPOTrainer, with the run's callbacks and the compact progress bar.

    Raises:
        StageError: the train split is missing or empty, or an argument this machine cannot honour
            (see `arguments.trainer_arguments`).
    """
    run, dpo = config.run_dir, config.dpo
    train_set = preference_split(run, TRAIN_SPLIT)
    if len(train_set) == 0:
        raise StageError(
            f"{run.preference_split('train')} has no preference pairs: see {run.data / 'report.md'}"
        )
    val_set = preference_split(run, VAL_SPLIT)
    arguments = trainer_arguments(
        dpo, "dpo", run.dpo / "checkpoints", precision, len(val_set) > 0, config.seed
    )
    # No router load-balancing loss: Llama 4's own forward (and so SFT) has none, and TRL 1.16's would read
    # Mixtral's `num_experts`, which Llama 4's config lacks.
    args = DPOConfig(
        **arguments,
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        max_length=config.data.max_seq_len,
        router_aux_loss_coef=0.0,
    )
    callbacks = stage_callbacks(dpo, run.dpo / "metrics.jsonl", run.dpo / "tensorboard", resumed_at)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set if len(val_set) else None,
        processing_class=chat.tokenizer,
        callbacks=callbacks,
    )
    return with_compact_progress(trainer)
