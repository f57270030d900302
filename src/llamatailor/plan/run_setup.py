"""The planner's view of a run file: the same method, shapes and settings the train stage will use."""

import json

import torch

from llamatailor.config import RunConfig
from llamatailor.errors import ConfigError, ModelLoadError
from llamatailor.hardware import micro_batch_tokens, resolve_precision, use_gradient_checkpointing
from llamatailor.plan.architectures import Architecture, base_architecture
from llamatailor.plan.memory import GIB, Setup, estimate
from llamatailor.vocabulary import AUTO, EXPERTS, TRAIN_SPLIT


def setup_from_config(config: RunConfig, arch: Architecture, seq_len: int | None = None) -> Setup:
    """The planner's Setup for a run file's train section, resolved on this machine as `train` resolves it
    (`llamatailor.hardware`); `seq_len` defaults to data.max_seq_len. Raises ConfigError for an unknown
    LoRA target preset or optimizer. With `targets: experts` the routed experts' LoRA is planned at
    `train.lora.expert_r` (auto: `models.moe.expert_rank`'s rule); their weights as the trainer keeps them (compute dtype, also under QLoRA)."""
    train = config.train
    precision = resolve_precision(train.precision)
    seq_len = seq_len or config.data.max_seq_len
    budget = micro_batch_tokens(train.micro_batch_tokens)  # a batch over it runs as passes of fewer rows
    rows = train.batch_size if budget is None else max(1, min(train.batch_size, budget // seq_len))
    experts = train.lora.targets == EXPERTS and train.method != "full"
    if experts and not arch.experts:
        raise ConfigError(
            f"train.lora.targets: experts adapts a Mixture-of-Experts model's routed experts, but {arch.name} "
            "has none; use all-linear"
        )
    return Setup(
        method=train.method,
        seq_len=seq_len,
        micro_batch=rows,
        gradient_checkpointing=use_gradient_checkpointing(train.gradient_checkpointing),
        precision=precision,
        optimizer=train.optimizer,
        lora_r=train.lora.r,
        lora_targets=train.lora.linears(),
        lora_experts=experts,
        expert_r=None if train.lora.expert_r == AUTO else int(train.lora.expert_r),
        lora_dropout=train.lora.dropout,
        dora=train.lora.dora,
        bits=train.quantization.bits,
        double_quant=train.quantization.double_quant,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )


def planned_peak(config: RunConfig) -> int | None:
    """The planner's peak for this run at its longest prepared sample; None when the shape is unknown.

    Returns:
        Bytes per device (`estimate(...).total`), at the longest train sample of data/report.json
        (else `data.max_seq_len`) tokens; None when the base model's config.json cannot be found.

    Raises:
        ConfigError: the train section names a method, precision or optimizer the planner has no rule for.
    """
    try:
        arch = base_architecture(config.model.base)
    except ModelLoadError:
        return None
    report = config.run_dir.data_report
    longest = (
        json.loads(report.read_text(encoding="utf-8"))["tokens"]["sft"][TRAIN_SPLIT].get("max")
        if report.is_file()
        else None
    )
    seq_len = min(longest or config.data.max_seq_len, config.data.max_seq_len)
    return estimate(arch, setup_from_config(config, arch, seq_len)).total


def fit_warning(peak: int | None, memory: int) -> str | None:
    """A warning, in GiB, when the planned `peak` (bytes per device) exceeds `memory` (bytes); else None."""
    if peak is None or peak <= memory:
        return None
    return (
        f"the planner puts this run's peak at {peak / GIB:.1f} GiB per device, more than the {memory / GIB:.1f} GiB "
        "available: it may run out of memory. `llamatailor plan RUN.yaml` shows the terms and what fits."
    )
