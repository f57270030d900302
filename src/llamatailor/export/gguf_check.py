"""Checks of one GGUF file against the merged model, run by llama.cpp itself.

* metadata: the chat template, end-of-turn and bos ids read back with `gguf.GGUFReader`;
* tokenizer: llama.cpp's token ids equal the HF tokenizer's on every rendered val/test conversation;
* logits: top-1 agreement and perplexity on the answer tokens of val conversations (the tokens training
  optimised) against the merged model;
* task: the eval metric on the test prompts, greedy, against the merged model's (retention);
* stopping: a chat answer through llama.cpp's own chat path (the template inside the file) that ends at the
  end-of-turn token.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel

from llamatailor.data.formats import Message
from llamatailor.data.templating import IGNORE_INDEX
from llamatailor.evaluate.engines import LlamaCppEngine, scored
from llamatailor.models.loading import ChatTokenizer


@dataclass(frozen=True)
class LogitReference:
    """What the merged model gives on the check sequences, at their answer positions: the log-probability
    of each answer token and the model's top-1 prediction there."""

    sequences: list[list[int]]
    answers: list[np.ndarray]  # per sequence, the positions i whose token i + 1 is an answer token
    logprobs: list[np.ndarray]
    top1: list[np.ndarray]

    @property
    def perplexity(self) -> float:
        return perplexity_of(self.logprobs)


@dataclass
class FileCheck:
    gguf_type: str
    path: str
    size_mb: float
    metadata_problems: list[str] = field(default_factory=list)
    tokenizer_texts: int = 0
    tokenizer_mismatches: int = 0
    first_mismatch: str | None = None
    top1_agreement: float = 0.0
    perplexity: float = 0.0
    perplexity_merged: float = 0.0
    perplexity_increase_pct: float = 0.0
    task_metric: float | None = None
    task_metric_merged: float | None = None
    retention: float | None = None
    chat_finish_reason: str = ""
    chat_answer: str = ""
    gate_pct: float | None = None
    failures: list[str] = field(default_factory=list)


def perplexity_of(logprobs: list[np.ndarray]) -> float:
    total = sum(float(row.sum()) for row in logprobs)
    return math.exp(-total / max(sum(len(row) for row in logprobs), 1))


def answer_positions(labels: list[list[int]]) -> list[np.ndarray]:
    return [np.flatnonzero(np.asarray(row[1:]) != IGNORE_INDEX) for row in labels]


@torch.inference_mode()
def logit_reference(
    model: PreTrainedModel, sequences: list[list[int]], labels: list[list[int]]
) -> LogitReference:
    answers = answer_positions(labels)
    logprobs, top1 = [], []
    for ids, positions in zip(sequences, answers, strict=True):
        logits = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        row_logprobs, row_top1 = scored(logits, ids, positions)
        logprobs.append(row_logprobs)
        top1.append(row_top1)
    return LogitReference(sequences, answers, logprobs, top1)


def gguf_logits(
    engine: LlamaCppEngine, reference: LogitReference
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rows = [engine.scored_at(ids, at) for ids, at in zip(reference.sequences, reference.answers, strict=True)]
    return [logprobs for logprobs, _ in rows], [top1 for _, top1 in rows]


def check_metadata(path: Path, chat: ChatTokenizer) -> list[str]:
    reader = gguf.GGUFReader(path)

    def value(key: str) -> Any:
        found = reader.get_field(key)
        return found.contents() if found is not None else None

    problems = []
    if value("tokenizer.chat_template") != chat.tokenizer.chat_template:
        problems.append("the chat template differs from the training template")
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        if value(key) != chat.stop_ids[0]:
            problems.append(f"{key} is {value(key)}, expected the end-of-turn id {chat.stop_ids[0]}")
    if (
        chat.tokenizer.bos_token_id is not None
        and value("tokenizer.ggml.bos_token_id") != chat.tokenizer.bos_token_id
    ):
        problems.append(f"tokenizer.ggml.bos_token_id is {value('tokenizer.ggml.bos_token_id')}")
    return problems


def check_tokenizer(engine: LlamaCppEngine, chat: ChatTokenizer, texts: list[str], result: FileCheck) -> None:
    result.tokenizer_texts = len(texts)
    for text in texts:
        expected = chat.tokenizer.encode(text, add_special_tokens=False)
        got = engine.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if got != expected:
            result.tokenizer_mismatches += 1
            if result.first_mismatch is None:
                at = next(
                    (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
                    min(len(expected), len(got)),
                )
                result.first_mismatch = (
                    f"{text[:80]!r}: first difference at token {at}: HF {expected[at : at + 4]}, "
                    f"llama.cpp {got[at : at + 4]}"
                )


def check_logits(engine: LlamaCppEngine, reference: LogitReference, result: FileCheck) -> None:
    logprobs, top1 = gguf_logits(engine, reference)
    agree = sum(int((a == b).sum()) for a, b in zip(top1, reference.top1, strict=True))
    result.top1_agreement = agree / max(sum(len(row) for row in top1), 1)
    result.perplexity = perplexity_of(logprobs)
    result.perplexity_merged = reference.perplexity
    result.perplexity_increase_pct = 100 * (result.perplexity / result.perplexity_merged - 1)


def check_chat_stops(
    engine: LlamaCppEngine, messages: list[Message], max_tokens: int, result: FileCheck
) -> None:
    """Through llama-cpp-python's chat path, which formats with the template stored in the file."""
    reply = engine.llm.create_chat_completion(
        messages=[dict(m) for m in messages], max_tokens=max_tokens, temperature=0.0, seed=0
    )
    choice = reply["choices"][0]
    result.chat_finish_reason = choice["finish_reason"] or ""
    result.chat_answer = choice["message"]["content"] or ""


def apply_gates(result: FileCheck, gate_pct: float | None) -> None:
    result.gate_pct = gate_pct
    failures = [f"metadata: {problem}" for problem in result.metadata_problems]
    if result.tokenizer_mismatches:
        failures.append(
            f"tokenizer: llama.cpp's ids differ from the HF tokenizer's on {result.tokenizer_mismatches} of "
            f"{result.tokenizer_texts} texts ({result.first_mismatch})"
        )
    if gate_pct is not None and result.perplexity_increase_pct > gate_pct:
        failures.append(
            f"perplexity {result.perplexity:.4f} is {result.perplexity_increase_pct:+.2f}% over the merged "
            f"model's {result.perplexity_merged:.4f}; the gate allows {gate_pct}%"
        )
    if result.chat_finish_reason != "stop":
        failures.append(
            f"the chat answer did not end at the end-of-turn token (finish_reason {result.chat_finish_reason!r})"
        )
    result.failures = failures
