"""A chat session against a run's tuned model (or its base), or against a running server, streaming each
answer as it is generated."""

from collections.abc import Callable

from llamatailor.config import RunConfig
from llamatailor.data.formats import Message
from llamatailor.errors import ModelLoadError
from llamatailor.generation.answers import stream_answer
from llamatailor.generation.engines import GREEDY, TransformersEngine
from llamatailor.generation.prompts import TokenizerPrompter
from llamatailor.models.loading import load_base_model, load_saved_tokenizer, load_tuned_model


class ChatSession:
    """Keeps the conversation; `reply` adds the user's turn and the model's answer to it."""

    def __init__(self, config: RunConfig, use_base: bool = False, max_new_tokens: int = 256) -> None:
        final = config.run_dir.final(config.dpo.enabled)
        # The tokenizer and template saved with the tuned model, for the base too: the same prompt for both.
        chat = load_saved_tokenizer(final, config.model)
        model = load_base_model(config.model) if use_base else load_tuned_model(config.model, final)
        self.engine = TransformersEngine("chat", model.eval(), chat.tokenizer.pad_token_id)
        self.prompter = TokenizerPrompter(chat, config.data.system_prompt)
        self.max_new_tokens = max_new_tokens
        self.history: list[Message] = []

    def reset(self) -> None:
        self.history = []

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        messages = [*self.history, {"role": "user", "content": text}]
        prompt = self.prompter.chat_ids(messages)
        pieces = []
        for delta in stream_answer(self.engine, self.prompter, prompt, GREEDY, self.max_new_tokens):
            pieces.append(delta.text)
            if on_text and delta.text:
                on_text(delta.text)
        answer = "".join(pieces).strip()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer


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
            stream=True,
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
