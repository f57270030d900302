"""Reading data files: line numbers, bad lines kept with reasons, JSON arrays, unknown formats."""

import json

import pytest

from llamatailor.config import DataFile
from llamatailor.data.reader import detect_file_format, read_source
from llamatailor.errors import DataError


def read_records_of(path, **options):
    return list(read_source(DataFile(path=path, **options), 10**6))


def test_jsonl_lines_keep_numbers_and_bad_lines_have_reasons(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"}).encode()
    path.write_bytes(
        good + b"\n\n" + b'{"instruction": "a", "output": \n' + b'{"x": "\xff"}\n' + good + b"\n"
    )
    records = list(read_records_of(path))
    assert [r.where for r in records] == [f"{path}:{n}" for n in (1, 3, 4, 5)]
    assert records[0].value == {"instruction": "a", "output": "b"} and records[0].error is None
    assert records[1].error is not None and records[1].error.reason.startswith(
        "invalid JSON: Expecting value"
    )
    assert records[2].error is not None and "not valid UTF-8 (byte 7: b'\\xff')" in records[2].error.reason


def test_json_array_and_jsonl_named_json(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"messages": []}, {"messages": [1]}]), encoding="utf-8")
    assert [(r.where, r.value) for r in read_records_of(array)] == [
        (f"{array}:1", {"messages": []}),
        (f"{array}:2", {"messages": [1]}),
    ]
    lines = tmp_path / "b.json"
    lines.write_text('{"messages": []}\n{"messages": []}\n', encoding="utf-8")
    assert [r.where for r in read_records_of(lines)] == [f"{lines}:1", f"{lines}:2"]


def test_unsupported_or_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        list(read_records_of(tmp_path / "d.txt"))
    with pytest.raises(DataError, match="data file not found"):
        list(read_records_of(tmp_path / "nope.jsonl"))
    scalar = tmp_path / "s.json"
    scalar.write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON array of records"):
        list(read_records_of(scalar))


def test_file_matching_no_format_says_what_was_found_and_expected(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        detect_file_format(DataFile(path=path), 10**6)
    message = str(info.value)
    assert "matches no known format; found records with keys ['answer', 'question']" in message
    assert "alpaca: instruction, output" in message and "openai: messages: [{role, content}" in message


def test_format_detected_past_leading_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('not json\n{"conversations": []}\n', encoding="utf-8")
    assert detect_file_format(DataFile(path=path), 10**6).name == "sharegpt"
