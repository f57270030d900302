"""Read data files record by record, keeping each record's file and line for error messages."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamatailor.data.formats import FORMATS, Format, RecordError, detect_format
from llamatailor.errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".ndjson", ".json")
FORMAT_PROBE_RECORDS = 100


@dataclass(frozen=True)
class RawRecord:
    """One record as read: `value` is the parsed JSON, or `error` says why it could not be parsed."""

    path: Path
    line: int  # 1-based line for JSONL, 1-based position in the array for a JSON file
    value: Any = None
    error: RecordError | None = None
    raw: str = ""

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def read_records(path: Path) -> Iterator[RawRecord]:
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; expected {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.is_file():
        raise DataError(f"{path}: data file not found (working directory: {Path.cwd()})")
    if path.suffix.lower() == ".json":
        array = _json_array(path)
        if array is not None:
            yield from (RawRecord(path, index + 1, value=value) for index, value in enumerate(array))
            return
    yield from _jsonl(path)


def _json_array(path: Path) -> list[Any] | None:
    """The file's JSON array; None when the file is really JSON Lines (a common .json misnomer)."""
    try:
        value = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(value, list):
        return value
    raise DataError(
        f"{path}: expected a JSON array of records (or JSON Lines), found a {type(value).__name__}"
    )


def _jsonl(path: Path) -> Iterator[RawRecord]:
    with path.open("rb") as handle:
        for number, raw_line in enumerate(handle, start=1):
            if not raw_line.strip():
                continue
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                error = RecordError(
                    "", f"not valid UTF-8 (byte {exc.start}: {raw_line[exc.start : exc.start + 1]!r})"
                )
                yield RawRecord(path, number, error=error, raw=raw_line.decode("utf-8", "replace"))
                continue
            try:
                yield RawRecord(path, number, value=json.loads(text), raw=text)
            except json.JSONDecodeError as exc:
                yield RawRecord(path, number, error=RecordError("", f"invalid JSON: {exc}"), raw=text)


def detect_file_format(path: Path) -> Format:
    """The format of a file, from its first records; DataError naming what was found if none fits."""
    seen_keys: list[str] | None = None
    for index, record in enumerate(read_records(path)):
        if index >= FORMAT_PROBE_RECORDS:
            break
        fmt = detect_format(record.value)
        if fmt is not None:
            return fmt
        if seen_keys is None and isinstance(record.value, dict):
            seen_keys = sorted(record.value)
    found = f"records with keys {seen_keys}" if seen_keys is not None else "no JSON object records"
    expected = "; ".join(f"{fmt.name}: {fmt.expects}" for fmt in FORMATS)
    raise DataError(f"{path}: matches no known format; found {found}. Expected one of: {expected}")
