"""What evaluation runs a model through: transformers (base, adapter or merged folder) or llama.cpp (GGUF).

Both take token ids rendered by llamatailor's own template, so every engine sees the same prompt, and both
answer greedily and stop at the family's end-of-turn tokens.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import PreTrainedModel
from trl.trainer.utils import add_fused_lm_head

from llamatailor.evaluate.generation import Generation, decode_generation, generate_all
from llamatailor.models.loading import ChatTokenizer

BatchCallback = Callable[[int], None]


class Engine(Protocol):
    label: str

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, on_batch: BatchCallback
    ) -> list[Generation]: ...

    def token_logprobs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """log p(token i | tokens before i) for i = 1 .. len - 1, per sequence."""
        ...


class TransformersEngine:
    def __init__(self, label: str, model: PreTrainedModel, chat: ChatTokenizer, batch_size: int) -> None:
        self.label, self.model, self.chat, self.batch_size = label, model, chat, batch_size
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not hasattr(base, "_llamatailor_fused_head"):
            # TRL's tiled head gives per-token log-probabilities without [tokens x vocabulary] logits.
            add_fused_lm_head(base)
            base._llamatailor_fused_head = True

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, on_batch: BatchCallback
    ) -> list[Generation]:
        return generate_all(self.model, self.chat, prompts, max_new_tokens, self.batch_size, on_batch)

    @torch.inference_mode()
    def token_logprobs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        results: list[np.ndarray] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(sequences), self.batch_size):
            batch = sequences[start : start + self.batch_size]
            width = max(len(ids) for ids in batch)
            ids = torch.tensor(
                [ids + [self.chat.tokenizer.pad_token_id] * (width - len(ids)) for ids in batch]
            )
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
            labels = ids.masked_fill(mask == 0, -100)
            out = self.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                labels=labels.to(device),
                fused_lm_head=True,
            )
            logprobs = out.log_probs.float().cpu().numpy()
            results += [row[: len(seq) - 1] for row, seq in zip(logprobs, batch, strict=True)]
        return results


class LlamaCppEngine:
    """A GGUF file through llama.cpp (llama-cpp-python), fed the same token ids."""

    def __init__(self, label: str, path: Path, chat: ChatTokenizer, context: int) -> None:
        from llama_cpp import Llama

        self.label, self.chat = label, chat
        self.llm = Llama(model_path=str(path), n_ctx=context, logits_all=True, verbose=False, seed=0)

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, on_batch: BatchCallback
    ) -> list[Generation]:
        stops = set(self.chat.stop_ids)
        results = []
        for prompt in prompts:
            self.llm.reset()
            produced: list[int] = []
            for token in self.llm.generate(prompt, top_k=1, temp=0.0, reset=True):
                produced.append(token)
                if token in stops or len(produced) >= max_new_tokens:
                    break
            results.append(decode_generation(produced, self.chat))
            on_batch(1)
        return results

    def close(self) -> None:
        self.llm.close()

    def token_logprobs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        return [self.scored_at(ids, np.arange(len(ids) - 1))[0] for ids in sequences]

    def scored_at(self, ids: list[int], positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One sequence through llama.cpp: log p(next token) and the top-1 token at `positions`."""
        self.llm.reset()
        self.llm.eval(ids)
        return scored(np.asarray(self.llm.scores[: len(ids)]), ids, positions)


def scored(logits: np.ndarray, ids: list[int], positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log p(next token) and the top-1 token at `positions`, from [positions x vocabulary] logits."""
    rows = logits[positions].astype(np.float64)
    shifted = rows - rows.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return log_softmax[np.arange(len(positions)), np.asarray(ids)[positions + 1]], rows.argmax(-1)
