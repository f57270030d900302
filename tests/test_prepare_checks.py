"""`prepare` checks from the CLI: cleaning, length policies, PII modes, deduplication, leakage, strata."""

import json

from typer.testing import CliRunner

from helpers import conversation, read_rows, write_jsonl, write_run_file
from llamatailor.cli import app

runner = CliRunner()


def prepare(tmp_path, model, inputs, **data):
    data.setdefault("val_ratio", 0.0)
    data.setdefault("test_ratio", 0.0)
    run_file = write_run_file(tmp_path, model, inputs, data=data)
    result = runner.invoke(app, ["prepare", str(run_file)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "runs" / "tiny" / "data"
    return folder, json.loads((folder / "report.json").read_text())


def answers(folder, split="train"):
    return [row["messages"][-1]["content"] for row in read_rows(folder / f"{split}.jsonl")]


def test_cleaning_normalises_and_counts(tmp_path, tiny_models):
    rows = [
        conversation(
            "Cafe\u0301?", "  Oui.  \r\nBien\u0000 sûr.\t \n"
        ),  # NFD accent, CRLF, NUL, trailing blanks
        conversation("plain", "already clean"),
        conversation("only spaces", "   \n\t "),  # empty after cleaning
    ]
    folder, report = prepare(tmp_path, tiny_models["chatml"], [write_jsonl(tmp_path / "d.jsonl", rows)])
    train = read_rows(folder / "train.jsonl")
    assert train[0]["messages"] == [
        {"role": "user", "content": "Café?"},
        {"role": "assistant", "content": "Oui.\nBien sûr."},
    ]
    assert report["cleaned"] == {"control_chars": 1, "unicode_nfc": 1, "whitespace": 2}
    assert report["rejected"]["train"] == {"empty": 1}
    rejected = read_rows(folder / "rejected.jsonl")
    assert (
        rejected[0]["field"] == "messages[1].content" and "data.policy.empty is drop" in rejected[0]["reason"]
    )


def test_length_policies(tmp_path, tiny_models):
    rows = [
        conversation("short", "ok"),
        conversation("long", "word " * 200),
        conversation("fine", "a reasonable answer of several tokens"),
        conversation("empty", " "),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    folder, report = prepare(tmp_path, tiny_models["chatml"], [path], max_seq_len=64, min_answer_tokens=3)
    assert answers(folder) == [("word " * 200).strip(), "a reasonable answer of several tokens"]
    assert report["rejected"]["train"] == {"empty": 1, "too_short": 1}
    assert report["truncated"]["sft"]["train"] == 1

    keep = {"empty": "keep", "too_short": "keep", "too_long": "drop"}
    folder, report = prepare(
        tmp_path, tiny_models["chatml"], [path], max_seq_len=64, min_answer_tokens=3, policy=keep
    )
    assert answers(folder) == ["ok", "a reasonable answer of several tokens", ""]
    assert report["rejected"]["train"] == {"too_long": 1}
    assert report["kept_by_policy"] == {"empty": 1, "too_short": 2}


def test_pii_modes(tmp_path, tiny_models):
    rows = [
        conversation("Reach me at ann@example.org", "Card 4111 1111 1111 1111 noted."),
        conversation("Nothing personal here", "Indeed nothing."),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    folder, report = prepare(tmp_path, tiny_models["chatml"], [path], pii={"mode": "report"})
    assert answers(folder)[0] == "Card 4111 1111 1111 1111 noted."
    assert report["pii"] == {
        "mode": "report",
        "records": {"card": 1, "email": 1},
        "findings": {"card": 1, "email": 1},
    }

    folder, _ = prepare(tmp_path, tiny_models["chatml"], [path], pii={"mode": "mask"})
    masked = read_rows(folder / "train.jsonl")[0]["messages"]
    assert [m["content"] for m in masked] == ["Reach me at [EMAIL]", "Card [CARD] noted."]

    folder, report = prepare(tmp_path, tiny_models["chatml"], [path], pii={"mode": "drop", "kinds": ["card"]})
    assert answers(folder) == ["Indeed nothing."]
    rejected = read_rows(folder / "rejected.jsonl")
    assert (rejected[0]["kind"], rejected[0]["field"]) == ("pii", "messages[1].content")
    assert rejected[0]["reason"] == "contains card (data.pii.mode is drop)"


def test_exact_and_near_duplicates_are_removed_with_the_record_they_repeat(tmp_path, tiny_models):
    base = "The quick brown fox jumps over the lazy dog near the quiet river bank at dawn today"
    rows = [
        conversation("Tell me a story.", base),  # line 1: kept
        conversation("tell  me a STORY.", base),  # line 2: same normalised text (case, spacing)
        conversation("Tell me a story.", base.replace("dawn", "dusk")),  # line 3: near-duplicate
        conversation("Something else entirely", "A different answer with other words altogether"),  # 4
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    folder, report = prepare(tmp_path, tiny_models["chatml"], [path])
    assert [row["source"] for row in read_rows(folder / "train.jsonl")] == [f"{path}:1", f"{path}:4"]
    rejected = {row["source"]: row for row in read_rows(folder / "rejected.jsonl")}
    assert rejected[f"{path}:2"]["kind"] == "duplicate"
    assert rejected[f"{path}:2"]["reason"] == f"same normalised text as {path}:1"
    assert rejected[f"{path}:3"]["kind"] == "near_duplicate"
    assert (
        rejected[f"{path}:3"]["reason"]
        == f"near-duplicate of {path}:1: word 3-gram Jaccard 17/21 = 0.810 >= 0.8"
    )
    assert rejected[f"{path}:3"]["record"]["messages"][1]["content"].endswith("dusk today")
    assert report["dedup"]["removed"] == {"duplicate": 1, "near_duplicate": 1}

    folder, report = prepare(tmp_path, tiny_models["chatml"], [path], dedup={"exact": False, "near": False})
    assert len(read_rows(folder / "train.jsonl")) == 4 and report["dedup"]["removed"] == {}


def test_no_test_record_has_a_near_duplicate_in_train(tmp_path, tiny_models):
    story = "Alice walked the long road from the mill to the old stone bridge every single morning"
    train = [
        conversation(f"Question number {n}?", f"Answer {n} is unrelated to the rest, item {n}.")
        for n in range(8)
    ]
    train.append(conversation("Where did Alice walk?", story))
    test = [
        conversation("Where did Alice walk?", story.replace("morning", "evening")),  # leak
        conversation("A genuinely new question", "with a genuinely new answer"),
    ]
    train_path, test_path = (
        write_jsonl(tmp_path / "train.jsonl", train),
        write_jsonl(tmp_path / "test.jsonl", test),
    )
    folder, report = prepare(
        tmp_path, tiny_models["chatml"], [train_path], test=[str(test_path)], dedup={"near": False}
    )
    assert [row["source"] for row in read_rows(folder / "test.jsonl")] == [f"{test_path}:2"]
    leak = read_rows(folder / "rejected.jsonl")[0]
    assert leak["kind"] == "leak" and leak["source"] == f"{test_path}:1"
    assert (
        leak["reason"]
        == f"a near-duplicate of train record {train_path}:9: kept out of test to avoid leakage"
    )
    assert report["rejected"]["test"] == {"leak": 1}


def test_near_duplicates_kept_together_when_not_removed(tmp_path, tiny_models):
    rows = []
    for n in range(12):
        text = f"topic {n} " + " ".join(f"word{n}x{k}" for k in range(12))
        rows += [conversation(f"About topic {n}", text), conversation(f"About topic {n}", text + " again")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    folder, report = prepare(
        tmp_path, tiny_models["chatml"], [path], val_ratio=0.25, test_ratio=0.25, dedup={"near": False}
    )
    split_of = {}
    for split in ("train", "val", "test"):
        for row in read_rows(folder / f"{split}.jsonl"):
            split_of.setdefault(row["messages"][0]["content"], set()).add(split)
    assert len(split_of) == 12 and all(len(splits) == 1 for splits in split_of.values())
    assert report["splits"]["sft"] == {"train": 12, "val": 6, "test": 6}


def test_stratified_split_keeps_each_class_share(tmp_path, tiny_models):
    rows = [
        {**conversation(f"ticket {n} about billing matters", f"billing reply {n}"), "label": "billing"}
        for n in range(40)
    ] + [
        {**conversation(f"ticket {n} about login trouble", f"login reply {n}"), "label": "login"}
        for n in range(10)
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    folder, report = prepare(tmp_path, tiny_models["chatml"], [path], test_ratio=0.2, stratify_by="label")
    assert report["strata"]["counts"]["test"] == {"billing": 8, "login": 2}
    assert report["strata"]["counts"]["train"] == {"billing": 32, "login": 8}
    assert read_rows(folder / "test.jsonl")[0]["meta"]["label"] in ("billing", "login")
    assert "## Strata of `label`" in (folder / "report.md").read_text()


def test_all_records_rejected_still_writes_a_report_and_train_refuses(tmp_path, tiny_models):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": []}, {"messages": "x"}])
    folder, report = prepare(tmp_path, tiny_models["chatml"], [path])
    assert read_rows(folder / "train.jsonl") == [] and report["rejected"]["train"] == {"invalid": 2}
    result = runner.invoke(app, ["train", str(tmp_path / "run.yaml")])
    assert result.exit_code == 1
    assert (
        "train.jsonl has no samples: see" in result.output
        and "report.md for what was rejected" in result.output
    )
