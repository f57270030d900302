"""As many generations at once as the backend has slots, a bounded queue in front, and cancellation.

A request waits for a free slot (at most `max_queue` wait; more are refused with QueueFull), then streams the
backend's deltas. A client that goes away closes its stream; the backend's generation is closed with it (an
in-process engine's thread stops before its next token, llama.cpp frees the slot), and the slot is given back
once the generation is closed. Each such cancel is counted. Closing needs no await from a backend in this
process (a flag its thread reads) and the socket's close from llama.cpp's, so it holds while the request's
task is itself being cancelled (Starlette cancels a streaming response whose client left).
"""

import asyncio
from collections.abc import AsyncIterator

from llamatailor.generation.text import Delta
from llamatailor.serve.backend import Backend, Job


class QueueFull(Exception):
    pass


class Scheduler:
    def __init__(self, backend: Backend, max_queue: int) -> None:
        self.backend, self.max_queue = backend, max_queue
        self.waiting = 0
        self.running = 0
        self.cancelled = 0  # generations stopped because their client went away
        self._slots = asyncio.Semaphore(backend.slots)

    @property
    def depth(self) -> int:
        return self.waiting + self.running

    async def run(self, job: Job) -> AsyncIterator[Delta]:
        """The job's deltas once a slot is free. Raises QueueFull when `max_queue` requests wait already."""
        if self.waiting >= self.max_queue:
            raise QueueFull
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        deltas = self.backend.answer(job)
        open_choices, failed = set(range(job.n)), False
        try:
            async for delta in deltas:
                if delta.finish_reason:
                    open_choices.discard(delta.index)
                yield delta
        except Exception:
            failed = True
            raise
        finally:
            self.cancelled += bool(open_choices) and not failed  # the consumer left mid-generation
            try:
                await deltas.aclose()  # type: ignore[attr-defined]
            finally:
                self.running -= 1
                self._slots.release()
