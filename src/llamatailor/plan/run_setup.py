"""The planner's view of a run file: the same method, shapes and settings the train stage will use."""

import json

import psutil
import torch

from llamatailor.config import RunConfig
from llamatailor.errors import ModelLoadError
from llamatailor.models.loading import resolve_precision
from llamatailor.models.source import resolve_source
from llamatailor.plan.architectures import Architecture, load_architecture
from llamatailor.plan.memory import GIB, TARGET_PRESETS, Setup, estimate
from llamatailor.train.arguments import micro_batch_tokens, use_gradient_checkpointing


def setup_from_config(config: RunConfig, arch: Architecture, seq_len: int | None = None) -> Setup:
    train = config.train
    targets = train.lora.targets
    precision = resolve_precision(train.precision)
    seq_len = seq_len or config.data.max_seq_len
    budget = micro_batch_tokens(train)  # a batch over the budget runs as passes of fewer rows
    rows = train.batch_size if budget is None else max(1, min(train.batch_size, budget // seq_len))
    return Setup(
        method=train.method,
        seq_len=seq_len,
        micro_batch=rows,
        gradient_checkpointing=use_gradient_checkpointing(train),
        precision=precision,
        optimizer=train.optimizer,
        lora_r=train.lora.r,
        lora_targets=TARGET_PRESETS[targets] if isinstance(targets, str) else tuple(targets),
        lora_dropout=train.lora.dropout,
        dora=train.lora.dora,
        bits=train.quantization.bits,
        double_quant=train.quantization.double_quant,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )


def available_memory() -> int:
    """Bytes one training process may use: the GPU's memory, or the CPU's free RAM."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return psutil.virtual_memory().available


def planned_peak(config: RunConfig) -> int | None:
    """The planner's peak for this run at its longest prepared sample; None when the shape is unknown."""
    try:
        arch = load_architecture(resolve_source(config.model.base).location)
    except ModelLoadError:
        return None
    report = config.run_dir.data_report
    longest = (
        json.loads(report.read_text(encoding="utf-8"))["tokens"]["sft"]["train"].get("max")
        if report.is_file()
        else None
    )
    seq_len = min(longest or config.data.max_seq_len, config.data.max_seq_len)
    return estimate(arch, setup_from_config(config, arch, seq_len)).total


def fit_warning(peak: int | None, memory: int) -> str | None:
    if peak is None or peak <= memory:
        return None
    return (
        f"the planner puts this run's peak at {peak / GIB:.1f} GiB per device, more than the {memory / GIB:.1f} GiB "
        "available: it may run out of memory. `llamatailor plan RUN.yaml` shows the terms and what fits."
    )
