"""What the server generates with: llama.cpp over a GGUF file, or transformers over a base model with any
number of adapters (the request's `model` picks one; the base's own name turns them off).

An engine turns messages or text into prompt ids with the training template, and yields generated token
ids one at a time until the caller stops iterating or `cancelled` is set. One generation runs at a time
per engine (the server's scheduler sees to it).
"""

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from llamatailor.config import ModelSection
from llamatailor.data.templating import render_prompt
from llamatailor.errors import ModelLoadError
from llamatailor.models.loading import ChatTokenizer, load_base_model, load_saved_tokenizer


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    seed: int | None


class ServeEngine(Protocol):
    context_length: int
    stop_ids: set[int]

    def model_ids(self) -> list[str]: ...

    def chat_prompt(self, model: str, messages: list[dict[str, str]]) -> list[int]: ...

    def text_prompt(self, model: str, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def generate(
        self, model: str, prompt: list[int], sampling: Sampling, cancelled: threading.Event
    ) -> Iterator[int]: ...


class LlamaCppServeEngine:
    """A GGUF file through llama-cpp-python; prompts rendered with the training tokenizer when the run has
    one (the export checked that llama.cpp tokenizes identically), else with the template in the file."""

    def __init__(self, name: str, path: Path, chat: ChatTokenizer | None, context: int, threads: int) -> None:
        from llama_cpp import Llama

        self.name, self.chat = name, chat
        self.llm = Llama(model_path=str(path), n_ctx=context, n_threads=threads, verbose=False)
        self.context_length = self.llm.n_ctx()
        self.stop_ids = set(chat.stop_ids) if chat else {self.llm.token_eos(), self._eot()} - {-1}

    def _eot(self) -> int:
        import llama_cpp

        return llama_cpp.llama_vocab_eot(llama_cpp.llama_model_get_vocab(self.llm.model))

    def model_ids(self) -> list[str]:
        return [self.name]

    def chat_prompt(self, model: str, messages: list[dict[str, str]]) -> list[int]:
        if self.chat is not None:
            return render_prompt(self.chat, messages)
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelLoadError("the GGUF file has no chat template; use /v1/completions")
        vocab = self.llm
        formatter = Jinja2ChatFormatter(
            template,
            eos_token=vocab.detokenize([vocab.token_eos()]).decode("utf-8", "replace"),
            bos_token=vocab.detokenize([vocab.token_bos()]).decode("utf-8", "replace"),
        )
        text = formatter(messages=messages).prompt
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def text_prompt(self, model: str, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def decode(self, ids: list[int]) -> str:
        if self.chat is not None:
            return self.chat.tokenizer.decode(ids, skip_special_tokens=True)
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def generate(
        self, model: str, prompt: list[int], sampling: Sampling, cancelled: threading.Event
    ) -> Iterator[int]:
        self.llm.set_seed(sampling.seed if sampling.seed is not None else torch.seed() % 2**31)
        greedy = sampling.temperature == 0
        for token in self.llm.generate(
            prompt, temp=sampling.temperature, top_p=1.0 if greedy else sampling.top_p, top_k=0, reset=True
        ):
            if cancelled.is_set():
                return
            yield token


class TransformersServeEngine:
    """A base model loaded once with its adapters; `model` names an adapter, or the base itself."""

    def __init__(
        self, base: ModelSection, base_name: str, adapters: dict[str, Path], chat_from: Path
    ) -> None:
        from peft import PeftModel

        self.chat = load_saved_tokenizer(chat_from, base)
        model = load_base_model(base)
        self.base_name, self.adapters = base_name, list(adapters)
        for index, (name, folder) in enumerate(adapters.items()):
            if not (folder / "adapter_config.json").is_file():
                raise ModelLoadError(f"adapter {name}: {folder} has no adapter_config.json")
            if index == 0:
                model = PeftModel.from_pretrained(model, folder, adapter_name=name)
            else:
                model.load_adapter(folder, adapter_name=name)
        self.model = model.eval()
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.stop_ids = set(self.chat.stop_ids)

    def model_ids(self) -> list[str]:
        return [*self.adapters, self.base_name]

    def chat_prompt(self, model: str, messages: list[dict[str, str]]) -> list[int]:
        return render_prompt(self.chat, messages)

    def text_prompt(self, model: str, text: str) -> list[int]:
        return self.chat.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.chat.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.inference_mode()
    def generate(
        self, model: str, prompt: list[int], sampling: Sampling, cancelled: threading.Event
    ) -> Iterator[int]:
        generator = torch.Generator().manual_seed(
            sampling.seed if sampling.seed is not None else torch.seed()
        )
        with self._adapter(model):
            ids = torch.tensor([prompt], device=self.model.device)
            cache = None
            while not cancelled.is_set():
                out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = sample(out.logits[0, -1].float().cpu(), sampling, generator)
                yield token
                ids = torch.tensor([[token]], device=self.model.device)

    def _adapter(self, model: str) -> contextlib.AbstractContextManager[object]:
        if model == self.base_name:
            return self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
        self.model.set_adapter(model)
        return contextlib.nullcontext()


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(0) - ordered < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
