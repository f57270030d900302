"""Which process this is, under torchrun or accelerate: only the main one writes run-wide files."""

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every process of an initialised process group; nothing without one."""
    import torch  # here, not at the top: the CLI asks which process it is before anything loads torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
