"""`llamatailor serve` as a real server on 127.0.0.1, driven by the official openai client and raw HTTP."""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import torch
from openai import OpenAI

from helpers import KEY, Server
from llamatailor.config import ModelSection
from llamatailor.export.gguf_file import write_gguf
from llamatailor.models.loading import load_saved_tokenizer


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tiny_models) -> Path:
    folder = tiny_models["chatml"]
    chat = load_saved_tokenizer(folder, ModelSection())
    return write_gguf(folder, tmp_path_factory.mktemp("serve") / "tiny.gguf", "f32", chat, "tiny")


@pytest.fixture(scope="module")
def server(gguf_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    running = Server(
        gguf_file,
        "--api-key",
        KEY,
        "--max-tokens-limit",
        "256",
        "--log-requests",
        str(folder / "requests.jsonl"),
        log=folder / "server.log",
    )
    yield running, folder
    running.stop()


def ask(client: OpenAI, content: str, **options):
    options = {"temperature": 0, **options}
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], **options
    )


def test_models_health_and_metrics(server):
    running, _ = server
    models = running.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(f"{running.url}/health").json()["models"] == ["tiny"]
    ask(running.client(), "warm up", max_tokens=4)
    metrics = httpx.get(f"{running.url}/metrics").text
    assert 'llamatailor_requests_total{route="/v1/chat/completions",status="200"}' in metrics
    for name in (
        "llamatailor_request_seconds_bucket",
        "llamatailor_time_to_first_token_seconds_count",
        "llamatailor_generated_tokens_per_second_count",
        "llamatailor_queue_depth",
    ):
        assert name in metrics


def test_chat_non_streaming_and_streaming_agree(server):
    client = server[0].client()
    full = ask(client, "Tell me a story", max_tokens=12)
    assert full.object == "chat.completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 5
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    text = full.choices[0].message.content
    assert text
    chunks = list(
        ask(client, "Tell me a story", max_tokens=12, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_stream_ends_with_done(server):
    running, _ = server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", f"{running.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_stop_sequence_cuts_the_answer(server):
    client = server[0].client()
    text = ask(client, "Count for me", max_tokens=24).choices[0].message.content
    words = text.split()
    stop = words[len(words) // 2]
    cut = ask(client, "Count for me", max_tokens=24, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_completions_route(server):
    client = server[0].client()
    first = client.completions.create(model="tiny", prompt="The capital of", max_tokens=6, temperature=0)
    again = client.completions.create(model="tiny", prompt="The capital of", max_tokens=6, temperature=0)
    assert first.object == "text_completion" and first.choices[0].finish_reason == "length"
    assert first.choices[0].text == again.choices[0].text and first.usage.completion_tokens == 6
    streamed = client.completions.create(
        model="tiny", prompt="The capital of", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == first.choices[0].text


def test_seeded_sampling_repeats(server):
    client = server[0].client()
    answers = {
        ask(client, "Pick", max_tokens=8, temperature=1.0, seed=5).choices[0].message.content
        for _ in range(2)
    }
    assert len(answers) == 1


def test_sixteen_concurrent_clients_each_get_their_own_answer(server):
    client = server[0].client()
    prompts = [f"Question {n}: what comes after {n}?" for n in range(16)]
    alone = {p: ask(client, p, max_tokens=10).choices[0].message.content for p in prompts}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = dict(
            zip(
                prompts,
                pool.map(lambda p: ask(client, p, max_tokens=10).choices[0].message.content, prompts),
                strict=False,
            )
        )
    assert together == alone
    assert len(set(alone.values())) > 8


def test_bad_requests_get_openai_shaped_errors(server):
    running, _ = server
    client = running.client()
    with pytest.raises(openai.AuthenticationError):
        running.client(key="wrong").models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        ask(client, "x", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        ask(client, "x", temperature=7)
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    cases = {
        b"{not json": "invalid JSON",
        b'{"model": "tiny", "messages": "hi"}': "messages",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"a": 5}}': "logit_bias",
        b'{"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}': "role",
        b'{"model": "tiny", "messages": [], "max_tokens": 99999999999999999999999}': "",
    }
    for body, mentioned in cases.items():
        response = httpx.post(f"{running.url}/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and mentioned in error["message"]
        if body == b"{not json":  # where the JSON breaks is an offset, not a field
            assert error["param"] is None
            assert error["message"] == "invalid JSON body: Expecting property name enclosed in double quotes"
    huge = b'{"model": "tiny", "prompt": "' + b"a" * (2 << 20) + b'"}'
    assert httpx.post(f"{running.url}/v1/completions", content=huge, headers=headers).status_code == 413
    assert (
        httpx.get(f"{running.url}/v1/nothing", headers=headers).json()["error"]["type"] == "not_found_error"
    )


def test_request_log_masks_pii(server):
    running, folder = server
    ask(running.client(), "Mail me at jane.doe@example.com please", max_tokens=3)
    rows = [json.loads(line) for line in (folder / "requests.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "example.com" in json.dumps(r) or "EMAIL" in json.dumps(r)]
    assert logged and "jane.doe@example.com" not in json.dumps(logged)
    assert logged[-1]["completion_tokens"] == 3 and logged[-1]["model"] == "tiny"


def test_full_queue_answers_429(gguf_file, tmp_path):
    """One slot, one place in the queue: of 6 requests at once (each a few seconds of generation), one runs,
    one waits, the others get 429 with Retry-After. The waiting one answers after both generations: on a
    busy CI machine that took over the client's usual 60 s."""
    running = Server(gguf_file, "--slots", "1", "--max-queue", "1", log=tmp_path / "server.log")
    try:
        client = running.client(key=None).with_options(timeout=600)

        def long_request(n: int) -> int:
            try:
                client.completions.create(model="tiny", prompt=f"story {n}", max_tokens=1000, temperature=0)
                return 200
            except openai.RateLimitError as exc:
                assert exc.response.headers["retry-after"] == "1"
                return 429

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(long_request, range(6)))
        assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
    finally:
        running.stop()


def test_non_loopback_bind_needs_a_key(gguf_file):
    result = subprocess.run(
        [sys.executable, "-m", "llamatailor", "serve", str(gguf_file), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "LLAMATAILOR_API_KEY"},
    )
    assert result.returncode == 2 and "needs --api-key" in result.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "llamatailor", "serve", str(gguf_file.with_name("absent.gguf"))],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "absent.gguf: no such file or folder" in missing.stderr


@pytest.mark.parametrize(
    ("options", "environment", "message"),
    [
        (["--engine", "vllm"], {}, "a GGUF file is served by llama.cpp, not vllm"),
        (["--engine", "sglang"], {}, "--engine 'sglang': expected auto, llama.cpp, transformers, vllm"),
        (["--adapter", "other=some/folder"], {}, "other=some/folder: a GGUF file is served with LoRA GGUF"),
        ([], {"LLAMATAILOR_LLAMA_SERVER": "/nowhere/llama-server"}, "/nowhere/llama-server: no such file"),
        (["--adapter", "x=/nowhere/x.gguf"], {}, "x=/nowhere/x.gguf: no such file"),
        (["--adapter", "tiny=/nowhere/x.gguf"], {}, "the name 'tiny' is taken (by the base model)"),
        (["--slots", "0"], {}, "--slots"),
        (["--context", "-5"], {}, "--context"),
        (["--port", "99999"], {}, "--port"),
    ],
)
def test_engine_choices_that_cannot_work_are_refused_before_starting(
    gguf_file, options, environment, message
):
    result = subprocess.run(
        [sys.executable, "-m", "llamatailor", "serve", str(gguf_file), *options],
        capture_output=True,
        text=True,
        env={**os.environ, **environment},
    )
    assert result.returncode == 2 and message in " ".join(result.stderr.split()), result.stderr


def test_fuzzed_requests_never_crash_the_server(server):
    """schemathesis generates requests from the server's OpenAPI schema, valid and broken on purpose; every
    answer is below 500 and every error is OpenAI-shaped. (Its pytest plugin does not run on pytest 9, so
    its strategies are driven with hypothesis directly.)"""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    running, _ = server
    schema = schemathesis.openapi.from_url(f"{running.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    seen: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:
            response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            seen.append(response.status_code)
            assert response.status_code < 500, response.text
            if response.status_code >= 400:
                assert {"message", "type"} <= set(response.json()["error"])

        check()
    assert 200 in seen and any(code >= 400 for code in seen)


def children(pid: int) -> list[int]:
    """Running processes whose parent is `pid` (from /proc; zombies excluded)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid) and not fields.get("State", "").startswith("Z"):
            found.append(int(status.parent.name))
    return found


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" not in status.read_text()
    except OSError:
        return False


def test_shutdown_finishes_in_flight_requests(gguf_file, tmp_path):
    """SIGTERM: the request in flight gets its whole answer, then llama-server's process stops too."""
    running = Server(gguf_file, log=tmp_path / "server.log")
    engine = children(running.process.pid)
    assert len(engine) == 1  # llama-server
    client = running.client(key=None)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            client.completions.create, model="tiny", prompt="long", max_tokens=200, temperature=0
        )
        time.sleep(0.3)
        running.process.terminate()
        answer = pending.result(timeout=120)
    assert answer.usage.completion_tokens == 200
    # uvicorn re-raises the SIGTERM it handled once the in-flight requests are done
    assert running.process.wait(timeout=60) in (0, -15)
    deadline = time.monotonic() + 10
    while alive(engine[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(engine[0])


def test_killed_server_takes_its_engine_along(gguf_file, tmp_path):
    """SIGKILL leaves no shutdown to run: the kernel stops llama-server with its parent (PR_SET_PDEATHSIG)."""
    running = Server(gguf_file, log=tmp_path / "server.log")
    engine = children(running.process.pid)
    running.process.kill()
    running.process.wait(timeout=30)
    deadline = time.monotonic() + 10
    while alive(engine[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(engine) == 1 and not alive(engine[0])


def test_transformers_engine_serves_base_and_adapters(tmp_path, tiny_models):
    from helpers import conversation, prepared_run
    from llamatailor.config import load_config
    from llamatailor.data.templating import render_prompt
    from llamatailor.generation.answers import answer_all
    from llamatailor.generation.engines import TransformersEngine
    from llamatailor.generation.prompts import TokenizerPrompter
    from llamatailor.models.loading import load_base_model, load_tuned_model
    from llamatailor.train.sft import train_sft

    configs = []
    for name, answer in (("first", "yes"), ("second", "no")):
        run_file = prepared_run(
            tmp_path / name,
            tiny_models["chatml"],
            [conversation(f"q{n}", answer) for n in range(20)],
            name=name,
            train={"max_steps": 6, "learning_rate": 2e-2},
        )
        config = load_config(run_file)
        train_sft(config)
        configs.append((config, run_file))
    (first, first_file), (second, _) = configs
    running = Server(
        first_file,
        "--engine",
        "transformers",
        "--adapter",
        f"second={second.run_dir.adapter}",
        log=tmp_path / "server.log",
    )
    try:
        client = running.client(key=None)
        assert [m.id for m in client.models.list().data] == ["first", "second", "base"]
        answers = {}
        for model in ("first", "second", "base"):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "q1"}], max_tokens=6, temperature=0
            )
            answers[model] = reply.choices[0].message.content
        refused = {}
        for field, value in UNHONOURED_IN_PROCESS:
            response = post(running, "chat", {"model": "first", field: value}, key=None)
            refused[field] = (response.status_code, response.json()["error"]["param"])
            assert response.json()["error"]["code"] == "unsupported_value"
            assert response.json()["error"]["message"].startswith(f"{field}: not supported by this server's")
        neutral = post(running, "chat", {"model": "first", **IN_PROCESS_NEUTRAL}, key=None)
    finally:
        running.stop()
    assert refused == {field: (400, field) for field, _ in UNHONOURED_IN_PROCESS}
    assert (
        neutral.status_code == 200 and neutral.json()["choices"][0]["message"]["content"] == answers["first"]
    )
    chat = load_saved_tokenizer(first.run_dir.adapter, first.model)
    prompt = [render_prompt(chat, [{"role": "user", "content": "q1"}])]
    pad = chat.tokenizer.pad_token_id

    def greedy(model) -> str:  # answer_all strips the answer; the server sends the text as generated
        return answer_all(TransformersEngine("t", model.eval(), pad), TokenizerPrompter(chat), prompt, 6)[
            0
        ].text

    assert answers["first"].strip() == greedy(load_tuned_model(first.model, first.run_dir.adapter))
    assert answers["base"].strip() == greedy(load_base_model(first.model))
    assert answers["second"] != answers["first"]


def test_chat_command_talks_to_a_running_server(server):
    running, _ = server
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llamatailor",
            "chat",
            "--url",
            f"{running.url}/v1",
            "--api-key",
            KEY,
            "-p",
            "Hello there",
            "--max-new-tokens",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    expected = ask(running.client(), "Hello there", max_tokens=5).choices[0].message.content
    assert result.stdout.strip() == expected.strip()


CHAT_DEFAULTS = {  # what LangChain and other clients send: none of it changes the answer
    "frequency_penalty": 0,
    "presence_penalty": 0.0,
    "logprobs": False,
    "top_logprobs": 0,
    "n": 1,
    "logit_bias": {},
    "user": "someone",
    "seed": 11,
    "store": False,
    "stream_options": {"include_usage": True, "include_obfuscation": False},
    "top_p": None,
    "stop": None,
}
COMPLETION_DEFAULTS = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logprobs": None,
    "n": 1,
    "logit_bias": {},
    "echo": False,
    "best_of": 1,
    "suffix": "",
    "user": "someone",
    "seed": 11,
    "stream_options": {"include_usage": False},
}
ONE = "only 1 or null is accepted"
# The sampling fields the transformers engine does not apply (llama.cpp's server does: test_serve_sampling.py),
# and their neutral values, which it accepts.
UNHONOURED_IN_PROCESS = [
    ("n", 2),
    ("presence_penalty", 0.5),
    ("frequency_penalty", -1),
    ("logit_bias", {"42": 5}),
    ("logprobs", True),
    ("response_format", {"type": "json_object"}),
]
IN_PROCESS_NEUTRAL = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "logprobs": False,
    "top_logprobs": 0,
    "response_format": {"type": "text"},
}
REFUSED = [  # route, field, value, and the error message after "<field>: "
    (
        "chat",
        "store",
        True,
        "true is not supported (this server stores no completions); only false or null is accepted",
    ),
    (
        "text",
        "echo",
        True,
        "true is not supported (this server does not echo the prompt); only false or null is accepted",
    ),
    ("text", "best_of", 2, f"2 is not supported (this server generates one candidate per request); {ONE}"),
    (
        "text",
        "suffix",
        "}",
        '"}" is not supported (this server does not insert text before a suffix); only "" '
        "or null is accepted",
    ),
]


def post(running, route: str, body: dict, key: str | None = KEY) -> httpx.Response:
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    question = {"messages": [{"role": "user", "content": "Tell me a story"}]} if route == "chat" else {}
    request = {"model": "tiny", "prompt": "Once upon", **question, "max_tokens": 2, "temperature": 0, **body}
    if route == "chat":
        request.pop("prompt")
    return httpx.post(
        f"{running.url}{path}", json=request, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def answer_text(response: httpx.Response) -> str:
    choice = response.json()["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_harmless_defaults_are_accepted_and_change_nothing(server):
    """Each field at its neutral value, alone and all together, gets 200 and the very answer the request
    without it gets, on both routes (and through the official client, as LangChain sends them)."""
    running, _ = server
    wrong = []
    for route, defaults in (("chat", CHAT_DEFAULTS), ("text", COMPLETION_DEFAULTS)):
        plain = answer_text(post(running, route, {}))
        for body in [{field: value} for field, value in defaults.items()] + [defaults]:
            response = post(running, route, body)
            if response.status_code != 200 or answer_text(response) != plain:
                wrong.append((route, body, response.status_code, response.text[:200]))
    assert wrong == []
    options = {k: v for k, v in CHAT_DEFAULTS.items() if k not in ("top_p", "stop")}
    reply = ask(running.client(), "Tell me a story", max_tokens=2, **options)
    assert reply.choices[0].message.content == answer_text(post(running, "chat", {}))


def test_values_no_engine_would_honour_are_refused(server):
    """echo, best_of, suffix, store: 400 naming the field and what is supported, with OpenAI's code for an
    unsupported value."""
    running, _ = server
    for route, field, value, message in REFUSED:
        response = post(running, route, {field: value})
        assert (response.status_code, response.json()) == (
            400,
            {
                "error": {
                    "message": f"{field}: {message}",
                    "type": "invalid_request_error",
                    "param": field,
                    "code": "unsupported_value",
                }
            },
        ), (route, field, value)
    nested = post(running, "chat", {"stream": True, "stream_options": {"include_obfuscation": True}})
    assert (
        nested.status_code == 400 and nested.json()["error"]["param"] == "stream_options.include_obfuscation"
    )


def emoji_bigram_model(source: Path, folder: Path) -> Path:
    """The tiny ChatML model rewired so that greedy decoding after a newline writes 😀 over and over: the
    emoji is three byte-level tokens (F0 9F, 98, 80), so any max_tokens not a multiple of 3 ends inside a
    character. Attention and MLP outputs are zeroed (the logits depend on the last token alone), the
    chain's tokens get one-hot embeddings, and the head maps each to its successor with a margin of ~80
    logits: newline -> F0 9F -> 98 -> 80 -> F0 9F ..."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    emoji = tokenizer.encode("😀", add_special_tokens=False)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert len(emoji) == 3 and len(newline) == 1
    chain, successors = [*newline, *emoji], [*emoji, emoji[0]]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for slot, (token, after) in enumerate(zip(chain, successors, strict=True)):
            model.model.embed_tokens.weight[token] = 0.0
            model.model.embed_tokens.weight[token, slot] = 1.0
            model.lm_head.weight[after, slot] = 10.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def emoji_model(tmp_path_factory, tiny_models) -> tuple[Path, Path]:
    """The emoji model as a folder (transformers) and as an f32 GGUF file (llama.cpp), both named emoji."""
    folder = emoji_bigram_model(tiny_models["chatml"], tmp_path_factory.mktemp("emoji") / "emoji")
    chat = load_saved_tokenizer(folder, ModelSection())
    return folder, write_gguf(folder, folder.parent / "emoji.gguf", "f32", chat, "emoji")


@pytest.mark.parametrize("engine", ["llama.cpp", "transformers"])
def test_answer_cut_inside_a_character_ends_at_the_last_whole_one(emoji_model, engine, tmp_path):
    """max_tokens 5 ends two bytes into the second 😀: the answer is one 😀, streamed or not, chat or
    completion, finish_reason "length" and 5 tokens counted; no U+FFFD anywhere."""
    folder, gguf = emoji_model
    running = Server(gguf if engine == "llama.cpp" else folder, log=tmp_path / "server.log")
    try:
        client = running.client(key=None)
        chat = {"model": "emoji", "messages": [{"role": "user", "content": "Smile"}], "temperature": 0}
        text = {"model": "emoji", "prompt": "Smile\n", "temperature": 0}
        whole = client.chat.completions.create(**chat, max_tokens=6)
        assert whole.choices[0].message.content == "😀😀"  # the model writes emoji, as built
        cut = client.chat.completions.create(**chat, max_tokens=5)
        assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("😀", "length")
        assert cut.usage.completion_tokens == 5
        chunks = list(client.chat.completions.create(**chat, max_tokens=5, stream=True))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(pieces) == "😀" and all("\ufffd" not in piece for piece in pieces)
        assert chunks[-1].choices[0].finish_reason == "length"
        completion = client.completions.create(**text, max_tokens=4)
        assert (completion.choices[0].text, completion.choices[0].finish_reason) == ("😀", "length")
        streamed = list(client.completions.create(**text, max_tokens=8, stream=True))
        assert [c.choices[0].text for c in streamed] == ["", "😀", "😀", ""]
        assert streamed[-1].choices[0].finish_reason == "length"
    finally:
        running.stop()


@pytest.fixture(scope="module")
def limited_server(gguf_file, tmp_path_factory):
    """No key, a 2048-byte body cap; its metrics are read before and after each test (deltas)."""
    running = Server(gguf_file, "--max-body-bytes", "2048", log=tmp_path_factory.mktemp("limited") / "s.log")
    yield running
    running.stop()


def raw_request(port: int, head: str, body: bytes) -> socket.socket:
    """Send one HTTP/1.1 request over a plain socket, in one write; the caller reads and closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode("latin-1") + b"\r\n" + body)
    return sock


def read_all(sock: socket.socket) -> tuple[int, bytes]:
    """The status code and body of the response on `sock` (the server closes after it)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_chunked_body_over_the_cap_gets_413(limited_server):
    """Transfer-Encoding: chunked carries no Content-Length: the body is counted as it arrives."""
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n"
    )
    small = json.dumps({"model": "tiny", "prompt": "Once upon", "max_tokens": 1}).encode()
    status, body = read_all(raw_request(limited_server.port, head, chunked(small, 16)))
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 1
    large = json.dumps({"model": "tiny", "prompt": "a " * 1500, "max_tokens": 1}).encode()
    assert len(large) > 2048
    status, body = read_all(raw_request(limited_server.port, head, chunked(large, 512)))
    assert (status, json.loads(body)) == (
        413,
        {
            "error": {
                "message": "request body over 2048 bytes",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        },
    )


COUNTERS = ("llamatailor_generated_tokens_total", "llamatailor_cancelled_generations_total")


def counters(running) -> dict[str, float]:
    lines = httpx.get(f"{running.url}/metrics").text.splitlines()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines if not line.startswith("#")}
    return {name: values[name] for name in COUNTERS}


@pytest.mark.parametrize("stream", [True, False])
def test_disconnecting_client_stops_its_generation(limited_server, stream):
    """A client asks for 1800 tokens (the tiny model's context is 2048) and goes away once they are being
    generated. llama.cpp's own count of generated tokens (flushed when its slot is freed) shows the
    generation stopped: one cancel counted, and far fewer tokens generated than asked for."""
    running = limited_server
    before = counters(running)
    body = json.dumps(
        {"model": "tiny", "prompt": "story", "max_tokens": 1800, "temperature": 0, "stream": stream}
    ).encode()
    received = disconnect_early(running, body, stream)
    deadline = time.monotonic() + 30
    after = before
    while after[COUNTERS[0]] == before[COUNTERS[0]] and time.monotonic() < deadline:
        time.sleep(0.05)  # llama.cpp adds a slot's tokens to its count when it frees the slot
        after = counters(running)
    generated, cancels = (after[name] - before[name] for name in COUNTERS)
    assert cancels == 1, (generated, cancels)
    # Not streaming, the client leaves at a moment it can only guess (the queue's depth, polled): on a busy
    # machine over 1400 tokens were out by then, so the bound is "stopped before the 1800 asked for".
    assert received.count(b'"text"') - 1 <= generated < (200 if stream else 1800), (received, generated)


def disconnect_early(running, body: bytes, stream: bool) -> bytes:
    """Send `body` to /v1/completions, close the connection once three text chunks came (streaming) or
    the generation runs (not streaming), wait until the server's queue is empty; what was received."""
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    sock = raw_request(running.port, head, body)
    deadline = time.monotonic() + 30
    received = b""
    if stream:
        while received.count(b"data: ") < 4 and time.monotonic() < deadline:
            received += sock.recv(4096)  # the first chunk, then three of text
    else:
        while not httpx.get(f"{running.url}/health").json()["queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
    sock.close()
    while httpx.get(f"{running.url}/health").json()["queue_depth"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return received


def test_disconnecting_client_stops_the_engine_in_this_process(tiny_models, tmp_path):
    """The transformers engine's own token counter: one cancel, at most the one token in flight generated
    after it, and fewer than the 250 asked for (the tiny model's context is 256)."""
    running = Server(tiny_models["chatml"], log=tmp_path / "server.log")
    late_name = "llamatailor_tokens_after_cancel_total"
    try:
        before = {**counters(running), late_name: 0.0}
        model = httpx.get(f"{running.url}/v1/models").json()["data"][0]["id"]
        body = json.dumps(
            {"model": model, "prompt": "story", "max_tokens": 250, "temperature": 0, "stream": True}
        ).encode()
        disconnect_early(running, body, stream=True)
        lines = httpx.get(f"{running.url}/metrics").text.splitlines()
        late = next(float(line.split(" ")[1]) for line in lines if line.startswith(late_name))
        after = counters(running)
    finally:
        running.stop()
    generated, cancels = (after[name] - before[name] for name in COUNTERS)
    assert cancels == 1 and late in (0, 1), (generated, cancels, late)
    assert 3 <= generated < 250, generated


def test_logit_bias_outside_the_vocabulary_is_refused(server):
    """llama.cpp skips a token id it does not have (vLLM answers 500): the API refuses it for every engine,
    naming the id and the vocabulary's size (the tiny model's 49152 tokens); the last id is accepted."""
    running, _ = server
    for route in ("chat", "text"):
        response = post(running, route, {"logit_bias": {"5": 1, "100000": -100, "49152": 3}})
        assert (response.status_code, response.json()) == (
            400,
            {
                "error": {
                    "message": "logit_bias: token id 49152 is not in this model's vocabulary of 49152 tokens "
                    "(ids 0 to 49151)",
                    "type": "invalid_request_error",
                    "param": "logit_bias",
                    "code": None,
                }
            },
        ), route
        assert post(running, route, {"logit_bias": {"49151": -100}}).status_code == 200


SCHEMA_FIELD = "response_format.json_schema.schema"
BROKEN_SCHEMAS = [  # schema, the error message after "<field>: not a valid JSON schema: " (jsonschema's words)
    ({"type": "integr"}, "#/type: 'integr' is not valid under any of the given schemas"),
    (
        {"type": "object", "properties": {"age": {"type": "integer", "minimum": "0"}}},
        "#/properties/age/minimum: '0' is not of type 'number'",
    ),
    ({"type": "object", "required": "name"}, "#/required: 'name' is not of type 'array'"),
    ({"type": "object", "properties": [{"name": {"type": "string"}}]}, "#/properties: [{'name'"),
    ({"anyOf": []}, "#/anyOf: [] should be non-empty"),
    ({"type": "array", "items": [{"type": "string"}, 5]}, "#/items: [{'type': 'string'}, 5] is not of type"),
    ({"$ref": "#/$defs/missing"}, "#/$ref: '#/$defs/missing' points at nothing in this schema"),
    (
        {"$schema": "http://json-schema.org/draft-07/schema#", "exclusiveMinimum": True},
        "#/exclusiveMinimum: True",
    ),
]


def test_invalid_json_schema_is_refused_naming_the_field(server):
    """A schema the JSON Schema metaschema does not allow (or a $ref to nothing) gets 400 naming
    response_format's schema field and the keyword's place in the schema, not llama.cpp's 400 without a
    param; a valid schema with $defs and $ref still constrains the answer."""
    running, _ = server
    for schema, message in BROKEN_SCHEMAS:
        response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        response = post(running, "chat", {"response_format": response_format})
        error = response.json()["error"]
        assert (response.status_code, error["param"], error["type"]) == (
            400,
            SCHEMA_FIELD,
            "invalid_request_error",
        ), schema
        assert error["message"].startswith(f"{SCHEMA_FIELD}: not a valid JSON schema: {message}"), error
    valid = {
        "$defs": {"yes": {"type": "boolean"}},
        "type": "object",
        "properties": {"ok": {"$ref": "#/$defs/yes"}},
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": valid}}
    answer = post(running, "chat", {"response_format": response_format, "max_tokens": 12})
    assert answer.status_code == 200 and answer_text(answer).startswith("{"), answer.text


@pytest.mark.parametrize(
    "schema",
    [
        {},
        {"type": ["string", "null"], "maxLength": 5, "pattern": "^a"},
        {
            "type": "object",
            "properties": {"a/b": {"const": 1}},
            "required": ["a/b"],
            "additionalProperties": False,
        },
        {"items": [{"type": "integer"}], "additionalItems": False},  # draft 7's tuple form
        {"prefixItems": [True, {"enum": [1, "x", None]}], "items": False, "minItems": 0},
        {"type": "number", "exclusiveMinimum": True, "minimum": 0, "multipleOf": 0.5},  # draft 4's bound
        {"definitions": {"n": {"type": "integer"}}, "oneOf": [{"$ref": "#/definitions/n"}, {"$ref": "#"}]},
        {"dependencies": {"a": ["b"], "c": {"required": ["d"]}}, "x-vendor": {"type": 5}},
        {"$defs": {"inner": {"$id": "other.json", "$ref": "#/elsewhere"}}, "$ref": "#/$defs/inner"},
    ],
)
def test_valid_json_schemas_pass_the_check(schema):
    """Valid schemas of several drafts pass: unknown keywords, draft 4/7 forms without `$schema`, a reference
    in another resource ($id), which is not looked up."""
    from llamatailor.serve.json_schema import check_schema

    check_schema(schema)


def test_nested_schema_errors_name_their_place():
    from llamatailor.serve.json_schema import SchemaError, check_schema

    nested = {"allOf": [{"properties": {"x": {"items": {"not": {"minItems": 1.5}}}}}]}
    with pytest.raises(
        SchemaError, match=r"^#/allOf/0/properties/x/items/not/minItems: 1.5 is not of type 'integer'"
    ):
        check_schema(nested)
    deep = {"$defs": {"a~b": {"type": "string"}}, "$ref": "#/$defs/a~0b"}
    check_schema(deep)  # RFC 6901 escapes: ~0 is ~
    with pytest.raises(SchemaError, match=r"'#/\$defs/a~1b' points at nothing"):
        check_schema({**deep, "$ref": "#/$defs/a~1b"})


def serve_command(target: Path, *options: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`llamatailor serve` that must stop by itself: a refusal (a server that started is killed at `timeout`)."""
    return subprocess.run(
        [sys.executable, "-m", "llamatailor", "serve", str(target), *options],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_options_another_engine_uses_are_refused(gguf_file, tiny_models):
    """--slots is llama.cpp's, --tensor-parallel vLLM's: given where another engine serves the target, each
    is refused before any engine starts, naming the option, its engine and the engine serving the target."""
    folder = tiny_models["chatml"]
    cases = [
        (
            gguf_file,
            ["--tensor-parallel", "2"],
            "--tensor-parallel 2: only the vllm engine uses it, and this target is served by llama.cpp",
        ),
        (
            folder,
            ["--slots", "4"],
            "--slots 4: only the llama.cpp engine uses it, and this target is served by transformers",
        ),
        (
            folder,
            ["--engine", "transformers", "--tensor-parallel", "2"],
            "--tensor-parallel 2: only the vllm engine uses it, and this target is served by transformers",
        ),
        (
            folder,
            ["--engine", "vllm", "--slots", "2"],
            "--slots 2: only the llama.cpp engine uses it, and this target is served by vllm",
        ),
    ]
    for target, options, message in cases:
        result = serve_command(target, *options)
        assert result.returncode == 2 and message in " ".join(result.stderr.split()), (options, result.stderr)
    from llamatailor.serve.target import ServeOptions, refuse_unused_options

    refuse_unused_options("transformers", ServeOptions("transformers", slots=1))  # its one slot: no change
    refuse_unused_options("vllm", ServeOptions("vllm", tensor_parallel=1))


def test_port_in_use_is_refused_before_the_engine_starts(gguf_file):
    """Another server holds the port: exit 2 naming the address, and no engine was started for nothing (the
    'serving ...' line comes after the engine is up)."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = serve_command(gguf_file, "--port", str(port))
    assert result.returncode == 2, result.stderr
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in " ".join(result.stderr.split())
    assert "serving" not in result.stdout


def metadata_gguf(path: Path, **fields: str) -> Path:
    """A GGUF file of llama architecture with these string metadata fields and no tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        writer.add_string(key.replace("__", "."), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_that_is_no_lora_adapter_is_refused_as_adapter(gguf_file, tmp_path):
    """--adapter takes LoRA GGUF files (general.type "adapter", adapter.type "lora"): a full model, another
    kind of adapter or a file that is no GGUF is refused naming the file and what it is, before llama-server
    starts; a LoRA adapter given as the model to serve is refused too."""
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model")
    other = metadata_gguf(tmp_path / "other.gguf", general__type="adapter", adapter__type="control_vector")
    lora = metadata_gguf(tmp_path / "lora.gguf", general__type="adapter", adapter__type="lora")
    cases = [
        (f"x={gguf_file}", f"--adapter x={gguf_file}: a full llama model (general.type not set), not a LoRA"),
        (
            f"x={other}",
            f"--adapter x={other}: a control_vector adapter (adapter.type 'control_vector'), not a",
        ),
        (f"x={not_gguf}", f"--adapter x={not_gguf}: cannot read it as a GGUF file"),
    ]
    for adapter, message in cases:
        result = serve_command(gguf_file, "--adapter", adapter)
        assert result.returncode == 2 and message in " ".join(result.stderr.split()), (adapter, result.stderr)
    alone = serve_command(lora)
    assert alone.returncode == 2, alone.stderr
    assert f"{lora}: a LoRA adapter (general.type 'adapter'), not a model" in " ".join(alone.stderr.split())
