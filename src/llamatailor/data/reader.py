"""Read inputs record by record (JSONL, JSON, CSV, Parquet, hub datasets), keeping where each came from.

Text files are UTF-8, with or without a byte-order mark; a file whose first 64 KiB are not is refused
whole by `llamatailor.textfiles`. Line-based files (JSONL, CSV) are streamed; a JSON array is parsed whole,
element by element; Parquet is read in batches; hub datasets are streamed by `datasets`. A record that
cannot be read becomes a RawRecord with an error and the reading goes on. `where` is the physical line in
the file (the element's number in a JSON array, the row in Parquet). A column mapping renames the input's
fields to ours before anything else.

JSON is read strictly (RFC 8259): Python's json also reads NaN, Infinity and -Infinity, which no JSON
reader elsewhere accepts, so a record holding them is rejected (`unreadable`) like any other invalid JSON.
A CSV file is comma-separated unless its header row holds no comma but semicolons or tabs (Excel saves
`;`-separated "CSV" where the decimal separator is a comma); the header's names are stripped of spaces.

Two rules guard the rest of `prepare` from hostile input. A record parsed from JSON text (a JSONL line, a
JSON array's element, a CSV cell) whose arrays and objects nest more than MAX_DEPTH levels is rejected
(`unreadable`) before anything recursive touches it; pyarrow itself refuses Parquet schemas nested that
deep. A CSV record that runs across lines is a multi-line quoted cell only if it parses strictly and has
the header's field count; otherwise its first line holds an unclosed quote: that line is rejected and
reading restarts on the next line, so one stray quote cannot swallow the rows after it.
"""

import csv
import io
import itertools
import json
import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

from llamatailor.config import DataFile
from llamatailor.data.formats import (
    FORMATS,
    STRICT_JSON,
    Format,
    NotJson,
    RecordError,
    detect_format,
    near_misses,
)
from llamatailor.errors import DataError
from llamatailor.textfiles import PROBE_BYTES, bom_length, check_utf8

SUPPORTED_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
FORMAT_PROBE_RECORDS = 100
PREVIEW_CHARS = 1000
# CSV cells of these fields may hold JSON lists of messages.
LIST_FIELDS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected")
# Real records nest a few levels (record > messages > turn > content parts); far deeper ones are hostile
# and would exhaust Python's recursion limit (1,000 frames) in the parser or in any later recursive step.
MAX_DEPTH = 100
TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep (the limit for a record)"
JSON_SPACE = " \t\n\r"
JSON_SPACES = re.compile(f"[{JSON_SPACE}]*")
# A JSON string or a bracket: enough to find where a value too deep to parse ends.
JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*+"|[\[\]{}]', re.DOTALL)
# A JSON string, or one of the constants Python's json reads but JSON has not: finds where the latter is.
NON_JSON_CONSTANT = re.compile(r'"(?:[^"\\]|\\.)*+"|(-?Infinity|NaN)', re.DOTALL)
CSV_DELIMITERS = ";\t"  # besides the comma, chosen from the header row
CSV_END_OF_DATA = "unexpected end of data"  # the csv module's words for a quote open at the end of the file


PYTHON_JSON = json.JSONDecoder()  # to find where an element with NaN ends, and go on after it


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record as read: `value` is the parsed record, or `error` says why it could not be read."""

    where: str
    value: Any = None
    error: RecordError | None = None
    raw: str = ""
    size: int | None = None  # bytes as read, where the input format tells


def read_source(source: DataFile, max_record_bytes: int) -> Iterator[RawRecord]:
    """The records of one input, in order, under our field names (`source.columns` applied).

    A record larger than `max_record_bytes` (UTF-8 bytes of its text) is yielded with a `too_large` error;
    unreadable ones with their reason. Raises DataError for a missing or unsupported file or one that is
    not valid as a whole (a JSON syntax error, a CSV header that is not CSV), EncodingError for a text
    file that is not UTF-8.
    """
    if source.hub is not None:
        records: Iterable[RawRecord] = _hub(source)
    else:
        records = _file(checked_path(source), max_record_bytes)
    from_csv = source.path is not None and source.path.suffix.lower() == ".csv"
    for record in records:
        if record.error is None:
            try:
                record = RawRecord(
                    record.where, value=_ours(record, source.columns, from_csv, max_record_bytes)
                )
            except RecordError as exc:
                record = RawRecord(record.where, error=exc, raw=_preview(record))
        yield record


def _ours(record: RawRecord, columns: dict[str, str], from_csv: bool, max_record_bytes: int) -> Any:
    size = record.size if record.size is not None else _size(record.value)
    if size > max_record_bytes:
        reason = f"record is {size:,} bytes; data.max_record_bytes is {max_record_bytes:,}"
        raise RecordError("", reason, "too_large")
    value = _renamed(record.value, columns)
    return _decoded_cells(value) if from_csv else value


def checked_path(source: DataFile) -> Path:
    """A local data file's path, once its type is one the reader reads and it exists (the UI's form asks
    the same before it writes a run file). Raises DataError naming the file and what was expected."""
    path = source.path
    assert path is not None
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; expected {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.is_file():
        raise DataError(
            f"{path}: data file not found (working directory: {Path.cwd()}; a relative data path in a run "
            "file is read from the working directory, not from the run file's folder)"
        )
    return path


def _file(path: Path, max_record_bytes: int) -> Iterable[RawRecord]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv(path, max_record_bytes)
    if suffix == ".parquet":
        return _parquet(path)
    if suffix == ".json":
        return _json(path)
    return _jsonl(path)


def _json(path: Path) -> Iterable[RawRecord]:
    """A .json file: a JSON array of records, or JSON Lines under a .json name (a common misnomer).

    An empty or blank file has no records (`detect_file_format` says which it is)."""
    data = path.read_bytes()[bom_length(path) :]
    if not data.strip():
        return []
    try:
        text = data.decode("utf-8")
        if text.lstrip(JSON_SPACE).startswith("["):
            return _json_array(path, text)
        value = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        if _first_line_is_json(data):
            return _jsonl(path)  # JSON Lines: its bad lines are rejected one by one
        check_utf8(data, path, complete=True)  # EncodingError when bad bytes, not the syntax, are at fault
        raise DataError(_json_failure(path, exc)) from None
    raise DataError(
        f"{path}: expected a JSON array of records (or JSON Lines), found a {type(value).__name__}"
    )


def _first_line_is_json(data: bytes) -> bool:
    start = len(data) - len(data.lstrip())
    end = data.find(b"\n", start)
    try:
        json.loads(data[start : end if end >= 0 else len(data)])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False
    return True


def _json_failure(path: Path, exc: Exception) -> str:
    """The message for a .json file that is not valid as a whole (a syntax error, or nesting too deep)."""
    expected = "expected a JSON array of records (or JSON Lines)"
    if isinstance(exc, json.JSONDecodeError):
        return (
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {_json_problem(exc)}; {expected}"
        )
    return f"{path}: the JSON value is {TOO_DEEP}; {expected}"


def _json_problem(exc: json.JSONDecodeError) -> str:
    """The parser's message, with a hint where the value it expected is missing after a comma, before a
    closing bracket (`[{...},]`, `{"a": 1,}`): JavaScript and Python allow that trailing comma, JSON does not."""
    before = exc.doc[max(0, exc.pos - PREVIEW_CHARS) : exc.pos].rstrip(JSON_SPACE)
    if before.endswith(",") and exc.doc[exc.pos : exc.pos + 1] in ("]", "}"):
        return f"{exc.msg} (a trailing comma before it?)"
    return exc.msg


def _json_record_error(exc: json.JSONDecodeError) -> str:
    """A record's JSON error, as json words it (`msg: line L column C (char P)`), with `_json_problem`'s hint."""
    return f"invalid JSON: {_json_problem(exc)}: line {exc.lineno} column {exc.colno} (char {exc.pos})"


def _not_json(exc: NotJson, text: str, start: int) -> json.JSONDecodeError:
    """The error for a NaN, Infinity or -Infinity met parsing text[start:], placed where it is."""
    position = next(
        (match.start() for match in NON_JSON_CONSTANT.finditer(text, start) if match.group(1)), start
    )
    return json.JSONDecodeError(f"{exc} is not a JSON value", text, position)


def _json_array(path: Path, text: str) -> list[RawRecord]:
    """Each element of the array in `text`, parsed on its own so that one nested too deeply is rejected alone.

    The whole array is parsed before any record is returned: DataError names the line and column of a
    syntax error, and no record of a broken file reaches `prepare`.
    """
    records: list[RawRecord] = []
    index = _after_space(text, text.index("[") + 1)
    closed = text.startswith("]", index)
    if closed:  # an empty array
        index = _after_space(text, index + 1)
    while not closed:
        where = f"{path}:{len(records) + 1}"
        try:
            value, end = STRICT_JSON.raw_decode(text, index)
        except RecursionError:
            end = _value_end(path, text, index)
            records.append(_too_deep_element(where, text, index, end))
        except json.JSONDecodeError as exc:
            raise DataError(_json_failure(path, exc)) from None
        except NotJson as exc:  # valid but for the constant: the element alone is rejected
            end = _python_value_end(path, text, index)
            error = RecordError("", _json_record_error(_not_json(exc, text, index)), "unreadable")
            records.append(RawRecord(where, error=error, raw=text[index : min(end, index + PREVIEW_CHARS)]))
        else:
            deep = _too_deep(value, text, index, end)
            size = len(text[index:end].encode("utf-8"))  # bytes as read, as for a JSONL line
            records.append(
                _too_deep_element(where, text, index, end)
                if deep
                else RawRecord(where, value=value, size=size)
            )
        index = _after_space(text, end)
        closed = text.startswith("]", index)
        if not closed and not text.startswith(",", index):
            raise DataError(_json_failure(path, json.JSONDecodeError("Expecting ',' delimiter", text, index)))
        index = _after_space(text, index + 1)
    if index < len(text):
        raise DataError(_json_failure(path, json.JSONDecodeError("Extra data", text, index)))
    return records


def _python_value_end(path: Path, text: str, start: int) -> int:
    """Where the value at `start`, which holds NaN or Infinity, ends (Python's json reads those)."""
    try:
        return PYTHON_JSON.raw_decode(text, start)[1]
    except RecursionError:
        return _value_end(path, text, start)
    except json.JSONDecodeError as exc:  # broken past the constant too: the file is
        raise DataError(_json_failure(path, exc)) from None


def _too_deep_element(where: str, text: str, start: int, end: int) -> RawRecord:
    error = RecordError("", TOO_DEEP, "unreadable")
    return RawRecord(where, error=error, raw=text[start : min(end, start + PREVIEW_CHARS)])


def _after_space(text: str, index: int) -> int:
    match = JSON_SPACES.match(text, index)
    assert match is not None  # the pattern matches the empty string too
    return match.end()


def _value_end(path: Path, text: str, start: int) -> int:
    """Where the array or object starting at `start` ends, found without recursion."""
    depth = 0
    for match in JSON_TOKEN.finditer(text, start):
        token = match.group()
        depth += 1 if token in ("[", "{") else -1 if token in ("]", "}") else 0
        if depth == 0:
            return match.end()
    raise DataError(_json_failure(path, json.JSONDecodeError("Unclosed bracket", text, start)))


def _jsonl(path: Path) -> Iterator[RawRecord]:
    with path.open("rb") as handle:
        handle.seek(bom_length(path))
        for number, raw_line in enumerate(handle, start=1):
            if raw_line.strip():
                yield _jsonl_record(f"{path}:{number}", raw_line)


def _jsonl_record(where: str, raw_line: bytes) -> RawRecord:
    try:
        text = raw_line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        bad = raw_line[exc.start : exc.start + 1]
        error = RecordError("", f"not valid UTF-8 (byte {exc.start}: {bad!r})", "unreadable")
        return RawRecord(where, error=error, raw=raw_line[:PREVIEW_CHARS].decode("utf-8", "replace"))
    try:
        return RawRecord(where, value=_loads(text), size=len(raw_line))
    except json.JSONDecodeError as exc:
        error = RecordError("", _json_record_error(exc), "unreadable")
    except RecordError as exc:
        error = exc
    return RawRecord(where, error=error, raw=text[:PREVIEW_CHARS])


def _loads(text: str, field: str = "") -> Any:
    """json.loads, strict (JSONDecodeError for bad syntax), but RecordError (`unreadable`, naming `field`) for
    NaN, Infinity or -Infinity, or for a value nested too deeply."""
    try:
        value = STRICT_JSON.decode(text)
    except RecursionError:
        raise RecordError(field, TOO_DEEP, "unreadable") from None
    except NotJson as exc:
        raise RecordError(field, _json_record_error(_not_json(exc, text, 0)), "unreadable") from None
    if _too_deep(value, text, 0, len(text)):
        raise RecordError(field, TOO_DEEP, "unreadable")
    return value


def _too_deep(value: Any, text: str, start: int, end: int) -> bool:
    """Whether `value` (parsed from text[start:end]) nests more than MAX_DEPTH levels of arrays and objects."""
    # Only text with that many opening brackets can nest so deep: most records skip the walk.
    if text.count("[", start, end) + text.count("{", start, end) <= MAX_DEPTH:
        return False
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:  # iterative, so that any depth is safe to measure
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        nested = [child for child in children if isinstance(child, dict | list)]
        if nested and depth == MAX_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in nested)
    return False


class _RunsOn(Exception):
    """A record's lines passed max_record_bytes before it ended."""


class _Lines:
    """The physical lines of a CSV file for csv.reader, numbered, and the lines the current record took.

    The lines of a record found malformed, but its first, can be read again. Memory stays bounded: a
    record may take at most `limit` characters of lines (then _RunsOn is raised), and only those are kept.
    """

    def __init__(self, handle: TextIO, limit: int) -> None:
        self._handle = handle
        self._limit = limit
        self._count = 0
        self._again: deque[tuple[int, str]] = deque()
        self.taken: list[tuple[int, str]] = []
        self._taken_chars = 0

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        if self._again:
            number, line = self._again.popleft()
        else:
            line = self._handle.readline()
            if not line:
                raise StopIteration
            self._count += 1
            number = self._count
        self.taken.append((number, line))
        self._taken_chars += len(line)
        if len(self.taken) > 1 and self._taken_chars > self._limit:
            raise _RunsOn
        return line

    def next_record(self) -> None:
        self.taken, self._taken_chars = [], 0

    def read_again_after_first(self) -> None:
        self._again.extendleft(reversed(self.taken[1:]))


def _csv(path: Path, max_record_bytes: int) -> Iterator[RawRecord]:
    with path.open("rb") as handle:
        lines, rows, header = _csv_table(handle, path, max_record_bytes)
        if header is None:
            return
        while True:
            lines.next_record()
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as exc:
                yield _malformed(path, lines, str(exc))
                continue
            except _RunsOn:
                why = f"it passes data.max_record_bytes ({max_record_bytes:,}) without ending"
                yield _malformed(path, lines, why, "too_large")
                continue
            first, last = lines.taken[0][0], lines.taken[-1][0]
            if last > first and len(row) != len(header):
                yield _malformed(path, lines, f"it has {len(row)} fields; the header has {len(header)}")
            elif row:  # a blank line is no record
                yield _csv_record(f"{path}:{first}", row, header, lines.taken)


def _csv_table(
    handle: IO[bytes], path: Path, max_record_bytes: int
) -> tuple[_Lines, Iterator[list[str]], list[str] | None]:
    """The lines and rows of an open CSV file, read past its header; the header is None in a blank file."""
    start = bom_length(path)
    handle.seek(start)
    header_line = handle.readline(max_record_bytes)
    while header_line and not header_line.strip():  # blank lines before the header
        header_line = handle.readline(max_record_bytes)
    delimiter = _csv_delimiter(header_line)
    handle.seek(start)
    # surrogateescape keeps bad bytes visible per cell instead of failing the whole file.
    text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape", newline="")
    lines = _Lines(text, max_record_bytes)
    rows = csv.reader(lines, strict=True, delimiter=delimiter)
    return lines, rows, _csv_header(path, rows)


def _csv_delimiter(first_line: bytes) -> str:
    """The comma, unless the header row has none but semicolons or tabs: then the more frequent of those.

    Excel saves "CSV" with `;` wherever the decimal separator is a comma (German, French, ... settings),
    and offers no per-file choice; the header, of plain column names, tells the separator reliably."""
    header = first_line.decode("utf-8", "replace")
    if "," in header:
        return ","
    counts = {delimiter: header.count(delimiter) for delimiter in CSV_DELIMITERS}
    best = max(counts, key=lambda delimiter: counts[delimiter])
    return best if counts[best] else ","


def _csv_header(path: Path, rows: Iterator[list[str]]) -> list[str] | None:
    """The first row that is not blank, its names stripped (`instruction, output` names `output`)."""
    try:
        header = next((row for row in rows if row), None)
    except (csv.Error, _RunsOn) as exc:
        why = "it runs on past data.max_record_bytes" if isinstance(exc, _RunsOn) else str(exc)
        raise DataError(f"{path}: the header row is not valid CSV ({why})") from None
    return None if header is None else [name.strip() for name in header]


def _malformed(path: Path, lines: _Lines, why: str, kind: str = "invalid") -> RawRecord:
    """A record that could not be read: its first line is rejected; the lines after it are read again.

    A record read across lines that fails is taken for an unclosed quote on its first line: a real
    multi-line cell parses cleanly and leaves the header's field count.
    """
    first, last = lines.taken[0][0], lines.taken[-1][0]
    if last > first:
        reason = f"unclosed quote starting at line {first}: read as one record up to line {last}, {why}"
    elif why == CSV_END_OF_DATA:  # the last line opens a quote that nothing closes
        reason = f"unclosed quote starting at line {first}: the file ends before it closes"
    else:
        reason = f"malformed CSV row: {why}"
    raw = _text(lines.taken)
    lines.read_again_after_first()
    return RawRecord(f"{path}:{first}", error=RecordError("", reason, kind), raw=raw)


def _csv_record(where: str, row: list[str], header: list[str], taken: list[tuple[int, str]]) -> RawRecord:
    if len(row) > len(header):
        error = RecordError("", f"{len(row)} fields, but the header has {len(header)}", "invalid")
        return RawRecord(where, error=error, raw=_text(taken))
    if len(row) < len(header):
        reason = f"missing: the row has {len(row)} of the header's {len(header)} columns"
        return RawRecord(where, error=RecordError(header[len(row)], reason, "invalid"), raw=_text(taken))
    for name, value in zip(header, row, strict=True):
        bad = next((char for char in value if "\udc80" <= char <= "\udcff"), None)
        if bad is not None:
            reason = f"not valid UTF-8 (byte {ord(bad) - 0xDC00:#04x})"
            return RawRecord(where, error=RecordError(name, reason, "unreadable"), raw=_text(taken))
    return RawRecord(where, value=dict(zip(header, row, strict=True)))


def _text(taken: list[tuple[int, str]]) -> str:
    """A preview of a record's lines as in the file, bad bytes shown as U+FFFD."""
    text = "".join(line for _, line in taken)[:PREVIEW_CHARS]
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


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
    """CSV cells are text: a message list arrives as JSON text in its cell (RecordError if nested too deeply)."""
    decoded = dict(row)
    for name in LIST_FIELDS:
        cell = decoded.get(name)
        if isinstance(cell, str) and cell.lstrip().startswith("["):
            try:
                decoded[name] = _loads(cell, name)
            except json.JSONDecodeError:
                continue  # plain text that happens to start with "[" stays text
    return decoded


def _size(value: Any) -> int:
    """Bytes of text in a record (strings counted as UTF-8), without serialising it; iterative."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        else:
            total += 8
    return total


def _preview(record: RawRecord) -> str:
    return json.dumps(record.value, ensure_ascii=False)[:PREVIEW_CHARS]


def detect_file_format(source: DataFile, max_record_bytes: int) -> Format:
    """The format of an input from its first records.

    Raises DataError naming the input and what was found when no format fits: that it holds no records
    (empty, blank, a CSV header without rows, an empty array), or the first records' keys with the field
    names they nearly match (a typo, another case), or the first unreadable record's reason.
    """
    if source.format != "auto":
        return next(fmt for fmt in FORMATS if fmt.name == source.format)
    seen_keys: list[str] | None = None
    first_error = ""
    records = 0
    for record in itertools.islice(read_source(source, max_record_bytes), FORMAT_PROBE_RECORDS):
        records += 1
        fmt = detect_format(record.value)
        if fmt is not None:
            return fmt
        if seen_keys is None and isinstance(record.value, dict):
            seen_keys = sorted(record.value)
        if not first_error and record.error is not None:
            first_error = f" (the first, {record.where}: {record.error})"
    if records == 0:
        raise DataError(f"{source.label}: no records: {_no_records(source)}")
    expected = "; ".join(f"{fmt.name}: {fmt.expects}" for fmt in FORMATS)
    if seen_keys is None:
        found = f"no readable object records{first_error}"
    else:
        found = f"records with keys {seen_keys}"
    hint = _near_miss_hint(source, seen_keys or [])
    raise DataError(
        f"{source.label}: matches no known format; found {found}.{hint} Expected one of: {expected}."
    )


def _near_miss_hint(source: DataFile, keys: list[str]) -> str:
    """What to change, for keys that nearly name our fields (`instrution`, `Instruction`), else where to map
    names of another vocabulary (`answer`)."""
    misses = near_misses(keys)
    if not misses:
        return " Map differently named fields with `columns` (e.g. {output: answer})."
    typos = [f"{theirs!r}: did you mean {ours!r}?" for theirs, ours in misses if theirs.lower() != ours]
    cases = [f"{theirs!r} is not {ours!r}" for theirs, ours in misses if theirs.lower() == ours]
    said = [f" Found {' '.join(typos)}"] if typos else []
    if cases:
        said.append(f" Field names are case-sensitive: {', '.join(cases)}.")
    mapping = ", ".join(f"{ours}: {theirs}" for theirs, ours in misses)
    entry = (
        f"{{path: {source.label}, columns: {{{mapping}}}}}"
        if source.path is not None
        else f"columns: {{{mapping}}}"
    )
    them = "it" if len(misses) == 1 else "them"
    return "".join(said) + f" Rename {them} in the file, or map {them} in the input's entry: `{entry}`."


def _no_records(source: DataFile) -> str:
    """Why an input yielded no record at all (read again: only files without records come here)."""
    if source.path is None:
        return f"the split {source.hub_split!r} has no rows"
    path = source.path
    if path.suffix.lower() == ".parquet":
        return "the Parquet file has no rows"
    start = bom_length(path)
    if path.stat().st_size == start:
        return "the file is empty (0 bytes)" if start == 0 else "the file holds only a byte-order mark"
    with path.open("rb") as handle:
        handle.seek(start)
        blank = all(not chunk.strip() for chunk in iter(lambda: handle.read(PROBE_BYTES), b""))
    if blank:
        return "the file holds only blank lines"
    if path.suffix.lower() == ".csv":
        with path.open("rb") as handle:
            header = _csv_table(handle, path, PROBE_BYTES)[2] or []
        return f"the CSV file has a header row ({', '.join(header)}) but no rows under it"
    return "the JSON array is empty"
