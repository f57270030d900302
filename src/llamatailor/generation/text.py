"""From generated token ids to text: the cut at the first stop token, stop strings cut out of the text,
incremental decoding that never sends half a UTF-8 character, and the finish reason.

A byte-level vocabulary spells a character it has no token for (most emoji) with several byte tokens;
until the last of them comes, the decoders give U+FFFD for the incomplete bytes. Such bytes are held back
while streaming, and an answer that stops there (at its token budget or a stop token) ends at its last
whole character: no answer, streamed or not, ends in U+FFFD. The decoders take ids, not bytes, so a
trailing U+FFFD is read as incomplete bytes (invalid bytes at the very end are dropped the same way).
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

Decode = Callable[[list[int]], str]


@dataclass(frozen=True)
class Generation:
    """One whole answer: `text` without the stop token and stripped of outer whitespace."""

    text: str
    tokens: int  # generated tokens, the stop token included
    stopped: bool  # ended at a stop token rather than at the token budget


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability (nats) with its UTF-8 bytes, and the most likely alternatives
    at its position as (token, logprob, bytes), most likely first (OpenAI's `logprobs.content` item)."""

    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]] = field(default_factory=list)


@dataclass
class Delta:
    """A piece of streamed answer text; the last one of an answer carries the finish reason. `index`: the
    choice it belongs to (a request may ask for n answers); `logprobs`: its tokens' log-probabilities, when
    asked for."""

    text: str
    finish_reason: str | None = None  # "stop" or "length" on the last delta
    completion_tokens: int = 0
    index: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


def finished(new_ids: list[int], decode: Decode, stop_ids: set[int]) -> Generation:
    """The answer in `new_ids` (generated ids, prompt excluded), cut before the first stop token."""
    end = next((i for i, token in enumerate(new_ids) if token in stop_ids), None)
    kept = new_ids if end is None else new_ids[:end]
    return Generation(
        text=whole(decode(kept)).strip(),
        tokens=len(new_ids) if end is None else end + 1,
        stopped=end is not None,
    )


def text_deltas(
    tokens: Iterable[int], decode: Decode, stop_ids: set[int], stop_strings: list[str], max_tokens: int
) -> Iterator[Delta]:
    """Text as it becomes final; the last delta carries the finish reason and the number of tokens
    generated (the stop token counted). A stop string is cut out with everything after it."""
    ids: list[int] = []
    sent = 0  # characters of the decoded text already sent
    for token in tokens:
        if token in stop_ids:
            yield Delta(whole(decode(ids))[sent:], "stop", len(ids) + 1)
            return
        ids.append(token)
        text = decode(ids)
        cut = first_stop(text, stop_strings)
        if cut is not None:
            yield Delta(text[sent:cut], "stop", len(ids))
            return
        if len(ids) >= max_tokens:
            yield Delta(whole(text)[sent:], "length", len(ids))
            return
        ready = safe_end(text, stop_strings)
        if ready > sent:
            yield Delta(text[sent:ready])
            sent = ready
    yield Delta(whole(decode(ids))[sent:], "length", len(ids))


def whole(text: str) -> str:
    """`text` up to its last whole character: without the U+FFFD that decoding gives trailing bytes."""
    return text.rstrip("\ufffd")


def first_stop(text: str, stop_strings: list[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [text.find(stop) for stop in stop_strings if stop in text]
    return min(found) if found else None


def safe_end(text: str, stop_strings: list[str]) -> int:
    """How much of `text` can be sent: not a trailing partial character, nor a possible stop's prefix."""
    end = len(whole(text))
    held = 0
    for stop in stop_strings:
        held = max(
            held, next((n for n in range(min(len(stop) - 1, end), 0, -1) if text[:end].endswith(stop[:n])), 0)
        )
    return end - held
