"""One generation at a time per server, a bounded queue in front of it, and cancellation.

Generation runs in a worker thread and hands text deltas to the event loop; a client that goes away closes
its stream, which sets the cancel flag the engine checks before each token. The engine is released only
when its thread has finished, so a cancelled request never overlaps the next one. Each such cancel is
counted, with the tokens the engine generated after it (read from the engine's own counter): at most the
one token in flight when the flag was set.
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
        self.cancelled = 0  # generations stopped because their client went away
        self.tokens_after_cancel = 0  # tokens the engine generated after those stops were asked for
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
        cancelled, worker_done = threading.Event(), threading.Event()
        at_cancel: list[int] = []  # the engine's token count when the cancel was asked for

        def release() -> None:  # on the loop, once the worker has finished
            if at_cancel:
                self.tokens_after_cancel += self.served.engine.tokens_generated - at_cancel[0]
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
                worker_done.set()
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)
                loop.call_soon_threadsafe(release)

        threading.Thread(target=work, daemon=True, name="llamatailor-generate").start()
        ended = False
        try:
            while True:
                item = await queue.get()
                ended = item is _DONE or isinstance(item, Exception)
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            if not ended and not worker_done.is_set():  # the consumer left mid-generation
                at_cancel.append(self.served.engine.tokens_generated)
                self.cancelled += 1
            cancelled.set()
