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


# --- Tool calling (OpenAI's format) ----------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "send_email",
            "description": "Send an e-mail.",
            "parameters": {"type": "object", "properties": {"to": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
]


def call(name="send_email", arguments='{"to": "ann@example.com", "cc": ["bob@example.com"]}', id="c1"):
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_messages(*calls, results=None):
    """user, an assistant message calling `calls` (content null, as OpenAI sends it), their results, answer."""
    if results is None:
        results = [{"role": "tool", "tool_call_id": c.get("id"), "content": "sent"} for c in calls]
    return [
        {"role": "user", "content": "Mail Ann."},
        {"role": "assistant", "content": None, "tool_calls": list(calls)},
        *results,
        {"role": "assistant", "content": "Done."},
    ]


def test_an_openai_tool_calling_record_becomes_the_canonical_form():
    record = {"tools": TOOLS, "messages": tool_messages(call())}
    record["messages"][2]["name"] = "send_email"
    sample = to_sample(record, FMT["openai"])
    assert sample.tools == TOOLS
    assert sample.messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {
                    "name": "send_email",
                    "arguments": {"to": "ann@example.com", "cc": ["bob@example.com"]},
                },
            }
        ],
    }
    assert sample.messages[2] == {
        "role": "tool",
        "content": "sent",
        "tool_call_id": "c1",
        "name": "send_email",
    }
    assert sample.row("id1", "f:1")["tools"] == TOOLS
    # Texts: the empty text of a call is no empty message; arguments only when asked (PII, dedup).
    assert [name for name, _ in sample.texts()] == [f"messages[{i}].content" for i in (0, 2, 3)]
    assert sample.texts(arguments=True)[3:] == [
        ("messages[1].tool_calls[0].function.arguments.to", "ann@example.com"),
        ("messages[1].tool_calls[0].function.arguments.cc[0]", "bob@example.com"),
    ]
    masked = sample.map_texts(lambda text: text.replace("example.com", "[X]"), arguments=True)
    assert masked.messages[1]["tool_calls"][0]["function"] == {
        "name": "send_email",
        "arguments": {"to": "ann@[X]", "cc": ["bob@[X]"]},
    }
    assert sample.map_texts(str.upper).messages[1] == {**sample.messages[1], "content": ""}
    assert masked.tools == TOOLS


def test_calls_answered_out_of_order_by_id_then_a_second_call_then_the_answer():
    messages = tool_messages(
        call(id="a"),
        call("lookup", "{}", id="b"),
        results=[
            {"role": "tool", "tool_call_id": "b", "content": "found"},
            {"role": "tool", "tool_call_id": "a", "content": "sent"},
        ],
    )
    messages[-1:-1] = [
        {"role": "assistant", "content": "One more.", "tool_calls": [call("lookup", {"q": 1}, id="c")]},
        {"role": "tool", "content": "ok"},  # no id: answers the next call in order
    ]
    sample = to_sample({"messages": messages}, FMT["openai"])
    assert [m["role"] for m in sample.messages] == [
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]
    assert sample.tools is None and "tools" not in sample.row("i", "f:1")
    # A conversation may end with a call: the model learns to call.
    assert to_sample({"messages": tool_messages(call())[:2]}, FMT["openai"]).messages[-1]["tool_calls"]


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        (
            {"messages": tool_messages(call(arguments='{"to": "ann@'))},
            "messages[1].tool_calls[0].function.arguments",
            "not valid JSON: Unterminated string starting at: line 1 column 8 (char 7)",
        ),
        (
            {"messages": tool_messages(call(arguments='{"limit": NaN}'))},
            "messages[1].tool_calls[0].function.arguments",
            "not valid JSON: NaN is not a JSON value",
        ),
        (
            {"messages": tool_messages(call(arguments="[1, 2]"))},
            "messages[1].tool_calls[0].function.arguments",
            "expected a JSON object of arguments by name, got array",
        ),
        (
            {"messages": tool_messages(call(arguments=None))},
            "messages[1].tool_calls[0].function.arguments",
            "missing",
        ),
        (
            {"tools": TOOLS, "messages": tool_messages(call("delete_all"))},
            "messages[1].tool_calls[0].function.name",
            "'delete_all' is not one of the record's tools (lookup, send_email)",
        ),
        (
            {"messages": tool_messages({"type": "code", "function": {"name": "x", "arguments": {}}})},
            "messages[1].tool_calls[0].type",
            "got 'code'; only 'function' tool calls are supported",
        ),
        (
            {"messages": tool_messages({"function": {"name": "", "arguments": {}}})},
            "messages[1].tool_calls[0].function.name",
            "empty",
        ),
        (  # only a message that calls tools may have no text
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
            "messages[1].content",
            "expected a string or a list of text parts, got null",
        ),
        (
            {"messages": [{"role": "user", "content": "q", "tool_calls": [call()]}]},
            "messages[0].tool_calls",
            "only assistant messages call tools; this one is 'user'",
        ),
        ({"tools": {"name": "x"}, "messages": []}, "tools", "expected a list of tools, got dict"),
        (
            {"tools": [TOOLS[0], TOOLS[0]], "messages": []},
            "tools[1].function.name",
            "'send_email' is defined twice",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}], "messages": []},
            "tools[0].function.parameters",
            "expected a JSON Schema object, got string",
        ),
        (
            {"messages": tool_messages(call(), results=[])},
            "messages[2].role",
            "got 'assistant', expected 'tool': messages[1] calls tools, and each call needs its result in a "
            "tool message (1 still missing)",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]},
            "messages[1].role",
            "got 'tool', expected 'assistant': a tool message answers a call of the assistant message before it",
        ),
        (
            {"messages": [*tool_messages(call())[:3], {"role": "user", "content": "and?"}]},
            "messages[3].role",
            "got 'user', expected 'assistant': after the tool results, the assistant calls again or answers",
        ),
        (
            {"messages": tool_messages(call())[:3]},
            "messages",
            "no assistant turn answers the last tool message",
        ),
        (
            {
                "messages": tool_messages(
                    call(), results=[{"role": "tool", "tool_call_id": "zz", "content": "r"}]
                )
            },
            "messages[2].tool_call_id",
            "'zz' is not the id of a call waiting for its result ('c1')",
        ),
    ],
)
def test_bad_tool_calling_records_name_field_and_reason(record, field, reason):
    with pytest.raises(RecordError) as info:
        to_sample(record, FMT["openai"])
    assert (info.value.field, info.value.reason) == (field, reason)
