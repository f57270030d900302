"""`llamatailor serve` under load: concurrent streaming clients, some of whom leave mid-answer.

    .venv/bin/python bench/serve_stress.py [--gguf FILE] [--clients 64] [--leaving 0.1] [--leave-after 3]
        [--max-tokens 64] [--rounds 2] [--slots N] [--context 4096] [--drain-s 30] [--margin-mib 32]

Each request asks for the signature of a function named after a unique marker (`qx` and four digits), which
the demo model repeats in its answer. First every request is sent alone, one after another (the reference
answers; this also warms the server up); then all of them at once, `--rounds` times, a `--leaving` share of
the clients closing their connection after `--leave-after` chunks of text. Hard checks (exit 1 when one
fails): no 5xx and no error inside a stream; after each round llamatailor's queue (/health) is empty within
`--drain-s` seconds and every llama-server slot is idle; llamatailor counts one cancelled generation per
client who left; no answer holds another request's marker; the resident memory of llamatailor's process and
of its llama-server after the last round is within `--margin-mib` of its level before the load. Reported:
the share of completed answers identical to the same request sent alone (greedy), and of answers holding
their own marker.
"""

import argparse
import asyncio
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import psutil
from serve_load import DEFAULT_GGUF, LOGS, chat, machine, server_specs, start, stop

from llamatailor.serve.llama_server import default_slots

MARKER = re.compile(r"qx\d{4}")
CANCELLED = "llamatailor_cancelled_generations_total"


def markers(count: int) -> list[str]:
    """`count` distinct markers of one width (none is part of another): 7919 is prime to 9000."""
    return [f"qx{1000 + (n * 7919) % 9000}" for n in range(count)]


def leavers(clients: int, share: float) -> set[int]:
    """Indices of the clients who leave mid-answer: round(clients × share) of them, spread evenly."""
    count = round(clients * share)
    return {n * clients // count for n in range(count)} if count else set()


@dataclass
class Outcome:
    marker: str
    status: int = 0  # HTTP status; 0: no response
    text: str = ""
    finish: str | None = None
    left: bool = False  # the client closed the connection before the answer's end
    error: str | None = None  # an error event inside the stream, or the connection's error


async def ask(
    client: httpx.AsyncClient, model: str, marker: str, max_tokens: int, leave_after: int
) -> Outcome:
    """One streamed greedy chat completion, read until its end or, with `leave_after` > 0, until that many
    chunks of text came (leaving closes the connection)."""
    body = {
        "model": model,
        "messages": chat(marker),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    outcome, chunks = Outcome(marker), 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                outcome.error = (await response.aread()).decode("utf-8", errors="replace")[:300]
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    outcome.error = str(event["error"].get("message"))
                for choice in event.get("choices", []):
                    outcome.text += choice["delta"].get("content") or ""
                    outcome.finish = choice.get("finish_reason") or outcome.finish
                    chunks += bool(choice["delta"].get("content"))
                if leave_after and chunks >= leave_after and outcome.finish is None:
                    outcome.left = True
                    break  # leaving the `async with` closes the half-read response's connection
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


async def send(
    url: str, model: str, plan: list[tuple[str, int]], max_tokens: int, together: bool
) -> list[Outcome]:
    """Each (marker, leave_after) of `plan`, all at once when `together`, else one after another."""
    limits = httpx.Limits(max_connections=len(plan) + 8)
    async with httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(600, connect=30), limits=limits
    ) as client:
        if together:
            return list(
                await asyncio.gather(*(ask(client, model, m, max_tokens, leave) for m, leave in plan))
            )
        return [await ask(client, model, m, max_tokens, leave) for m, leave in plan]


class Memory:
    """Resident memory (MiB) of llamatailor's process and its llama-server child; `peak` while sampling."""

    def __init__(self, pid: int) -> None:
        parent = psutil.Process(pid)
        children = [p for p in parent.children(recursive=True) if p.name() == "llama-server"]
        if not children:
            raise RuntimeError(f"llamatailor (pid {pid}) runs no llama-server child")
        self.processes = {"llamatailor": parent, "llama-server": children[0]}
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def now(self) -> dict[str, float]:
        return {name: p.memory_info().rss / 2**20 for name, p in self.processes.items()}

    def start_sampling(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop_sampling(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = {name: max(self.peak[name], rss) for name, rss in self.now().items()}

    def llama_server_url(self) -> str:
        command = self.processes["llama-server"].cmdline()
        return f"http://127.0.0.1:{command[command.index('--port') + 1]}"


def cancelled(url: str) -> float:
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return next(float(line.split()[-1]) for line in lines if line.startswith(CANCELLED))


def drain(url: str, memory: Memory, limit_s: float) -> tuple[float | None, str]:
    """Seconds until llamatailor's queue is empty (None: not within `limit_s`), and llama-server's idle
    slots once it is (from its /slots)."""
    started = time.monotonic()
    while httpx.get(f"{url}/health", timeout=10).json()["queue_depth"]:
        if time.monotonic() - started > limit_s:
            return None, "-"
        time.sleep(0.05)
    waited = time.monotonic() - started
    while True:
        slots = httpx.get(f"{memory.llama_server_url()}/slots", timeout=10).json()
        idle = sum(not slot["is_processing"] for slot in slots)
        if idle == len(slots) or time.monotonic() - started > limit_s:
            return waited, f"{idle}/{len(slots)}"
        time.sleep(0.05)


@dataclass
class Round:
    outcomes: list[Outcome]
    drain_s: float | None
    idle_slots: str
    cancelled: float


def load_round(
    url: str, model: str, plan: list[tuple[str, int]], args: argparse.Namespace, memory: Memory
) -> Round:
    before = cancelled(url)
    memory.start_sampling()
    outcomes = asyncio.run(send(url, model, plan, args.max_tokens, together=True))
    drained, idle = drain(url, memory, args.drain_s)
    memory.stop_sampling()  # the queue empty: every generation closed, each cancel counted
    return Round(outcomes, drained, idle, cancelled(url) - before)


def checks(first: list[Outcome], rounds: list[Round]) -> list[tuple[str, str, bool | None]]:
    """(check, value, passed) rows over the requests sent alone (`first`) and the rounds; passed None:
    reported, not judged."""
    alone = {o.marker: o.text for o in first}
    loaded = [o for r in rounds for o in r.outcomes]
    outcomes = first + loaded
    statuses = Counter(o.status for o in outcomes)
    errors = [o for o in outcomes if o.error is not None]
    completed = [o for o in loaded if o.status == 200 and o.finish and not o.left]
    left = [o for o in loaded if o.left]
    cancels = sum(r.cancelled for r in rounds)
    crossed = [o for o in outcomes if set(MARKER.findall(o.text)) & set(alone) - {o.marker}]
    drains = ", ".join("-" if r.drain_s is None else f"{r.drain_s:.2f}" for r in rounds)
    idle = [r.idle_slots.split("/") for r in rounds]
    return [
        ("status codes", ", ".join(f"{c}×{n}" for c, n in sorted(statuses.items())), 0 < min(statuses) < 500),
        ("errors inside streams or connections", str(len(errors)), not errors),
        ("left mid-answer / cancels counted", f"{len(left)} / {cancels:.0f}", len(left) == cancels),
        ("queue empty after the load (s)", drains, all(r.drain_s is not None for r in rounds)),
        (
            "llama-server slots idle after the load",
            ", ".join(r.idle_slots for r in rounds),
            all(i[0] == i[-1] for i in idle),
        ),
        ("answers with another request's marker", str(len(crossed)), not crossed),
        (
            "completed answers identical to the request alone",
            share(sum(o.text == alone[o.marker] for o in completed), len(completed)),
            None,
        ),
        (
            "partial answers a prefix of the request alone",
            share(sum(alone[o.marker].startswith(o.text) for o in left), len(left)),
            None,
        ),
        (
            "completed answers holding their own marker",
            share(sum(o.marker in o.text for o in completed), len(completed)),
            None,
        ),
    ]


def share(part: int, whole: int) -> str:
    return f"{part}/{whole} ({part / whole:.0%})" if whole else "0/0"


def memory_rows(
    before: dict[str, float], memory: Memory, after: list[dict[str, float]], margin: float
) -> list[tuple[str, str, bool | None]]:
    rows = []
    for name in before:
        growth = after[-1][name] - before[name]
        afters = " / ".join(f"{a[name]:.0f}" for a in after)
        rows.append(
            (
                name,
                f"{before[name]:.0f} | {memory.peak[name]:.0f} | {afters} | {growth:+.0f}",
                growth <= margin,
            )
        )
    return rows


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--leaving", type=float, default=0.1, help="share of clients who leave mid-answer")
    parser.add_argument("--leave-after", type=int, default=3, help="chunks of text a leaving client reads")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="loads, one after another")
    parser.add_argument("--slots", type=int, default=None, help="default: llamatailor serve's (cores, ≥ 4)")
    parser.add_argument("--context", type=int, default=4096, help="tokens per slot")
    parser.add_argument("--drain-s", type=float, default=30)
    parser.add_argument("--margin-mib", type=float, default=32, help="allowed growth of resident memory")
    args = parser.parse_args()
    args.slots = args.slots or default_slots()
    return args


def main() -> None:
    args = arguments()
    threads = os.cpu_count() or 1
    header = machine(threads)
    spec = server_specs(args.gguf, args.slots, args.context, threads, args.clients)["llamatailor"]
    names = markers(args.clients)
    leaving = leavers(args.clients, args.leaving)
    plan = [(m, args.leave_after if n in leaving else 0) for n, m in enumerate(names)]
    process, url = start(spec.command, LOGS / "stress.log")
    try:
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        memory = Memory(process.pid)
        first = asyncio.run(send(url, model, [(m, 0) for m in names], args.max_tokens, together=False))
        time.sleep(1)
        before = memory.now()
        memory.peak = dict(before)
        rounds, after = [], []
        for _ in range(args.rounds):
            rounds.append(load_round(url, model, plan, args, memory))
            after.append(memory.now())
    finally:
        stop(process)
    rows = checks(first, rounds)
    mem = memory_rows(before, memory, after, args.margin_mib)
    report(header, args, len(leaving), rows, mem)
    outcomes = first + [o for r in rounds for o in r.outcomes]
    errors = Counter(f"{o.status} {o.error}" for o in outcomes if o.error is not None)
    for error, count in errors.most_common():
        print(f"error ×{count}: {error}")
    if not all(passed is not False for _, _, passed in rows + mem):
        sys.exit(1)


def report(header: str, args: argparse.Namespace, leaving: int, rows: list, mem: list) -> None:
    print(
        f"\n{header}\n{args.gguf.name}, {args.slots} slots of {args.context} tokens; {args.rounds} rounds of "
        f"{args.clients} streaming clients at once, {leaving} of them leaving after {args.leave_after} chunks; up to "
        f"{args.max_tokens} tokens per answer, greedy\n"
    )
    print("| check | value | passed |\n|---|---|---|")
    for check, value, passed in rows:
        print(f"| {check} | {value} | {'-' if passed is None else 'yes' if passed else 'NO'} |")
    after = " / ".join(f"after round {n + 1}" for n in range(args.rounds))
    print(
        f"\n| process | before MiB | peak MiB | {after} MiB | growth MiB | within {args.margin_mib:.0f} MiB |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for name, values, passed in mem:
        print(f"| {name} | {values} | {'yes' if passed else 'NO'} |")


if __name__ == "__main__":
    main()
