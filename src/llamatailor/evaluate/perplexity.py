"""Perplexity of a split: over the answers (assistant tokens and their end-of-turn token) and over whole
sequences (every token after the first), exp of the mean negative log-likelihood per token."""

import math
from dataclasses import dataclass

from llamatailor.data.formats import Message, Tool
from llamatailor.data.templating import IGNORE_INDEX, render_for_training
from llamatailor.generation.engines import Engine
from llamatailor.models.loading import ChatTokenizer


@dataclass(frozen=True)
class Perplexity:
    answers: float
    sequences: float
    answer_tokens: int
    tokens: int


def perplexity(
    engine: Engine,
    chat: ChatTokenizer,
    conversations: list[tuple[list[Message], list[Tool] | None]],
    max_len: int,
) -> Perplexity:
    """Perplexities of `conversations` (messages, and the tools offered, as in a split's rows), each
    rendered and labelled as for training and cut to `max_len` tokens.

    Args:
        engine: Scores each sequence (`Engine.token_logprobs`: (len - 1,) log p in nats).
        chat: The tokenizer and chat template the conversations are rendered with.
        conversations: (messages, tools or None) per conversation.
        max_len: Tokens per rendered conversation at most.

    Returns:
        Perplexity: exp(mean negative log-likelihood in nats) pooled over every scored token, on the
        answer tokens (labelled, as in training) and on whole sequences (every token after the first),
        with both token counts; 1.0 where nothing is scored.

    Raises:
        RenderError: a conversation does not render (a ValueError).
    """
    samples = [render_for_training(chat, messages, max_len, tools) for messages, tools in conversations]
    answer_nll = sequence_nll = 0.0
    answer_tokens = tokens = 0
    for sample, logprobs in zip(samples, engine.token_logprobs([s.input_ids for s in samples]), strict=True):
        sequence_nll -= float(logprobs.sum())
        tokens += len(logprobs)
        for position, label in enumerate(sample.labels[1:]):  # logprobs[i] scores token i + 1
            if label != IGNORE_INDEX:
                answer_nll -= float(logprobs[position])
                answer_tokens += 1
    return Perplexity(
        answers=math.exp(answer_nll / max(answer_tokens, 1)),
        sequences=math.exp(sequence_nll / max(tokens, 1)),
        answer_tokens=answer_tokens,
        tokens=tokens,
    )
