"""The in-process backend: one generation engine in this process (transformers, a base with adapters), the
prompter for its vocabulary, and the model names a request may ask for (an adapter's name, or the base's own
name for the adapters off).

Prompts, decoding and stops come from `generation`, as for `chat` and eval: a run's requests render the
training tokenizer's ids with the run's system prompt. One generation runs at a time (one slot); the engine
runs in a worker thread that hands deltas to the event loop and stops before its next token once the request
is closed. A GGUF file is served by llama.cpp's own server (`serve.llama_server`).
"""

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from peft import PeftModel

from llamatailor.config import ModelSection
from llamatailor.data.formats import Message
from llamatailor.errors import ModelLoadError
from llamatailor.generation.answers import stream_answer
from llamatailor.generation.engines import Engine, Sampling, TransformersEngine
from llamatailor.generation.prompts import Prompter, TokenizerPrompter
from llamatailor.generation.text import Delta
from llamatailor.models.loading import load_base_model, load_saved_tokenizer
from llamatailor.serve.backend import Job

_DONE = object()


class ServedModels:
    """`adapters` maps each model name to the adapter generating for it (None: the adapters off).
    `tokens_after_cancel`: tokens the engine generated after a closed request asked it to stop (at most the
    one in flight each time)."""

    slots = 1
    honours: frozenset[str] = frozenset()  # OpenAI's extra sampling fields: none (see serve.backend)

    def __init__(
        self,
        engine: Engine,
        prompter: Prompter,
        adapters: dict[str, str | None],
        description: str,
        vocab_size: int,
    ) -> None:
        self.engine, self.prompter, self.adapters, self.description = engine, prompter, adapters, description
        self.context_length = engine.context_length
        self.vocab_size = vocab_size
        self.tokens_after_cancel = 0
        self._engine_lock = threading.Lock()  # a closed request's thread finishes before the next starts

    @property
    def tokens_generated(self) -> int:
        return self.engine.tokens_generated

    def model_ids(self) -> list[str]:
        return list(self.adapters)

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        """A chat request's prompt: the template's markup as control tokens, the messages as plain text
        (a message that spells `<|im_end|>` cannot close its turn; `generation.prompts`)."""
        return self.prompter.chat_ids(messages)

    def text_prompt(self, text: str) -> list[int]:
        """A raw prompt, the client's own text: special-token text in it is read as control tokens."""
        return self.prompter.text_ids(text)

    def deltas(self, job: Job, cancelled: threading.Event) -> Iterator[Delta]:
        """The answer's text deltas from the adapter `job.model` names (see `generation.answers`)."""
        sampling = Sampling(job.temperature, job.top_p, job.seed)
        with self._engine_lock, self.engine.adapter(self.adapters[job.model]):
            yield from stream_answer(
                self.engine, self.prompter, job.prompt, sampling, job.max_tokens, job.stop_strings, cancelled
            )

    async def answer(self, job: Job) -> AsyncIterator[Delta]:
        """The deltas of `job` from a worker thread; closing this iterator sets the flag the engine checks
        before each token (it needs no await, so it holds when the request's task is being cancelled)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled, at_cancel = threading.Event(), [0]

        def work() -> None:
            try:
                for delta in self.deltas(job, cancelled):
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
            except Exception as exc:  # handed to the request that asked for it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                if cancelled.is_set():
                    self.tokens_after_cancel += self.engine.tokens_generated - at_cancel[0]
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        threading.Thread(target=work, daemon=True, name="llamatailor-generate").start()
        ended = False
        try:
            while True:
                item = await queue.get()
                ended = item is _DONE or isinstance(item, Exception)
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            if not ended:  # the consumer left mid-generation
                at_cancel[0] = self.engine.tokens_generated
                cancelled.set()

    def close(self) -> None:
        """Nothing to stop: the engine lives in this process."""


def transformers_models(
    base: ModelSection, base_name: str, adapters: dict[str, Path], chat_from: Path, system_prompt: str | None
) -> ServedModels:
    """A base model loaded once with its adapters; the base's own name serves it with the adapters off."""
    chat = load_saved_tokenizer(chat_from, base)
    model = load_base_model(base)
    for index, (name, folder) in enumerate(adapters.items()):
        if not (folder / "adapter_config.json").is_file():
            raise ModelLoadError(f"adapter {name}: {folder} has no adapter_config.json")
        if index == 0:
            model = PeftModel.from_pretrained(model, folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
    engine = TransformersEngine(base_name, model.eval(), chat.tokenizer.pad_token_id)
    names: dict[str, str | None] = {name: name for name in adapters}
    description = f"transformers over {base.base}" + (f" with {', '.join(adapters)}" if adapters else "")
    vocab_size = model.get_output_embeddings().weight.shape[0]  # the logits' rows, padding rows included
    return ServedModels(
        engine, TokenizerPrompter(chat, system_prompt), {**names, base_name: None}, description, vocab_size
    )
