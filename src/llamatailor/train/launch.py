"""Several training processes on one machine: `--nproc N` starts N copies of the same command under
torchrun (DDP over NCCL on GPUs, gloo on CPU) and waits for them.

On CPU, `accelerate launch --cpu --num_processes N` silently runs one process and FSDP silently turns into
DDP; torchrun runs real DDP, and `check_launch` refuses FSDP and DeepSpeed where they cannot work.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

from llamatailor.errors import StageError


def torchrun_command(
    verb: str, config: Path, overrides: list[str], nproc: int, resume: bool, fresh: bool = False
) -> list[str]:
    """The torchrun command line that runs `llamatailor VERB` in `nproc` processes, with --resume or --fresh
    passed on (each process decides where training starts; the main one alone deletes)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    start = [*(["--resume"] if resume else []), *(["--fresh"] if fresh else [])]
    return [*launcher, "-m", "llamatailor", verb, str(config), *overrides, *start]


def launch_distributed(
    verb: str, config: Path, overrides: list[str], nproc: int, resume: bool, fresh: bool = False
) -> int:
    """Run `llamatailor VERB` under torchrun in `nproc` processes and wait; returns torchrun's exit status.
    Raises StageError when more processes than GPUs are asked for."""
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise StageError(
            f"--nproc {nproc} asks for more processes than the {torch.cuda.device_count()} GPUs here"
        )
    command = torchrun_command(verb, config, overrides, nproc, resume, fresh)
    return subprocess.run(command, check=False).returncode


def check_launch() -> None:
    """Refuse launches that would silently do something else than asked."""
    if torch.cuda.is_available():
        return
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "").lower() == "true":
            raise StageError(
                f"{name} needs CUDA GPUs; on CPU it would silently run as plain data parallelism. "
                "On CPU, use `llamatailor train RUN.yaml --nproc N` (torchrun, DDP)."
            )
