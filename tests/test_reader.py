"""Reading data files: line numbers, bad lines kept with reasons, JSON arrays, unknown formats, encodings,
broken CSV quoting and hostile nesting."""

import codecs
import json
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from llamatailor.config import DataFile
from llamatailor.data.reader import MAX_DEPTH, detect_file_format, read_source
from llamatailor.errors import DataError, EncodingError
from llamatailor.textfiles import PROBE_BYTES

TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep"
WESTERN = "its bytes look like Windows-1252 (cp1252) or Latin-1 (ISO-8859-1), which read them the same"
# A blank line past the start that textfiles checks whole: bad bytes after it are one line's fault only.
PAST_PROBE = b" " * PROBE_BYTES + b"\n"


def read_records_of(path, max_record_bytes=10**6, **options):
    return list(read_source(DataFile(path=path, **options), max_record_bytes))


def kept_and_rejected(records):
    kept = [(r.where, r.value) for r in records if r.error is None]
    rejected = [(r.where, r.error.kind, r.error.reason) for r in records if r.error is not None]
    return kept, rejected


def nested(depth):
    """A record whose `messages` value nests `depth` - 1 arrays inside it (the record itself is level 1)."""
    return '{"messages": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def test_jsonl_lines_keep_numbers_and_bad_lines_have_reasons(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"}).encode()
    path.write_bytes(
        PAST_PROBE + good + b"\n\n" + b'{"instruction": "a", "output": \n' + b'{"x": "\xff"}\n' + good + b"\n"
    )
    records = list(read_records_of(path))
    assert [r.where for r in records] == [f"{path}:{n}" for n in (2, 4, 5, 6)]
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
    # A first line that is JSON makes a JSON Lines file: its later bad lines are its records' fault.
    lines.write_text('{"messages": []}\n{"messages": \n{"messages": [2]}\n', encoding="utf-8")
    kept, rejected = kept_and_rejected(read_records_of(lines))
    assert kept == [(f"{lines}:1", {"messages": []}), (f"{lines}:3", {"messages": [2]})]
    assert [(where, kind) for where, kind, _ in rejected] == [(f"{lines}:2", "unreadable")]


def test_json_file_with_a_syntax_error_names_its_line_and_column(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [] \n  {"messages": []}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_records_of(path)
    assert str(info.value) == (
        f"{path}: invalid JSON at line 4, column 3: Expecting ',' delimiter; "
        "expected a JSON array of records (or JSON Lines)"
    )
    path.write_text('{"messages": [\n  {"role": "user" "content": "x"}]}\n', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"a\.json: invalid JSON at line 2, column 19: Expecting ',' delimiter"
    ):
        read_records_of(path)


def test_unsupported_or_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        list(read_records_of(tmp_path / "d.txt"))
    with pytest.raises(DataError) as info:
        list(read_records_of(tmp_path / "nope.jsonl"))
    assert str(info.value) == (
        f"{tmp_path / 'nope.jsonl'}: data file not found (working directory: {Path.cwd()}; a relative data "
        "path in a run file is read from the working directory, not from the run file's folder)"
    )
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


def test_utf8_with_a_byte_order_mark_reads_like_without(tmp_path):
    bom = codecs.BOM_UTF8
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(bom + b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    assert kept_and_rejected(read_records_of(jsonl)) == (
        [
            (f"{jsonl}:1", {"instruction": "a", "output": "b"}),
            (f"{jsonl}:2", {"instruction": "c", "output": "d"}),
        ],
        [],
    )
    table = tmp_path / "t.csv"
    table.write_bytes(bom + "instruction,output\nsalut,ça va\n".encode())
    assert kept_and_rejected(read_records_of(table)) == (
        [(f"{table}:2", {"instruction": "salut", "output": "ça va"})],
        [],
    )
    array = tmp_path / "a.json"
    array.write_bytes(bom + b'[{"messages": []}]')
    assert [(r.where, r.value) for r in read_records_of(array)] == [(f"{array}:1", {"messages": []})]
    lines = tmp_path / "b.json"
    lines.write_bytes(bom + b'{"messages": []}\n{"messages": [1]}\n')
    assert [(r.where, r.value) for r in read_records_of(lines)] == [
        (f"{lines}:1", {"messages": []}),
        (f"{lines}:2", {"messages": [1]}),
    ]


@pytest.mark.parametrize(
    ("name", "encoding", "found"),
    [
        ("d.jsonl", "utf-16", "the file is UTF-16 LE (byte-order mark found)"),
        ("d.csv", "utf-16-le", "the file looks like UTF-16 without a byte-order mark"),
        ("d.json", "utf-16", "the file is UTF-16 LE (byte-order mark found)"),
        ("d.csv", "latin-1", f"not UTF-8 (byte 3: b'\\xe9') on line 2; {WESTERN}"),
        ("d.jsonl", "latin-1", f"not UTF-8 (byte 20: b'\\xe9') on line 1; {WESTERN}"),
        ("d.json", "latin-1", f"not UTF-8 (byte 21: b'\\xe9') on line 1; {WESTERN}"),
    ],
)
def test_other_encodings_are_refused_whole_naming_file_and_encoding(tmp_path, name, encoding, found):
    """Judged from the first 64 KiB (here the whole file): its line and byte, and the encoding it looks like
    (charset-normalizer alone says cp1250, an arbitrary pick among encodings that read these bytes alike)."""
    path = tmp_path / name
    text = {
        ".csv": "instruction,output\ncafé,crème\n",
        ".jsonl": '{"instruction": "café", "output": "crème"}\n',
        ".json": '[{"instruction": "café", "output": "crème"}]',
    }[path.suffix]
    path.write_bytes(text.encode(encoding))
    with pytest.raises(EncodingError) as info:
        read_records_of(path)
    assert str(info.value).startswith(f"{path}: {found}")
    assert str(info.value).endswith("save it as UTF-8 (with or without a byte-order mark) and run again")


def alpaca_csv(rows):
    return "instruction,input,output\n" + "".join(f"{row}\n" for row in rows)


def alpaca_row(n):
    return f"Question {n}.,{n}+{n},{2 * n}"


@pytest.mark.parametrize(
    ("later_row_12", "swallowed_to", "why"),
    [
        (alpaca_row(12), 22, "unexpected end of data"),  # no quote after it: the field would run to the end
        ('Question 12.,"12+12, twice",24', 13, "',' expected after '\"'"),  # a later quote closes it
    ],
)
def test_csv_unclosed_quote_rejects_its_line_and_the_rows_after_it_stay_rows(
    tmp_path, later_row_12, swallowed_to, why
):
    rows = [alpaca_row(n) for n in range(1, 22)]
    rows[6] = 'Question 7.,"7+7,14'
    rows[11] = later_row_12
    path = tmp_path / "d.csv"
    path.write_text(alpaca_csv(rows), encoding="utf-8")
    kept, rejected = kept_and_rejected(read_records_of(path))
    assert rejected == [
        (
            f"{path}:8",
            "invalid",
            f"unclosed quote starting at line 8: read as one record up to line {swallowed_to}, {why}",
        )
    ]
    assert [where for where, _ in kept] == [f"{path}:{n + 1}" for n in range(1, 22) if n != 7]
    assert kept[6] == (f"{path}:9", {"instruction": "Question 8.", "input": "8+8", "output": "16"})
    assert kept[-1][1] == {"instruction": "Question 21.", "input": "21+21", "output": "42"}
    assert kept[10][1]["input"] == ("12+12, twice" if swallowed_to == 13 else "12+12")


def test_csv_multi_line_quoted_cells_stay_cells_with_physical_line_numbers(tmp_path):
    answer = "Steps:\nmix flour, sugar, eggs\nbake, then serve"  # inner lines look like 3-field rows
    quoted = '"She said ""hi"",\nthen left."'
    path = tmp_path / "d.csv"
    path.write_bytes(
        alpaca_csv(["Bake a cake.,," + '"' + answer + '"', f"Quote her.,{quoted},ok", alpaca_row(3)])
        .replace("\n", "\r\n")
        .encode()
    )
    kept, rejected = kept_and_rejected(read_records_of(path))
    assert rejected == []
    assert kept == [
        (f"{path}:2", {"instruction": "Bake a cake.", "input": "", "output": answer.replace("\n", "\r\n")}),
        (f"{path}:5", {"instruction": "Quote her.", "input": 'She said "hi",\r\nthen left.', "output": "ok"}),
        (f"{path}:7", {"instruction": "Question 3.", "input": "3+3", "output": "6"}),
    ]


def test_csv_rows_with_wrong_field_counts_or_bad_quoting_are_rejected_alone(tmp_path):
    path = tmp_path / "d.csv"
    rows = [
        alpaca_row(1),
        "Only two,fields",
        'Bad "quote",x,y',
        '"closed"then text,x,y',
        "a,b,c,d",
        alpaca_row(6),
    ]
    path.write_text(alpaca_csv(rows), encoding="utf-8")
    kept, rejected = kept_and_rejected(read_records_of(path))
    assert [where for where, _ in kept] == [f"{path}:2", f"{path}:4", f"{path}:7"]
    assert kept[1][1] == {"instruction": 'Bad "quote"', "input": "x", "output": "y"}  # a quote inside a cell
    assert rejected == [
        (f"{path}:3", "invalid", "missing: the row has 2 of the header's 3 columns"),
        (f"{path}:5", "invalid", "malformed CSV row: ',' expected after '\"'"),
        (f"{path}:6", "invalid", "4 fields, but the header has 3"),
    ]


def test_csv_unclosed_quote_in_a_large_file_reads_in_bounded_memory(tmp_path):
    answer = "an answer of some length " * 10
    rows = [f"Question {n}.,{n},{answer}{n}" for n in range(1, 3_001)]
    rows[1] = 'Question 2.,"open'
    path = tmp_path / "d.csv"
    path.write_text(alpaca_csv(rows), encoding="utf-8")
    tracemalloc.start()
    try:
        counts = Counter(record.error is None for record in read_source(DataFile(path=path), 10_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert counts == {True: 2_999, False: 1}
    # The unclosed quote holds at most max_record_bytes of lines, not the 800 kB after it (measured: 138 kB,
    # mostly the 64 KiB encoding probe; the same for a clean file, and for one twice as long).
    assert path.stat().st_size > 800_000 and peak < 200_000, peak


def test_csv_record_running_past_max_record_bytes_is_rejected_and_reading_restarts(tmp_path):
    rows = [alpaca_row(1), 'Question 2.,"open', *(alpaca_row(n) for n in range(3, 40))]
    rows[20] = 'Question 21.,"closes late",x'
    path = tmp_path / "d.csv"
    path.write_text(alpaca_csv(rows), encoding="utf-8")
    kept, rejected = kept_and_rejected(read_records_of(path, max_record_bytes=200))
    assert rejected == [
        (
            f"{path}:3",
            "too_large",
            "unclosed quote starting at line 3: read as one record up to line 13, "
            "it passes data.max_record_bytes (200) without ending",
        )
    ]
    assert len(kept) == 38 and kept[1][0] == f"{path}:4"


def test_records_nested_too_deeply_are_rejected_and_the_rest_go_on(tmp_path):
    good = [json.dumps({"instruction": f"q{n}", "output": f"a{n}"}) for n in range(20)]
    lines = [*good[:10], nested(1_000), nested(MAX_DEPTH + 1), nested(MAX_DEPTH), *good[10:]]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    kept, rejected = kept_and_rejected(read_records_of(path))
    reason = TOO_DEEP + " (the limit for a record)"
    assert rejected == [(f"{path}:11", "unreadable", reason), (f"{path}:12", "unreadable", reason)]
    assert [where for where, _ in kept] == [f"{path}:{n}" for n in [*range(1, 11), *range(13, 24)]]
    assert detect_file_format(DataFile(path=path), 10**6).name == "alpaca"

    array = tmp_path / "a.json"
    elements = [good[0], nested(100_000), good[1], nested(MAX_DEPTH + 1), good[2]]
    array.write_text("[" + ",\n".join(elements) + "]", encoding="utf-8")
    records = read_records_of(array)
    kept, rejected = kept_and_rejected(records)
    assert [where for where, _ in kept] == [f"{array}:1", f"{array}:3", f"{array}:5"]
    assert [(where, kind) for where, kind, _ in rejected] == [
        (f"{array}:2", "unreadable"),
        (f"{array}:4", "unreadable"),
    ]
    assert records[1].raw == nested(100_000)[:1000]

    table = tmp_path / "d.csv"
    cell = nested(5_000)[len('{"messages": ') : -1]
    table.write_text(f'messages\n"{cell}"\n"[]"\n', encoding="utf-8")
    records = read_records_of(table)
    assert [(r.where, r.error.field if r.error else None) for r in records] == [
        (f"{table}:2", "messages"),
        (f"{table}:3", None),
    ]
    assert records[0].error.reason.startswith(TOO_DEEP) and records[1].value == {"messages": []}


def test_windows_1252_with_utf8_looking_pairs_on_every_other_line_is_refused_whole(tmp_path):
    """`ß“` in Windows-1252 is DF 93, a well-formed UTF-8 pair: before, it passed the file as UTF-8 and half
    its records were rejected one by one."""
    lines = [
        {"instruction": f"Frage {n}: Wie „groß“ ist das?" if n % 2 == 0 else f"Question {n}", "output": "ok"}
        for n in range(20)
    ]
    path = tmp_path / "d.jsonl"
    path.write_bytes("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in lines).encode("cp1252"))
    with pytest.raises(EncodingError) as info:
        read_records_of(path)
    assert str(info.value) == (
        f"{path}: not UTF-8 (byte 30: b'\\x84') on line 1; its bytes look like Windows-1252 (cp1252); "
        "save it as UTF-8 (with or without a byte-order mark) and run again"
    )


@pytest.mark.parametrize(
    ("name", "data", "why"),
    [
        ("d.jsonl", b"", "the file is empty (0 bytes)"),
        ("d.csv", b"", "the file is empty (0 bytes)"),
        ("d.json", b"", "the file is empty (0 bytes)"),
        ("d.jsonl", b"\n\n   \n", "the file holds only blank lines"),
        ("d.json", b" \r\n\t\n", "the file holds only blank lines"),
        ("d.csv", codecs.BOM_UTF8, "the file holds only a byte-order mark"),
        (
            "d.csv",
            b"instruction,output\n",
            "the CSV file has a header row (instruction, output) but no rows under it",
        ),
        (
            "d.csv",
            b"\ninstruction;output\n\n",
            "the CSV file has a header row (instruction, output) but no rows under it",
        ),
        ("d.json", b"[ ]\n", "the JSON array is empty"),
    ],
    ids=[
        "empty-jsonl",
        "empty-csv",
        "empty-json",
        "blank-jsonl",
        "blank-json",
        "bom-only",
        "header-only",
        "semicolon-header-only",
        "empty-array",
    ],
)
def test_an_input_without_records_says_why(tmp_path, name, data, why):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as info:
        detect_file_format(DataFile(path=path), 10**6)
    assert str(info.value) == f"{path}: no records: {why}"


@pytest.mark.parametrize(
    ("header", "separator"),
    [("instruction;output", ";"), ("instruction\toutput", "\t"), ("instruction, output ", ",")],
)
def test_csv_separated_by_semicolons_or_tabs_and_spaced_header_names_are_read(tmp_path, header, separator):
    """Excel saves `;`-separated "CSV" where the decimal separator is a comma; cells keep their commas."""
    path = tmp_path / "d.csv"
    cells = ["What is 1,5 plus 1?", "It is 2,5."] if separator != "," else ["Hi", '"A, b"']
    path.write_text(f"{header}\n" + separator.join(cells) + "\n", encoding="utf-8")
    assert detect_file_format(DataFile(path=path), 10**6).name == "alpaca"
    [record] = read_records_of(path)
    output = "A, b" if separator == "," else cells[1]
    assert (record.where, record.error, record.value) == (
        f"{path}:2",
        None,
        {"instruction": cells[0], "output": output},
    )


EXPECTED_FORMATS = (
    " Expected one of: preference: chosen, rejected, and a prompt (text or messages); prompt_completion: "
    "prompt, completion (text or messages); alpaca: instruction, output, optional input and system; "
    "sharegpt: conversations: [{from, value}, ...]; openai: messages: [{role, content}, ...]."
)


@pytest.mark.parametrize(
    ("header", "hint", "columns"),
    [
        (
            "instrution,output",
            "found records with keys ['instrution', 'output']. Found 'instrution': did you mean "
            "'instruction'? Rename it in the file, or map it in the input's entry: "
            "`{path: PATH, columns: {instruction: instrution}}`.",
            {"instruction": "instrution"},
        ),
        (
            "Instruction,Output",
            "found records with keys ['Instruction', 'Output']. Field names are case-sensitive: "
            "'Instruction' is not 'instruction', 'Output' is not 'output'. Rename them in the file, or map "
            "them in the input's entry: `{path: PATH, columns: {instruction: Instruction, output: Output}}`.",
            {"instruction": "Instruction", "output": "Output"},
        ),
        (
            "question,answer",
            "found records with keys ['answer', 'question']. Map differently named fields with `columns` "
            "(e.g. {output: answer}).",
            None,
        ),
    ],
    ids=["typo", "case", "other-names"],
)
def test_keys_that_nearly_name_a_format_get_a_did_you_mean_and_the_mapping(tmp_path, header, hint, columns):
    path = tmp_path / "d.csv"
    path.write_text(f"{header}\nWhat is 2+2?,4\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        detect_file_format(DataFile(path=path), 10**6)
    found = hint.replace("PATH", str(path))
    assert str(info.value) == f"{path}: matches no known format; {found}{EXPECTED_FORMATS}"
    if columns is not None:  # the mapping the message proposes reads the file
        assert detect_file_format(DataFile(path=path, columns=columns), 10**6).name == "alpaca"


def test_nan_and_infinity_are_not_json(tmp_path):
    """Python's json reads NaN, Infinity and -Infinity; JSON has no such values, so the record is rejected,
    with where the constant is; a string holding the word is text like any other."""
    lines = tmp_path / "d.jsonl"
    lines.write_text(
        '{"instruction": "nan", "output": NaN}\n'
        '{"instruction": "NaN", "output": "Infinity"}\n'
        '{"instruction": "x", "output": [1, -Infinity]}\n',
        encoding="utf-8",
    )
    kept, rejected = kept_and_rejected(read_records_of(lines))
    assert kept == [(f"{lines}:2", {"instruction": "NaN", "output": "Infinity"})]
    assert rejected == [
        (f"{lines}:1", "unreadable", "invalid JSON: NaN is not a JSON value: line 1 column 34 (char 33)"),
        (
            f"{lines}:3",
            "unreadable",
            "invalid JSON: -Infinity is not a JSON value: line 1 column 36 (char 35)",
        ),
    ]
    array = tmp_path / "a.json"
    array.write_text(
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": Infinity},\n'
        '  {"instruction": "e", "output": "f"}\n]\n',
        encoding="utf-8",
    )
    kept, rejected = kept_and_rejected(read_records_of(array))
    assert [where for where, _ in kept] == [f"{array}:1", f"{array}:3"]
    assert rejected == [
        (f"{array}:2", "unreadable", "invalid JSON: Infinity is not a JSON value: line 3 column 34 (char 74)")
    ]
    table = tmp_path / "d.csv"
    table.write_text('messages\n"[{""role"": ""user"", ""content"": NaN}]"\n', encoding="utf-8")
    [record] = read_records_of(table)
    assert (record.error.field, record.error.reason) == (
        "messages",
        "invalid JSON: NaN is not a JSON value: line 1 column 30 (char 29)",
    )


def test_a_trailing_comma_is_pointed_out(tmp_path):
    array = tmp_path / "a.json"
    array.write_text('[\n  {"instruction": "a", "output": "b"},\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_records_of(array)
    assert str(info.value) == (
        f"{array}: invalid JSON at line 3, column 1: Expecting value (a trailing comma before it?); "
        "expected a JSON array of records (or JSON Lines)"
    )
    array.write_text('[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "c"}]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3, column 3: Expecting ',' delimiter; expected"):
        read_records_of(array)  # no comma before it: no hint
    lines = tmp_path / "d.jsonl"
    lines.write_text(
        '{"instruction": "a", "output": "b",}\n{"instruction": "a", "output": "b"}\n', encoding="utf-8"
    )
    [(_, _, reason)] = kept_and_rejected(read_records_of(lines))[1]
    assert reason == (
        "invalid JSON: Expecting property name enclosed in double quotes (a trailing comma before it?): "
        "line 1 column 36 (char 35)"
    )


def test_csv_quote_left_open_on_the_last_line_says_unclosed_quote(tmp_path):
    rows = [alpaca_row(n) for n in range(1, 4)] + ['"Explain the last item, never closed,Answer']
    path = tmp_path / "d.csv"
    path.write_text(alpaca_csv(rows), encoding="utf-8")
    kept, rejected = kept_and_rejected(read_records_of(path))
    assert len(kept) == 3
    assert rejected == [
        (f"{path}:5", "invalid", "unclosed quote starting at line 5: the file ends before it closes")
    ]
