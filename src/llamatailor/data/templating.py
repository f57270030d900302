"""Render conversations with the model's own chat template, with labels on the assistant answers only.

The token ids are exactly `tokenizer.apply_chat_template(messages)`. Each assistant answer is located by
rendering the conversation up to that turn, with and without the answer: the answer's tokens are what the
longer rendering adds, up to and including the end-of-turn token the template closes it with (so the
model learns to stop). Anything after that token (a newline, the next turn) stays unlabelled.
"""

from dataclasses import dataclass

from llamatailor.data.formats import Message
from llamatailor.models.loading import ChatTokenizer

IGNORE_INDEX = -100


class RenderError(ValueError):
    """A conversation that cannot be trained on as rendered: `kind` is truncated_away or unrenderable."""

    def __init__(self, reason: str, kind: str = "unrenderable") -> None:
        super().__init__(reason)
        self.kind = kind


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


def chat_ids(chat: ChatTokenizer, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    ids = chat.tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    return list(ids)


def render_prompt(chat: ChatTokenizer, messages: list[Message]) -> list[int]:
    """Ids of a conversation up to the point where the assistant should answer."""
    return chat_ids(chat, messages, add_generation_prompt=True)


def render_for_training(chat: ChatTokenizer, messages: list[Message], max_len: int) -> RenderedSample:
    _reject_special_token_text(chat, messages)
    full = chat_ids(chat, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    stop_ids = set(chat.stop_ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = chat_ids(chat, messages[:index], add_generation_prompt=True)
        is_last = index == len(messages) - 1
        with_answer = full if is_last else chat_ids(chat, messages[: index + 1], add_generation_prompt=False)
        if full[: len(prompt)] != prompt or full[: len(with_answer)] != with_answer:
            raise RenderError(
                f"the chat template renders turn {index} differently inside the whole conversation than up to "
                "that turn, so its answer cannot be located token by token"
            )
        end = _answer_end(with_answer, len(prompt), stop_ids)
        if end is None:
            raise RenderError(
                f"the chat template does not close assistant turn {index} with a stop token "
                f"({', '.join(chat.family.stop_tokens)}); a model trained on it would not learn to stop"
            )
        labels[len(prompt) : end] = full[len(prompt) : end]
    sample = RenderedSample(full[:max_len], labels[:max_len], len(full))
    if sample.answer_tokens == 0:
        first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        raise RenderError(
            f"the assistant part is truncated away: the sample has {len(full)} tokens, its first answer starts "
            f"at token {first_answer} and data.max_seq_len is {max_len}",
            kind="truncated_away",
        )
    return sample


def _answer_end(ids: list[int], start: int, stop_ids: set[int]) -> int | None:
    """Index just past the first stop token at or after `start`."""
    return next((i + 1 for i in range(start, len(ids)) if ids[i] in stop_ids), None)


def _reject_special_token_text(chat: ChatTokenizer, messages: list[Message]) -> None:
    """Text such as '<|im_end|>' in a message would be read as the real control token."""
    tokenizer = chat.tokenizer
    added = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    specials = sorted({*tokenizer.all_special_tokens, *added} - {""}, key=len, reverse=True)
    for index, message in enumerate(messages):
        found = next((token for token in specials if token in message["content"]), None)
        if found:
            raise RenderError(f"messages[{index}].content contains the special token text {found!r}")
