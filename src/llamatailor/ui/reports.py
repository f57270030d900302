"""What the Data and Export pages show of a run: data/report.json and the rejected records of
data/rejected.jsonl (paged, filtered), and gguf/export_report.json with every gate's value, limit and verdict,
the Modelfile and merged/merge_report.json. Every file is opened through `RunsFolder.file` (inside the runs
folder only)."""

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard, cast

import yaml

from llamatailor.export.gates import Gate, file_gates, lora_gates, merge_gates
from llamatailor.export.gguf_gates import gate_for
from llamatailor.ui.paths import OutsideRunsFolder, RunsFolder
from llamatailor.vocabulary import GgufType

PER_PAGE = 50  # rejected records per page
NOT_JSON = "not JSON"  # the kind shown for a rejected.jsonl line that is not a JSON object


def run_file(runs: RunsFolder, name: str, path: Path) -> Path | None:
    """`path` (a RunDir path of run `name`) when it is a file inside the runs folder, else None (missing, or
    a symlink leading out). Raises OutsideRunsFolder when `name` is not a run's."""
    run = runs.run(name)
    try:
        return runs.file(name, path.relative_to(run.root).as_posix())
    except OutsideRunsFolder:
        return None


# The containers each report's pages walk: a dotted key -> its type, then its values' type, and so on.
Shapes = Mapping[str, tuple[type, ...]]
DATA_SHAPES: Shapes = {
    "inputs": (list, dict),
    "read": (dict,),
    "rejected": (dict, dict),
    "cleaned": (dict,),
    "pii": (dict,),
    "pii.records": (dict,),
    "pii.findings": (dict,),
    "kept_by_policy": (dict,),
    "dedup": (dict,),
    "dedup.removed": (dict,),
    "splits": (dict, dict),
    "tokens": (dict, dict, dict),
    "truncated": (dict, dict),
}
EXPORT_SHAPES: Shapes = {"files": (list, dict), "failures": (list,), "lora": (dict,)}
MERGE_SHAPES: Shapes = {}


def shape_problem(report: Mapping[str, Any], shapes: Shapes, file: str) -> str | None:
    """What in `report` is not the container `shapes` says (absent keys are fine), naming `file` and the
    field; None when all are."""
    for key, types in shapes.items():
        parent, _, leaf = key.rpartition(".")
        holder = report.get(parent) if parent else report
        value = holder.get(leaf) if isinstance(holder, dict) else None
        values = [value] if value is not None else []
        for depth, kind in enumerate(types):
            if any(not isinstance(item, kind) for item in values):
                where = key + ".*" * depth
                return f"{file}: {where} is not a JSON {'array' if kind is list else 'object'}"
            values = [item for v in values for item in (v.values() if isinstance(v, dict) else v)]
    return None


def read_report(path: Path | None, missing: str, shapes: Shapes) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON report as (content, None), or (None, why not): `missing` when there is no file, the parser's
    message naming the file, line and column, or the field that is not the container `shapes` says."""
    if path is None:
        return None, missing
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{path.name}: cannot be read ({exc})"
    except ValueError as exc:
        return None, f"{path.name}: not valid JSON ({exc})"
    if not isinstance(value, dict):
        return None, f"{path.name}: a JSON {type(value).__name__} where an object was expected"
    problem = shape_problem(value, shapes, path.name)
    return (None, problem) if problem else (value, None)


# --- the Data page ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRow:
    """One output split of one sample kind: samples, token length statistics (tokens), truncated samples."""

    kind: str
    split: str
    samples: Any
    stats: dict[str, Any]
    truncated: Any


def token_rows(report: Mapping[str, Any]) -> list[TokenRow]:
    """The report's `tokens` per sample kind and split, with `splits` and `truncated` beside; a kind with no
    sample in any split (preference data without preference inputs) is left out."""
    rows = []
    splits, truncated = report.get("splits") or {}, report.get("truncated") or {}
    for kind, per_split in (report.get("tokens") or {}).items():
        if not any((stats or {}).get("count") for stats in per_split.values()):
            continue
        for split, stats in per_split.items():
            samples = (splits.get(kind) or {}).get(split, (stats or {}).get("count"))
            rows.append(TokenRow(kind, split, samples, stats or {}, (truncated.get(kind) or {}).get(split)))
    return rows


@dataclass(frozen=True)
class Rejection:
    """One line of rejected.jsonl (`number`, 1-based): the input `file` and `line` the record came from, the
    kind of rejection, the field, the reason, and the record as JSON text. A line that is not a JSON object
    has kind NOT_JSON and its text as `record`."""

    number: int
    file: str
    line: str
    kind: str
    field: str
    reason: str
    record: str


@dataclass(frozen=True)
class RejectionPage:
    """The page `page` (1-based, of `pages`) of the rejections matching the filter (`total` of them), and how
    many lines of each kind the whole file holds."""

    rows: list[Rejection]
    total: int
    page: int
    pages: int
    kinds: dict[str, int] = field(default_factory=dict)


def parse_rejection(number: int, text: str) -> Rejection:
    """Line `number` of rejected.jsonl as data/prepare.py writes it: {source: "FILE:LINE", kind, field,
    reason, record}."""
    try:
        row = json.loads(text)
    except ValueError as exc:
        return Rejection(number, "", "", NOT_JSON, "", f"line {number} of rejected.jsonl: {exc}", text)
    if not isinstance(row, dict):
        return Rejection(
            number, "", "", NOT_JSON, "", f"line {number} of rejected.jsonl: not an object", text
        )
    file, _, line = str(row.get("source", "")).rpartition(":")
    if not line.isdigit():  # a source without a line number
        file, line = str(row.get("source", "")), ""
    record = json.dumps(row.get("record"), ensure_ascii=False, indent=1)
    kind, where = str(row.get("kind", "")), str(row.get("field") or "")
    return Rejection(number, file, line, kind, where, str(row.get("reason", "")), record)


def read_rejections(path: Path, kind: str = "", text: str = "", page: int = 1) -> RejectionPage:
    """The rejections of `path` whose kind is `kind` (any when empty) and whose reason, file or record holds
    `text` (case-insensitive), PER_PAGE a page; `page` is clamped to the pages there are. Reads the file
    line by line, keeping only the rows of that page."""
    kinds: Counter[str] = Counter()
    rows: list[Rejection] = []
    total, first = 0, (max(page, 1) - 1) * PER_PAGE
    wanted = text.casefold()
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            row = parse_rejection(number, line.rstrip("\n"))
            kinds[row.kind] += 1
            if kind and row.kind != kind:
                continue
            if wanted and not any(wanted in part.casefold() for part in (row.reason, row.file, row.record)):
                continue
            if first <= total < first + PER_PAGE:
                rows.append(row)
            total += 1
    pages = max(1, math.ceil(total / PER_PAGE))
    if page > pages:  # past the end: show the last page
        return read_rejections(path, kind, text, pages)
    return RejectionPage(rows, total, max(page, 1), pages, dict(sorted(kinds.items())))


@dataclass
class DataPage:
    """What the Data page shows: data/report.json (`problem` says why there is none), its token rows, whether
    data/lengths.png and data/rejected.jsonl are there, and the page of rejections asked for."""

    report: dict[str, Any] | None
    problem: str | None
    tokens: list[TokenRow] = field(default_factory=list)
    histogram: str | None = None
    rejections: RejectionPage | None = None


def load_data(runs: RunsFolder, name: str, kind: str = "", text: str = "", page: int = 1) -> DataPage:
    """Run `name`'s data report and the page `page` of its rejected records of `kind` holding `text`
    (read_rejections). Raises OutsideRunsFolder when `name` is not a run's."""
    run = runs.run(name)
    report, problem = read_report(
        run_file(runs, name, run.data_report),
        "No data/report.json: run `llamatailor prepare` first.",
        DATA_SHAPES,
    )
    data = DataPage(report, problem, token_rows(report) if report else [])
    histogram = run.data / "lengths.png"
    if run_file(runs, name, histogram):
        data.histogram = histogram.relative_to(run.root).as_posix()
    rejected = run_file(runs, name, run.rejected)
    if rejected is not None:
        data.rejections = read_rejections(rejected, kind, text, page)
    return data


# --- the Export page -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufRow:
    """One checked GGUF file (`label`: its type, or the base type with the adapter applied) with its
    FileCheck numbers (`check`, export_report.json's dict), its gates and its recorded failures."""

    label: str
    file: str
    check: dict[str, Any]
    gates: list[Gate]

    @property
    def passed(self) -> bool:
        """Every gate passes on the recorded numbers and the report records no failure for the file."""
        return all(gate.passed for gate in self.gates) and not self.check.get("failures")


def gguf_gates(check: Mapping[str, Any], overrides: Mapping[str, float]) -> list[Gate]:
    """export.gates.file_gates of one file, against its recorded `gate_pct`, else gguf_gates.gate_for with
    the run file's export.gates `overrides` (None for an unknown type: the gate then fails)."""
    limit = check.get("gate_pct")
    if limit is None:
        try:
            limit = gate_for(
                cast(GgufType, check.get("gguf_type")), cast(Mapping[GgufType, float], overrides)
            )
        except KeyError:
            limit = None
    return file_gates(check, limit)


def _measured(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class ExportPage:
    """What the Export page shows; `problem` says why there is no export report."""

    report: dict[str, Any] | None
    problem: str | None
    files: list[GgufRow] = field(default_factory=list)
    lora: dict[str, Any] | None = None
    lora_gates: list[Gate] = field(default_factory=list)
    modelfile: str | None = None
    merge: dict[str, Any] | None = None
    merge_problem: str | None = None
    merge_gates: list[Gate] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    @property
    def failing_gates(self) -> int:
        """Gates that fail on the report's numbers (of every file and the LoRA GGUF)."""
        gates = [gate for row in self.files for gate in row.gates] + self.lora_gates
        return sum(not gate.passed for gate in gates)


def load_export(runs: RunsFolder, name: str) -> ExportPage:
    """Run `name`'s gguf/export_report.json with the gates of each file (and of the LoRA GGUF), the Modelfile
    and merged/merge_report.json, each when present. Raises OutsideRunsFolder when `name` is not a run's."""
    run = runs.run(name)
    wanted = (run.gguf / "export_report.json", run.gguf / "Modelfile", run.merged / "merge_report.json")
    report_path, modelfile, merge_path = (run_file(runs, name, path) for path in wanted)
    page = ExportPage(
        *read_report(report_path, "No gguf/export_report.json: run export first.", EXPORT_SHAPES)
    )
    if modelfile is not None:
        page.modelfile = modelfile.read_text(encoding="utf-8", errors="replace")
    if merge_path is not None:
        page.merge, page.merge_problem = read_report(merge_path, "", MERGE_SHAPES)
        page.merge_gates = merge_gates(page.merge) if page.merge is not None else []
    found = (report_path, modelfile, merge_path)
    page.links = [path.relative_to(run.root).as_posix() for path, at in zip(wanted, found, strict=True) if at]
    if page.report is None:
        return page
    overrides = _gate_overrides(run_file(runs, name, run.config))
    for check in page.report.get("files") or []:
        page.files.append(
            GgufRow(str(check.get("gguf_type")), _base(check), check, gguf_gates(check, overrides))
        )
    lora = page.report.get("lora")
    if isinstance(lora, dict):
        page.lora, page.lora_gates = lora, lora_gates(lora)
        check = lora.get("file_check")
        if isinstance(check, dict):
            label = f"{check.get('gguf_type')} + {Path(str(lora.get('adapter'))).name}"
            page.files.append(GgufRow(label, _base(check), check, gguf_gates(check, overrides)))
    return page


def _base(check: Mapping[str, Any]) -> str:
    return Path(str(check.get("path", ""))).name


def _gate_overrides(config: Path | None) -> dict[str, float]:
    """The run file's export.gates (GGUF type -> percent), {} when config.yaml is missing or unreadable."""
    if config is None:
        return {}
    try:
        resolved = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    export = resolved.get("export") if isinstance(resolved, dict) else None
    gates = export.get("gates") if isinstance(export, dict) else None
    return {str(k): float(v) for k, v in gates.items() if _measured(v)} if isinstance(gates, dict) else {}
