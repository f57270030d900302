"""From generated token ids to the text a client sees: incremental detokenization that never splits a
UTF-8 character, stop sequences cut out of the text, and the finish reason."""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None  # "stop" or "length" on the last delta
    completion_tokens: int = 0


def text_deltas(
    tokens: Iterable[int],
    decode: Callable[[list[int]], str],
    stop_ids: set[int],
    stop_strings: list[str],
    max_tokens: int,
) -> Iterator[Delta]:
    """Yield text as it becomes final; the last delta carries the finish reason and the token count."""
    ids: list[int] = []
    sent = 0  # characters of the decoded text already sent
    for token in tokens:
        if token in stop_ids:
            yield Delta(decode(ids)[sent:], "stop", len(ids) + 1)
            return
        ids.append(token)
        text = decode(ids)
        cut = first_stop(text, stop_strings)
        if cut is not None:
            yield Delta(text[sent:cut], "stop", len(ids))
            return
        if len(ids) >= max_tokens:
            yield Delta(text[sent:], "length", len(ids))
            return
        ready = safe_end(text, stop_strings)
        if ready > sent:
            yield Delta(text[sent:ready])
            sent = ready
    text = decode(ids)
    yield Delta(text[sent:], "length", len(ids))


def first_stop(text: str, stop_strings: list[str]) -> int | None:
    found = [text.find(stop) for stop in stop_strings if stop in text]
    return min(found) if found else None


def safe_end(text: str, stop_strings: list[str]) -> int:
    """How much of `text` can be sent: not a trailing partial character, nor a possible stop's prefix."""
    end = len(text.rstrip("\ufffd"))
    held = 0
    for stop in stop_strings:
        held = max(
            held, next((n for n in range(min(len(stop) - 1, end), 0, -1) if text[:end].endswith(stop[:n])), 0)
        )
    return end - held
