"""Serving throughput and latency: llamatailor's llama.cpp engine against llama-cpp-python's own server,
on the same GGUF file, at 1, 4 and 16 concurrent clients, one server at a time.

    .venv/bin/python bench/serve_load.py [--gguf FILE] [--requests 32] [--max-tokens 64]

Each client sends chat completions (greedy, distinct prompts) through the official openai client until the
requests are done; tokens/s counts the completion tokens of all requests over the wall time.
"""

import argparse
import concurrent.futures
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
from openai import OpenAI


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited: {log.read_text()[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return process
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError(f"{command[:4]} did not start")


def load(port: int, model: str, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    def one(index: int) -> tuple[float, int]:
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Write a short story about the number {index}."}],
            max_tokens=max_tokens,
            temperature=0,
        )
        return time.perf_counter() - started, reply.usage.completion_tokens

    one(-1)  # warm-up
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    latencies = sorted(seconds for seconds, _ in results)
    tokens = sum(count for _, count in results)
    return {
        "tokens_per_s": tokens / wall,
        "requests_per_s": requests / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "tokens": tokens,
    }


def embedded_gguf() -> Path:
    from llamatailor.models.source import embedded_gguf_path

    return embedded_gguf_path("smollm2-135m-instruct")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gguf", type=Path, default=None, help="default: the embedded SmolLM2 (Q4_1)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    gguf = args.gguf or embedded_gguf()
    logs = Path("bench/.serve_logs")
    logs.mkdir(exist_ok=True)
    servers = {
        "llamatailor": lambda port: [
            sys.executable,
            "-m",
            "llamatailor",
            "serve",
            str(gguf),
            "--port",
            str(port),
        ],
        "llama-cpp-python server": lambda port: [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--port",
            str(port),
            "--n_ctx",
            "4096",
            "--n_threads",
            str(args.threads),
        ],
    }
    rows = []
    for name, command in servers.items():
        port = free_port()
        process = start(command(port), port, logs / f"{name.split()[0]}.log")
        try:
            model = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none").models.list().data[0].id
            for clients in (1, 4, 16):
                rows.append((name, clients, load(port, model, clients, args.requests, args.max_tokens)))
        finally:
            process.terminate()
            process.wait(timeout=60)
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, llama.cpp threads "
        f"{args.threads}, {gguf.name}, {args.requests} requests of up to {args.max_tokens} tokens, greedy\n"
    )
    print("| server | clients | tokens/s | requests/s | p50 s | p95 s | ratio to reference |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    reference = {clients: r for name, clients, r in rows if name != "llamatailor"}
    for name, clients, r in rows:
        ratio = r["tokens_per_s"] / reference[clients]["tokens_per_s"]
        print(
            f"| {name} | {clients} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | {r['p50']:.2f} | "
            f"{r['p95']:.2f} | {ratio:.2f}x |"
        )


if __name__ == "__main__":
    main()
