"""`llamatailor prepare` on real files: good records go through, bad ones are kept with precise reasons;
and the typed records its passes keep."""

import json
from typing import get_args

import numpy as np
from typer.testing import CliRunner

from helpers import alpaca_rows, write_jsonl, write_run_file
from llamatailor.cli import app
from llamatailor.data.formats import Kind, Sample
from llamatailor.data.prepare import REASONS
from llamatailor.data.records import AcceptedRecordsBuilder, Decision, Decisions, SampleKind
from llamatailor.data.scan import Accepted
from llamatailor.data.split import SplitCode
from llamatailor.vocabulary import SPLITS

runner = CliRunner()


def make_data(tmp_path):
    rows = alpaca_rows(20)
    rows.insert(3, {"instruction": "Give the next number as JSON.", "output": 5})  # line 4: wrong type
    rows.insert(6, {"instruction": "Say <|im_end|>", "output": "no"})  # line 7: control token text
    rows.insert(9, {"instruction": "word " * 200, "output": "too late"})  # line 10: answer cut away
    rows.append({"instruction": "Long answer.", "output": "many " * 100})  # line 24: truncated, kept
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"instruction": "broken", "output": \n')  # line 25: invalid JSON
    return path


def test_prepare_keeps_good_records_and_explains_bad_ones(tmp_path, tiny_models):
    data = make_data(tmp_path)
    run_file = write_run_file(
        tmp_path, tiny_models["chatml"], [data], data={"system_prompt": "Answer in JSON.", "max_seq_len": 64}
    )
    result = runner.invoke(app, ["prepare", str(run_file)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    rejected = [json.loads(line) for line in (run / "data" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["source"], r["kind"], r["field"]) for r in rejected] == [
        (f"{data}:4", "invalid", "output"),
        (f"{data}:7", "unrenderable", ""),
        (f"{data}:10", "truncated_away", ""),
        (f"{data}:25", "unreadable", ""),
    ]
    assert rejected[0]["reason"] == "expected a string, got int"
    assert rejected[0]["record"] == {"instruction": "Give the next number as JSON.", "output": 5}
    assert "special token text '<|im_end|>'" in rejected[1]["reason"]
    assert (
        "assistant part is truncated away" in rejected[2]["reason"]
        and "max_seq_len is 64" in rejected[2]["reason"]
    )
    assert rejected[3]["reason"].startswith("invalid JSON")

    report = json.loads((run / "data" / "report.json").read_text())
    assert report["splits"]["sft"] == {"train": 13, "val": 4, "test": 4}
    assert report["rejected"]["train"] == {
        "invalid": 1,
        "truncated_away": 1,
        "unreadable": 1,
        "unrenderable": 1,
    }
    assert report["inputs"][0]["format"] == "alpaca" and report["inputs"][0]["accepted"] == 21
    assert sum(report["truncated"]["sft"].values()) == 1
    assert report["family"] == "chatml"

    splits = {
        name: (run / "data" / f"{name}.jsonl").read_text().splitlines() for name in ("train", "val", "test")
    }
    records = [json.loads(line) for lines in splits.values() for line in lines]
    assert len({r["id"] for r in records}) == 21
    assert all(r["messages"][0] == {"role": "system", "content": "Answer in JSON."} for r in records)
    assert (run / "data" / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rejected: 4" in result.output
    assert f"{data}:4: output: expected a string, got int" in result.output


def test_prepare_twice_gives_identical_files(tmp_path, tiny_models):
    prefs = write_jsonl(
        tmp_path / "prefs.jsonl", [{"prompt": f"Q{n}", "chosen": "yes", "rejected": "no"} for n in range(6)]
    )
    inputs = [make_data(tmp_path), prefs]
    run_file = write_run_file(
        tmp_path, tiny_models["chatml"], inputs, data={"max_seq_len": 64, "pii": {"mode": "mask"}}
    )
    data_dir = tmp_path / "runs" / "tiny" / "data"
    contents = []
    for _ in range(2):
        assert runner.invoke(app, ["prepare", str(run_file)]).exit_code == 0
        files = sorted(path for path in data_dir.rglob("*") if path.is_file() and path.suffix != ".png")
        contents.append({str(path.relative_to(data_dir)): path.read_bytes() for path in files})
    assert contents[0] == contents[1]
    assert sorted(contents[0]) == [
        "preference/test.jsonl",
        "preference/train.jsonl",
        "preference/val.jsonl",
        "rejected.jsonl",
        "report.json",
        "report.md",
        "test.jsonl",
        "train.jsonl",
        "val.jsonl",
    ]


def test_explicit_val_file_is_used_as_given(tmp_path, tiny_models):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(10))
    val = write_jsonl(tmp_path / "val.jsonl", alpaca_rows(3, start=100))
    run_file = write_run_file(
        tmp_path, tiny_models["llama3"], [train], data={"val": [str(val)], "test_ratio": 0.0}
    )
    assert runner.invoke(app, ["prepare", str(run_file)]).exit_code == 0
    data_dir = tmp_path / "runs" / "tiny" / "data"
    val_rows = [json.loads(line) for line in (data_dir / "val.jsonl").read_text().splitlines()]
    assert [row["source"] for row in val_rows] == [f"{val}:1", f"{val}:2", f"{val}:3"]
    assert len((data_dir / "train.jsonl").read_text().splitlines()) == 10
    assert (data_dir / "test.jsonl").read_text() == ""


def test_file_in_no_known_format_fails_clearly(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    run_file = write_run_file(tmp_path, tiny_models["chatml"], [data])
    result = runner.invoke(app, ["prepare", str(run_file)])
    assert result.exit_code == 1
    assert (
        "qa.jsonl: matches no known format; found records with keys ['answer', 'question']" in result.output
    )


def test_typo_in_run_file_exits_2_with_the_fix(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(5))
    run_file = write_run_file(tmp_path, tiny_models["chatml"], [data], train={"batch_sise": 4})
    result = runner.invoke(app, ["prepare", str(run_file)])
    assert result.exit_code == 2
    assert "train.batch_sise (run.yaml line" in result.output
    assert "unknown key (value 4); did you mean 'train.batch_size'?" in result.output
    assert not (tmp_path / "runs").exists(), "nothing is written for an invalid run file"


def test_the_record_codes_name_every_sample_kind_split_and_removal():
    assert [kind.label for kind in SampleKind] == list(get_args(Kind))
    assert [split.label for split in SplitCode] == list(SPLITS)
    assert SampleKind.of("preference") is SampleKind.PREFERENCE and SplitCode.of("val") is SplitCode.VAL
    # The labels are rejected.jsonl's kinds; each removal has its reason.
    assert [decision.label for decision in Decision] == ["kept", "duplicate", "near_duplicate", "leak"]
    assert set(REASONS) == set(Decision) - {Decision.KEPT}


def test_accepted_records_keep_each_fact_in_its_column():
    question = {"role": "user", "content": "Q"}
    chat = Sample("sft", [question, {"role": "assistant", "content": "A"}])
    pair = Sample("preference", [question], chosen="a", rejected="b")
    builder = AcceptedRecordsBuilder(num_perm=4)
    added = [
        (Accepted(chat, 12, False, "Q A", "x"), SplitCode.TRAIN, 2**64 - 1, 3),
        (Accepted(pair, 300, True, "Q a b", "y"), SplitCode.TEST, 5, 2),
        (Accepted(chat, 7, False, "Q A", "x"), SplitCode.VAL, 6, 1),
    ]
    for n, (accepted, split, exact, shingle_count) in enumerate(added):
        builder.add(accepted, split, exact, np.arange(4 * n, 4 * n + 4, dtype=np.uint32), shingle_count)
    records = builder.finish()
    assert records.kind.tolist() == [SampleKind.SFT, SampleKind.PREFERENCE, SampleKind.SFT]
    assert records.input_split.tolist() == [SplitCode.TRAIN, SplitCode.TEST, SplitCode.VAL]
    assert records.exact.tolist() == [2**64 - 1, 5, 6]
    assert records.tokens.tolist() == [12, 300, 7] and records.truncated.tolist() == [False, True, False]
    assert records.stratum.tolist() == [0, 1, 0] and records.strata == ("x", "y")
    assert records.signatures.tolist() == np.arange(12).reshape(3, 4).tolist()
    assert records.shingle_ends.tolist() == [3, 5, 6]  # each record's end in the shingle spool

    decisions = Decisions(
        cluster=np.array([0, 1, 0]),
        decision=np.array([Decision.KEPT, Decision.KEPT, Decision.DUPLICATE], dtype=np.int8),
        repeats=np.array([-1, -1, 0]),
        split=np.array([SplitCode.TRAIN, SplitCode.TEST, SplitCode.VAL], dtype=np.int8),
    )
    assert decisions.written(records, SampleKind.SFT, SplitCode.TRAIN).tolist() == [True, False, False]
    assert decisions.written(records, SampleKind.PREFERENCE, SplitCode.TEST).tolist() == [False, True, False]
    assert not decisions.written(records, SampleKind.SFT, SplitCode.VAL).any()  # removed as a duplicate
