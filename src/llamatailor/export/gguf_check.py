"""Checks of one GGUF file against the merged model, run by llama.cpp itself.

* metadata: the chat template, end-of-turn and bos ids and the RoPE keys, read back from the file;
* tokenizer: llama.cpp's token ids equal the HF tokenizer's on every rendered val/test conversation;
* logits: top-1 agreement and perplexity on the answer tokens of val conversations (the tokens training
  optimised) against the merged model;
* task: the eval metric on the test prompts, greedy, against the merged model's (retention);
* stopping: a greedy chat answer rendered by the file's own template and cut at the file's own stop tokens
  (what llama.cpp's and Ollama's chat paths read) that ends at the end-of-turn token.
"""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.integrations.gguf.reader import read_gguf_metadata

from llamatailor.data.formats import Message
from llamatailor.data.templating import IGNORE_INDEX
from llamatailor.export.gates import CHAT_STOP, METADATA, PERPLEXITY, TOKENIZER, failed, file_gates
from llamatailor.export.rope import GgufRope
from llamatailor.generation.answers import stream_answer
from llamatailor.generation.engines import GREEDY, LlamaCppEngine, scored
from llamatailor.generation.prompts import GGUFPrompter
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
    diverges_from: int | None = None  # first position of a top-1 disagreement run that starts late
    chat_finish_reason: str = ""
    chat_answer: str = ""
    merged_stop_share: float | None = None  # test prompts the merged model answered up to a stop token
    gate_pct: float | None = None
    failures: list[str] = field(default_factory=list)


def perplexity_of(logprobs: list[np.ndarray]) -> float:
    """exp(-mean log p) over every scored token, pooled across sequences (llama.cpp's `perplexity`
    tool's definition; it scores the second half of fixed windows, this the answer tokens).

    Args:
        logprobs: Per sequence, (scored,) float64 natural-log probabilities of the scored tokens.

    Returns:
        The perplexity (1.0 when nothing is scored).
    """
    total = sum(float(row.sum()) for row in logprobs)
    return math.exp(-total / max(sum(len(row) for row in logprobs), 1))


def answer_positions(labels: list[list[int]]) -> list[np.ndarray]:
    """Per sequence, the positions i (int64, ascending) whose next token i + 1 is labelled (not -100):
    where the logits that predict an answer token are read. `labels` as `render_for_training` gives."""
    return [np.flatnonzero(np.asarray(row[1:]) != IGNORE_INDEX) for row in labels]


@torch.inference_mode()
def logit_reference(
    model: PreTrainedModel, sequences: list[list[int]], labels: list[list[int]]
) -> LogitReference:
    """The merged model's log-probabilities and top-1 tokens at the answer positions, one unpadded
    forward pass per sequence, on the CPU.

    Args:
        model: The merged model, fp32, in eval mode.
        sequences: Token ids per check conversation.
        labels: The same conversations' labels (-100 outside the answers), of the same lengths.

    Returns:
        LogitReference: per sequence, the answer positions (n,) int64, the answer tokens' log p (n,)
        float64 in nats, and the top-1 token ids (n,) int64 there.
    """
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
    """The GGUF file's answer-token log p (n,) float64 and top-1 ids (n,) per sequence, at the
    reference's positions, one llama.cpp evaluation per sequence (the engine keeps every position's
    logits: `LlamaCppEngine(..., scores=True)`)."""
    rows = [engine.scored_at(ids, at) for ids, at in zip(reference.sequences, reference.answers, strict=True)]
    return [logprobs for logprobs, _ in rows], [top1 for _, top1 in rows]


def check_metadata(path: Path, chat: ChatTokenizer, rope: GgufRope) -> list[str]:
    """What the file's metadata gets wrong: the chat template, end-of-turn, bos, and the RoPE keys that
    `rope` (export/rope.py, from the merged model's config) says llama.cpp needs."""
    # transformers' reader skips the token arrays: 0.05 s where gguf.GGUFReader takes 18 s on a 128k vocabulary
    fields, _ = read_gguf_metadata(str(path))

    def value(key: str) -> Any:
        return fields.get(key)

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
    arch = value("general.architecture") or "llama"
    expected = rope.keys(arch)
    written = {key: value(key) for key in fields if key.startswith(f"{arch}.rope.")}
    for key in sorted({*expected, *written} - {f"{arch}.rope.dimension_count"}):
        want, got = expected.get(key), written.get(key)
        same = (
            got == want
            if isinstance(want, str | None)
            else got is not None and math.isclose(got, want, rel_tol=1e-6)
        )
        if not same:
            problems.append(f"rope: {key} is {got!r}, the merged model's config needs {want!r}")
    return problems


def check_tokenizer(engine: LlamaCppEngine, chat: ChatTokenizer, texts: list[str], result: FileCheck) -> None:
    """Count the rendered conversations (`texts`) that llama.cpp tokenizes (special tokens parsed, no
    bos added) differently from the HF tokenizer, into `result`, with the first difference shown."""
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
    """Score the GGUF file on the reference's answer tokens, into `result`: top-1 agreement with the
    merged model (share of answer tokens, 0..1), where agreement breaks off (`divergence_start`), and
    the answer-token perplexity of both and its increase in percent (what the gate reads)."""
    logprobs, top1 = gguf_logits(engine, reference)
    agree = [a == b for a, b in zip(top1, reference.top1, strict=True)]
    result.top1_agreement = sum(int(row.sum()) for row in agree) / max(sum(len(row) for row in top1), 1)
    if agree:
        result.diverges_from = divergence_start(np.concatenate(reference.answers), np.concatenate(agree))
    result.perplexity = perplexity_of(logprobs)
    result.perplexity_merged = reference.perplexity
    result.perplexity_increase_pct = 100 * (result.perplexity / result.perplexity_merged - 1)


def check_chat_stops(
    engine: LlamaCppEngine, messages: list[Message], max_tokens: int, result: FileCheck
) -> None:
    """With the file's own template, vocabulary and stop tokens, as llama.cpp's own chat path reads them."""
    prompter = GGUFPrompter(engine.llm)
    pieces, finish = [], ""
    for delta in stream_answer(engine, prompter, prompter.chat_ids(messages), GREEDY, max_tokens):
        pieces.append(delta.text)
        finish = delta.finish_reason or finish
    result.chat_finish_reason = finish
    result.chat_answer = "".join(pieces)


def divergence_start(positions: np.ndarray, agree: np.ndarray) -> int | None:
    """The position from which top-1 agreement falls below 90 % when it was at least 99 % (over 8 or more
    scored tokens) before it: what wrong RoPE scaling or context metadata looks like. None otherwise.
    `positions` and `agree` are per scored token, in any order."""
    order = np.argsort(positions, kind="stable")
    positions, agree = positions[order], agree[order].astype(bool)
    for index in np.flatnonzero(~agree):
        before, after = agree[:index], agree[index:]
        if len(before) >= 8 and before.mean() >= 0.99 and after.mean() < 0.9:
            return int(positions[index])
        if len(before) >= 8 and before.mean() < 0.99:
            return None
    return None


def likely_cause(result: FileCheck) -> str | None:
    """What most probably broke a file whose logits or perplexity fail, from what was measured."""
    if result.tokenizer_mismatches:
        return "llama.cpp's token ids differ from the training tokenizer's (see the tokenizer check)"
    rope = [problem for problem in result.metadata_problems if "rope" in problem]
    if rope:
        return f"RoPE metadata: {rope[0]}"
    if result.diverges_from is not None:
        return (
            f"the logits agree up to position {result.diverges_from} and diverge after it: the file's RoPE "
            "scaling or context metadata differs from the model's"
        )
    return None


def stop_cause(result: FileCheck, stop_id: int) -> str:
    """Why a chat answer through the file did not stop, from the metadata and the merged model."""
    eot = [problem for problem in result.metadata_problems if "eot_token_id" in problem or "eos" in problem]
    if eot:
        return f"the end-of-turn token is missing from the file's metadata ({eot[0]}; expected id {stop_id})"
    if result.merged_stop_share is not None and result.merged_stop_share < 1:
        return (
            f"the merged model itself stopped on {result.merged_stop_share:.0%} of the test prompts: "
            "it has not learned to end its answers"
        )
    return "the file's template or vocabulary renders the conversation differently from training"


def perplexity_failure(result: FileCheck, gate_pct: float) -> str:
    """The failed perplexity gate: the increase over the merged model against the gate (percent), or that it
    is no finite number, with the likely cause."""
    cause = likely_cause(result)
    if math.isfinite(result.perplexity_increase_pct):
        measured = (
            f"perplexity {result.perplexity:.4f} is {result.perplexity_increase_pct:+.2f}% over the merged "
            f"model's {result.perplexity_merged:.4f}"
        )
    else:
        measured = (
            f"perplexity {result.perplexity:.4f} against the merged model's {result.perplexity_merged:.4f} is "
            f"no finite increase ({result.perplexity_increase_pct}%): a log-probability is not finite"
        )
    return f"{measured}; the gate allows {gate_pct}% (top-1 agreement {result.top1_agreement:.3f})" + (
        f"; likely cause: {cause}" if cause else ""
    )


def apply_gates(result: FileCheck, gate_pct: float, stop_id: int) -> None:
    """Collect the failures of one file (gates.file_gates decides which); each names what failed, by how
    much, and its likely cause."""
    result.gate_pct = gate_pct
    failing = failed(file_gates(asdict(result), gate_pct))
    failures = [f"metadata: {problem}" for problem in result.metadata_problems] if METADATA in failing else []
    if TOKENIZER in failing:
        failures.append(
            f"tokenizer: llama.cpp's ids differ from the HF tokenizer's on {result.tokenizer_mismatches} of "
            f"{result.tokenizer_texts} texts ({result.first_mismatch})"
        )
    if PERPLEXITY in failing:
        failures.append(perplexity_failure(result, gate_pct))
    if CHAT_STOP in failing:
        failures.append(
            f"the chat answer did not end at the end-of-turn token (finish_reason {result.chat_finish_reason!r}); "
            f"likely cause: {stop_cause(result, stop_id)}"
        )
    result.failures = failures
