"""What the server answers with: one generation engine, the prompter for its vocabulary, and the model
names a request may ask for (an adapter's name, or the base's own name for the adapters off).

Prompts, decoding and stops come from `generation`: a run served by llama.cpp or by transformers renders
the same ids for the same request (the training tokenizer, with the run's system prompt); a bare GGUF
file is rendered by its own vocabulary and template. One generation runs at a time (the scheduler sees
to it).
"""

import threading
from collections.abc import Iterator
from pathlib import Path

from peft import PeftModel

from llamatailor.config import ModelSection
from llamatailor.data.formats import Message
from llamatailor.errors import ModelLoadError
from llamatailor.generation.answers import stream_answer
from llamatailor.generation.engines import Engine, LlamaCppEngine, Sampling, TransformersEngine
from llamatailor.generation.prompts import GGUFPrompter, Prompter, TokenizerPrompter
from llamatailor.generation.text import Delta
from llamatailor.models.loading import ChatTokenizer, load_base_model, load_saved_tokenizer


class ServedModels:
    """`adapters` maps each model name to the adapter generating for it (None: the adapters off)."""

    def __init__(
        self, engine: Engine, prompter: Prompter, adapters: dict[str, str | None], description: str
    ) -> None:
        self.engine, self.prompter, self.adapters, self.description = engine, prompter, adapters, description
        self.context_length = engine.context_length

    def model_ids(self) -> list[str]:
        return list(self.adapters)

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        """A chat request's prompt: the template's markup as control tokens, the messages as plain text
        (a message that spells `<|im_end|>` cannot close its turn; `generation.prompts`)."""
        return self.prompter.chat_ids(messages)

    def text_prompt(self, text: str) -> list[int]:
        """A raw prompt, the client's own text: special-token text in it is read as control tokens."""
        return self.prompter.text_ids(text)

    def deltas(
        self,
        model: str,
        prompt: list[int],
        sampling: Sampling,
        max_tokens: int,
        stop_strings: list[str],
        cancelled: threading.Event,
    ) -> Iterator[Delta]:
        """The answer's text deltas from the adapter `model` names (see `generation.answers`)."""
        with self.engine.adapter(self.adapters[model]):
            yield from stream_answer(
                self.engine, self.prompter, prompt, sampling, max_tokens, stop_strings, cancelled
            )


def llama_cpp_models(
    name: str, path: Path, chat: ChatTokenizer | None, context: int, threads: int, system_prompt: str | None
) -> ServedModels:
    """A GGUF file; prompts from the run's training tokenizer when there is one (export checked that
    llama.cpp tokenizes identically), else from the file's own vocabulary and template."""
    engine = LlamaCppEngine(name, path, context, threads)
    prompter: Prompter = (
        TokenizerPrompter(chat, system_prompt) if chat else GGUFPrompter(engine.llm, system_prompt)
    )
    return ServedModels(engine, prompter, {name: None}, f"llama.cpp over {path.name}")


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
    return ServedModels(
        engine, TokenizerPrompter(chat, system_prompt), {**names, base_name: None}, description
    )
