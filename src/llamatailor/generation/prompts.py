"""Prompt ids for a conversation or a raw text, and the decoding of answer ids, from one vocabulary.

Two vocabularies give prompts: the tokenizer a run was trained with (`TokenizerPrompter`, for every engine
serving a run, so the same request gives the same ids on transformers and llama.cpp), and a bare GGUF
file's own vocabulary and template (`GGUFPrompter`, for a file served or checked on its own). Each rule is
here once:

* the run's system prompt goes first when a conversation has none (`data.formats.with_system_prompt`);
* a raw text is read with its special tokens as control tokens (`<|im_end|>` is one token, as in training);
* bos is added where the vocabulary adds it, and never twice (a Llama 2 prompt written as `<s>[INST] ...`);
* decoding skips control tokens; the stop ids are the family's end-of-turn tokens and eos.
"""

from typing import Any, Protocol

from llamatailor.data.formats import Message, Tool, with_system_prompt
from llamatailor.data.templating import render_prompt
from llamatailor.errors import ModelLoadError
from llamatailor.models.loading import ChatTokenizer


class Prompter(Protocol):
    """One vocabulary's prompt rules; `stop_ids` are the ids an answer ends at."""

    stop_ids: set[int]

    def chat_ids(self, messages: list[Message], tools: list[Tool] | None = None) -> list[int]:
        """Ids of `messages` up to the point where the assistant answers (the generation prompt), with the
        `tools` offered (OpenAI's format) rendered by the template as in training."""
        ...

    def text_ids(self, text: str) -> list[int]:
        """Ids of a raw prompt, special tokens read as control tokens, with one bos where the vocabulary
        adds one."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of answer ids, control tokens left out (a cut UTF-8 character decodes to U+FFFD)."""
        ...


def single_bos(ids: list[int], bos: int | None, adds_bos: bool) -> list[int]:
    """`ids` starting with exactly one bos where the vocabulary adds one; as they are elsewhere."""
    if not adds_bos or bos is None:
        return ids
    while ids[:2] == [bos, bos]:
        ids = ids[1:]
    return ids if ids[:1] == [bos] else [bos, *ids]


class TokenizerPrompter:
    """The training tokenizer and chat template (the one saved beside the adapter or merged model)."""

    def __init__(self, chat: ChatTokenizer, system_prompt: str | None = None) -> None:
        self.chat, self.system_prompt = chat, system_prompt
        self.stop_ids = set(chat.stop_ids)

    def chat_ids(self, messages: list[Message], tools: list[Tool] | None = None) -> list[int]:
        return render_prompt(self.chat, with_system_prompt(messages, self.system_prompt), tools)

    def text_ids(self, text: str) -> list[int]:
        tokenizer = self.chat.tokenizer
        ids = tokenizer.encode(text, add_special_tokens=False)
        return single_bos(ids, tokenizer.bos_token_id, self.chat.adds_bos)

    def decode(self, ids: list[int]) -> str:
        return self.chat.tokenizer.decode(ids, skip_special_tokens=True)


class GGUFPrompter:
    """A GGUF file's own vocabulary (llama.cpp's tokenizer) and the chat template stored in the file; the
    stop ids are the file's eos and end-of-turn tokens. `llm` is a `llama_cpp.Llama`."""

    def __init__(self, llm: Any, system_prompt: str | None = None) -> None:
        import llama_cpp

        self.llm, self.system_prompt = llm, system_prompt
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.bos = llm.token_bos()
        self.adds_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.stop_ids = {llm.token_eos(), llama_cpp.llama_vocab_eot(vocab)} - {-1}

    def chat_ids(self, messages: list[Message], tools: list[Tool] | None = None) -> list[int]:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelLoadError("the GGUF file has no chat template; use /v1/completions")
        formatter = Jinja2ChatFormatter(
            template, eos_token=self._text(self.llm.token_eos()), bos_token=self._text(self.bos)
        )
        text = formatter(
            messages=with_system_prompt(messages, self.system_prompt), tools=tools or None
        ).prompt
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return single_bos(ids, self.bos, self.adds_bos)

    def text_ids(self, text: str) -> list[int]:
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return single_bos(ids, self.bos, self.adds_bos)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def _text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""
