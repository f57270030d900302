"""Checkpoints that can be trusted for resuming.

The trainer writes a checkpoint's files in place; a checkpoint counts as complete only once llamatailor
has written its marker after the trainer finished: the marker lists every file with its size (and, for
files up to 64 MiB, its SHA-256) and the settings the stage's computation depends on (`CheckpointKey`).
Resuming takes the newest complete checkpoint whose files still match its marker; a partial save (killed
mid-write, no marker) or a damaged file sends it to the one before. When that checkpoint was written under
other settings, resuming stops and names each difference: nothing is deleted.

Settings that change what is logged, evaluated, kept or tracked, the CPU threads, when early stopping
ends training, and whether activations are recomputed, never the weights a step produces, may differ on
resume (`RESUME_NEUTRAL_KEYS`).
"""

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llamatailor.config import RunConfig
from llamatailor.distributed import barrier, world_size
from llamatailor.rundir import remove_path, sha256_file, write_json

log = logging.getLogger(__name__)
MARKER = "llamatailor-checkpoint.json"
TRAINER_STATE = "trainer_state.json"  # transformers' name for the trainer's state in a checkpoint
HASHED_UP_TO_BYTES = 64 * 2**20

# Keys of a schedule (`train:` and `dpo:`, config.Schedule) that a resume may change: they decide what is
# logged, evaluated, kept or tracked, how many CPU threads torch uses, when early stopping ends training and
# which saved step can be chosen as the best, but not the weights any step produces. gradient_checkpointing
# recomputes the same activations (the RNG state is replayed for dropout): the adapter after 6 LoRA steps
# with dropout 0.1 was bitwise the same with it on and off (CPU, fp32).
RESUME_NEUTRAL_KEYS = (
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "threads",
    "trackers",
    "early_stopping_patience",
    "early_stopping_threshold",
    "gradient_checkpointing",
)
SCHEDULE_SECTIONS = ("train", "dpo")
# Sections a method never reads (model_setup): a change there cannot change the computation.
UNUSED_BY_METHOD = {
    "full": ("train.lora", "train.quantization"),
    "lora": ("train.quantization",),
    "qlora": (),
}
NOT_PRESENT = "(not present)"


@dataclass(frozen=True)
class CheckpointKey:
    """What a stage's checkpoints depend on, flat: {"train.learning_rate": 0.0002, ...,
    "data/train.jsonl (sha256)": "9f2c..."}; values as in the resolved config (JSON), a missing file as None."""

    settings: dict[str, Any] = field(default_factory=dict)

    def differences(self, recorded: Mapping[str, Any]) -> list[str]:
        """One line per setting that differs: "train.learning_rate: checkpoint 0.003, now 0.001"."""
        lines = []
        for name in sorted(recorded.keys() | self.settings.keys()):
            before, now = recorded.get(name, NOT_PRESENT), self.settings.get(name, NOT_PRESENT)
            if before != now:
                lines.append(f"{name}: checkpoint {_shown(before)}, now {_shown(now)}")
        return lines


def _shown(value: Any) -> str:
    return value if value == NOT_PRESENT else json.dumps(value)


def computation_key(config: RunConfig, parts: Iterable[str], files: Iterable[Path]) -> CheckpointKey:
    """The settings under `parts` of the resolved config (sections or dotted keys, e.g. "data.max_seq_len"),
    flattened to dotted keys, without RESUME_NEUTRAL_KEYS and the sections the method does not read; plus
    "<file> (sha256)" of each of `files` (None when it does not exist; named relative to the run directory
    when inside it) and the number of processes. A stage passes its declared reads (`STAGE.config_keys`,
    `STAGE.inputs`), so what invalidates its checkpoints is the rule that reruns it."""
    resolved = config.resolved()
    skipped = {f"{section}.{key}" for section in SCHEDULE_SECTIONS for key in RESUME_NEUTRAL_KEYS}
    skipped.update(UNUSED_BY_METHOD[config.train.method])
    settings: dict[str, Any] = {}
    for part in parts:
        node: Any = resolved
        for name in part.split("."):
            node = node[name]
        _flatten(part, node, skipped, settings)
    root = config.run_dir.root.resolve()
    for path in files:
        label = path.resolve().relative_to(root) if path.resolve().is_relative_to(root) else path
        settings[f"{label} (sha256)"] = sha256_file(path) if path.is_file() else None
    # Not in the run file, but it sets the global batch and the RNG states (one per process).
    settings["processes"] = world_size()
    return CheckpointKey(settings)


def _flatten(name: str, node: Any, skipped: set[str], into: dict[str, Any]) -> None:
    if name in skipped:
        return
    if isinstance(node, dict):
        for key, child in node.items():
            _flatten(f"{name}.{key}", child, skipped, into)
    else:
        into[name] = node


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes": size, "sha256": digest (files up to HASHED_UP_TO_BYTES)}}, marker left out."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER):
        size = path.stat().st_size
        entry: dict[str, Any] = {"bytes": size}
        if size <= HASHED_UP_TO_BYTES:
            entry["sha256"] = sha256_file(path)
        files[str(path.relative_to(folder))] = entry
    return files


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's marker ({"settings", "step", "files"}), or None where the save never finished."""
    marker = folder / MARKER
    return json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint is not complete (no marker, or files changed since it), or None when it is."""
    recorded = read_marker(folder)
    if recorded is None:
        return "no completeness marker (the save did not finish)"
    if describe_files(folder) != recorded["files"]:
        return "its files no longer match what was written (damaged or changed)"
    return None


def step_of(folder: Path) -> int:
    """The step of a `checkpoint-<step>` folder."""
    return int(folder.name.rsplit("-", 1)[1])


def training_finished(folder: Path, patience: int | None) -> bool:
    """Whether the checkpoint was saved where training ended: at max_steps, or where early stopping ended it
    and would end it again with the `patience` asked for now (None: early stopping off). Read from the
    checkpoint's trainer_state.json (transformers' TrainerState, with its callbacks' states)."""
    path = folder / TRAINER_STATE
    if not path.is_file():
        return False
    state = json.loads(path.read_text(encoding="utf-8"))
    if 0 < state.get("max_steps", 0) <= state.get("global_step", 0):
        return True
    callbacks = state.get("stateful_callbacks", {})
    stopped = callbacks.get("TrainerControl", {}).get("args", {}).get("should_training_stop", False)
    early = callbacks.get("EarlyStoppingCallback", {}).get("attributes", {})
    return (
        bool(stopped) and patience is not None and early.get("early_stopping_patience_counter", 0) >= patience
    )


def checkpoint_folders(checkpoints: Path) -> list[Path]:
    """The `checkpoint-<step>` folders, newest first."""
    if not checkpoints.is_dir():
        return []
    return sorted(checkpoints.glob("checkpoint-*"), key=step_of, reverse=True)


def newest_complete(checkpoints: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint (whatever its settings), and why each newer one was passed over."""
    skipped: list[str] = []
    for folder in checkpoint_folders(checkpoints):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append(f"{folder.name}: {problem}")
    return None, skipped


def settings_differences(folder: Path, key: CheckpointKey) -> list[str]:
    """How the settings recorded in a complete checkpoint's marker differ from `key` (empty: they match)."""
    recorded = read_marker(folder) or {}
    if "settings" not in recorded:  # markers from before settings were recorded
        return ["settings: not recorded (written by an earlier llamatailor)"]
    return key.differences(recorded["settings"])


def resumable_checkpoint(checkpoints: Path, key: CheckpointKey) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint if it was written under `key`'s settings, and why each newer one was
    passed over (None when there is no complete one, or when the newest complete one has other settings)."""
    found, skipped = newest_complete(checkpoints)
    if found is not None and settings_differences(found, key):
        return None, [*skipped, f"{found.name}: written under other settings"]
    return found, skipped


def drop_checkpoints_after(checkpoints: Path, step: int) -> None:
    """Newer checkpoints than the one resumed from are not trustworthy: remove them before training on."""
    for folder in checkpoints.glob("checkpoint-*"):
        if step_of(folder) > step:
            log.warning(
                "Deleting %s: newer than the checkpoint resumed from, and training writes it again", folder
            )
            remove_path(folder)


class CheckpointMarker(TrainerCallback):
    """Writes a checkpoint's marker once the trainer has saved all of it (on every process's return)."""

    def __init__(self, key: CheckpointKey) -> None:
        self.key = key

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        barrier()  # every process has written its part (RNG states are per process)
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json(
                folder / MARKER,
                {"settings": self.key.settings, "step": state.global_step, "files": describe_files(folder)},
            )
        barrier()
