"""What generates tokens: transformers (a model, with or without adapters) or llama.cpp (a GGUF file).

Both take prompt ids (from `generation.prompts`) and give token ids: `stream` one at a time, sampled or
greedy, until the caller stops iterating or `cancelled` is set; `greedy` for a list of prompts (batched by
transformers); `token_logprobs` for scoring. This is the only module that runs a model's decoding loop.
"""

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import GenerationConfig, PreTrainedModel

from llamatailor.hardware import cpu_threads

BatchCallback = Callable[[int], None]


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; `seed` None draws a fresh seed per request."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


GREEDY = Sampling()


class Engine(Protocol):
    """Token ids in, token ids out; `context_length` in tokens. `tokens_generated` counts every token
    `stream` has computed since the engine was made, a cancelled generation's included (the server's
    metrics read it, to show that a generation whose client left stopped)."""

    label: str
    context_length: int
    tokens_generated: int

    def stream(self, prompt: list[int], sampling: Sampling, cancelled: threading.Event) -> Iterator[int]:
        """Generated ids one at a time, without end: the caller stops at a stop id or its budget."""
        ...

    def adapter(self, name: str | None) -> contextlib.AbstractContextManager[object]:
        """Generate with adapter `name` inside the context, or with the adapters off (None)."""
        ...

    def greedy(
        self, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int], on_batch: BatchCallback
    ) -> list[list[int]]:
        """Generated ids per prompt (the prompt excluded), up to and including the first stop id."""
        ...

    def token_logprobs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """log p(token i | tokens before i) for i = 1 .. len - 1, per sequence: a (len - 1,) float array
        in nats (natural log)."""
        ...


class TransformersEngine:
    """A transformers model (a PeftModel's adapters can be switched with `adapter`)."""

    def __init__(self, label: str, model: PreTrainedModel, pad_id: int | None, batch_size: int = 8) -> None:
        # Padded positions are masked out, so a vocabulary without a pad token can pad with any id.
        self.label, self.model, self.batch_size = label, model, batch_size
        self.pad_id = pad_id if pad_id is not None else 0
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.tokens_generated = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def adapter(self, name: str | None) -> contextlib.AbstractContextManager[object]:
        """Generate with adapter `name`, or with the adapters off (None)."""
        if name is None:
            disable = getattr(self.model, "disable_adapter", None)
            return disable() if disable is not None else contextlib.nullcontext()
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def stream(self, prompt: list[int], sampling: Sampling, cancelled: threading.Event) -> Iterator[int]:
        """Generated ids one at a time (see `Engine.stream`): one forward pass per token over the KV
        cache, the last position's logits (vocab,) taken in fp32 and picked by `sample`."""
        seed = sampling.seed if sampling.seed is not None else torch.seed()
        generator = torch.Generator().manual_seed(seed % 2**63)
        ids, cache = torch.tensor([prompt], device=self.device), None
        while not cancelled.is_set():
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = sample(out.logits[0, -1].float().cpu(), sampling, generator)
            self.tokens_generated += 1
            yield token
            ids = torch.tensor([[token]], device=self.device)

    def greedy(
        self, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int], on_batch: BatchCallback
    ) -> list[list[int]]:
        """Prompts of similar length batched together (left-padded); results in the prompts' order."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: dict[int, list[int]] = {}
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            rows = self._greedy_batch([prompts[i] for i in batch], max_new_tokens, stop_ids)
            results.update(zip(batch, rows, strict=True))
            on_batch(len(batch))
        return [results[i] for i in range(len(prompts))]

    @torch.inference_mode()
    def _greedy_batch(
        self, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int]
    ) -> list[list[int]]:
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        # A fresh config: a model's own generation_config may ask for sampling.
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(stop_ids),
            pad_token_id=self.pad_id,
        )
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            generation_config=config,
        )
        return [until_stop(row[width:].tolist(), stop_ids) for row in output]

    @torch.inference_mode()
    def token_logprobs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """log p(token i | tokens before i), i = 1 .. len - 1, per sequence, without (batch, seq, vocab)
        logits: TRL 1.16's fused LM head (`add_fused_lm_head`), `batch_size` right-padded rows a pass.

        Args:
            sequences: Token ids per sequence, each at least 2 long and within `context_length`.

        Returns:
            Per sequence, a (len - 1,) float32 array in nats.
        """
        self._fused_head()
        results: list[np.ndarray] = []
        for start in range(0, len(sequences), self.batch_size):
            batch = sequences[start : start + self.batch_size]
            width = max(len(ids) for ids in batch)
            ids = torch.tensor([ids + [self.pad_id] * (width - len(ids)) for ids in batch])
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                labels=ids.masked_fill(mask == 0, -100).to(self.device),
                fused_lm_head=True,
            )
            logprobs = out.log_probs.float().cpu().numpy()
            results += [row[: len(seq) - 1] for row, seq in zip(logprobs, batch, strict=True)]
        return results

    def _fused_head(self) -> None:
        from trl.trainer.utils import add_fused_lm_head

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if not hasattr(base, "_llamatailor_fused_head"):
            # TRL's tiled head gives per-token log-probabilities without [tokens x vocabulary] logits.
            add_fused_lm_head(base)
            base._llamatailor_fused_head = True


class LlamaCppEngine:
    """A GGUF file through llama.cpp (llama-cpp-python). `scores` keeps the logits of every position,
    for `token_logprobs` and `scored_at`; `threads`: llama.cpp's CPU threads (default: `cpu_threads()`)."""

    def __init__(
        self, label: str, path: Path, context: int, threads: int | None = None, scores: bool = False
    ) -> None:
        from llama_cpp import Llama

        self.label = label
        self.llm = Llama(
            model_path=str(path),
            n_ctx=context,
            n_threads=threads or cpu_threads(),
            logits_all=scores,
            verbose=False,
            seed=0,
        )
        self.context_length = self.llm.n_ctx()
        self.tokens_generated = 0

    def stream(self, prompt: list[int], sampling: Sampling, cancelled: threading.Event) -> Iterator[int]:
        self.llm.set_seed(sampling.seed % 2**31 if sampling.seed is not None else torch.seed() % 2**31)
        greedy = sampling.temperature == 0
        for token in self.llm.generate(
            prompt,
            temp=sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=1 if greedy else 0,
            reset=True,
        ):
            self.tokens_generated += 1  # computed even when the check below drops it
            if cancelled.is_set():
                return
            yield token

    def adapter(self, name: str | None) -> contextlib.AbstractContextManager[object]:
        """A GGUF file has its adapters merged in: only None (the file as it is) can be asked for."""
        if name is not None:
            raise ValueError(f"a GGUF file has no adapter {name!r}")
        return contextlib.nullcontext()

    def greedy(
        self, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int], on_batch: BatchCallback
    ) -> list[list[int]]:
        results = []
        for prompt in prompts:
            produced: list[int] = []
            for token in self.stream(prompt, GREEDY, threading.Event()):
                produced.append(token)
                if token in stop_ids or len(produced) >= max_new_tokens:
                    break
            results.append(produced)
            on_batch(1)
        return results

    def token_logprobs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """log p(token i | tokens before i), i = 1 .. len - 1: per sequence a (len - 1,) float64 array in
        nats, one llama.cpp evaluation each (needs `scores=True`), as llama.cpp's `perplexity` tool reads
        its logits."""
        return [self.scored_at(ids, np.arange(len(ids) - 1))[0] for ids in sequences]

    def scored_at(self, ids: list[int], positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One sequence through llama.cpp: log p(next token) and the top-1 token at `positions`.

        Args:
            ids: The sequence's token ids, at most `context_length` of them.
            positions: (n,) int positions in [0, len(ids) - 1); position i scores token i + 1.

        Returns:
            (n,) float64 log-probabilities in nats, and (n,) int64 top-1 token ids, from the (len, vocab)
            logits llama.cpp keeps with `scores=True` (without it only the last row is kept).
        """
        self.llm.reset()
        self.llm.eval(ids)
        return scored(np.asarray(self.llm.scores[: len(ids)]), ids, positions)

    def close(self) -> None:
        self.llm.close()


def until_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    """`ids` up to and including the first stop id (batched generation pads the rows that stopped)."""
    end = next((i for i, token in enumerate(ids) if token in stop_ids), None)
    return ids if end is None else ids[: end + 1]


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Greedy at temperature 0; else temperature-scaled softmax with nucleus (top-p) truncation.

    Nucleus sampling as Holtzman et al. 2020: the smallest set of most probable tokens whose mass reaches
    `top_p` (the top token always kept), sampled in proportion to their probabilities.

    Args:
        logits: (vocab,) float logits of the next token.
        sampling: Temperature (0: greedy) and top_p.
        generator: The seeded CPU generator the draw uses.

    Returns:
        The chosen token id.
    """
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(0) - ordered < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def scored(logits: np.ndarray, ids: list[int], positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log p(next token) and the top-1 token at `positions`, from a sequence's logits.

    Args:
        logits: (len, vocab) float logits of the sequence; row i predicts token i + 1.
        ids: The sequence's len token ids.
        positions: (n,) int positions in [0, len - 1).

    Returns:
        (n,) float64 log-softmax values of the next tokens, in nats (computed in float64), and (n,)
        int64 top-1 token ids.
    """
    rows = logits[positions].astype(np.float64)
    shifted = rows - rows.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return log_softmax[np.arange(len(positions)), np.asarray(ids)[positions + 1]], rows.argmax(-1)
