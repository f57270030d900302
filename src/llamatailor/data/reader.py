"""Read inputs record by record (JSONL, JSON, CSV, Parquet, hub datasets), keeping where each came from.

Line-based files (JSONL, CSV) are streamed; a JSON array is parsed whole; Parquet is read in batches;
hub datasets are streamed by `datasets`. A record that cannot be read becomes a RawRecord with an error
and the reading goes on. A column mapping renames the input's fields to ours before anything else.
"""

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamatailor.config import DataFile
from llamatailor.data.formats import FORMATS, Format, RecordError, detect_format
from llamatailor.errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
FORMAT_PROBE_RECORDS = 100
PREVIEW_CHARS = 1000
# CSV cells of these fields may hold JSON lists of messages.
LIST_FIELDS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected")


@dataclass(frozen=True)
class RawRecord:
    """One record as read: `value` is the parsed record, or `error` says why it could not be read."""

    where: str
    value: Any = None
    error: RecordError | None = None
    raw: str = ""
    size: int | None = None  # bytes as read, where the input format tells


def read_source(source: DataFile, max_record_bytes: int) -> Iterator[RawRecord]:
    records = _hub(source) if source.hub is not None else _file(_checked_path(source))
    from_csv = source.path is not None and source.path.suffix.lower() == ".csv"
    for record in records:
        if record.error is not None:
            yield record
        elif (size := record.size if record.size is not None else _size(record.value)) > max_record_bytes:
            reason = f"record is {size:,} bytes; data.max_record_bytes is {max_record_bytes:,}"
            yield RawRecord(record.where, error=RecordError("", reason, "too_large"), raw=_preview(record))
        else:
            value = _renamed(record.value, source.columns)
            yield RawRecord(record.where, value=_decoded_cells(value) if from_csv else value)


def _checked_path(source: DataFile) -> Path:
    path = source.path
    assert path is not None
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; expected {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.is_file():
        raise DataError(f"{path}: data file not found (working directory: {Path.cwd()})")
    return path


def _file(path: Path) -> Iterator[RawRecord]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        yield from _csv(path)
    elif suffix == ".parquet":
        yield from _parquet(path)
    elif suffix == ".json" and (array := _json_array(path)) is not None:
        yield from (RawRecord(f"{path}:{index + 1}", value=value) for index, value in enumerate(array))
    else:
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
            where = f"{path}:{number}"
            try:
                text = raw_line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                bad = raw_line[exc.start : exc.start + 1]
                error = RecordError("", f"not valid UTF-8 (byte {exc.start}: {bad!r})", "unreadable")
                yield RawRecord(where, error=error, raw=raw_line[:PREVIEW_CHARS].decode("utf-8", "replace"))
                continue
            try:
                yield RawRecord(where, value=json.loads(text), size=len(raw_line))
            except json.JSONDecodeError as exc:
                yield RawRecord(
                    where,
                    error=RecordError("", f"invalid JSON: {exc}", "unreadable"),
                    raw=text[:PREVIEW_CHARS],
                )


def _csv(path: Path) -> Iterator[RawRecord]:
    # surrogateescape keeps bad bytes visible per cell instead of failing the whole file.
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        start = 2
        for row in reader:
            where, start = f"{path}:{start}", reader.line_num + 1
            yield _csv_record(where, row, header)


def _csv_record(where: str, row: dict[str | None, Any], header: list[str]) -> RawRecord:
    if None in row:
        reason = f"{len(row[None]) + len(header)} fields, but the header has {len(header)}"
        return RawRecord(where, error=RecordError("", reason, "invalid"), raw=str(row))
    missing = [name for name, value in row.items() if value is None]
    if missing:
        reason = f"missing: the row has {len(header) - len(missing)} of the header's {len(header)} columns"
        return RawRecord(where, error=RecordError(str(missing[0]), reason, "invalid"), raw=str(row))
    for name, value in row.items():
        if any("\udc80" <= char <= "\udcff" for char in value):
            byte = next(char for char in value if "\udc80" <= char <= "\udcff")
            reason = f"not valid UTF-8 (byte {ord(byte) - 0xDC00:#04x})"
            return RawRecord(
                where, error=RecordError(str(name), reason, "unreadable"), raw=str(row)[:PREVIEW_CHARS]
            )
    return RawRecord(where, value=dict(row))


def _parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield RawRecord(f"{path}:row {number}", value=row)


def _hub(source: DataFile) -> Iterator[RawRecord]:
    from datasets import load_dataset

    try:
        rows = load_dataset(source.hub, source.hub_config, split=source.hub_split, streaming=True)
        for number, row in enumerate(rows, start=1):
            yield RawRecord(f"hub:{source.hub}[{source.hub_split}]:{number}", value=row)
    except Exception as exc:  # the loader's errors vary by cause (network, offline mode, missing split)
        raise DataError(
            f"hub:{source.hub}: could not read split {source.hub_split!r} from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). Without a network, save the data set as a local JSONL, CSV or "
            "Parquet file and list its path instead."
        ) from exc


def _renamed(value: Any, columns: dict[str, str]) -> Any:
    if not isinstance(value, dict) or not columns:
        return value
    renamed = dict(value)
    for ours, theirs in columns.items():
        if theirs in renamed:
            renamed[ours] = renamed.pop(theirs)
    return renamed


def _decoded_cells(row: dict[str, Any]) -> dict[str, Any]:
    """CSV cells are text: a message list arrives as JSON text in its cell."""
    decoded = dict(row)
    for name in LIST_FIELDS:
        cell = decoded.get(name)
        if isinstance(cell, str) and cell.lstrip().startswith("["):
            try:
                decoded[name] = json.loads(cell)
            except json.JSONDecodeError:
                continue  # plain text that happens to start with "[" stays text
    return decoded


def _size(value: Any) -> int:
    """Bytes of text in a record (strings counted as UTF-8), without serialising it."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(_size(key) + _size(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return sum(_size(item) for item in value)
    return 8


def _preview(record: RawRecord) -> str:
    return json.dumps(record.value, ensure_ascii=False)[:PREVIEW_CHARS]


def detect_file_format(source: DataFile, max_record_bytes: int) -> Format:
    """The format of an input from its first records; DataError naming what was found if none fits."""
    if source.format != "auto":
        return next(fmt for fmt in FORMATS if fmt.name == source.format)
    seen_keys: list[str] | None = None
    for index, record in enumerate(read_source(source, max_record_bytes)):
        if index >= FORMAT_PROBE_RECORDS:
            break
        fmt = detect_format(record.value)
        if fmt is not None:
            return fmt
        if seen_keys is None and isinstance(record.value, dict):
            seen_keys = sorted(record.value)
    found = f"records with keys {seen_keys}" if seen_keys is not None else "no readable object records"
    expected = "; ".join(f"{fmt.name}: {fmt.expects}" for fmt in FORMATS)
    hint = " Map differently named fields with `columns` (e.g. {output: answer})."
    raise DataError(
        f"{source.label}: matches no known format; found {found}. Expected one of: {expected}.{hint}"
    )
