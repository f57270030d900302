"""Input record formats turned into one canonical sample: a conversation, or a preference pair.

Conversations (for SFT) come from Alpaca, ShareGPT, OpenAI messages and prompt/completion records: a list
of `{"role": "system" | "user" | "assistant", "content": str}`, an optional leading system message, then
user and assistant turns alternating, ending with an answer. Preference pairs (for DPO) are a prompt
conversation ending with a user turn, and a chosen and a rejected answer.
"""

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Message = dict[str, str]
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
    """A canonical sample. For preference pairs, `messages` is the prompt and ends with a user turn."""

    kind: Kind
    messages: list[Message]
    chosen: str | None = None
    rejected: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def texts(self) -> list[tuple[str, str]]:
        """(field, text) for every text the sample holds."""
        texts = [(f"messages[{i}].content", m["content"]) for i, m in enumerate(self.messages)]
        if self.kind == "preference":
            texts += [("chosen", self.chosen or ""), ("rejected", self.rejected or "")]
        return texts

    def map_texts(self, change: Callable[[str], str]) -> "Sample":
        messages = [{**m, "content": change(m["content"])} for m in self.messages]
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
        if self.meta:
            row["meta"] = self.meta
        return row


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


def _turns(value: Any, where: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[Message]:
    if not isinstance(value, list):
        raise RecordError(where, f"expected a list of turns, got {type(value).__name__}")
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
        messages.append({"role": roles[role], "content": _content(turn.get(text_key), f"{at}.{text_key}")})
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


def parse_sharegpt(record: dict[str, Any]) -> Sample:
    turns = _turns(record.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    return _sft([*_system(record), *turns])


def parse_openai(record: dict[str, Any]) -> Sample:
    return _sft(
        [*_system(record), *_turns(record.get("messages"), "messages", "role", "content", OPENAI_ROLES)]
    )


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
    """Roles and order; emptiness is a cleaning policy (see `data.policy.empty`), not checked here."""
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
    if turns[-1]["role"] != "assistant":
        raise RecordError("messages", "no assistant turn answers the last user message")
