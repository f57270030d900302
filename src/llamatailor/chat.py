"""A chat session against a run's tuned model (or its base), or against a running server, streaming each
answer as it is generated."""

from collections.abc import Callable
from threading import Thread

import torch
from transformers import TextIteratorStreamer

from llamatailor.config import RunConfig
from llamatailor.data.formats import Message
from llamatailor.data.templating import render_prompt
from llamatailor.errors import ModelLoadError
from llamatailor.evaluate.generation import greedy_config
from llamatailor.models.loading import load_base_model, load_saved_tokenizer, load_tuned_model


class ChatSession:
    """Keeps the conversation; `reply` adds the user's turn and the model's answer to it."""

    def __init__(self, config: RunConfig, use_base: bool = False, max_new_tokens: int = 256) -> None:
        final = config.run_dir.final(config.dpo.enabled)
        # The tokenizer and template saved with the tuned model, for the base too: the same prompt for both.
        self.chat = load_saved_tokenizer(final, config.model)
        self.model = (
            load_base_model(config.model) if use_base else load_tuned_model(config.model, final)
        ).eval()
        self.max_new_tokens = max_new_tokens
        self.system_prompt = config.data.system_prompt
        self.history: list[Message] = []

    def reset(self) -> None:
        self.history = []

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages = [*system, *self.history, {"role": "user", "content": text}]
        prompt = torch.tensor([render_prompt(self.chat, messages)], device=self.model.device)
        streamer = TextIteratorStreamer(self.chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {
            "input_ids": prompt,
            "attention_mask": torch.ones_like(prompt),
            "generation_config": greedy_config(self.chat, self.max_new_tokens),
            "streamer": streamer,
        }
        worker = Thread(target=self._generate, kwargs=kwargs, daemon=True)
        worker.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            if on_text:
                on_text(piece)
        worker.join()
        answer = "".join(pieces).strip()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer

    @torch.inference_mode()
    def _generate(self, **kwargs: object) -> None:
        self.model.generate(**kwargs)


class RemoteChatSession:
    """The same conversation against an OpenAI-compatible server (`llamatailor serve`), streamed."""

    def __init__(self, url: str, api_key: str | None, model: str | None, max_new_tokens: int) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=url, api_key=api_key or "none")
        self.model = model or self._first_model()
        self.max_new_tokens = max_new_tokens
        self.history: list[Message] = []

    def _first_model(self) -> str:
        from openai import OpenAIError

        try:
            return self.client.models.list().data[0].id
        except (OpenAIError, IndexError) as exc:
            raise ModelLoadError(f"{self.client.base_url}: cannot list the server's models: {exc}") from None

    def reset(self) -> None:
        self.history = []

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        messages = [*self.history, {"role": "user", "content": text}]
        stream = self.client.chat.completions.create(
            model=self.model,
            messages=messages,
            max_tokens=self.max_new_tokens,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
        pieces = []
        for chunk in stream:
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                pieces.append(piece)
                if on_text:
                    on_text(piece)
        answer = "".join(pieces).strip()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer
