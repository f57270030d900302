"""Checkpoints that can be trusted for resuming.

The trainer writes a checkpoint's files in place; a checkpoint counts as complete only once llamatailor
has written its marker after the trainer finished: the marker lists every file with its size (and, for
files up to 64 MiB, its SHA-256) and the key of the configuration that produced it. Resuming takes the
newest checkpoint whose marker matches this configuration and whose files still match the marker; a
partial save (killed mid-write) or a damaged file sends it to the one before.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llamatailor.distributed import barrier
from llamatailor.rundir import remove_path, sha256_file, write_json

MARKER = "llamatailor-checkpoint.json"
HASHED_UP_TO_BYTES = 64 * 2**20


def checkpoint_key(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER):
        size = path.stat().st_size
        entry: dict[str, Any] = {"bytes": size}
        if size <= HASHED_UP_TO_BYTES:
            entry["sha256"] = sha256_file(path)
        files[str(path.relative_to(folder))] = entry
    return files


def checkpoint_problem(folder: Path, key: str) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when it can."""
    marker = folder / MARKER
    if not marker.is_file():
        return "no completeness marker (the save did not finish)"
    recorded = json.loads(marker.read_text(encoding="utf-8"))
    if recorded.get("key") != key:
        return "written by a different configuration or data"
    if describe_files(folder) != recorded["files"]:
        return "its files no longer match what was written (damaged or changed)"
    return None


def step_of(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[1])


def resumable_checkpoint(checkpoints: Path, key: str) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint of this configuration, and why each newer one was passed over."""
    skipped = []
    folders = (
        sorted(checkpoints.glob("checkpoint-*"), key=step_of, reverse=True) if checkpoints.is_dir() else []
    )
    for folder in folders:
        problem = checkpoint_problem(folder, key)
        if problem is None:
            return folder, skipped
        skipped.append(f"{folder.name}: {problem}")
    return None, skipped


def drop_checkpoints_after(checkpoints: Path, step: int) -> None:
    """Newer checkpoints than the one resumed from are not trustworthy: remove them before training on."""
    for folder in checkpoints.glob("checkpoint-*"):
        if step_of(folder) > step:
            remove_path(folder)


class CheckpointMarker(TrainerCallback):
    """Writes a checkpoint's marker once the trainer has saved all of it (on every process's return)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        barrier()  # every process has written its part (RNG states are per process)
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json(
                folder / MARKER, {"key": self.key, "step": state.global_step, "files": describe_files(folder)}
            )
        barrier()
