"""The Modelfile's TEMPLATE rendered by Go's own text/template, the way Ollama renders it, against
`apply_chat_template`, for every family (ChatML, Llama 2, Llama 3.1, 3.2, 3.3) and several request dates;
and templates that compute the date (Llama 3.2) are never frozen at the export day.

The Go side is tests/go/ollama_template (Ollama's template functions, `collate` and data map). It needs the
`go` command (Debian: `apt-get install golang-go`); without it these tests skip, except in CI (CI=true),
where .ci/run installs it and a missing `go` is a failure.
"""

import copy
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from datetime import date
from pathlib import Path

import pytest

from llamatailor.cache import cache_dir
from llamatailor.config import ModelSection
from llamatailor.export.gotemplate import render
from llamatailor.export.ollama import build_modelfile, go_variables, hf_text, matching_conversations
from llamatailor.export.request_dates import CHECK_DATES
from llamatailor.models.loading import ChatTokenizer, prepare_tokenizer
from tiny_models import llama_cpp_model_file

GO_PROGRAM = Path(__file__).parent / "go" / "ollama_template"
META_TEMPLATES = {
    "llama3.2": "templates/meta-llama-Llama-3.2-3B-Instruct.jinja",
    "llama3.3": "templates/meta-llama-Llama-3.3-70B-Instruct.jinja",
}
# Today (the unpatched clock on both sides), a day and month with a leading zero, and a later date.
DATES = [date.today(), date(2031, 2, 3), date(2027, 11, 28)]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You answer in JSON.\nKeys in English."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": '{"colour": "blue", "path": "C:\\\\tmp", "tab": "\\t"}'},
        {"role": "user", "content": "Another one."},
    ],
    [
        {"role": "user", "content": "First question:\nline two\n\nline four"},
        {"role": "assistant", "content": "First answer,\nover two lines"},
        {"role": "user", "content": "Second question"},
    ],
    [
        {"role": "user", "content": "Grüße aus Köln! 世界 😀 — déjà vu, {{ .Content }} stays text"},
        {"role": "assistant", "content": "Ça va ? Ünïcödé ✓ 日本語"},
        {"role": "user", "content": "$.System and {{ end }} are text too"},
    ],
    [
        {"role": "system", "content": "Tu es un assistant. Réponds en français."},
        {"role": "user", "content": "Bonjour"},
        {"role": "assistant", "content": "Bonjour ! Comment puis-je vous aider ?"},
    ],
]

GoRenderer = Callable[[list[dict[str, object]]], list[str]]


@pytest.fixture(scope="session")
def go_render(tmp_path_factory: pytest.TempPathFactory) -> GoRenderer:
    """Build tests/go/ollama_template once; return a function rendering a batch of cases with it."""
    go = shutil.which("go")
    if go is None:
        message = (
            "the `go` command is missing: apt-get install golang-go (Go's text/template checks the Modelfile)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; .ci/run installs it in CI")
        pytest.skip(message)
    # A fresh clone, as root or not: Go's caches go to our cache folder, never to a home that may not exist.
    env = {
        **os.environ,
        "GOCACHE": str(cache_dir() / "go" / "build-cache"),
        "GOPATH": str(cache_dir() / "go" / "path"),
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",  # the program uses the standard library only
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }
    binary = tmp_path_factory.mktemp("go") / "ollama_template"
    built = subprocess.run(
        [go, "build", "-o", str(binary), "."], cwd=GO_PROGRAM, env=env, capture_output=True, text=True
    )
    assert built.returncode == 0, f"go build failed:\n{built.stderr}"

    def run(cases: list[dict[str, object]]) -> list[str]:
        done = subprocess.run(
            [str(binary)], input=json.dumps(cases), capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        results = json.loads(done.stdout)
        errors = [
            (case["template"], r["error"]) for case, r in zip(cases, results, strict=True) if r.get("error")
        ]
        assert not errors, f"Go's text/template refused a template: {errors[0]}"
        return [result["text"] for result in results]

    return run


def with_template(chat: ChatTokenizer, template: str) -> ChatTokenizer:
    """A copy of `chat`'s tokenizer with another chat template, prepared as a run would prepare it."""
    tokenizer = copy.deepcopy(chat.tokenizer)
    tokenizer.chat_template = template
    return prepare_tokenizer(tokenizer, ModelSection())


@pytest.fixture(scope="module")
def families(chatml, llama2, llama3) -> dict[str, ChatTokenizer]:
    """Every family of the fidelity matrix: the `llama3` fixture has Meta's 3.1 template."""
    meta = {
        name: llama_cpp_model_file(path).read_text(encoding="utf-8") for name, path in META_TEMPLATES.items()
    }
    return {
        "chatml": chatml,
        "llama2": llama2,
        "llama3.1": llama3,
        **{name: with_template(llama3, text) for name, text in meta.items()},
    }


def go_case(template: str, messages: list[dict[str, str]], day: date) -> dict[str, object]:
    return {"template": template, "today": day.isoformat(), "messages": messages}


def hf_on(chat: ChatTokenizer, messages: list[dict[str, str]], day: date) -> str:
    """apply_chat_template on `day`; today's rendering uses the real clock, untouched."""
    return hf_text(chat, messages) if day == date.today() else hf_text(chat, messages, day)


def test_go_renders_every_familys_modelfile_like_apply_chat_template(families, go_render):
    cases, expected, labels = [], [], []
    for name, chat in families.items():
        modelfile = build_modelfile(chat, "m-q8_0.gguf", None)
        assert modelfile.template is not None, f"{name}: {modelfile.note}"
        for index, messages in enumerate(CONVERSATIONS):
            for day in DATES:
                cases.append(go_case(modelfile.template, messages, day))
                expected.append(hf_on(chat, messages, day))
                labels.append(f"{name} conversation {index} on {day}")
    rendered = go_render(cases)
    mismatches = [label for label, got, want in zip(labels, rendered, expected, strict=True) if got != want]
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ, first: {mismatches[0]}"
    assert len(cases) == 5 * len(CONVERSATIONS) * len(DATES)


def test_llama32_modelfile_computes_the_date_at_request_time(families, go_render):
    chat = families["llama3.2"]
    modelfile = build_modelfile(chat, "m.gguf", None)
    assert modelfile.date_dependent and modelfile.note is None
    template = modelfile.template
    assert template.startswith("{{ $today := currentDate }}")
    assert "Today Date: {{ $day }} {{ $monthAbbr }} {{ $year }}\n\n" in template
    for day in {date.today(), *CHECK_DATES}:  # no literal date of any check day, nor of today
        assert f"{day:%d %b %Y}" not in modelfile.text
    bos = chat.tokenizer.bos_token if not chat.adds_bos else ""
    expected = (
        f"{bos}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 03 Feb 2031\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    messages = [{"role": "user", "content": "Hi"}]
    assert hf_text(chat, messages, date(2031, 2, 3)) == expected
    assert render(template, go_variables(messages), date(2031, 2, 3)) == expected
    assert go_render([go_case(template, messages, date(2031, 2, 3))]) == [expected]
    # every month's name, days 01-31: Go's rendering equals strftime("%d %b %Y")
    days = [date(2030, month, day) for month in range(1, 13) for day in (1, 9, 10, 28)]
    texts = go_render([go_case(template, messages, day) for day in days])
    assert texts == [expected.replace("03 Feb 2031", f"{day:%d %b %Y}") for day in days]


@pytest.mark.parametrize("name", ["llama3.1", "llama3.3"])
def test_fixed_date_templates_keep_their_fixed_date(families, name):
    """Meta's 3.1 and 3.3 templates write "26 Jul 2024" unless the caller passes date_string, which
    training and serving never do: that text is the template's constant, not a frozen request date."""
    modelfile = build_modelfile(families[name], "m.gguf", None)
    assert not modelfile.date_dependent
    assert modelfile.template.count("Today Date: 26 Jul 2024\n\n") == 2  # no-system block, system turn
    assert "currentDate" not in modelfile.template


def test_a_frozen_date_fails_the_export_check(families):
    chat = families["llama3.2"]
    template = build_modelfile(chat, "m.gguf", None).template
    frozen = template.replace("{{ $day }} {{ $monthAbbr }} {{ $year }}", f"{date.today():%d %b %Y}")
    assert "currentDate" in frozen and "{{ $day }}" not in frozen
    assert matching_conversations(chat, template) == 4
    assert matching_conversations(chat, frozen) == 0  # rendered on the export day it would have passed


@pytest.mark.parametrize(
    ("strftime", "day", "written"),
    [
        ("%-d %B %Y", date(2031, 2, 3), "3 February 2031"),
        ("%Y-%m-%d", date(2031, 2, 3), "2031-02-03"),
        ("%e/%-m/%y", date(2029, 12, 7), " 7/12/29"),
        ("%d.%m.%Y (%h)", date(2028, 9, 30), "30.09.2028 (Sep)"),
    ],
)
def test_other_date_formats_render_in_go(families, go_render, strftime, day, written):
    meta = llama_cpp_model_file(META_TEMPLATES["llama3.2"]).read_text(encoding="utf-8")
    chat = with_template(
        families["llama3.1"], meta.replace('strftime_now("%d %b %Y")', f'strftime_now("{strftime}")')
    )
    modelfile = build_modelfile(chat, "m.gguf", None)
    assert modelfile.template is not None, modelfile.note
    messages = CONVERSATIONS[2]
    expected = hf_text(chat, messages, day)
    assert f"Today Date: {written}\n\n" in expected
    assert go_render([go_case(modelfile.template, messages, day)]) == [expected]


def test_a_date_ollama_cannot_compute_gets_no_template(families):
    meta = llama_cpp_model_file(META_TEMPLATES["llama3.2"]).read_text(encoding="utf-8")
    chat = with_template(
        families["llama3.1"], meta.replace('strftime_now("%d %b %Y")', 'strftime_now("%A %d %b %Y")')
    )
    modelfile = build_modelfile(chat, "m.gguf", None)
    assert modelfile.template is None and modelfile.date_dependent
    assert modelfile.text.splitlines()[:2] == [
        "FROM ./m.gguf",
        '# No TEMPLATE: the chat template writes the date as strftime "%A %d %b %Y", and %A cannot be '
        "computed by an Ollama template (its date function, currentDate, gives YYYY-MM-DD). "
        "Ollama uses the chat template stored in the GGUF file.",
    ]
    assert 'TEMPLATE """' not in modelfile.text


def test_our_renderer_agrees_with_go(go_render):
    """export's own check uses gotemplate.render: on what our templates use, it must read them as Go does
    (variable scopes, assignment from inside range, slice, currentDate, and Ollama's collate)."""
    messages = [
        {"role": "system", "content": "S1"},
        {"role": "system", "content": "S2"},
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    day = date(2031, 2, 3)
    expected = {
        '{{ $x := "a" }}{{ range .Messages }}{{ $x := "b" }}{{ $x }}{{ end }}{{ $x }}': "bbba",
        '{{ $x := "-" }}{{ range .Messages }}{{ $x = .Role }}{{ end }}{{ $x }}': "assistant",
        '{{ if .System }}{{ $y := "in" }}{{ $y }}{{ end }}': "in",
        "{{ $t := currentDate }}{{ slice $t 0 4 }}|{{ slice $t 5 7 }}|{{ slice $t 8 10 }}|{{ currentDate }}": "2031|02|03|2031-02-03",
        "{{ $f := true }}{{ $f }}{{ $f = false }}{{ $f }}{{ if not $f }}!{{ end }}": "truefalse!",
        "[{{ .System }}]{{ range .Messages }}{{ .Role }}={{ .Content }};{{ end }}": "[S1\n\nS2]system=S1\n\nS2;user=a\n\nb;assistant=c;",
    }
    # Ollama passes .Messages only to templates that read it: a trailing empty range marks the others.
    templates = [t if ".Messages" in t else t + "{{ range .Messages }}{{ end }}" for t in expected]
    ours = [render(template, go_variables(messages), day) for template in templates]
    assert go_render([go_case(template, messages, day) for template in templates]) == ours
    assert ours == list(expected.values())
