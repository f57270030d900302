"""`llamatailor serve` as a real server on 127.0.0.1, driven by the official openai client and raw HTTP."""

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
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
        b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logit_bias": {}}': "logit_bias",
        b'{"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}': "role",
        b'{"model": "tiny", "messages": [], "max_tokens": 99999999999999999999999}': "",
    }
    for body, mentioned in cases.items():
        response = httpx.post(f"{running.url}/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and mentioned in error["message"]
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
    running = Server(gguf_file, "--max-queue", "1", log=tmp_path / "server.log")
    try:
        client = running.client(key=None)

        def long_request(n: int) -> int:
            try:
                client.completions.create(model="tiny", prompt=f"story {n}", max_tokens=300, temperature=0)
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


def test_disconnecting_client_cancels_its_generation(gguf_file, tmp_path):
    running = Server(gguf_file, "--context", "4096", log=tmp_path / "server.log")
    try:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 4000,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            next(lines), next(lines)  # a few tokens arrive, then the client goes away
        deadline = time.monotonic() + 5
        while httpx.get(f"{running.url}/health").json()["queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{running.url}/health").json()["queue_depth"] == 0
        metrics = httpx.get(f"{running.url}/metrics").text
        assert "llamatailor_generated_tokens_total 0.0" in metrics  # it never ran to its 4000 tokens
    finally:
        running.stop()


def test_shutdown_finishes_in_flight_requests(gguf_file, tmp_path):
    running = Server(gguf_file, log=tmp_path / "server.log")
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
    finally:
        running.stop()
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
