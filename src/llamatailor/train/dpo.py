"""The `dpo` stage: direct preference optimisation that continues the SFT adapter on data/preference/.

The reference policy is the SFT model itself: the SFT adapter is loaded as the trainable adapter, and
TRL's DPOTrainer keeps a frozen copy of it (named "ref") for the reference log-probabilities. The result is
one adapter, in `dpo/adapter/`, loadable like the SFT one.
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
from llamatailor.models.loading import (
    ChatTokenizer,
    Precision,
    load_base_model,
    load_saved_tokenizer,
    resolve_precision,
    torch_dtype,
)
from llamatailor.rundir import RunDir, read_jsonl
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
    run, dpo = config.run_dir, config.dpo
    check_launch()
    sft = run.trained
    if not (sft / "adapter_config.json").is_file():
        raise StageError(
            f"DPO continues an SFT adapter, and {sft} has none: run `llamatailor train` first "
            "(DPO after full fine-tuning is not supported)"
        )
    if dpo.threads:
        torch.set_num_threads(dpo.threads)
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


def dpo_checkpoint_key(config: RunConfig) -> CheckpointKey:
    """What DPO checkpoints depend on: the seed, the model, data.max_seq_len, train.method (and
    train.quantization for qlora: the base is loaded as SFT's was), the dpo section (less the resume-neutral
    keys), and by hash the preference splits and every file of the SFT adapter folder (weights, adapter
    config, the tokenizer and template DPO trains with). The rest of `train` reaches DPO through those files."""
    run = config.run_dir
    splits = [run.preference_split(name) for name in ("train", "val")]
    sft = sorted(path for path in run.trained.iterdir() if path.is_file()) if run.trained.is_dir() else []
    files = {str(path.relative_to(run.root)): path for path in [*splits, *sft]}
    parts = ("seed", "model", "data.max_seq_len", "train.method", "train.quantization", "dpo")
    return computation_key(config, parts, files)


def policy_with_reference(config: RunConfig, sft: Path, precision: Precision) -> PeftModel:
    """The base with the SFT adapter, trainable (DPOTrainer adds its frozen "ref" copy)."""
    dtype = torch.float32 if precision == "fp32" else torch_dtype(precision)
    if config.train.method == "qlora":
        base = quantized_base(config, precision)
    else:
        base = load_base_model(config.model, dtype)
    return PeftModel.from_pretrained(base, sft, is_trainable=True)


def preference_split(run: RunDir, name: str) -> Dataset:
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
    run, dpo = config.run_dir, config.dpo
    train_set = preference_split(run, "train")
    if len(train_set) == 0:
        raise StageError(
            f"{run.preference_split('train')} has no preference pairs: see {run.data / 'report.md'}"
        )
    val_set = preference_split(run, "val")
    arguments = trainer_arguments(
        dpo, "dpo", run.dpo / "checkpoints", precision, len(val_set) > 0, config.seed
    )
    args = DPOConfig(
        **arguments, beta=dpo.beta, loss_type=[dpo.loss_type], max_length=config.data.max_seq_len
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
