"""Serving throughput and latency on one GGUF file: llama.cpp's own `llama-server` (the reference),
`llamatailor serve` over it with as many slots, and llama-cpp-python's server (a second reference), one
server at a time, at 1, 4, 16 and 64 concurrent streaming clients.

    .venv/bin/python bench/serve_load.py [--gguf FILE] [--clients 1,4,16,64] [--requests N]
        [--max-tokens 64] [--slots N] [--context 4096] [--servers llama-server,llamatailor,llama-cpp-python]

Each client streams chat completions (greedy, a distinct prompt per request) through the official openai
client, one after another, until the client count's requests are done. tokens/s: completion tokens of all
requests over the wall time from the first request to the last answer; latency: request sent to last chunk;
time to first token: request sent to the first chunk with text. Every server runs with one thread per core
(`llamatailor serve` always does) and is warmed up with one request per slot before it is measured. Run it
on an otherwise idle machine: the header prints the load average at the start.
"""

import argparse
import asyncio
import functools
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
from openai import AsyncOpenAI, DefaultAsyncHttpxClient

from llamatailor.serve.llama_server import default_slots, find_binary

REFERENCE = "llama-server"
SERVERS = (REFERENCE, "llamatailor", "llama-cpp-python")
DEFAULT_GGUF = Path("runs/demo/gguf/demo-q8_0.gguf")
LOGS = Path("bench/.serve_logs")
# llama.cpp's samplers beyond OpenAI's (top-k 40, min-p 0.05, and llama-cpp-python's repeat penalty 1.1) off,
# as llamatailor sends them: greedy answers then match (llamatailor itself refuses fields OpenAI lacks).
LLAMA_CPP_SAMPLING = {"top_k": 0, "min_p": 0, "top_p": 1, "repeat_penalty": 1.0}
SYSTEM = (
    "Answer with one JSON object with the keys module, function, required (parameters without defaults) and "
    "optional (parameters with defaults, *args and **kwargs)."
)
GOAL_SPEED, GOAL_P95, GOAL_P95_CLIENTS = 0.9, 1.2, 16
# A new connection per request, for every server: llama-server closes its connection after each streamed
# answer without saying so (cpp-httplib takes the stream's end for a cancel), so a reused one now and then
# fails with "Server disconnected without sending a response".
FRESH_CONNECTIONS = httpx.Limits(max_connections=None, max_keepalive_connections=0)


def chat(name: str) -> list[dict[str, str]]:
    """A request in the demo model's task (the signature of a made-up function named after `name`), so that
    its answers end as trained; distinct names make distinct prompts."""
    question = (
        f"Describe this Python function signature as JSON.\n\n{name}.run_{name}(path, limit=None, *rest)"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: list[str]  # with {port} where the port goes
    extra_body: dict[str, Any]


def server_specs(gguf: Path, slots: int, context: int, threads: int, max_queue: int) -> dict[str, ServerSpec]:
    """The three servers on `gguf`, each with `context` tokens per request; llama-server as llamatailor runs
    it but bare (its own chat template, no llamatailor in front)."""
    port = ["--port", "{port}"]
    bare = [str(find_binary()), "-m", str(gguf), "--host", "127.0.0.1", *port, "-np", str(slots)]
    bare += ["-c", str(context * slots), "--no-kv-unified", "-t", str(threads)]
    tailor = [sys.executable, "-m", "llamatailor", "serve", str(gguf), *port, "--slots", str(slots)]
    tailor += ["--context", str(context), "--max-queue", str(max_queue)]
    python = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), *port, "--n_ctx", str(context)]
    python += [
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--interrupt_requests",
        "False",
    ]
    return {
        REFERENCE: ServerSpec(REFERENCE, bare, LLAMA_CPP_SAMPLING),
        "llamatailor": ServerSpec("llamatailor", tailor, {}),
        "llama-cpp-python": ServerSpec("llama-cpp-python", python, LLAMA_CPP_SAMPLING),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(command: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """Starts `command` on a free port; returns the process and its /v1 URL once /v1/models answers 200.
    Raises RuntimeError (with the log's tail) when it exits or does not answer within 180 s."""
    port = free_port()
    argv = [part.replace("{port}", str(port)) for part in command]
    LOGS.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(argv[:5])} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop(process)
    raise RuntimeError(f"{' '.join(argv[:5])} did not answer within 180 s: {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Reply:
    seconds: float
    first_token_s: float
    text: str
    tokens: int | None  # the stream's usage; None when the server sends none


async def stream_chat(
    client: AsyncOpenAI, model: str, messages: list[dict[str, str]], max_tokens: int, extra: dict[str, Any]
) -> Reply:
    """One greedy streamed chat completion, timed from the request to its first text and to its end."""
    started = time.perf_counter()
    first, parts, tokens = None, [], None
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra or None,
    )
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                parts.append(choice.delta.content)
    ended = time.perf_counter()
    return Reply(ended - started, (first or ended) - started, "".join(parts), tokens)


async def run_load(
    url: str, model: str, requests: list[list[dict[str, str]]], clients: int, max_tokens: int, extra: dict
) -> tuple[list[Reply], float]:
    """`clients` concurrent clients, each sending the next waiting request once its last one is answered;
    the replies in the requests' order and the wall time in seconds."""
    client = AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key="none",
        max_retries=0,
        timeout=1800,
        http_client=DefaultAsyncHttpxClient(limits=FRESH_CONNECTIONS),
    )
    replies: list[Reply | None] = [None] * len(requests)
    waiting = iter(enumerate(requests))

    async def one_client() -> None:
        for index, messages in waiting:  # one iterator shared by all: each request is sent once
            replies[index] = await stream_chat(client, model, messages, max_tokens, extra)

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.perf_counter() - started
    await client.close()
    return [reply for reply in replies if reply is not None], wall


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile: the smallest value with at least `share` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


@dataclass
class Row:
    server: str
    clients: int
    wall_s: float
    replies: list[Reply]
    tokens: list[int]  # per reply: its usage, else its text re-tokenized

    def stats(self) -> dict[str, float]:
        latency = [reply.seconds for reply in self.replies]
        first = [reply.first_token_s for reply in self.replies]
        return {
            "tokens_per_s": sum(self.tokens) / self.wall_s,
            "requests_per_s": len(self.replies) / self.wall_s,
            "p50": percentile(latency, 0.5),
            "p95": percentile(latency, 0.95),
            "ttft_p50": percentile(first, 0.5),
            "ttft_p95": percentile(first, 0.95),
        }


@functools.cache
def token_counter(gguf: Path) -> Callable[[str], int]:
    """Tokens of an answer's text in the file's own vocabulary, for a server whose stream carries no usage
    (llama-cpp-python's): close to, not always exactly, the tokens generated."""
    from llama_cpp import Llama

    vocabulary = Llama(str(gguf), vocab_only=True, verbose=False)
    return lambda text: len(vocabulary.tokenize(text.encode(), add_bos=False, special=True))


def measure(spec: ServerSpec, args: argparse.Namespace) -> list[Row]:
    """One server's rows: started, warmed up with one request per slot, loaded at each client count,
    stopped."""
    process, url = start(spec.command, LOGS / f"{spec.name}.log")
    rows = []
    try:
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        warm_up = [chat(f"warm{n}") for n in range(args.slots)]
        asyncio.run(run_load(url, model, warm_up, args.slots, args.max_tokens, spec.extra_body))
        for clients in args.clients:
            count = max(args.requests or 16, clients)
            requests = [chat(f"c{clients}n{n}") for n in range(count)]
            replies, wall = asyncio.run(
                run_load(url, model, requests, clients, args.max_tokens, spec.extra_body)
            )
            tokens = [r.tokens if r.tokens is not None else token_counter(args.gguf)(r.text) for r in replies]
            rows.append(Row(spec.name, clients, wall, replies, tokens))
    finally:
        stop(process)
    return rows


def machine(threads: int) -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
    ]
    cpu = names[0] if names else platform.processor() or platform.machine()
    version = subprocess.run(
        [str(find_binary()), "--version"], capture_output=True, text=True, check=False
    ).stderr.splitlines()
    return (
        f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, {threads} threads per server, load "
        f"average {os.getloadavg()[0]:.2f} at the start; llama-server {version[0] if version else '?'}"
    )


def table(rows: list[Row]) -> list[str]:
    """Markdown rows; `× llama-server` is tokens/s over llama-server's at the same client count, and
    `same answers` the share of requests answered exactly as llama-server answered them."""
    reference = {row.clients: row for row in rows if row.server == REFERENCE}
    lines = [
        "| server | clients | requests | tokens/s | requests/s | p50 s | p95 s | TTFT p50 s | TTFT p95 s "
        "| × llama-server | same answers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        s, ref = row.stats(), reference.get(row.clients)
        ratio = f"{s['tokens_per_s'] / ref.stats()['tokens_per_s']:.2f}x" if ref else "-"
        same = "-"
        if ref:
            equal = sum(a.text == b.text for a, b in zip(row.replies, ref.replies, strict=True))
            same = f"{equal / len(row.replies):.0%}"
        lines.append(
            f"| {row.server} | {row.clients} | {len(row.replies)} | {s['tokens_per_s']:.1f} | "
            f"{s['requests_per_s']:.2f} | {s['p50']:.2f} | {s['p95']:.2f} | {s['ttft_p50']:.2f} | "
            f"{s['ttft_p95']:.2f} | {ratio} | {same} |"
        )
    return lines


def verdicts(rows: list[Row]) -> list[str]:
    """The issue's goals: llamatailor at least 0.9× llama-server's tokens/s at every client count, and its
    p95 latency at 16 clients at most 1.2× llama-server's."""
    pairs = {
        row.clients: (row.stats(), ref.stats())
        for row in rows
        if row.server == "llamatailor"
        for ref in rows
        if ref.server == REFERENCE and ref.clients == row.clients
    }
    if not pairs:
        return ["goals: not judged (needs the llama-server and llamatailor rows)"]
    speed = {clients: mine["tokens_per_s"] / ref["tokens_per_s"] for clients, (mine, ref) in pairs.items()}
    worst = min(speed, key=speed.__getitem__)
    lines = [
        f"goal tokens/s ≥ {GOAL_SPEED}× llama-server at every client count: "
        f"{'met' if speed[worst] >= GOAL_SPEED else 'NOT met'} (lowest {speed[worst]:.2f}× at {worst} clients)"
    ]
    if GOAL_P95_CLIENTS in pairs:
        mine, ref = pairs[GOAL_P95_CLIENTS]
        p95 = mine["p95"] / ref["p95"]
        lines.append(
            f"goal p95 latency at {GOAL_P95_CLIENTS} clients ≤ {GOAL_P95}× llama-server's: "
            f"{'met' if p95 <= GOAL_P95 else 'NOT met'} ({p95:.2f}×)"
        )
    else:
        lines.append(f"goal p95 latency: not judged (no {GOAL_P95_CLIENTS}-client rows)")
    return lines


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--clients", default="1,4,16,64", help="comma-separated client counts")
    parser.add_argument(
        "--requests", type=int, default=None, help="per client count (default max(16, clients))"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=None, help="default: llamatailor serve's (cores, ≥ 4)")
    parser.add_argument("--context", type=int, default=4096, help="tokens per slot")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"some of {', '.join(SERVERS)}")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.servers = args.servers.split(",")
    if unknown := set(args.servers) - set(SERVERS):
        parser.error(f"--servers: unknown {', '.join(sorted(unknown))}")
    args.slots = args.slots or default_slots()
    return args


def main() -> None:
    args = arguments()
    threads = os.cpu_count() or 1  # what `llamatailor serve` gives llama-server; the others get as many
    header = machine(threads)
    specs = server_specs(args.gguf, args.slots, args.context, threads, max(args.clients))
    rows = [row for name in args.servers for row in measure(specs[name], args)]
    retokenized = sorted({row.server for row in rows for reply in row.replies if reply.tokens is None})
    print(
        f"\n{header}\n{args.gguf.name}, {args.slots} slots of {args.context} tokens, up to {args.max_tokens} "
        f"tokens per answer, greedy, streamed; completion tokens from each stream's usage"
        + (f", except {', '.join(retokenized)}: its answers re-tokenized (no usage)" if retokenized else "")
        + "\n"
    )
    print("\n".join(table(rows)))
    print("\n" + "\n".join(verdicts(rows)))
    token_counter.cache_clear()  # frees llama.cpp's vocabulary now: at the interpreter's exit it fails


if __name__ == "__main__":
    main()
