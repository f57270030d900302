"""The run directory: its fixed layout, atomic writes, and the manifest that records each stage.

Every artifact is written under a temporary name in its final folder and renamed into place, so a crash
never leaves a half-written file under its final name.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llamatailor.errors import StageError

MANIFEST_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (file or folder); rename it into place on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        replace_path(tmp, path)
    finally:
        remove_path(tmp)


def replace_path(source: Path, target: Path) -> None:
    """Move `source` to `target`, replacing a file or a whole folder that is there."""
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        target.rename(old)
        source.rename(target)
        shutil.rmtree(old)
    else:
        source.replace(target)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line; return the number of rows."""
    count = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (`<output_dir>/<name>`); the layout is a contract users rely on."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        return self.data / f"{name}.jsonl"

    def read_split(self, name: str) -> list[dict[str, Any]]:
        """Records of a prepared split; StageError if `prepare` has not written it."""
        path = self.split(name)
        if not path.is_file():
            raise StageError(f"{path} does not exist: run `llamatailor prepare` first")
        return read_jsonl(path)

    def preference_split(self, name: str) -> Path:
        return self.data / "preference" / f"{name}.jsonl"

    @property
    def rejected(self) -> Path:
        return self.data / "rejected.jsonl"

    @property
    def data_report(self) -> Path:
        return self.data / "report.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def model(self) -> Path:
        """A fully fine-tuned model (train.method full), in place of an adapter."""
        return self.root / "model"

    @property
    def trained(self) -> Path:
        """What SFT produced: the adapter, or the whole model for full fine-tuning."""
        return self.model if (self.model / "config.json").is_file() else self.adapter

    @property
    def dpo(self) -> Path:
        return self.root / "dpo"

    def final(self, dpo_enabled: bool) -> Path:
        """The model the later stages use: the DPO adapter when DPO is on, else what SFT produced."""
        return self.dpo / "adapter" if dpo_enabled else self.trained

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def gguf(self) -> Path:
        return self.root / "gguf"

    def gguf_file(self, name: str, gguf_type: str) -> Path:
        return self.gguf / f"{name}-{gguf_type}.gguf"

    def read_manifest(self) -> dict[str, Any]:
        """The run's manifest (an empty one before the first stage starts).

        Raises StageError naming the file and its fault when it is not a JSON object whose `stages` is an
        object of stage records (objects): a manifest cut short or edited by hand is never overwritten, since
        it is the run's only record of what each stage did.
        """
        if not self.manifest.exists():
            return {"manifest_version": MANIFEST_VERSION, "stages": {}}
        try:
            manifest = json.loads(self.manifest.read_bytes().decode("utf-8"))
        except json.JSONDecodeError as exc:
            raise self._unreadable_manifest(f"not valid JSON ({exc})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise self._unreadable_manifest(f"cannot be read ({exc})") from None
        if isinstance(manifest, dict):
            manifest.setdefault("stages", {})
        problems = manifest_problems(manifest)
        if problems:
            raise self._unreadable_manifest("; ".join(problems))
        return manifest

    def _unreadable_manifest(self, fault: str) -> StageError:
        return StageError(
            f"{self.manifest}: {fault}: it is this run's record of its stages, and llamatailor will not write "
            f"over it. Repair it, or move it away (mv {self.manifest} {self.manifest}.broken) to start the "
            "run's record over: every stage then counts as not run and runs again."
        )

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        manifest = self.read_manifest()
        manifest.update(fields)
        manifest["updated_at"] = now_iso()
        write_json(self.manifest, manifest)
        return manifest

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        return self.read_manifest()["stages"].get(stage)

    def set_stage_record(self, stage: str, record: dict[str, Any]) -> None:
        manifest = self.read_manifest()
        manifest["stages"][stage] = record
        manifest["updated_at"] = now_iso()
        write_json(self.manifest, manifest)

    def write_config(self, resolved: dict[str, Any]) -> None:
        write_text(self.config, yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))


def manifest_problems(manifest: Any) -> list[str]:
    """Every fault of a parsed manifest.json's shape, each worded after its key path ("stages.train.status is
    7, not a status word"); [] for an object whose `stages` (when present) is an object of stage records as
    `pipeline.run_stage` writes them: objects whose status is text. The one rule for the stages and the UI."""
    if not isinstance(manifest, dict):
        return [f"is a JSON {_json_type(manifest)}, not an object"]
    stages = manifest.get("stages", {})
    if not isinstance(stages, dict):
        return [f"stages is a JSON {_json_type(stages)}, not an object of stage records"]
    problems = [stage_record_problem(name, record) for name, record in stages.items()]
    return [problem for problem in problems if problem is not None]


def stage_record_problem(name: str, record: Any) -> str | None:
    """What is wrong with stage `name`'s record (None: an object whose status is text)."""
    if not isinstance(record, dict):
        return f"stages.{name} is {excerpt(record)}, not a stage record (an object with a status)"
    if "status" not in record:
        return f"stages.{name} has no status"
    if not isinstance(record["status"], str):
        return f"stages.{name}.status is {excerpt(record['status'])}, not a status word"
    return None


def excerpt(value: Any, limit: int = 60) -> str:
    """`value` as JSON, cut at `limit` characters: a message names a malformed value without quoting a whole
    section."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages about a file's shape."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
