"""One generation at a time per server, a bounded queue in front of it, and cancellation.

Generation runs in a worker thread and hands text deltas to the event loop; a client that goes away closes
its stream, which sets the cancel flag the engine checks before each token. The engine is released only
when its thread has finished, so a cancelled request never overlaps the next one.
"""

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llamatailor.generation.engines import Sampling
from llamatailor.generation.text import Delta
from llamatailor.serve.models import ServedModels

_DONE = object()


class QueueFull(Exception):
    pass


@dataclass(frozen=True)
class Job:
    model: str
    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    stop_strings: list[str]


class Scheduler:
    def __init__(self, served: ServedModels, max_queue: int) -> None:
        self.served, self.max_queue = served, max_queue
        self.waiting = 0
        self.running = 0
        self._lock = asyncio.Lock()

    @property
    def depth(self) -> int:
        return self.waiting + self.running

    async def run(self, job: Job) -> AsyncIterator[Delta]:
        if self.waiting >= self.max_queue:
            raise QueueFull
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        self.running = 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def release() -> None:
            self.running = 0
            self._lock.release()

        def work() -> None:
            try:
                for delta in self.served.deltas(
                    job.model, job.prompt, job.sampling, job.max_tokens, job.stop_strings, cancelled
                ):
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
            except Exception as exc:  # handed to the request that asked for it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)
                loop.call_soon_threadsafe(release)

        threading.Thread(target=work, daemon=True, name="llamatailor-generate").start()
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            cancelled.set()
