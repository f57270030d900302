"""`llamatailor serve` on llama-server under load (issue 19), in miniature on the tiny model: 64 concurrent
streaming clients, 6 of them leaving mid-answer. bench/serve_stress.py runs the same on a real model."""

import concurrent.futures
import json
import random
import time

import httpx2 as httpx
import psutil
import pytest

from helpers import Server
from test_serve import gguf_file  # noqa: F401 (the module's tiny GGUF, a fixture)

WORDS = "apple river stone cloud tiger music paper glass honey storm lemon piano orbit candle mirror forest".split()
CLIENTS = 64
LEAVERS = frozenset(range(5, CLIENTS, 10))  # 6 of 64, about 10%
LEAVE_AFTER = 3  # chunks of text a leaving client reads
MAX_TOKENS = 12
LEAVER_MAX_TOKENS = (
    1500  # the tiny model never ends an answer: a leaver is still being answered when it goes,
)
# even on a busy machine (200 was done before 3 of 6 slow clients left, under a parallel test run)
RSS_MARGIN_MIB = 16


@pytest.fixture(scope="module")
def running(gguf_file, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("load")
    server = Server(gguf_file, "--slots", "4", "--max-queue", str(CLIENTS), log=folder / "server.log")
    yield server
    server.stop()


def prompt(n: int) -> str:
    """Words of a length that varies with `n`: the tiny random model's greedy answer depends mostly on the
    prompt's length and last words, and these make most answers distinct."""
    chooser = random.Random(n)
    return " ".join(chooser.choice(WORDS) for _ in range(chooser.randint(5, 40)))


def stream(client: httpx.Client, content: str, max_tokens: int, leave_after: int = 0) -> dict:
    """A streamed greedy chat completion: its status, text, finish reason and errors; with `leave_after`,
    the connection is closed once that many chunks of text came."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    result = {"status": 0, "text": "", "finish": None, "left": False, "errors": []}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        result["status"] = response.status_code
        chunks = 0
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            result["errors"] += [event["error"]] if "error" in event else []
            for choice in event.get("choices", []):
                result["text"] += choice["delta"].get("content") or ""
                result["finish"] = choice["finish_reason"] or result["finish"]
                chunks += bool(choice["delta"].get("content"))
            if leave_after and chunks >= leave_after and result["finish"] is None:
                result["left"] = True
                break  # leaving the `with` closes the half-read response's connection
    return result


def cancelled(url: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return next(
        float(line.split()[-1])
        for line in lines
        if line.startswith("llamatailor_cancelled_generations_total")
    )


def llama_server_rss_mib(server: Server) -> float:
    children = psutil.Process(server.process.pid).children(recursive=True)
    return next(p.memory_info().rss for p in children if p.name() == "llama-server") / 2**20


def test_64_streaming_clients_with_some_leaving_get_their_own_answers(running):
    """Sent alone one after another, then all at once with 6 leaving after 3 chunks: no error, the queue
    drains, one cancel counted per leaver, at least 90% of the answers as they were alone (a leaver's a prefix
    of it; 100% in the runs so far), none another request's, and llama-server's resident memory back within
    a margin."""
    prompts = [prompt(n) for n in range(CLIENTS)]
    limits = httpx.Limits(max_connections=CLIENTS + 4)
    with httpx.Client(base_url=running.url, timeout=60, limits=limits) as client:
        first = [stream(client, p, MAX_TOKENS) for p in prompts]
        rss_before, cancels_before = llama_server_rss_mib(running), cancelled(running.url)
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            together = list(
                pool.map(
                    lambda n: stream(
                        client,
                        prompts[n],
                        *((LEAVER_MAX_TOKENS, LEAVE_AFTER) if n in LEAVERS else (MAX_TOKENS,)),
                    ),
                    range(CLIENTS),
                )
            )
    deadline = time.monotonic() + 10
    while httpx.get(f"{running.url}/health").json()["queue_depth"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{running.url}/health").json()["queue_depth"] == 0
    failed = {
        n: (r["status"], r["errors"])
        for n, r in enumerate(first + together)
        if r["status"] != 200 or r["errors"]
    }
    assert failed == {}
    alone = [r["text"] for r in first]
    assert {n for n, r in enumerate(together) if r["left"]} == LEAVERS
    assert cancelled(running.url) - cancels_before == len(LEAVERS)
    assert len(set(alone)) >= CLIENTS * 3 // 4  # mostly distinct: an answer equal to its own is no one else's
    # Greedy answers equal the answer alone unless batching moved a near-tie (the tiny model's logits are
    # nearly flat): most must be equal, and none may be another request's answer (cross-talk).
    equal = [
        alone[n].startswith(r["text"]) if n in LEAVERS else (r["text"], r["finish"]) == (alone[n], "length")
        for n, r in enumerate(together)
    ]
    assert all(together[n]["text"] for n in LEAVERS)
    assert sum(equal) >= CLIENTS * 9 // 10, [n for n, same in enumerate(equal) if not same]
    crossed = [n for n, r in enumerate(together) if not equal[n] and r["text"] in alone[:n] + alone[n + 1 :]]
    assert crossed == []
    assert llama_server_rss_mib(running) <= rss_before + RSS_MARGIN_MIB
