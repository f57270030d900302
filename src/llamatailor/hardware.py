"""Settings resolved from the machine a run is on: the compute precision, gradient checkpointing, the
micro-batch token budget, the memory one process may use, and the answer loss's chunk size.

The planner (`plan`) and the trainer (`train`) both resolve a run's settings here, so what is planned is
what runs. Ground floor: it imports only `vocabulary` from llamatailor.
"""

import logging

import psutil
import torch

from llamatailor.vocabulary import AUTO, BF16, FP16, FP32, Auto, Precision, PrecisionSetting

log = logging.getLogger(__name__)

CPU_MICRO_BATCH_TOKENS = 2048
CHUNK_ELEMENTS = 1 << 24  # logits per chunk of the answer loss: 16M fp32 values, 64 MiB
MIN_CHUNK_ROWS = 16


def resolve_precision(requested: PrecisionSetting) -> Precision:
    """The compute dtype for a run file's `precision`: auto is bf16 where the GPU has it, fp16 on older
    GPUs, fp32 on CPU (bf16 matmul on CPU is ~250x slower). An explicit choice is kept; on CPU anything but
    fp32 is logged as slow."""
    if requested != AUTO:
        if requested != FP32 and not torch.cuda.is_available():
            log.warning("precision %s on CPU is very slow; fp32 is recommended there", requested)
        return requested
    if not torch.cuda.is_available():
        return FP32
    return BF16 if torch.cuda.is_bf16_supported() else FP16


def use_gradient_checkpointing(setting: Auto | bool) -> bool:
    """auto: on for GPUs (it trades a second forward per layer for memory), off on CPU, where it is pure
    cost."""
    if setting == AUTO:
        return torch.cuda.is_available()
    return bool(setting)


def micro_batch_tokens(setting: Auto | int | None) -> int | None:
    """Padded tokens per forward pass (None: a batch runs whole); auto: 2,048 on CPU (activation memory,
    not speed, grows with it there), no split on GPUs."""
    if setting == AUTO:
        return None if torch.cuda.is_available() else CPU_MICRO_BATCH_TOKENS
    return setting


def available_memory() -> int:
    """Bytes one training process may use: the first GPU's memory, or the CPU's available RAM."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return psutil.virtual_memory().available


def chunk_rows(vocab_size: int) -> int:
    """Rows of the answer loss's chunks: CHUNK_ELEMENTS logits each, at least MIN_CHUNK_ROWS rows."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab_size)
