"""Alpaca, ShareGPT and OpenAI records into one canonical conversation; precise errors otherwise."""

import pytest

from llamatailor.data.formats import FORMATS, RecordError, Sample, detect_format, to_sample

FMT = {fmt.name: fmt for fmt in FORMATS}


def to_conversation(record, fmt):
    sample = to_sample(record, fmt)
    assert sample.kind == "sft"
    return sample.messages


def test_alpaca_with_and_without_input():
    record = {"instruction": "Add.", "input": "1 + 1", "output": "2", "system": "Be exact."}
    assert to_conversation(record, FMT["alpaca"]) == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Add.\n\n1 + 1"},
        {"role": "assistant", "content": "2"},
    ]
    assert to_conversation({"instruction": "Hi", "input": "", "output": "Hello"}, FMT["alpaca"]) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_sharegpt_roles_are_mapped():
    record = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "user", "value": "Q2"},
            {"from": "assistant", "value": "A2"},
        ]
    }
    roles = [m["role"] for m in to_conversation(record, FMT["sharegpt"])]
    assert roles == ["system", "user", "assistant", "user", "assistant"]


def test_openai_messages_with_text_parts_and_developer_role():
    record = {
        "messages": [
            {"role": "developer", "content": "Rules"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"},
        ]
    }
    assert to_conversation(record, FMT["openai"]) == [
        {"role": "system", "content": "Rules"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "c"},
    ]


@pytest.mark.parametrize(
    ("record", "fmt", "field", "reason"),
    [
        ({"instruction": "x", "output": 3}, "alpaca", "output", "expected a string, got int"),
        ({"instruction": "x"}, "alpaca", "output", "missing; this input is in alpaca format"),
        ({"conversations": "hi"}, "sharegpt", "conversations", "expected a list of turns, got str"),
        (
            {"conversations": [{"from": "robot", "value": "x"}]},
            "sharegpt",
            "conversations[0].from",
            "unknown role 'robot'",
        ),
        ({"messages": []}, "openai", "messages", "empty conversation"),
        ({"messages": [{"role": "system", "content": "s"}]}, "openai", "messages", "only a system message"),
        (
            {"messages": [{"role": "user", "content": "q"}]},
            "openai",
            "messages",
            "no assistant turn answers the last user message",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]},
            "openai",
            "messages[1].role",
            "got 'user', expected 'assistant'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url"}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "openai",
            "messages[0].content[0]",
            "only text parts",
        ),
    ],
)
def test_bad_records_name_field_and_reason(record, fmt, field, reason):
    with pytest.raises(RecordError) as info:
        to_conversation(record, FMT[fmt])
    assert info.value.field == field
    assert reason in info.value.reason


def test_detect_format_by_keys():
    assert detect_format({"instruction": "a", "output": "b"}).name == "alpaca"
    assert detect_format({"conversations": []}).name == "sharegpt"
    assert detect_format({"messages": []}).name == "openai"
    assert detect_format({"prompt": "a"}) is None
    assert detect_format({"prompt": "a", "completion": "b"}).name == "prompt_completion"
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c"}).name == "preference"
    assert detect_format(["not", "a", "dict"]) is None


def test_prompt_completion_as_text_and_as_messages():
    assert to_conversation({"prompt": "Q", "completion": "A"}, FMT["prompt_completion"]) == [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    record = {
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        "completion": [{"role": "assistant", "content": "A"}],
    }
    assert [m["role"] for m in to_conversation(record, FMT["prompt_completion"])] == [
        "system",
        "user",
        "assistant",
    ]


def test_preference_with_explicit_and_implicit_prompt():
    explicit = to_sample({"prompt": "Q", "chosen": "good", "rejected": "bad"}, FMT["preference"])
    assert explicit == Sample("preference", [{"role": "user", "content": "Q"}], "good", "bad")
    shared = [{"role": "user", "content": "Q"}]
    implicit = {
        "chosen": [*shared, {"role": "assistant", "content": "good"}],
        "rejected": [*shared, {"role": "assistant", "content": "bad"}],
    }
    assert to_sample(implicit, FMT["preference"]) == explicit
    assert explicit.conversations()[1] == [*shared, {"role": "assistant", "content": "bad"}]
    assert explicit.row("id1", "f:1") == {
        "id": "id1",
        "source": "f:1",
        "prompt": shared,
        "chosen": "good",
        "rejected": "bad",
    }


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        ({"prompt": "Q", "chosen": 1, "rejected": "b"}, "chosen", "expected a list of turns, got int"),
        (
            {"prompt": "Q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
            "chosen",
            "expected one assistant message",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}],
            },
            "rejected",
            "share all turns but the last",
        ),
        (
            {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
            "messages[0].role",
            "expected 'user'",
        ),
    ],
)
def test_bad_preference_records(record, field, reason):
    with pytest.raises(RecordError) as info:
        to_sample(record, FMT["preference"])
    assert info.value.field == field and reason in info.value.reason
