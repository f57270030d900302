"""The sampling fields on the llama.cpp engine (llama-server behind llamatailor's API), each through the
official openai client and checked against llama.cpp's own answer: the same request sent straight to a bare
llama-server on the same file, through llama.cpp's own OpenAI layer (its /v1/completions with the prompt as
token ids). Each field is also shown to change the answer, so a field passed on but not applied would fail."""

import json
import math
import subprocess
import time

import httpx2 as httpx
import numpy as np
import openai
import pytest

from helpers import Server, free_port
from llamatailor.generation.prompts import GGUFPrompter
from llamatailor.serve.llama_server import find_binary
from test_serve import gguf_file  # noqa: F401 (the module's tiny GGUF, a fixture)

QUESTION = [{"role": "user", "content": "Tell me a story about a cat"}]
# llama.cpp's own sampling extras off, and OpenAI's top_p default (llama.cpp's is 0.95), as in our requests
LLAMA_DEFAULTS = {"top_k": 0, "min_p": 0.0, "top_p": 1.0}


@pytest.fixture(scope="module")
def servers(gguf_file, tmp_path_factory):  # noqa: F811
    """Ours (4 slots) and a bare llama-server on the same file with the same slots and context."""
    folder = tmp_path_factory.mktemp("servers")
    ours = Server(gguf_file, "--slots", "4", "--context", "1024", log=folder / "ours.log")
    port = free_port()
    command = [str(find_binary()), "-m", str(gguf_file), "--port", str(port), "-c", "4096", "-np", "4"]
    command += ["--no-kv-unified", "-t", "2", "--no-webui"]
    bare = subprocess.Popen(command, stdout=(folder / "bare.log").open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield ours, url
    ours.stop()
    bare.terminate()
    bare.wait(timeout=30)


@pytest.fixture(scope="module")
def prompter(gguf_file) -> GGUFPrompter:  # noqa: F811
    """Renders a chat prompt's ids as our server does for a bare GGUF (the file's template)."""
    import llama_cpp

    return GGUFPrompter(llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False))


@pytest.fixture(scope="module")
def prompt_ids(prompter) -> list[int]:
    return prompter.chat_ids(QUESTION)


def ours(servers, messages=QUESTION, **options):
    client = servers[0].client(key=None)
    return client.chat.completions.create(model="tiny", messages=messages, **{"max_tokens": 16, **options})


def llamas(servers, prompt_ids, **options) -> dict:
    """llama.cpp's own OpenAI completions on the same prompt ids."""
    body = {"prompt": prompt_ids, "max_tokens": 16, **LLAMA_DEFAULTS, **options}
    response = httpx.post(f"{servers[1]}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def llama_native(servers, prompt_ids, **options) -> str:
    """llama.cpp's native /completion, greedy."""
    body = {"prompt": prompt_ids, "temperature": 0, **LLAMA_DEFAULTS, **options}
    response = httpx.post(f"{servers[1]}/completion", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return str(response.json()["content"])


def texts(reply) -> list[str]:
    return [choice.message.content for choice in sorted(reply.choices, key=lambda c: c.index)]


def llama_texts(reply: dict) -> list[str]:
    return [choice["text"] for choice in sorted(reply["choices"], key=lambda c: c["index"])]


def test_greedy_answer_and_prompt_equal_llama_cpps(servers, prompt_ids):
    mine, theirs = ours(servers, temperature=0), llamas(servers, prompt_ids, temperature=0)
    assert texts(mine) == llama_texts(theirs) and texts(mine)[0]
    assert mine.usage.prompt_tokens == theirs["usage"]["prompt_tokens"] == len(prompt_ids)


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
def test_penalties_equal_llama_cpps_and_change_the_answer(servers, prompter, field):
    """The question is the greedy answer itself: its tokens are in the prompt, which llama.cpp's penalties
    count, so a penalty of 2 turns the answer away from them (the tiny model's logits are nearly flat)."""
    echo = [{"role": "user", "content": texts(ours(servers, temperature=0))[0]}]
    plain = texts(ours(servers, echo, temperature=0))
    mine = texts(ours(servers, echo, temperature=0, **{field: 2.0}))
    assert mine == llama_texts(llamas(servers, prompter.chat_ids(echo), temperature=0, **{field: 2.0}))
    assert mine != plain


def test_logit_bias_bans_a_token_as_llama_cpp_does(servers, prompt_ids):
    """-100 on the greedy answer's first token: another first token, llama.cpp's answer."""
    first = ours(servers, temperature=0, logprobs=True).choices[0].logprobs.content[0]
    token = httpx.post(f"{servers[1]}/tokenize", json={"content": first.token}).json()["tokens"]
    assert len(token) == 1
    bias = {str(token[0]): -100}
    mine = ours(servers, temperature=0, logit_bias=bias, logprobs=True)
    assert mine.choices[0].logprobs.content[0].token != first.token
    assert texts(mine) == llama_texts(llamas(servers, prompt_ids, temperature=0, logit_bias=bias))


def test_logprobs_equal_llama_cpps_and_the_logits(servers, prompt_ids, gguf_file):  # noqa: F811
    """Each token's log-probability and its 3 most likely alternatives equal llama.cpp's OpenAI layer; the
    first token's equals log-softmax of llama-cpp-python's own logits for the prompt (a third computation)."""
    import llama_cpp

    mine = ours(servers, temperature=0, logprobs=True, top_logprobs=3).choices[0].logprobs.content
    theirs = llamas(servers, prompt_ids, temperature=0, logprobs=3)["choices"][0]["logprobs"]["content"]
    assert [t.token for t in mine] == [t["token"] for t in theirs]
    assert np.allclose([t.logprob for t in mine], [t["logprob"] for t in theirs], atol=1e-4)
    for item, reference in zip(mine, theirs, strict=True):
        assert [a.token for a in item.top_logprobs] == [a["token"] for a in reference["top_logprobs"]]
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].token == item.token
        assert bytes(item.bytes).decode("utf-8", errors="replace") == item.token
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=512, logits_all=True, verbose=False)
    llm.eval(prompt_ids)
    logits = np.asarray(llm.scores[len(prompt_ids) - 1], dtype=np.float64)
    logsoftmax = logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())
    first_id = int(np.argmax(logits))
    assert abs(mine[0].logprob - logsoftmax[first_id]) < 1e-3


def test_completions_logprobs_in_openais_legacy_shape(servers):
    client = servers[0].client(key=None)
    reply = client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=5, temperature=0, logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text and len(logprobs.tokens) == 5
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]
    for token, value, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert len(top) == 2 and top[token] == value and value == max(top.values())


def test_n_choices_with_a_seed_equal_llama_cpps(servers, prompt_ids):
    options = {"temperature": 1.0, "seed": 5, "n": 2}
    mine = texts(ours(servers, **options))
    assert mine == llama_texts(llamas(servers, prompt_ids, **options))
    assert len(set(mine)) == 2  # two draws, not one answer twice
    with pytest.raises(openai.BadRequestError, match="n: at most 4 choices"):
        ours(servers, n=5)


def test_n_choices_stream_as_they_answer_whole(servers):
    """Streamed chunks of two choices (and their logprobs) reassemble into the non-streamed answer."""
    options = {"temperature": 1.0, "seed": 9, "n": 2, "logprobs": True}
    whole = ours(servers, **options)
    pieces, tokens = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in ours(servers, stream=True, **options):
        for choice in chunk.choices:
            pieces[choice.index] += choice.delta.content or ""
            tokens[choice.index] += [t.token for t in (choice.logprobs.content if choice.logprobs else [])]
    assert [pieces[0], pieces[1]] == texts(whole)
    assert [tokens[i] for i in (0, 1)] == [[t.token for t in c.logprobs.content] for c in whole.choices]


def test_seed_repeats_and_equals_llama_cpps(servers, prompt_ids):
    options = {"temperature": 1.0, "top_p": 0.9}
    first, again = texts(ours(servers, seed=7, **options)), texts(ours(servers, seed=7, **options))
    other = texts(ours(servers, seed=8, **options))
    assert first == again != other
    assert first == llama_texts(llamas(servers, prompt_ids, seed=7, **options))


def test_stop_strings_cut_as_llama_cpp_does(servers, prompt_ids):
    plain = texts(ours(servers, temperature=0))[0]
    stop = plain.split()[1]
    mine = ours(servers, temperature=0, stop=[stop])
    assert mine.choices[0].message.content == plain[: plain.index(stop)]
    assert mine.choices[0].finish_reason == "stop"
    assert texts(mine) == llama_texts(llamas(servers, prompt_ids, temperature=0, stop=[stop]))


SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


def test_response_format_json_schema_and_json_object(servers, prompt_ids):
    """json_schema: the answer parses and matches the schema; json_object: a JSON object's start where a
    random model would write words; both llama.cpp's answers to the same schema (its native /completion
    route: its /v1/completions applies neither response_format nor json_schema)."""
    schema = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    mine = ours(servers, temperature=0, max_tokens=48, response_format=schema)
    assert json.loads(mine.choices[0].message.content)["answer"] in ("yes", "no")
    assert texts(mine) == [llama_native(servers, prompt_ids, n_predict=48, json_schema=SCHEMA)]
    loose = ours(servers, temperature=0, response_format={"type": "json_object"})
    assert loose.choices[0].message.content.lstrip().startswith("{")
    assert not texts(ours(servers, temperature=0))[0].lstrip().startswith("{")
    assert texts(loose) == [llama_native(servers, prompt_ids, n_predict=16, json_schema={"type": "object"})]


def test_bad_sampling_values_are_refused_by_name(servers):
    cases = [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"response_format": {"type": "json_schema"}}, "needs json_schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"presence_penalty": 3}, "presence_penalty"),
    ]
    for options, named in cases:
        with pytest.raises(openai.BadRequestError, match=named.replace(".", r"\.")):
            ours(servers, **options)
