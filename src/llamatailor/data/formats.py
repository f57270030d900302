"""Input record formats turned into one canonical sample: a conversation, or a preference pair.

Conversations (for SFT) come from Alpaca, ShareGPT, OpenAI messages and prompt/completion records: a list
of `{"role": "system" | "user" | "assistant", "content": str}`, an optional leading system message, then
user and assistant turns alternating, ending with an answer. Preference pairs (for DPO) are a prompt
conversation ending with a user turn, and a chosen and a rejected answer.

OpenAI records may also call tools, in OpenAI's tool-calling format: the record's `tools`
(`[{"type": "function", "function": {"name", "description", "parameters"}}]`), assistant messages with
`tool_calls` (`[{"id", "type": "function", "function": {"name", "arguments"}}]`, their `content` optional)
and `tool` messages holding each call's result (`content`, optional `tool_call_id` and `name`). The
canonical form keeps `content` a string ("" for a call without text) and `arguments` a JSON object, as
Hugging Face chat templates expect (OpenAI sends it as a JSON string).
"""

import difflib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Message = dict[str, Any]
Tool = dict[str, Any]
Kind = Literal["sft", "preference"]

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
TOOL_CALLING_ROLES = {**OPENAI_ROLES, "tool": "tool"}


def with_system_prompt(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """The run's system prompt (`data.system_prompt`) first, unless the conversation brings its own: the one
    rule for training samples and for every prompt generated from (eval, chat, serve)."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


class RecordError(ValueError):
    """A record that cannot be used: `field` names where, the message says what was expected."""

    def __init__(self, field: str, reason: str, kind: str = "invalid") -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True)
class Sample:
    """A canonical sample. For preference pairs, `messages` is the prompt and ends with a user turn. `tools`
    are the functions an SFT conversation offers the model (OpenAI's format), rendered with it."""

    kind: Kind
    messages: list[Message]
    chosen: str | None = None
    rejected: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    tools: list[Tool] | None = None

    def texts(self, arguments: bool = False) -> list[tuple[str, str]]:
        """(field, text) for every text the sample holds: each message's content (except the empty content of
        an assistant message that only calls tools), the answers of a preference pair, and with `arguments`
        every string inside tool-call arguments (`messages[2].tool_calls[0].function.arguments.to`)."""
        texts = [
            (f"messages[{i}].content", m["content"])
            for i, m in enumerate(self.messages)
            if m["content"] or "tool_calls" not in m
        ]
        if arguments:
            texts += [text for i, m in enumerate(self.messages) for text in _argument_texts(i, m)]
        if self.kind == "preference":
            texts += [("chosen", self.chosen or ""), ("rejected", self.rejected or "")]
        return texts

    def map_texts(self, change: Callable[[str], str], arguments: bool = False) -> "Sample":
        """`change` applied to every message content and preference answer, and with `arguments` to every
        string inside tool-call arguments; function names and `tools` are never changed."""
        messages = [_map_message(m, change, arguments) for m in self.messages]
        if self.kind == "sft":
            return replace(self, messages=messages)
        return replace(
            self, messages=messages, chosen=change(self.chosen or ""), rejected=change(self.rejected or "")
        )

    def conversations(self) -> list[list[Message]]:
        """What gets rendered: the conversation, or the prompt with each of the two answers."""
        if self.kind == "sft":
            return [self.messages]
        return [
            [*self.messages, {"role": "assistant", "content": answer or ""}]
            for answer in (self.chosen, self.rejected)
        ]

    def row(self, sample_id: str, source: str) -> dict[str, Any]:
        row: dict[str, Any] = {"id": sample_id, "source": source}
        if self.kind == "sft":
            row["messages"] = self.messages
        else:
            row.update(prompt=self.messages, chosen=self.chosen, rejected=self.rejected)
        if self.tools:
            row["tools"] = self.tools
        if self.meta:
            row["meta"] = self.meta
        return row


def _map_message(message: Message, change: Callable[[str], str], arguments: bool) -> Message:
    changed = {**message, "content": change(message["content"])}
    if arguments and "tool_calls" in message:
        changed["tool_calls"] = [
            {
                **call,
                "function": {
                    **call["function"],
                    "arguments": map_strings(call["function"]["arguments"], change),
                },
            }
            for call in message["tool_calls"]
        ]
    return changed


def map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """`value` (JSON-like: lists, tuples, dicts) with `change` applied to every string in it, dict keys aside."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {key: map_strings(item, change) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(map_strings(item, change) for item in value)
    return value


def _argument_texts(index: int, message: Message) -> Iterator[tuple[str, str]]:
    for number, call in enumerate(message.get("tool_calls", ())):
        where = f"messages[{index}].tool_calls[{number}].function.arguments"
        yield from json_strings(call["function"]["arguments"], where)


def json_strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """(field path, string) for every string value inside a JSON value (`where.key[0].key`)."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from json_strings(item, f"{where}.{key}")
    elif isinstance(value, list):
        for number, item in enumerate(value):
            yield from json_strings(item, f"{where}[{number}]")


@dataclass(frozen=True)
class Format:
    name: str
    keys: tuple[str, ...]
    expects: str
    parse: Callable[[dict[str, Any]], Sample]


def _text(record: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise RecordError(key, "missing")
    if not isinstance(value, str):
        raise RecordError(key, f"expected a string, got {type(value).__name__}")
    return value


def _system(record: dict[str, Any]) -> list[Message]:
    system = _text(record, "system", required=False)
    return [{"role": "system", "content": system}] if system.strip() else []


def _sft(messages: list[Message]) -> Sample:
    validate_conversation(messages)
    return Sample("sft", messages)


def parse_alpaca(record: dict[str, Any]) -> Sample:
    instruction = _text(record, "instruction")
    extra = _text(record, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    answer = _text(record, "output")
    return _sft(
        [*_system(record), {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    )


def _turns(
    value: Any,
    where: str,
    role_key: str,
    text_key: str,
    roles: dict[str, str],
    tools: list[Tool] | None = None,
) -> list[Message]:
    """Messages from a list of turns; with `roles` TOOL_CALLING_ROLES, tool calls and results too, the calls
    checked against `tools` when the record has them."""
    if not isinstance(value, list):
        raise RecordError(where, f"expected a list of turns, got {type(value).__name__}")
    tool_names = {tool["function"]["name"] for tool in tools} if tools else None
    messages = []
    for index, turn in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(turn, dict):
            raise RecordError(at, f"expected an object with {role_key!r} and {text_key!r}")
        role = turn.get(role_key)
        if role not in roles:
            raise RecordError(
                f"{at}.{role_key}", f"unknown role {role!r}; expected one of {', '.join(roles)}"
            )
        if roles is TOOL_CALLING_ROLES:
            messages.append(_tool_calling_message(turn, at, roles[role], tool_names))
        else:
            messages.append(
                {"role": roles[role], "content": _content(turn.get(text_key), f"{at}.{text_key}")}
            )
    return messages


def _tool_calling_message(turn: dict[str, Any], at: str, role: str, tool_names: set[str] | None) -> Message:
    """An OpenAI message: text, an assistant's tool calls (its text then optional), or a tool's result."""
    calls = turn.get("tool_calls")
    if calls is not None and role != "assistant":
        raise RecordError(f"{at}.tool_calls", f"only assistant messages call tools; this one is {role!r}")
    if not calls:  # absent, null or [] (some exports write an empty list on every message)
        message = {"role": role, "content": _content(turn.get("content"), f"{at}.content")}
        if role == "tool":
            message.update(
                (key, _name(turn[key], f"{at}.{key}"))
                for key in ("tool_call_id", "name")
                if turn.get(key) is not None
            )
        return message
    if not isinstance(calls, list):
        raise RecordError(f"{at}.tool_calls", f"expected a list of tool calls, got {type(calls).__name__}")
    content = turn.get("content")
    return {
        "role": "assistant",
        "content": "" if content is None else _content(content, f"{at}.content"),
        "tool_calls": [_tool_call(call, f"{at}.tool_calls[{n}]", tool_names) for n, call in enumerate(calls)],
    }


def _tool_call(call: Any, at: str, tool_names: set[str] | None) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise RecordError(at, "expected {'type': 'function', 'function': {'name': ..., 'arguments': ...}}")
    if call.get("type", "function") != "function":
        raise RecordError(f"{at}.type", f"got {call['type']!r}; only 'function' tool calls are supported")
    function = call["function"]
    name = _name(function.get("name"), f"{at}.function.name")
    if tool_names is not None and name not in tool_names:
        raise RecordError(
            f"{at}.function.name",
            f"{name!r} is not one of the record's tools ({', '.join(sorted(tool_names))})",
        )
    parsed = {
        "type": "function",
        "function": {
            "name": name,
            "arguments": _arguments(function.get("arguments"), f"{at}.function.arguments"),
        },
    }
    return {"id": _name(call["id"], f"{at}.id"), **parsed} if call.get("id") is not None else parsed


class NotJson(ValueError):
    """NaN, Infinity or -Infinity met while parsing: Python's json reads them, JSON has no such values."""


def _refuse_constant(name: str) -> Any:
    raise NotJson(name)


# Strict (RFC 8259): a record is JSON as any other reader of it (the outputs, other tools) understands it.
STRICT_JSON = json.JSONDecoder(parse_constant=_refuse_constant)


def _arguments(value: Any, where: str) -> dict[str, Any]:
    """A call's arguments as a JSON object: given as one, or as the JSON text OpenAI sends."""
    if value is None:
        raise RecordError(where, "missing")
    if isinstance(value, str):
        try:
            value = STRICT_JSON.decode(value)
        except json.JSONDecodeError as exc:
            raise RecordError(where, f"not valid JSON: {exc}") from None
        except NotJson as exc:
            raise RecordError(where, f"not valid JSON: {exc} is not a JSON value") from None
    if not isinstance(value, dict):
        raise RecordError(where, f"expected a JSON object of arguments by name, got {_json_type(value)}")
    return value


def _tools(value: Any) -> list[Tool] | None:
    """The record's `tools`, checked: each a function with a unique name (its JSON Schema kept as given)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise RecordError("tools", f"expected a list of tools, got {type(value).__name__}")
    tools: list[Tool] = []
    for index, tool in enumerate(value):
        at = f"tools[{index}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise RecordError(
                at, "expected {'type': 'function', 'function': {'name', 'description', 'parameters'}}"
            )
        if tool.get("type", "function") != "function":
            raise RecordError(f"{at}.type", f"got {tool['type']!r}; only 'function' tools are supported")
        function = tool["function"]
        name = _name(function.get("name"), f"{at}.function.name")
        if any(name == known["function"]["name"] for known in tools):
            raise RecordError(f"{at}.function.name", f"{name!r} is defined twice")
        if not isinstance(function.get("description", ""), str):
            raise RecordError(
                f"{at}.function.description", f"expected a string, got {_json_type(function['description'])}"
            )
        if not isinstance(function.get("parameters", {}), dict):
            raise RecordError(
                f"{at}.function.parameters",
                f"expected a JSON Schema object, got {_json_type(function['parameters'])}",
            )
        tools.append({"type": "function", "function": function})
    return tools or None


def _name(value: Any, where: str) -> str:
    if value is None:
        raise RecordError(where, "missing")
    if not isinstance(value, str):
        raise RecordError(where, f"expected a string, got {_json_type(value)}")
    if not value:
        raise RecordError(where, "empty")
    return value


def _json_type(value: Any) -> str:
    """The JSON name of a value's type (what a record's author wrote)."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: only text can be trained on
        texts = []
        for index, part in enumerate(value):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise RecordError(
                    f"{where}[{index}]", "only text parts ({'type': 'text', 'text': ...}) are supported"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise RecordError(where, f"expected a string or a list of text parts, got {_json_type(value)}")


def parse_sharegpt(record: dict[str, Any]) -> Sample:
    turns = _turns(record.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    return _sft([*_system(record), *turns])


def parse_openai(record: dict[str, Any]) -> Sample:
    tools = _tools(record.get("tools"))
    turns = _turns(record.get("messages"), "messages", "role", "content", TOOL_CALLING_ROLES, tools)
    messages = [*_system(record), *turns]
    validate_conversation(messages)
    return Sample("sft", messages, tools=tools)


def _prompt(value: Any, where: str) -> list[Message]:
    """A prompt given as text (one user turn) or as messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return _turns(value, where, "role", "content", OPENAI_ROLES)


def _answer(value: Any, where: str) -> str:
    """An answer given as text, or as a list holding one assistant message."""
    if isinstance(value, str):
        return value
    turns = _turns(value, where, "role", "content", OPENAI_ROLES)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise RecordError(where, "expected one assistant message")
    return turns[0]["content"]


def parse_prompt_completion(record: dict[str, Any]) -> Sample:
    prompt = [*_system(record), *_prompt(record.get("prompt"), "prompt")]
    return _sft([*prompt, {"role": "assistant", "content": _answer(record.get("completion"), "completion")}])


def parse_preference(record: dict[str, Any]) -> Sample:
    if "prompt" in record:
        prompt = [*_system(record), *_prompt(record["prompt"], "prompt")]
        chosen, rejected = (
            _answer(record.get("chosen"), "chosen"),
            _answer(record.get("rejected"), "rejected"),
        )
    else:  # implicit prompt: two whole conversations that differ only in their last answer
        prompt, chosen, rejected = _split_implicit_prompt(record)
    validate_conversation([*prompt, {"role": "assistant", "content": chosen}])
    return Sample("preference", prompt, chosen, rejected)


def _split_implicit_prompt(record: dict[str, Any]) -> tuple[list[Message], str, str]:
    chosen = _turns(record.get("chosen"), "chosen", "role", "content", OPENAI_ROLES)
    rejected = _turns(record.get("rejected"), "rejected", "role", "content", OPENAI_ROLES)
    if not chosen or not rejected or chosen[:-1] != rejected[:-1]:
        raise RecordError(
            "rejected", "without a prompt, chosen and rejected must share all turns but the last"
        )
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise RecordError(
                f"{name}[{len(turns) - 1}].role", "the last turn must be the assistant's answer"
            )
    return [*_system(record), *chosen[:-1]], chosen[-1]["content"], rejected[-1]["content"]


# Most specific first: a preference record also has a prompt, so it is tried before prompt/completion.
FORMATS = (
    Format(
        "preference",
        ("chosen", "rejected"),
        "chosen, rejected, and a prompt (text or messages)",
        parse_preference,
    ),
    Format(
        "prompt_completion",
        ("prompt", "completion"),
        "prompt, completion (text or messages)",
        parse_prompt_completion,
    ),
    Format(
        "alpaca", ("instruction", "output"), "instruction, output, optional input and system", parse_alpaca
    ),
    Format("sharegpt", ("conversations",), "conversations: [{from, value}, ...]", parse_sharegpt),
    Format("openai", ("messages",), "messages: [{role, content}, ...]", parse_openai),
)
FORMAT_BY_NAME = {fmt.name: fmt for fmt in FORMATS}


# Every field name a format reads: a record's keys are checked against these for near misses.
FIELD_NAMES = tuple(
    dict.fromkeys([*(key for fmt in FORMATS for key in fmt.keys), "input", "system", "tools"])
)
NEAR_MISS_CUTOFF = 0.8  # difflib's ratio: catches `instrution`, `ouptut`, `message`; not `answer`, `question`


def near_misses(keys: Iterable[str]) -> list[tuple[str, str]]:
    """`(key, field)` for each of `keys` that is not a field name of ours but nearly is: the same but for
    case (`Instruction`), or close by difflib's ratio (`instrution`); fields `keys` already hold are skipped."""
    keys = list(keys)
    misses = []
    for key in keys:
        if key in FIELD_NAMES:
            continue
        close = difflib.get_close_matches(key.lower(), FIELD_NAMES, n=1, cutoff=NEAR_MISS_CUTOFF)
        if close and close[0] not in keys:
            misses.append((key, close[0]))
    return misses


def detect_format(record: Any) -> Format | None:
    if not isinstance(record, dict):
        return None
    return next((fmt for fmt in FORMATS if all(key in record for key in fmt.keys)), None)


def to_sample(record: Any, fmt: Format) -> Sample:
    """Parse and validate one record of a known format; raise RecordError saying what is wrong."""
    if not isinstance(record, dict):
        raise RecordError("", f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in fmt.keys if key not in record]
    if missing:
        raise RecordError(missing[0], f"missing; this input is in {fmt.name} format ({fmt.expects})")
    return fmt.parse(record)


def validate_conversation(messages: list[Message]) -> None:
    """Roles and order: an optional system message, then user and assistant turns alternating, starting with
    user and ending with the assistant. An assistant message that calls tools is followed by one `tool`
    message per call (its result; matched by `tool_call_id` where both have ids), then by the assistant again
    (a further call or the answer), unless it ends the conversation. Emptiness is a cleaning policy (see
    `data.policy.empty`), not checked here."""
    if not messages:
        raise RecordError("messages", "empty conversation")
    first = 1 if messages[0]["role"] == "system" else 0
    if len(messages) == first:
        raise RecordError("messages", "only a system message, no user or assistant turn")
    pending: list[dict[str, Any]] = []  # calls of the last assistant message still waiting for their result
    caller = -1  # where that message is
    for position in range(first, len(messages)):
        role = messages[position]["role"]
        previous = messages[position - 1]["role"] if position > first else None
        expected = _expected_role(previous, pending)
        if role != expected:
            reason = _order_reason(role, expected, previous, caller, len(pending))
            raise RecordError(f"messages[{position}].role", reason)
        if role == "tool":
            _answer_call(pending, messages[position], position)
        elif role == "assistant":
            pending, caller = list(messages[position].get("tool_calls", ())), position
    if messages[-1]["role"] != "assistant":
        raise RecordError("messages", f"no assistant turn answers the last {messages[-1]['role']} message")


def _expected_role(previous: str | None, pending: list[dict[str, Any]]) -> str:
    if pending:
        return "tool"
    return {None: "user", "user": "assistant", "assistant": "user", "tool": "assistant"}[previous]


def _order_reason(role: str, expected: str, previous: str | None, caller: int, missing: int) -> str:
    if expected == "tool":
        return (
            f"got {role!r}, expected 'tool': messages[{caller}] calls tools, and each call needs its result "
            f"in a tool message ({missing} still missing)"
        )
    if role == "tool":
        return f"got 'tool', expected {expected!r}: a tool message answers a call of the assistant message before it"
    if previous == "tool":
        return (
            "got 'user', expected 'assistant': after the tool results, the assistant calls again or answers"
        )
    return (
        f"got {role!r}, expected {expected!r}: after an optional system message, "
        "user and assistant turns must alternate, starting with user"
    )


def _answer_call(pending: list[dict[str, Any]], message: Message, position: int) -> None:
    """Take the call this tool message answers: the one with its `tool_call_id`, else the next in order."""
    wanted = message.get("tool_call_id")
    ids = [call.get("id") for call in pending]
    if wanted is None or wanted in ids or not any(ids):
        pending.pop(ids.index(wanted) if wanted in ids else 0)
        return
    waiting = ", ".join(repr(i) for i in ids if i is not None)
    raise RecordError(
        f"messages[{position}].tool_call_id",
        f"{wanted!r} is not the id of a call waiting for its result ({waiting})",
    )
