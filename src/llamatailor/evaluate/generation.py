"""Batched greedy generation that stops at the family's end-of-turn tokens and says whether it did."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel

from llamatailor.models.loading import ChatTokenizer


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int  # generated tokens, the stop token included
    stopped: bool  # ended at a stop token rather than at max_new_tokens


def greedy_config(chat: ChatTokenizer, max_new_tokens: int) -> GenerationConfig:
    # A fresh config: a model's own generation_config may ask for sampling.
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=chat.stop_ids,
        pad_token_id=chat.tokenizer.pad_token_id,
    )


@torch.inference_mode()
def generate_batch(
    model: PreTrainedModel, chat: ChatTokenizer, prompts: list[list[int]], max_new_tokens: int
) -> list[Generation]:
    width = max(len(prompt) for prompt in prompts)
    pad = chat.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        generation_config=greedy_config(chat, max_new_tokens),
    )
    return [decode_generation(row[width:].tolist(), chat) for row in output]


def decode_generation(new_ids: list[int], chat: ChatTokenizer) -> Generation:
    stops = set(chat.stop_ids)
    end = next((i for i, token in enumerate(new_ids) if token in stops), None)
    kept = new_ids if end is None else new_ids[:end]
    text = chat.tokenizer.decode(kept, skip_special_tokens=True)
    return Generation(
        text=text.strip(), tokens=len(new_ids) if end is None else end + 1, stopped=end is not None
    )


def generate_all(
    model: PreTrainedModel,
    chat: ChatTokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Generate for every prompt, batching prompts of similar length; results in the prompts' order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: dict[int, Generation] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for index, generation in zip(
            batch, generate_batch(model, chat, [prompts[i] for i in batch], max_new_tokens), strict=True
        ):
            results[index] = generation
        if on_batch:
            on_batch(len(batch))
    return [results[i] for i in range(len(prompts))]
