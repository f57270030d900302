"""The Ollama Modelfile: FROM, a Go TEMPLATE equal to the training template, a stop for every end token.

The Go template is derived from the tokenizer's own Jinja template by rendering sample conversations with
marker contents and cutting the text at the family's turn headers: what each role's turn looks like, the
generation prompt, and any text the template puts first when there is no system message (SmolLM2's default
system prompt, Llama 3's system block). Llama 2, which has no turn headers, gets a written template.

Some templates compute text at request time: Llama 3.2's writes `strftime_now("%d %b %Y")`. Such text must
not be frozen at the export day. The derivation renders with a clock whose `strftime` returns the format
itself, marked, and each marked date becomes Go over Ollama's `currentDate` (YYYY-MM-DD, the server's date
when the request comes), which reproduces the strftime text exactly for every date (day, month number or
name, year). A format Ollama's functions cannot reproduce (a weekday, a time) gets no TEMPLATE.

The result is checked by rendering it (`gotemplate.render`) on sample conversations at twelve dates that
are not today and comparing with `apply_chat_template` rendered at the same dates: a template that froze
a date cannot pass. A template that does not match gets no TEMPLATE line and a comment saying why, and
Ollama takes the template stored in the GGUF file.
"""

import itertools
import json
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from llamatailor.export.gotemplate import render
from llamatailor.export.request_dates import (
    FORMATS,
    NoTemplate,
    check_dates,
    request_clock,
    with_request_dates,
)
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
    """The Modelfile's text and how its TEMPLATE was checked."""

    text: str
    template: str | None
    template_matches: int  # sample conversations where the Go template renders the HF template's text
    template_samples: int
    note: str | None = None  # why there is no TEMPLATE
    date_dependent: bool = False  # the training template's text changes with the request date


def hf_text(chat: ChatTokenizer, messages: list[dict[str, str]], today: date | None = None) -> str:
    """The training template's text, less the leading bos that llama.cpp adds itself for such models;
    rendered as on `today` (default: the real clock) for templates that compute the date."""
    if today is not None:
        with request_clock(today):
            return hf_text(chat, messages)
    text = chat.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = chat.tokenizer.bos_token
    return text[len(bos) :] if chat.adds_bos and text.startswith(bos) else text


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


def derive_go_template(chat: ChatTokenizer) -> str:
    """The Go template for `chat`'s training template; raises NoTemplate saying why there is none."""
    if chat.family.name == "llama2":
        return llama2_go_template(chat)
    header = TURN_HEADERS.get(chat.family.name)
    if header is None:
        raise NoTemplate(
            f"llamatailor derives Go templates for turn-header formats; {chat.family.name} is not one"
        )
    roles = ["system", "user", "assistant", "user"]
    messages = [{"role": r, "content": MARK.format(role=r, index=i)} for i, r in enumerate(roles)]
    with request_clock(FORMATS):
        lead, turns = split_turns(hf_text(chat, messages), header)
        _, turns_without_system = split_turns(hf_text(chat, messages[1:]), header)
    if len(turns) != len(roles) + 1:
        raise NoTemplate(f"the chat template's text does not cut into turns at {header.strip()!r} headers")
    snippets = {}
    for index, (role, turn) in enumerate(zip(roles, turns, strict=False)):
        snippets[role] = turn.replace(MARK.format(role=role, index=index), "{{ .Content }}")
    preamble = "".join(turns_without_system[: len(turns_without_system) - len(roles)])
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{snippets[role]}'
        for i, role in enumerate(ROLES)
    )
    optional = f"{{{{ if not .System }}}}{preamble}{{{{ end }}}}" if preamble else ""
    template = f"{lead}{optional}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{turns[-1]}"
    return with_request_dates(template)


def go_variables(messages: list[dict[str, str]]) -> dict[str, object]:
    """What Ollama hands a chat template (template.go: `collate`, then `Execute`'s map): consecutive messages
    of one role merged with a blank line, and .System, all system messages joined by a blank line."""
    turns: list[dict[str, str]] = []
    for message in messages:
        if turns and turns[-1]["Role"] == message["role"] and message["role"] != "tool":
            turns[-1]["Content"] += "\n\n" + message["content"]
        else:
            turns.append({"Role": message["role"], "Content": message["content"]})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"Messages": turns, "System": system, "Response": "", "Think": False, "ThinkLevel": ""}


def matching_conversations(chat: ChatTokenizer, template: str) -> int:
    """Sample conversations that the Go template renders exactly as the training template, at every date."""
    return sum(
        all(
            render(template, go_variables(messages), day) == hf_text(chat, messages, day)
            for day in check_dates()
        )
        for messages in SAMPLE_CONVERSATIONS
    )


def changes_with_date(chat: ChatTokenizer) -> bool:
    """Whether the training template's text differs between two request dates."""
    first, second = check_dates()[:2]
    return any(hf_text(chat, m, first) != hf_text(chat, m, second) for m in SAMPLE_CONVERSATIONS)


def build_modelfile(chat: ChatTokenizer, gguf_name: str, system_prompt: str | None) -> Modelfile:
    """FROM, TEMPLATE (when one renders like the training template at every check date), stops, SYSTEM."""
    dated, matches, template, note = changes_with_date(chat), 0, None, None
    try:
        derived = derive_go_template(chat)
        matches = matching_conversations(chat, derived)
        if matches != len(SAMPLE_CONVERSATIONS):
            raise NoTemplate(
                f"the derived Go template renders {len(SAMPLE_CONVERSATIONS) - matches} of "
                f"{len(SAMPLE_CONVERSATIONS)} sample conversations differently from the training template"
                + (" at some request date" if dated else "")
            )
        template = derived
    except NoTemplate as reason:
        note = str(reason)
    lines = [f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append(f"# No TEMPLATE: {note}. Ollama uses the chat template stored in the GGUF file.")
    stops = [chat.tokenizer.convert_ids_to_tokens(token_id) for token_id in chat.stop_ids]
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    return Modelfile("\n".join(lines) + "\n", template, matches, len(SAMPLE_CONVERSATIONS), note, dated)


def write_modelfile(path: Path, modelfile: Modelfile) -> None:
    """Write the Modelfile atomically (a temporary name in the same folder, then renamed)."""
    from llamatailor.rundir import write_text

    write_text(path, modelfile.text)
