"""Render conversations with the model's own chat template, with labels on the assistant answers only.

The token ids are exactly `tokenizer.apply_chat_template(messages, tools=tools)`: the conversation is
rendered to text once and tokenized once, with each token's character offsets. An assistant answer starts
where the rendering of the conversation before it, with the generation prompt, ends; it runs up to and
including the first end-of-turn token (so the model learns to stop), which must come before the rendering
up to and including that answer ends. Anything after that token (a newline, the next turn) stays
unlabelled. An assistant turn that calls tools is an answer too (the model learns to call); tool results
are not.

Those two prefix renderings per answer are Jinja text only: each must be a prefix of the whole text and
end on a token boundary of it (found through the offsets), so the tokenizer runs once however many turns
there are. The Jinja work still grows with the turns before each answer (a few microseconds a message),
which is why answers are located only up to `max_len` tokens: truncation drops any later answer's labels.
Where a prefix does not end on a token boundary (or the tokenizer gives no offsets), that answer is
located token by token instead, as before this linear path: the prefix is tokenized and must start the
whole conversation's ids, else the template renders that turn differently inside the whole conversation
and the sample is refused.
"""

import functools
import re
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass

from jinja2 import TemplateError, TemplateSyntaxError
from transformers import PreTrainedTokenizerBase

from llamatailor.data.formats import Message, Tool, json_strings
from llamatailor.models.loading import ChatTokenizer

IGNORE_INDEX = -100


class RenderError(ValueError):
    """A conversation that cannot be trained on as rendered: `kind` is truncated_away or unrenderable."""

    def __init__(self, reason: str, kind: str = "unrenderable") -> None:
        super().__init__(reason)
        self.kind = kind


class ToolsNotRendered(RenderError):
    """The chat template cannot render tool calling: a fault of the template, not of one record."""


@dataclass(frozen=True)
class RenderedSample:
    input_ids: list[int]
    labels: list[int]
    full_length: int  # tokens before truncation

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    @property
    def answer_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class _Whole:
    """The whole conversation as text and as tokens; `starts`/`ends` are each token's character span."""

    text: str
    ids: list[int]
    starts: list[int] | None  # None: the tokenizer gives no offsets
    ends: list[int] | None

    def tokens_in(self, prefix: str) -> int | None:
        """How many tokens spell `prefix`, if it is a prefix of the text that ends on a token boundary."""
        if prefix == self.text:
            return len(self.ids)
        if self.starts is None or self.ends is None or not self.text.startswith(prefix):
            return None
        cut = len(prefix)
        count = bisect_left(self.starts, cut)
        # A clean boundary: the tokens before end at the cut and the next starts there (no token straddles
        # it, no character between them that no token claims).
        before = self.ends[count - 1] if count else 0
        after = self.starts[count] if count < len(self.ids) else len(self.text)
        return count if before == cut == after else None


def chat_ids(
    chat: ChatTokenizer,
    messages: list[Message],
    add_generation_prompt: bool,
    tools: list[Tool] | None = None,
) -> list[int]:
    ids = chat.tokenizer.apply_chat_template(
        messages,
        tools=tools or None,
        tokenize=True,
        add_generation_prompt=add_generation_prompt,
        return_dict=False,
    )
    return list(ids)


def render_prompt(chat: ChatTokenizer, messages: list[Message], tools: list[Tool] | None = None) -> list[int]:
    """Ids of a conversation up to the point where the assistant should answer, with the `tools` offered
    (OpenAI's format) rendered as in training."""
    return chat_ids(chat, messages, add_generation_prompt=True, tools=tools)


def render_prompt_text(chat: ChatTokenizer, messages: list[Message], tools: list[Tool] | None = None) -> str:
    """The text `render_prompt` tokenizes: the template's rendering up to the assistant's answer."""
    text = chat.tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=True
    )
    return str(text)


def render_for_training(
    chat: ChatTokenizer, messages: list[Message], max_len: int, tools: list[Tool] | None = None
) -> RenderedSample:
    """Ids and labels of an SFT conversation (see the module docstring), cut to `max_len` tokens;
    `full_length` counts the tokens before the cut. `tools` (OpenAI's format) are rendered as the template
    renders them. Raises RenderError saying why a conversation cannot be trained on (special-token text in
    a message, a template that refuses it or renders a turn inconsistently, an answer without a stop token,
    every answer cut away), and its subclass ToolsNotRendered when it calls tools and the template cannot
    render them."""
    _reject_special_token_text(chat, messages, tools)
    uses = _tool_parts(messages, tools)
    if uses:
        _check_tool_rendering(chat, uses)
    whole = _whole(chat, messages, tools)
    labels = [IGNORE_INDEX] * len(whole.ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = _answer_span(chat, messages, tools, index, whole)
        labels[start:end] = whole.ids[start:end]
        if end >= max_len:
            break  # any later answer starts past the cut
    sample = RenderedSample(whole.ids[:max_len], labels[:max_len], len(whole.ids))
    if sample.answer_tokens == 0:
        first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        raise RenderError(
            f"the assistant part is truncated away: the sample has {len(whole.ids)} tokens, its first answer "
            f"starts at token {first_answer} and data.max_seq_len is {max_len}",
            kind="truncated_away",
        )
    return sample


def _render(
    chat: ChatTokenizer, messages: list[Message], tools: list[Tool] | None, add_generation_prompt: bool
) -> str:
    try:
        text = chat.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateSyntaxError:
        raise  # a broken template is no fault of the conversation
    except TemplateError as exc:  # the template's own raise_exception, or a field it needs and lacks
        raise RenderError(f"the chat template refuses this conversation: {exc}") from None
    return str(text)


def _whole(chat: ChatTokenizer, messages: list[Message], tools: list[Tool] | None) -> _Whole:
    """The rendering tokenized as apply_chat_template tokenizes it (no special tokens added)."""
    text = _render(chat, messages, tools, add_generation_prompt=False)
    tokenizer = chat.tokenizer
    if not tokenizer.is_fast:
        return _Whole(text, list(tokenizer(text, add_special_tokens=False)["input_ids"]), None, None)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    return _Whole(text, list(encoding["input_ids"]), [s for s, _ in offsets], [e for _, e in offsets])


def _answer_span(
    chat: ChatTokenizer, messages: list[Message], tools: list[Tool] | None, index: int, whole: _Whole
) -> tuple[int, int]:
    """Token positions [start, end) of assistant turn `index`'s answer and its end-of-turn token."""
    prompt = _render(chat, messages[:index], tools, add_generation_prompt=True)
    is_last = index == len(messages) - 1
    with_answer = whole.text if is_last else _render(chat, messages[: index + 1], tools, False)
    start, stop = whole.tokens_in(prompt), whole.tokens_in(with_answer)
    if start is None or stop is None:
        start, stop = _token_prefixes(chat, whole.ids, (prompt, with_answer), index)
    message = messages[index]
    if "tool_calls" in message and message["content"].strip() not in with_answer[len(prompt) :]:
        raise RenderError(
            f"the chat template leaves out messages[{index}].content, the text of an assistant message that "
            "calls a tool; keep such text out of tool-calling turns for this template"
        )
    stop_ids = set(chat.stop_ids)
    end = next((i + 1 for i in range(start, stop) if whole.ids[i] in stop_ids), None)
    if end is None:
        raise RenderError(
            f"the chat template does not close assistant turn {index} with a stop token "
            f"({', '.join(chat.family.stop_tokens)}); a model trained on it would not learn to stop"
        )
    return start, end


def _token_prefixes(
    chat: ChatTokenizer, ids: list[int], prefixes: tuple[str, str], index: int
) -> tuple[int, int]:
    """Lengths of the prompt's and the prompt-with-answer's own tokens, each checked to start `ids`."""
    lengths = []
    for prefix in prefixes:
        prefix_ids = list(chat.tokenizer(prefix, add_special_tokens=False)["input_ids"])
        if ids[: len(prefix_ids)] != prefix_ids:
            raise RenderError(
                f"the chat template renders turn {index} differently inside the whole conversation than up to "
                "that turn, so its answer cannot be located token by token"
            )
        lengths.append(len(prefix_ids))
    return lengths[0], lengths[1]


TOOL_PARTS = ("the list of tools", "tool calls", "tool results")
PROBE_TOOL: Tool = {
    "type": "function",
    "function": {
        "name": "probe_lookup",
        "description": "Probe description 7.",
        "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
    },
}
PROBE_CONVERSATION: list[Message] = [
    {"role": "user", "content": "Probe question."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "probe_lookup", "arguments": {"key": "probe-key-7"}}}
        ],
    },
    {"role": "tool", "content": "probe-result-7"},
    {"role": "assistant", "content": "Probe answer."},
]


_TOOL_RENDERING: dict[str, dict[str, str | None]] = {}  # _tool_rendering's answers, by template text


def _tool_parts(messages: list[Message], tools: list[Tool] | None) -> list[str]:
    """Which parts of tool calling (TOOL_PARTS) a conversation uses."""
    used = (
        bool(tools),
        any("tool_calls" in message for message in messages),
        any(message["role"] == "tool" for message in messages),
    )
    return [part for part, is_used in zip(TOOL_PARTS, used, strict=True) if is_used]


def _check_tool_rendering(chat: ChatTokenizer, parts: list[str]) -> None:
    """Raise ToolsNotRendered unless the chat template renders each of `parts` (TOOL_PARTS). Decided by
    rendering a small tool-calling conversation: the tool's description must appear when it is passed as
    `tools`, the called function's name and argument in the rendering up to the call, and the tool's result
    in the rendering up to the result."""
    missing = {part: reason for part, reason in _tool_rendering(chat).items() if part in parts and reason}
    if missing:
        found = "; ".join(f"{part}: {reason}" for part, reason in missing.items())
        raise ToolsNotRendered(
            f"the chat template ({chat.template_origin}) cannot render {', '.join(missing)} ({found}). "
            "Tool-calling conversations need a template that renders tools, such as Llama 3.1 and later or "
            "Llama 4's: use such a model, or set model.chat_template to one"
        )


def _tool_rendering(chat: ChatTokenizer) -> dict[str, str | None]:
    """For each of TOOL_PARTS, None if the chat template renders it, else what goes wrong. Computed once
    per template: whether a template renders tools is a property of the template."""
    template = repr(chat.tokenizer.chat_template)
    if template not in _TOOL_RENDERING:
        answer, call, result = PROBE_CONVERSATION[::3], PROBE_CONVERSATION[:2], PROBE_CONVERSATION[:3]
        checks = (
            (
                [PROBE_TOOL],
                answer,
                ["Probe description 7."],
                "the tools' descriptions are not in the rendering",
            ),
            (
                None,
                call,
                ["probe_lookup", "probe-key-7"],
                "a call's function name or arguments are not in the rendering",
            ),
            (None, result, ["probe-result-7"], "a tool's result is not in the rendering"),
        )
        _TOOL_RENDERING[template] = {
            part: _probe(chat, tools, messages, expected, missing)
            for part, (tools, messages, expected, missing) in zip(TOOL_PARTS, checks, strict=True)
        }
    return _TOOL_RENDERING[template]


def _probe(
    chat: ChatTokenizer, tools: list[Tool] | None, messages: list[Message], expected: list[str], missing: str
) -> str | None:
    try:
        text = _render(chat, messages, tools, add_generation_prompt=False)
    except RenderError as exc:
        return str(exc)
    return None if all(part in text for part in expected) else missing


def _reject_special_token_text(
    chat: ChatTokenizer, messages: list[Message], tools: list[Tool] | None
) -> None:
    """Text such as '<|im_end|>' in a message (or in a tool call or definition) would be read as the real
    control token."""
    pattern = token_pattern(special_token_texts(chat.tokenizer))
    strings = [pair for i, message in enumerate(messages) for pair in json_strings(message, f"messages[{i}]")]
    for where, text in [*strings, *json_strings(tools or [], "tools")]:
        if found := pattern.search(text):
            raise RenderError(f"{where} contains the special token text {found.group()!r}")


def special_token_texts(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """The text of every special token: the named ones (bos, eos, ...) and the added tokens marked special,
    which the tokenizer reads as one control token wherever the text spells them."""
    added = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return {*tokenizer.all_special_tokens, *added} - {""}


def token_pattern(tokens: Iterable[str]) -> re.Pattern[str]:
    """One pattern matching any of `tokens`, longest first (so that '<|eot_id|>' wins over a shorter token
    at the same place, as the tokenizers' own leftmost-longest matching does)."""
    return _any_of(tuple(sorted(tokens, key=lambda token: (-len(token), token))))


@functools.lru_cache(maxsize=8)
def _any_of(tokens: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(token) for token in tokens) or "(?!)")  # (?!): matches nothing
