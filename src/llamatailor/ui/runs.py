"""What the UI shows of a run, read from its run directory: the manifest's stages, headline numbers, and
metrics.jsonl lines from a byte offset (for live curves)."""

import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llamatailor.rundir import RunDir, excerpt, manifest_problems, stage_record_problem
from llamatailor.ui.pages import seconds

STAGE_NAMES = ("prepare", "train", "dpo", "eval", "merge", "export")  # pipeline.STAGES' names, in order
INTERRUPTED = "interrupted"  # recorded as running, but its process is gone
UNREADABLE = "unreadable"  # a run whose manifest.json or one of its stage records is malformed


@dataclass
class RunSummary:
    """One row of the runs page. Times in seconds; `headline` is eval's headline metric (base, tuned)."""

    name: str
    stages: dict[str, str]
    seconds: float
    created_at: str
    updated_at: str
    base_model: str
    method: str
    headline: str | None = None
    base_score: float | None = None
    tuned_score: float | None = None
    last_loss: float | None = None
    problems: list[str] = field(default_factory=list)
    manifest_malformed: bool = False  # manifest.json, or one of its stage records, is malformed (`problems`)

    @property
    def status(self) -> str:
        """running, unreadable (a malformed manifest or stage record: the stages it holds cannot be told,
        so the run is neither complete nor resumable), interrupted, failed, complete or new: the run's state
        in one word. A stage running still says running: its process owns the run."""
        states = set(self.stages.values())
        if "running" in states:
            return "running"
        if self.manifest_malformed:
            return UNREADABLE
        for state in (INTERRUPTED, "failed"):
            if state in states:
                return state
        return "complete" if states else "new"

    @property
    def delta(self) -> float | None:
        if self.base_score is None or self.tuned_score is None:
            return None
        return self.tuned_score - self.base_score


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (a run being written)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stage_state(record: dict[str, Any]) -> str:
    """A stage record's status; `running` becomes `interrupted` when its process (pid on this host, as
    `pipeline.run_stage` records) is not alive."""
    status = str(record.get("status", "unknown"))
    if status != "running":
        return status
    pid, host = record.get("pid"), record.get("host")
    if not isinstance(pid, int) or host != platform.node():
        return INTERRUPTED if pid is not None or host is not None else status
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return INTERRUPTED
    except PermissionError:
        pass  # alive, another user's
    return status


@dataclass
class ManifestView:
    """What a manifest.json holds, as far as it is well formed: its top-level fields, each stage's record
    (an object with a string status), and what is wrong with the rest (file and key named)."""

    fields: dict[str, Any]
    stages: dict[str, dict[str, Any]]
    problems: list[str]


def read_manifest(run: RunDir) -> ManifestView:
    """A run's manifest.json, read without trusting its shape: a file that is not JSON, not an object, or
    whose stage records are not objects with a status yields problems, never an exception; no manifest yet
    (a run just started) is no problem."""
    if not run.manifest.exists():
        return ManifestView({}, {}, [])
    try:
        manifest = json.loads(run.manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return ManifestView({}, {}, [f"manifest.json: not readable JSON ({exc})"])
    problems = [f"manifest.json: {problem}" for problem in manifest_problems(manifest)]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages", {}), dict):
        return ManifestView(manifest if isinstance(manifest, dict) else {}, {}, problems)
    stages = {n: r for n, r in manifest.get("stages", {}).items() if stage_record_problem(n, r) is None}
    return ManifestView(manifest, stages, problems)


def stage_rows(manifest: ManifestView) -> list[dict[str, str]]:
    """The run page's stage table, in pipeline order: name, state (see stage_state), started_at,
    finished_at, time (formatted) and error, each as text (the page's script rebuilds the table from these
    while the run goes on)."""
    rows = []
    for name in STAGE_NAMES:
        record = manifest.stages.get(name)
        if record is not None:
            rows.append(
                {
                    "name": name,
                    "state": stage_state(record),
                    "started_at": str(record.get("started_at", "")),
                    "finished_at": str(record.get("finished_at", "")),
                    "time": seconds(record.get("seconds")),
                    "error": str(record.get("error", "")),
                }
            )
    return rows


def summarize_run(run: RunDir, manifest: ManifestView | None = None) -> RunSummary:
    """The runs page's row for `run`: reads manifest.json, config.yaml and eval/metrics.json only; what is
    malformed in them goes to `problems` (the row still shows)."""
    manifest = manifest or read_manifest(run)
    config = _read_yaml(run.config)
    problems = list(manifest.problems)
    if run.config.is_file() and not isinstance(config, dict):
        problems.append("config.yaml: not a YAML mapping")
    config = config if isinstance(config, dict) else {}
    model, train = _mapping(config.get("model")), _mapping(config.get("train"))
    summary = RunSummary(
        name=run.root.name,
        stages={name: stage_state(manifest.stages[name]) for name in STAGE_NAMES if name in manifest.stages},
        seconds=sum(_number(record.get("seconds")) or 0.0 for record in manifest.stages.values()),
        created_at=str(manifest.fields.get("created_at", "")),
        updated_at=str(manifest.fields.get("updated_at", "")),
        base_model=str(model.get("base", "")),
        method=str(train.get("method", "")),
        problems=problems,
        manifest_malformed=bool(manifest.problems),
    )
    metrics = read_json(run.eval / "metrics.json")
    if isinstance(metrics, dict) and metrics.get("headline"):
        summary.headline = str(metrics["headline"])
        summary.base_score = _number(_mapping(metrics.get("base")).get(summary.headline))
        summary.tuned_score = _number(_mapping(metrics.get("tuned")).get(summary.headline))
    return summary


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# libyaml's loader: the runs page parses every run's config.yaml, and the pure-Python one takes 7x longer.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except (OSError, yaml.YAMLError):
        return None


@dataclass
class MetricsChunk:
    """metrics.jsonl lines from a byte offset: the parsed rows (numbers only), the offset and line number
    (1-based) to ask from next time, the line numbers of lines that were not JSON objects, and each value
    left out of its row because it is not a finite number ({line, key, value}: `value` as JSON, cut)."""

    rows: list[dict[str, Any]]
    offset: int
    line: int
    bad_lines: list[int]
    bad_values: list[dict[str, Any]] = field(default_factory=list)


def read_metrics(path: Path, offset: int = 0, first_line: int = 1) -> MetricsChunk:
    """Complete lines of `path` from byte `offset` on (a line still being written is left for the next call).

    A file shorter than `offset` was rewritten (a fresh training run): it is read again from the start, and
    the chunk's rows begin with {"reset": true} so a chart clears its points. Every value of a row is a
    finite number (the trainer writes nothing else): any other ("high", null, NaN) is left out and listed in
    `bad_values`, and a row whose step is not one is left out whole (a point needs its step).
    """
    try:
        size = path.stat().st_size
    except OSError:
        return MetricsChunk([], 0, 1, [])
    rows: list[dict[str, Any]] = []
    if size < offset:
        offset, first_line, rows = 0, 1, [{"reset": True}]
    with path.open("rb") as handle:
        handle.seek(offset)
        data = handle.read(size - offset)
    complete = data[: data.rfind(b"\n") + 1]
    chunk = MetricsChunk(rows, offset + len(complete), first_line, [])
    for number, line in enumerate(complete.splitlines(), start=first_line):
        chunk.line = number + 1
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            _add_row(chunk, number, row)
        elif line.strip():
            chunk.bad_lines.append(number)
    return chunk


def _add_row(chunk: MetricsChunk, number: int, row: dict[str, Any]) -> None:
    """Line `number`'s row into `chunk`: its finite numbers, the rest listed as bad values."""
    kept = {}
    for key, value in row.items():
        if _finite(value):
            kept[key] = value
        else:
            chunk.bad_values.append({"line": number, "key": key, "value": excerpt(value, 40)})
    if "step" in kept:
        chunk.rows.append(kept)


def _finite(value: Any) -> bool:
    # NaN and infinity are numbers to Python's json, but not to JSON: the answer could not carry them.
    return _number(value) is not None and math.isfinite(value)
