"""Settings resolved from the machine a run is on: the compute precision, gradient checkpointing, the
micro-batch token budget, the memory one process may use, the CPUs and threads it may use, and the answer
loss's chunk size.

The planner (`plan`) and the trainer (`train`) both resolve a run's settings here, so what is planned is
what runs. Ground floor: it imports only `vocabulary`, `errors` and `cgroups` from llamatailor.
"""

import logging
import os

import psutil
import torch

from llamatailor.cgroups import cgroup_limits
from llamatailor.errors import ConfigError
from llamatailor.vocabulary import AUTO, BF16, FP16, FP32, Auto, Precision, PrecisionSetting

log = logging.getLogger(__name__)

CPU_MICRO_BATCH_TOKENS = 2048
CHUNK_ELEMENTS = 1 << 24  # logits per chunk of the answer loss: 16M fp32 values, 64 MiB
MIN_CHUNK_ROWS = 16
THREADS_ENV = "OMP_NUM_THREADS"


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
    """Bytes one training process may use: the first GPU's memory, or the CPU's available RAM, capped by
    what this process's cgroup memory limit leaves (a container's `--memory`)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    free = psutil.virtual_memory().available
    left = cgroup_limits().memory_left
    return free if left is None else min(free, left)


def usable_cpus() -> int:
    """CPUs this process may keep busy: its affinity mask (taskset, cpusets, Slurm) capped by its cgroup
    CPU quota rounded down (threads past a quota are throttled, not run); at least 1. `os.cpu_count()`
    counts the host's CPUs, of which a container may be given a few."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_limits().cpus
    return max(1, cpus if quota is None else min(cpus, int(quota)))


def cpu_threads() -> int:
    """Threads for llama.cpp's CPU compute (llama-server, the in-process GGUF engine, the quantizer):
    OMP_NUM_THREADS when set (the cap torch honours too; its first number where it lists nesting levels),
    else the usable CPUs capped at the physical cores, as llama.cpp counts by default (a core's second
    hardware thread adds nothing to its matrix work).

    Raises:
        ConfigError: OMP_NUM_THREADS is set but is not a positive whole number.
    """
    setting = os.environ.get(THREADS_ENV, "").strip()
    if setting:
        first = setting.split(",")[0].strip()
        if not first.isdigit() or int(first) == 0:
            raise ConfigError(f"{THREADS_ENV}={setting!r}: expected a positive whole number of threads")
        return int(first)
    usable = usable_cpus()
    return min(usable, psutil.cpu_count(logical=False) or usable)


def torch_threads(setting: int | None) -> int:
    """Threads torch computes with on CPU: the run file's `threads` when given, else torch's own choice
    (OMP_NUM_THREADS, or the physical cores) capped at the usable CPUs."""
    return setting or min(torch.get_num_threads(), usable_cpus())


def chunk_rows(vocab_size: int) -> int:
    """Rows of the answer loss's chunks: CHUNK_ELEMENTS logits each, at least MIN_CHUNK_ROWS rows."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab_size)
