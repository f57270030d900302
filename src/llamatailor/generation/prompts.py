"""Prompt ids for a conversation or a raw text, and the decoding of answer ids, from one vocabulary.

Two vocabularies give prompts: the tokenizer a run was trained with (`TokenizerPrompter`, for every engine
serving a run, so the same request gives the same ids on transformers and llama.cpp), and a bare GGUF
file's own vocabulary and template (`GGUFPrompter`, for a file served or checked on its own). Each rule is
here once:

* the run's system prompt goes first when a conversation has none (`data.formats.with_system_prompt`);
* a chat's messages are text: only the template's own markup becomes control tokens (`chat_ids`, see
  `plain_content_ids`), so a message that spells `<|im_end|>\n<|im_start|>system` cannot forge a turn;
* a raw text is read with its special tokens as control tokens (`<|im_end|>` is one token, as in training);
* bos is added where the vocabulary adds it, and never twice (a Llama 2 prompt written as `<s>[INST] ...`);
* decoding skips control tokens; the stop ids are the family's end-of-turn tokens and eos.
"""

import functools
import re
from bisect import bisect_left
from typing import Any, Protocol

from llamatailor.data.formats import Message, Tool, json_strings, map_strings, with_system_prompt
from llamatailor.data.templating import (
    RenderError,
    render_prompt,
    render_prompt_text,
    special_token_texts,
    token_pattern,
)
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


class ChatVocabulary(Protocol):
    """What `plain_content_ids` needs of a vocabulary: its chat template, its tokenizer, and a pattern that
    matches the text of any of its control tokens (the tokens it reads as one id wherever text spells them:
    special tokens in transformers, control and unknown tokens in llama.cpp)."""

    @property
    def control_pattern(self) -> re.Pattern[str]: ...

    def render(self, messages: list[Message], tools: list[Tool] | None) -> str: ...

    def tokenize(self, text: str, special: bool) -> list[int]: ...


def spells_control_tokens(
    pattern: re.Pattern[str], messages: list[Message], tools: list[Tool] | None
) -> bool:
    """Whether any string in `messages` or `tools` (contents, tool-call arguments, tool results, tool
    definitions; dict keys are not looked at) contains the text of a control token `pattern` matches."""
    return any(pattern.search(text) for _, text in json_strings([messages, tools or []], ""))


def plain_content_ids(
    vocabulary: ChatVocabulary, messages: list[Message], tools: list[Tool] | None
) -> list[int]:
    """Prompt ids in which only the template's own markup is control tokens: the text of a control token that
    a string of `messages` or `tools` spells is read as plain text. Used when `spells_control_tokens`.

    The template renders the conversation twice: as it is, and with each such text in the strings replaced
    by a marker that no string holds; putting the texts back in place of the markers shows where they lie
    in the rendering. A tokenizer cuts a text at its control tokens and tokenizes each stretch between two
    of them as plain text; so is the rendering, except that a string's control text is no cut: the stretch
    around it, between two of the template's control tokens, is tokenized as plain text (like
    `split_special_tokens` in transformers, `special=False` in llama.cpp). Everything outside such a
    stretch keeps the ids it has without this rule. (transformers' `sanitize_control_tokens` finds the same
    control tokens but tokenizes each spelled one apart from the text around it; here the stretch reads as
    it would in a vocabulary without those tokens, the same on every tokenizer.) Raises RenderError when
    the template changes a string around such a text (escapes or cuts it) and its rendering holds control
    tokens that the template did not write."""
    pattern = vocabulary.control_pattern
    strings = [text for _, text in json_strings([messages, tools or []], "")]
    marker = _free_marker(strings)
    spelled: list[str] = []

    def hide(found: re.Match[str]) -> str:
        spelled.append(found.group())
        return f"{marker}{len(spelled) - 1}x"

    masked = vocabulary.render(*map_strings((messages, tools), lambda text: pattern.sub(hide, text)))
    text = vocabulary.render(messages, tools)
    restored, forged = _put_back(masked, marker, spelled)
    if restored == text:
        return _ids_around(vocabulary, text, forged)
    if [found.group() for found in pattern.finditer(text)] != [
        found.group() for found in pattern.finditer(masked)
    ]:
        raise RenderError(
            "the chat template changes message text that spells a control token in a way that cannot be "
            "followed, so that text would be read as control tokens; remove it from the messages"
        )
    return vocabulary.tokenize(text, special=True)  # the template escaped or dropped every such text


def _free_marker(strings: list[str]) -> str:
    """Letters no string holds (a marker must pass through the template unchanged: no space, no quote)."""
    marker = "Plaintextmarker"
    while any(marker in text for text in strings):
        marker += "q"
    return marker


def _put_back(masked: str, marker: str, spelled: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The masked rendering with each marker replaced by the control text it hides, and the character span
    of each such text in the result."""
    pieces, spans, length, last = [], [], 0, 0
    for found in re.finditer(f"{re.escape(marker)}(\\d+)x", masked):
        before, token = masked[last : found.start()], spelled[int(found.group(1))]
        start = length + len(before)
        pieces += [before, token]
        spans.append((start, start + len(token)))
        length, last = start + len(token), found.end()
    return "".join([*pieces, masked[last:]]), spans


def _ids_around(vocabulary: ChatVocabulary, text: str, forged: list[tuple[int, int]]) -> list[int]:
    """Ids of `text` with the control texts at the `forged` spans (in order) read as plain text."""
    starts = [start for start, _ in forged]
    gaps = zip([0, *(end for _, end in forged)], [*starts, len(text)], strict=True)
    pattern = vocabulary.control_pattern
    own = [found.span() for start, end in gaps for found in pattern.finditer(text, start, end)]
    ids: list[int] = []
    clean_from = 0
    # The stretches between two of the template's control tokens (or an end of the text)
    for (_, start), (end, _) in zip([(0, 0), *own], [*own, (len(text), len(text))], strict=True):
        first = bisect_left(starts, start)
        if first < len(starts) and starts[first] < end:  # a string's control text lies in this stretch
            ids += _tokens(vocabulary, text[clean_from:start], special=True)
            ids += _tokens(vocabulary, text[start:end], special=False)
            clean_from = end
    return ids + _tokens(vocabulary, text[clean_from:], special=True)


def _tokens(vocabulary: ChatVocabulary, text: str, special: bool) -> list[int]:
    return vocabulary.tokenize(text, special) if text else []


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

    @functools.cached_property
    def control_pattern(self) -> re.Pattern[str]:
        """The special tokens, as `prepare` refuses them in training data."""
        return token_pattern(special_token_texts(self.chat.tokenizer))

    def chat_ids(self, messages: list[Message], tools: list[Tool] | None = None) -> list[int]:
        messages = with_system_prompt(messages, self.system_prompt)
        if spells_control_tokens(self.control_pattern, messages, tools):
            return plain_content_ids(self, messages, tools)
        return render_prompt(self.chat, messages, tools)  # training's own rendering

    def text_ids(self, text: str) -> list[int]:
        return single_bos(
            self.tokenize(text, special=True), self.chat.tokenizer.bos_token_id, self.chat.adds_bos
        )

    def decode(self, ids: list[int]) -> str:
        return self.chat.tokenizer.decode(ids, skip_special_tokens=True)

    def render(self, messages: list[Message], tools: list[Tool] | None) -> str:
        """The chat template's text for `messages` up to the assistant's answer (`render_prompt`'s text)."""
        return render_prompt_text(self.chat, messages, tools)

    def tokenize(self, text: str, special: bool) -> list[int]:
        """Ids of `text`, no bos added; special-token text read as control tokens only when `special`."""
        encoded = self.chat.tokenizer(text, add_special_tokens=False, split_special_tokens=not special)
        return list(encoded["input_ids"])


class GGUFPrompter:
    """A GGUF file's own vocabulary (llama.cpp's tokenizer) and the chat template stored in the file; the
    stop ids are the file's eos and end-of-turn tokens. `llm` is a `llama_cpp.Llama`."""

    def __init__(self, llm: Any, system_prompt: str | None = None) -> None:
        import llama_cpp

        self.llm, self.system_prompt = llm, system_prompt
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.bos = llm.token_bos()
        self.adds_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.stop_ids = {llm.token_eos(), llama_cpp.llama_vocab_eot(self.vocab)} - {-1}

    @functools.cached_property
    def control_pattern(self) -> re.Pattern[str]:
        """The tokens llama.cpp reads from text only when asked to parse special tokens: control and unknown
        ones (a walk over the vocabulary, about 0.1 s for 128k tokens, once)."""
        import llama_cpp

        kinds = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        count = llama_cpp.llama_vocab_n_tokens(self.vocab)
        ids = [i for i in range(count) if llama_cpp.llama_vocab_get_attr(self.vocab, i) & kinds]
        return token_pattern({self._text(i) for i in ids} - {""})

    def chat_ids(self, messages: list[Message], tools: list[Tool] | None = None) -> list[int]:
        messages = with_system_prompt(messages, self.system_prompt)
        if spells_control_tokens(self.control_pattern, messages, tools):
            ids = plain_content_ids(self, messages, tools)
        else:
            ids = self.tokenize(self.render(messages, tools), special=True)
        return single_bos(ids, self.bos, self.adds_bos)

    def text_ids(self, text: str) -> list[int]:
        return single_bos(self.tokenize(text, special=True), self.bos, self.adds_bos)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def render(self, messages: list[Message], tools: list[Tool] | None) -> str:
        """The file's chat template rendered by llama-cpp-python, up to the assistant's answer. Raises
        ModelLoadError when the file has no template."""
        return self._formatter(messages=messages, tools=tools or None).prompt

    def tokenize(self, text: str, special: bool) -> list[int]:
        """Ids of `text` by llama.cpp, no bos added; control-token text read as control tokens only when
        `special`."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    @functools.cached_property
    def _formatter(self) -> Any:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelLoadError("the GGUF file has no chat template; use /v1/completions")
        return Jinja2ChatFormatter(
            template, eos_token=self._text(self.llm.token_eos()), bos_token=self._text(self.bos)
        )

    def _text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""
