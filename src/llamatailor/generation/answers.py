"""Answers from an engine: whole greedy answers for a list of prompts (eval, merge and export checks), or
text deltas as they are generated (serve, chat). Both cut at the prompter's stop ids."""

import threading
from collections.abc import Iterator

from llamatailor.generation.engines import BatchCallback, Engine, Sampling
from llamatailor.generation.prompts import Prompter
from llamatailor.generation.text import Delta, Generation, finished, text_deltas


def answer_all(
    engine: Engine,
    prompter: Prompter,
    prompts: list[list[int]],
    max_new_tokens: int,
    on_batch: BatchCallback | None = None,
) -> list[Generation]:
    """The greedy answer to every prompt (ids from `prompter`), in the prompts' order."""
    rows = engine.greedy(prompts, max_new_tokens, prompter.stop_ids, on_batch or (lambda count: None))
    return [finished(row, prompter.decode, prompter.stop_ids) for row in rows]


def stream_answer(
    engine: Engine,
    prompter: Prompter,
    prompt: list[int],
    sampling: Sampling,
    max_tokens: int,
    stop_strings: list[str] | None = None,
    cancelled: threading.Event | None = None,
) -> Iterator[Delta]:
    """Text deltas of one answer; the last carries the finish reason ("stop" at a stop id or stop string,
    "length" at `max_tokens`) and the token count. Setting `cancelled` ends the generation."""
    tokens = engine.stream(prompt, sampling, cancelled or threading.Event())
    return text_deltas(tokens, prompter.decode, prompter.stop_ids, stop_strings or [], max_tokens)
