"""The Ollama Modelfile: FROM, a Go TEMPLATE equal to the training template, a stop for every end token.

The Go template is derived from the tokenizer's own Jinja template by rendering sample conversations with
marker contents and cutting the text at the family's turn headers: what each role's turn looks like, the
generation prompt, and any text the template puts first when there is no system message (SmolLM2's default
system prompt, Llama 3.1's date block). The result is checked by rendering it (`gotemplate.render`) on
sample conversations and comparing with `apply_chat_template`. Llama 2, which has no turn headers, gets a
written template checked the same way. A template that does not match gets no TEMPLATE line, so Ollama
takes the template stored in the GGUF file.
"""

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from llamatailor.export.gguf_file import adds_bos
from llamatailor.export.gotemplate import render
from llamatailor.models.loading import ChatTokenizer

TURN_HEADERS = {
    "chatml": "<|im_start|>{role}\n",
    "llama3": "<|start_header_id|>{role}<|end_header_id|>\n\n",
    "llama4": "<|header_start|>{role}<|header_end|>\n\n",
}
ROLES = ("system", "user", "assistant")
MARK = "\x00{role}{index}\x00"
SAMPLE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You answer in JSON."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": '{"colour": "blue"}'},
        {"role": "user", "content": "Another one."},
    ],
    [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "Second\nline two"},
    ],
]


@dataclass(frozen=True)
class Modelfile:
    text: str
    template: str | None
    template_matches: int  # sample conversations where the Go template renders the HF template's text
    template_samples: int


def hf_text(chat: ChatTokenizer, messages: list[dict[str, str]]) -> str:
    """The training template's text, less the leading bos that llama.cpp adds itself for such models."""
    text = chat.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = chat.tokenizer.bos_token
    return text[len(bos) :] if adds_bos(chat) and text.startswith(bos) else text


def split_turns(text: str, header: str) -> tuple[str, list[str]]:
    """Text before the first turn header, and each turn from its header to the next header."""
    headers = "|".join(re.escape(header.format(role=role)) for role in ROLES)
    starts = [match.start() for match in re.finditer(headers, text)]
    if not starts:
        return text, []
    bounds = [*starts, len(text)]
    return text[: starts[0]], [text[a:b] for a, b in itertools.pairwise(bounds)]


def llama2_go_template(chat: ChatTokenizer) -> str:
    """Llama 2 folds the system prompt into the first user turn and opens every later turn with bos (the
    first bos is llama.cpp's own)."""
    bos, eos = chat.tokenizer.bos_token, chat.tokenizer.eos_token
    system = "{{ if $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}"
    user = f"{{{{ if not $first }}}}{bos}{{{{ end }}}}[INST] {{{{ if $first }}}}{system}{{{{ end }}}}{{{{ .Content }}}} [/INST]"
    assistant = f" {{{{ .Content }}}} {eos}"
    return (
        '{{ $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}' + user + "{{ $first = false }}"
        '{{ else if eq .Role "assistant" }}' + assistant + "{{ $first = false }}{{ end }}{{ end }}"
    )


def derive_go_template(chat: ChatTokenizer) -> str | None:
    if chat.family.name == "llama2":
        return llama2_go_template(chat)
    header = TURN_HEADERS.get(chat.family.name)
    if header is None:
        return None
    roles = ["system", "user", "assistant", "user"]
    messages = [{"role": r, "content": MARK.format(role=r, index=i)} for i, r in enumerate(roles)]
    lead, turns = split_turns(hf_text(chat, messages), header)
    _, turns_without_system = split_turns(hf_text(chat, messages[1:]), header)
    if len(turns) != len(roles) + 1:
        return None
    snippets = {}
    for index, (role, turn) in enumerate(zip(roles, turns, strict=False)):
        snippets[role] = turn.replace(MARK.format(role=role, index=index), "{{ .Content }}")
    preamble = "".join(turns_without_system[: len(turns_without_system) - len(roles)])
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{snippets[role]}'
        for i, role in enumerate(ROLES)
    )
    optional = f"{{{{ if not .System }}}}{preamble}{{{{ end }}}}" if preamble else ""
    return f"{lead}{optional}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{turns[-1]}"


def go_variables(messages: list[dict[str, str]]) -> dict[str, object]:
    """What Ollama hands a template: the messages, and .System from the (last) system message."""
    systems = [m["content"] for m in messages if m["role"] == "system"]
    turns = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    return {"Messages": turns, "System": systems[-1] if systems else ""}


def build_modelfile(chat: ChatTokenizer, gguf_name: str, system_prompt: str | None) -> Modelfile:
    template = derive_go_template(chat)
    matches = 0
    if template is not None:
        for messages in SAMPLE_CONVERSATIONS:
            matches += render(template, go_variables(messages)) == hf_text(chat, messages)
        if matches != len(SAMPLE_CONVERSATIONS):
            template = None
    lines = [f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    stops = [chat.tokenizer.convert_ids_to_tokens(token_id) for token_id in chat.stop_ids]
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    return Modelfile("\n".join(lines) + "\n", template, matches, len(SAMPLE_CONVERSATIONS))


def write_modelfile(path: Path, modelfile: Modelfile) -> None:
    from llamatailor.rundir import write_text

    write_text(path, modelfile.text)
