"""Reading data files: line numbers, bad lines kept with reasons, JSON arrays, unknown formats."""

import json

import pytest

from llamatailor.data.reader import detect_file_format, read_records
from llamatailor.errors import DataError


def test_jsonl_lines_keep_numbers_and_bad_lines_have_reasons(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"}).encode()
    path.write_bytes(
        good + b"\n\n" + b'{"instruction": "a", "output": \n' + b'{"x": "\xff"}\n' + good + b"\n"
    )
    records = list(read_records(path))
    assert [r.line for r in records] == [1, 3, 4, 5]
    assert records[0].value == {"instruction": "a", "output": "b"} and records[0].error is None
    assert records[1].error is not None and records[1].error.reason.startswith(
        "invalid JSON: Expecting value"
    )
    assert records[2].error is not None and "not valid UTF-8 (byte 7: b'\\xff')" in records[2].error.reason
    assert records[3].where == f"{path}:5"


def test_json_array_and_jsonl_named_json(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"messages": []}, {"messages": [1]}]), encoding="utf-8")
    assert [(r.line, r.value) for r in read_records(array)] == [(1, {"messages": []}), (2, {"messages": [1]})]
    lines = tmp_path / "b.json"
    lines.write_text('{"messages": []}\n{"messages": []}\n', encoding="utf-8")
    assert [r.line for r in read_records(lines)] == [1, 2]


def test_unsupported_or_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        list(read_records(tmp_path / "d.txt"))
    with pytest.raises(DataError, match="data file not found"):
        list(read_records(tmp_path / "nope.jsonl"))
    scalar = tmp_path / "s.json"
    scalar.write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON array of records"):
        list(read_records(scalar))


def test_file_matching_no_format_says_what_was_found_and_expected(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        detect_file_format(path)
    message = str(info.value)
    assert "matches no known format; found records with keys ['answer', 'question']" in message
    assert "alpaca: instruction, output" in message and "openai: messages: [{role, content}" in message


def test_format_detected_past_leading_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('not json\n{"conversations": []}\n', encoding="utf-8")
    assert detect_file_format(path).name == "sharegpt"
