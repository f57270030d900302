"""Input record formats (Alpaca, ShareGPT, OpenAI messages) turned into one canonical conversation.

The canonical form is a list of `{"role": "system" | "user" | "assistant", "content": str}` with an
optional leading system message, then user and assistant turns alternating, ending with an answer.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]

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


class RecordError(ValueError):
    """A record that cannot be used: `field` names where, the message says what was expected."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Format:
    name: str
    keys: tuple[str, ...]
    expects: str
    parse: Callable[[dict[str, Any]], list[Message]]


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


def parse_alpaca(record: dict[str, Any]) -> list[Message]:
    instruction = _text(record, "instruction")
    extra = _text(record, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    answer = _text(record, "output")
    return [*_system(record), {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _turns(
    record: dict[str, Any], key: str, role_key: str, text_key: str, roles: dict[str, str]
) -> list[Message]:
    turns = record.get(key)
    if not isinstance(turns, list):
        raise RecordError(key, f"expected a list of turns, got {type(turns).__name__}")
    messages = [*_system(record)]
    for index, turn in enumerate(turns):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise RecordError(where, f"expected an object with {role_key!r} and {text_key!r}")
        role = turn.get(role_key)
        if role not in roles:
            raise RecordError(
                f"{where}.{role_key}", f"unknown role {role!r}; expected one of {', '.join(roles)}"
            )
        messages.append({"role": roles[role], "content": _content(turn.get(text_key), f"{where}.{text_key}")})
    return messages


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
    raise RecordError(where, f"expected a string, got {type(value).__name__}")


def parse_sharegpt(record: dict[str, Any]) -> list[Message]:
    return _turns(record, "conversations", "from", "value", SHAREGPT_ROLES)


def parse_openai(record: dict[str, Any]) -> list[Message]:
    return _turns(record, "messages", "role", "content", OPENAI_ROLES)


FORMATS = (
    Format(
        "alpaca", ("instruction", "output"), "instruction, output, optional input and system", parse_alpaca
    ),
    Format("sharegpt", ("conversations",), "conversations: [{from, value}, ...]", parse_sharegpt),
    Format("openai", ("messages",), "messages: [{role, content}, ...]", parse_openai),
)


def detect_format(record: Any) -> Format | None:
    if not isinstance(record, dict):
        return None
    return next((fmt for fmt in FORMATS if all(key in record for key in fmt.keys)), None)


def to_conversation(record: Any, fmt: Format) -> list[Message]:
    """Parse and validate one record of a known format; raise RecordError saying what is wrong."""
    if not isinstance(record, dict):
        raise RecordError("", f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in fmt.keys if key not in record]
    if missing:
        raise RecordError(missing[0], f"missing; this file is in {fmt.name} format ({fmt.expects})")
    messages = fmt.parse(record)
    validate_conversation(messages)
    return messages


def validate_conversation(messages: list[Message]) -> None:
    if not messages:
        raise RecordError("messages", "empty conversation")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise RecordError("messages", "only a system message, no user or assistant turn")
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            position = index + len(messages) - len(turns)
            raise RecordError(
                f"messages[{position}].role",
                f"got {message['role']!r}, expected {expected!r}: after an optional system message, "
                "user and assistant turns must alternate, starting with user",
            )
        if not message["content"].strip():
            raise RecordError(f"messages[{index + len(messages) - len(turns)}].content", "empty content")
    if turns[-1]["role"] != "assistant":
        raise RecordError("messages", "no assistant turn answers the last user message")
