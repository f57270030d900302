"""`prepare` inputs: every kind of bad record is kept with a precise reason; CSV, Parquet, mapping, preference."""

import codecs
import json

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from helpers import alpaca_rows, conversation, read_rows, write_jsonl, write_run_file
from llamatailor.cli import app
from llamatailor.textfiles import PROBE_BYTES

runner = CliRunner()


def prepare(tmp_path, model, inputs, **sections):
    sections.setdefault("data", {})
    run_file = write_run_file(tmp_path, model, inputs, **sections)
    result = runner.invoke(app, ["prepare", str(run_file)])
    return result, tmp_path / "runs" / "tiny" / "data"


def test_each_kind_of_bad_record_gets_its_reason_and_the_rest_goes_through(tmp_path, tiny_models):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps(conversation(f"question {n}", f"answer {n}")) for n in range(10)]
    bad = [
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',  # 12: Latin-1 byte
        b'{"messages": [{"role": "user", "content": "cut',  # 13: truncated JSON
        json.dumps({"messages": "hello"}).encode(),  # 14: wrong type
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),  # 15: unknown role
        json.dumps({"messages": []}).encode(),  # 16: empty conversation
        json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode(),  # 17: no assistant turn
        json.dumps(conversation("big", "x" * 10_000_000)).encode(),  # 18: 10 MB record
    ]
    # Line 11 is blank but long: bad bytes past the start that is checked whole are one line's fault only.
    padding = b" " * PROBE_BYTES
    path.write_bytes(b"\n".join([line.encode() for line in good] + [padding] + bad) + b"\n")
    csv_path = tmp_path / "table.csv"
    csv_path.write_text("instruction,input,output\nAdd.,1+1,2\nSub.,3-1\nMul.,2*2,4\n", encoding="utf-8")
    result, data = prepare(
        tmp_path, tiny_models["chatml"], [path, csv_path], data={"max_record_bytes": 1_000_000}
    )
    assert result.exit_code == 0, result.output
    rejected = {row["source"]: row for row in read_rows(data / "rejected.jsonl")}
    expected = {
        f"{path}:12": ("unreadable", "", "not valid UTF-8 (byte 46: b'\\xe9')"),
        f"{path}:13": ("unreadable", "", "invalid JSON: Unterminated string"),
        f"{path}:14": ("invalid", "messages", "expected a list of turns, got str"),
        f"{path}:15": ("invalid", "messages[0].role", "unknown role 'wizard'"),
        f"{path}:16": ("invalid", "messages", "empty conversation"),
        f"{path}:17": ("invalid", "messages", "no assistant turn answers the last user message"),
        f"{path}:18": (
            "too_large",
            "",
            f"record is {len(bad[-1]) + 1:,} bytes; data.max_record_bytes is 1,000,000",
        ),
        f"{csv_path}:3": ("invalid", "output", "missing: the row has 2 of the header's 3 columns"),
    }
    assert set(rejected) == set(expected)
    for source, (kind, field, reason) in expected.items():
        assert (rejected[source]["kind"], rejected[source]["field"]) == (kind, field), source
        assert rejected[source]["reason"].startswith(reason), rejected[source]["reason"]
    assert len(rejected[f"{path}:18"]["record"]) == 1000, "a huge record is kept as a preview only"
    kept = sum(len(read_rows(data / f"{split}.jsonl")) for split in ("train", "val", "test"))
    assert kept == 12


def test_csv_parquet_several_files_and_column_mapping(tmp_path, tiny_models):
    csv_path = tmp_path / "qa.csv"
    csv_path.write_text('question,answer\n"multi\nline?",yes\nplain,no\n', encoding="utf-8")
    parquet_path = tmp_path / "chats.parquet"
    rows = [conversation(f"parquet q{n}", f"parquet a{n}") for n in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), parquet_path)
    messages_csv = tmp_path / "messages.csv"
    cell = json.dumps(conversation("json in a cell", "works")["messages"]).replace('"', '""')
    messages_csv.write_text(f'messages\n"{cell}"\n', encoding="utf-8")
    inputs = [
        {
            "path": str(csv_path),
            "format": "prompt_completion",
            "columns": {"prompt": "question", "completion": "answer"},
        },
        str(parquet_path),
        str(messages_csv),
    ]
    result, data = prepare(
        tmp_path, tiny_models["chatml"], [], data={"train": inputs, "val_ratio": 0, "test_ratio": 0}
    )
    assert result.exit_code == 0, result.output
    train = read_rows(data / "train.jsonl")
    assert [row["source"] for row in train] == [
        f"{csv_path}:2",
        f"{csv_path}:4",
        *(f"{parquet_path}:row {n}" for n in range(1, 5)),
        f"{messages_csv}:2",
    ]
    assert train[0]["messages"] == [
        {"role": "user", "content": "multi\nline?"},
        {"role": "assistant", "content": "yes"},
    ]
    assert train[-1]["messages"][1]["content"] == "works"
    report = json.loads((data / "report.json").read_text())
    assert [(i["format"], i["accepted"]) for i in report["inputs"]] == [
        ("prompt_completion", 2),
        ("openai", 4),
        ("openai", 1),
    ]


def test_preference_data_goes_to_its_own_files(tmp_path, tiny_models):
    prefs = [{"prompt": f"Q{n}?", "chosen": f"good answer {n}", "rejected": f"bad {n}"} for n in range(9)]
    prefs.append(
        {
            "chosen": [{"role": "user", "content": "Q9?"}, {"role": "assistant", "content": "good answer 9"}],
            "rejected": [{"role": "user", "content": "Q9?"}, {"role": "assistant", "content": "bad 9"}],
        }
    )
    pref_path = write_jsonl(tmp_path / "prefs.jsonl", prefs)
    sft_path = write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(10))
    result, data = prepare(tmp_path, tiny_models["chatml"], [sft_path, pref_path])
    assert result.exit_code == 0, result.output
    pref_rows = [
        row for split in ("train", "val", "test") for row in read_rows(data / "preference" / f"{split}.jsonl")
    ]
    assert len(pref_rows) == 10
    implicit = next(row for row in pref_rows if row["source"] == f"{pref_path}:10")
    assert implicit["prompt"] == [{"role": "user", "content": "Q9?"}]
    assert (implicit["chosen"], implicit["rejected"]) == ("good answer 9", "bad 9")
    report = json.loads((data / "report.json").read_text())
    assert report["splits"]["preference"] == {"train": 6, "val": 2, "test": 2}
    assert report["splits"]["sft"] == {"train": 6, "val": 2, "test": 2}
    assert "preference" in result.output


def test_hub_dataset_offline_says_what_to_do(tmp_path, tiny_models):
    result, _ = prepare(tmp_path, tiny_models["chatml"], [], data={"train": [{"hub": "tatsu-lab/alpaca"}]})
    assert result.exit_code == 1
    assert "hub:tatsu-lab/alpaca: could not read split 'train' from the Hugging Face Hub" in result.output
    assert "save the data set as a local JSONL, CSV or Parquet file" in result.output


def test_bom_unclosed_csv_quote_and_deep_nesting_cost_one_record_each(tmp_path, tiny_models):
    jsonl = tmp_path / "chats.jsonl"
    lines = [json.dumps(conversation(f"chat question {n}", f"chat answer {n}")) for n in range(20)]
    lines.insert(12, '{"messages": ' + "[" * 1_000 + "]" * 1_000 + "}")  # line 13: 1,001 levels deep
    jsonl.write_bytes(codecs.BOM_UTF8 + "\n".join(lines).encode() + b"\n")  # saved by a Windows editor
    table = tmp_path / "table.csv"
    rows = [f"Add {n} and {n}.,{n}+{n},{2 * n}" for n in range(1, 22)]
    rows[6] = 'Add 7 and 7.,"7+7,14'  # line 8: the quote is never closed
    table.write_bytes(codecs.BOM_UTF8 + ("instruction,input,output\n" + "\n".join(rows) + "\n").encode())
    result, data = prepare(tmp_path, tiny_models["chatml"], [jsonl, table])
    assert result.exit_code == 0, result.output
    rejected = [(row["source"], row["kind"], row["reason"]) for row in read_rows(data / "rejected.jsonl")]
    assert rejected == [
        (f"{jsonl}:13", "unreadable", "nested more than 100 levels deep (the limit for a record)"),
        (
            f"{table}:8",
            "invalid",
            "unclosed quote starting at line 8: read as one record up to line 22, unexpected end of data",
        ),
    ]
    report = json.loads((data / "report.json").read_text())
    assert [(i["format"], i["accepted"], i["rejected"]) for i in report["inputs"]] == [
        ("openai", 20, 1),
        ("alpaca", 20, 1),
    ]
    samples = {
        row["source"]: row["messages"]
        for split in ("train", "val", "test")
        for row in read_rows(data / f"{split}.jsonl")
    }
    assert samples[f"{jsonl}:1"][0] == {"role": "user", "content": "chat question 0"}
    assert samples[f"{table}:9"] == [
        {"role": "user", "content": "Add 8 and 8.\n\n8+8"},
        {"role": "assistant", "content": "16"},
    ]
    assert sorted(int(source.rsplit(":", 1)[1]) for source in samples if source.startswith(str(table))) == [
        n for n in range(2, 23) if n != 8
    ]


def strict_json(line):
    """json.loads as strict readers (RFC 8259) read: NaN, Infinity and -Infinity refused."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


SPLIT_FILES = ("train", "val", "test", "rejected")


def test_every_line_written_is_strict_json(tmp_path, tiny_models):
    """NaN in a JSON input is invalid JSON; NaN from Parquet (a float column) reaches no output bare."""
    jsonl = tmp_path / "nan.jsonl"
    good = [json.dumps({"instruction": f"Question {n}?", "output": f"Answer {n}."}) for n in range(6)]
    jsonl.write_text("\n".join([*good, '{"instruction": "nan", "output": NaN}']) + "\n", encoding="utf-8")
    parquet_path = tmp_path / "scores.parquet"
    rows = [
        {"instruction": f"Parquet question {n}?", "output": f"Parquet answer {n}.", "score": float(n)}
        for n in range(4)
    ]
    rows[1]["score"] = float("nan")  # kept under meta: the sample cannot be written as JSON
    rows[2]["instruction"], rows[2]["score"] = None, float("-inf")  # rejected; its record keeps "-Infinity"
    pq.write_table(pa.Table.from_pylist(rows), parquet_path)
    result, data = prepare(
        tmp_path,
        tiny_models["chatml"],
        [jsonl, parquet_path],
        data={"meta_fields": ["score"], "val_ratio": 0, "test_ratio": 0},
    )
    assert result.exit_code == 0, result.output
    lines = {name: (data / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() for name in SPLIT_FILES}
    parsed = {name: [strict_json(line) for line in found] for name, found in lines.items()}
    rejected = {row["source"]: row for row in parsed["rejected"]}
    assert {source: (row["kind"], row["field"], row["reason"]) for source, row in rejected.items()} == {
        f"{jsonl}:7": ("unreadable", "", "invalid JSON: NaN is not a JSON value: line 1 column 34 (char 33)"),
        f"{parquet_path}:row 2": (
            "invalid",
            "meta.score",
            "NaN is not a JSON value (the split files are JSON)",
        ),
        f"{parquet_path}:row 3": ("invalid", "instruction", "missing"),
    }
    assert rejected[f"{jsonl}:7"]["record"] == '{"instruction": "nan", "output": NaN}'
    assert rejected[f"{parquet_path}:row 2"]["record"]["score"] == "NaN"
    assert rejected[f"{parquet_path}:row 3"]["record"]["score"] == "-Infinity"
    assert len(parsed["train"]) == 8 and [row["meta"]["score"] for row in parsed["train"][6:]] == [0.0, 3.0]


def test_a_missing_data_file_stops_prepare_before_the_model_loads_or_data_is_written(tmp_path):
    result, data = prepare(tmp_path, tmp_path / "no-model", [tmp_path / "missing.jsonl"])
    assert result.exit_code == 1
    assert f"{tmp_path / 'missing.jsonl'}: data file not found" in " ".join(result.output.split())
    assert not data.parent.exists()  # no run directory, config.yaml or manifest.json left behind
