"""OpenAI's JSON for one request's answer: whole responses, stream chunks and usage, for chat and completions,
with n choices and log-probabilities (OpenAI's API reference: chat `logprobs.content` items; the legacy
completions `logprobs` with tokens, token_logprobs, top_logprobs and text_offset)."""

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from llamatailor.generation.text import Delta, TokenLogprob


@dataclass
class Choice:
    """One choice's answer so far."""

    text: str = ""
    finish_reason: str = "length"
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.logprobs += delta.logprobs
        if delta.finish_reason:
            self.finish_reason, self.tokens = delta.finish_reason, delta.completion_tokens


class ResponseShape:
    """`logprobs`: None when the request asked for none (the field is then null)."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int, logprobs: int | None) -> None:
        self.chat, self.model, self.prompt_tokens, self.with_logprobs = chat, model, prompt_tokens, logprobs
        self.kind = "chat.completion" if chat else "text_completion"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def logprobs(self, items: list[TokenLogprob], text_offset: int) -> dict[str, Any] | None:
        if self.with_logprobs is None:
            return None
        if self.chat:
            return {"content": [chat_logprob(item) for item in items], "refusal": None}
        offsets, at = [], text_offset
        for item in items:
            offsets.append(at)
            at += len(item.token)
        return {
            "tokens": [item.token for item in items],
            "token_logprobs": [item.logprob for item in items],
            "top_logprobs": [{token: lp for token, lp, _ in item.top} for item in items],
            "text_offset": offsets,
        }

    def full(self, choices: list[Choice]) -> dict[str, Any]:
        rows = []
        for index, choice in enumerate(choices):
            row: dict[str, Any] = {"index": index, "finish_reason": choice.finish_reason}
            if self.chat:
                row["message"] = {"role": "assistant", "content": choice.text}
            else:
                row["text"] = choice.text
            row["logprobs"] = self.logprobs(choice.logprobs, 0)
            rows.append(row)
        tokens = sum(choice.tokens for choice in choices)
        return {**self.head(self.kind), "choices": rows, "usage": self.usage(tokens)}

    def first_chunk(self, index: int) -> dict[str, Any]:
        """A stream opens each choice with an empty chunk (chat: the assistant's role), before any text."""
        choice: dict[str, Any] = {"index": index, "finish_reason": None, "logprobs": None}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": ""}
            return {**self.head("chat.completion.chunk"), "choices": [choice]}
        return {**self.head("text_completion"), "choices": [{**choice, "text": ""}]}

    def chunk(self, delta: Delta, text_offset: int) -> dict[str, Any]:
        logprobs = self.logprobs(delta.logprobs, text_offset) if delta.logprobs else None
        choice: dict[str, Any] = {
            "index": delta.index,
            "finish_reason": delta.finish_reason,
            "logprobs": logprobs,
        }
        if self.chat:
            choice["delta"] = {"content": delta.text} if delta.text else {}
            return {**self.head("chat.completion.chunk"), "choices": [choice]}
        choice["text"] = delta.text
        return {**self.head("text_completion"), "choices": [choice]}

    def usage_chunk(self, tokens: int) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self.head(kind), "choices": [], "usage": self.usage(tokens)}


def chat_logprob(item: TokenLogprob) -> dict[str, Any]:
    top = [{"token": token, "logprob": lp, "bytes": raw} for token, lp, raw in item.top]
    return {"token": item.token, "logprob": item.logprob, "bytes": item.bytes, "top_logprobs": top}
