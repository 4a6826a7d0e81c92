"""Concurrent requests -> batches for the engine: a bounded queue, at most `max_batch` rows per prefill, and at most
`max_wait_s` of waiting for more rows once the first has arrived.

The engine runs in one worker thread (it owns the model); the event loop only queues, batches and hands results
back. A full queue refuses new rows at once (503 with Retry-After) instead of letting latency grow without bound.
`close` refuses new rows and lets every queued one finish: the graceful part of a shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from halp.errors import ServeRequestError
from halp.serve.engine import BatchStats, Job

log = logging.getLogger(__name__)

#: Seconds a refused client is asked to wait (Retry-After) when the queue is full.
RETRY_AFTER_S = 1


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[list[Job]], list[BatchStats]],
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[list[Job], list[BatchStats], float], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.on_depth = on_depth
        self._pending: deque[tuple[Job, asyncio.Future]] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.closing = False
        #: Rows in the batch the engine is running now.
        self.running = 0

    @property
    def depth(self) -> int:
        """Rows waiting for a batch."""
        return len(self._pending)

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="halp-serve-engine")
        self._worker = asyncio.create_task(self._work())

    def submit(self, jobs: list[Job]) -> list[asyncio.Future]:
        """Queue `jobs` (all or none); each future resolves to its job once the engine has run it."""
        if self.closing or self._arrived is None:
            raise ServeRequestError("the server is shutting down", 503, None, "shutting_down", "server_error")
        if len(self._pending) + len(jobs) > self.max_queue:
            raise ServeRequestError(
                f"the queue is full ({len(self._pending)} waiting, at most {self.max_queue}); retry in "
                f"{RETRY_AFTER_S} s", 503, None, "queue_full", "server_error",
            )  # fmt: skip
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        self._pending.extend(zip(jobs, futures, strict=True))
        self._depth_changed()
        self._arrived.set()
        return futures

    async def close(self) -> None:
        """Refuse new rows, run every queued one, stop the worker."""
        self.closing = True
        if self._arrived is not None:
            self._arrived.set()
        if self._worker is not None:
            await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def _next_batch(self) -> list[tuple[Job, asyncio.Future]]:
        """Up to max_batch queued rows: at once when that many wait, else when max_wait_s has passed since the first
        arrived (or the server closes). Empty once closed and drained."""
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while not self._pending:
            if self.closing:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        deadline = loop.time() + self.max_wait_s
        while len(self._pending) < self.max_batch and not self.closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
        self._depth_changed()
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while batch := await self._next_batch():
            jobs = [job for job, _ in batch]
            self.running = len(jobs)
            start = time.perf_counter()
            try:
                stats = await loop.run_in_executor(self._executor, self.run_batch, jobs)
            except Exception as err:  # a bug in the engine: its rows fail, the service goes on
                log.exception("the engine failed on a batch of %d", len(jobs))
                stats = []
                for job in jobs:
                    job.error = ServeRequestError(f"internal error: {type(err).__name__}: {err}", 500, None,
                                                  "internal_error", "server_error")  # fmt: skip
            finally:
                self.running = 0
            if self.on_batch is not None:
                self.on_batch(jobs, stats, time.perf_counter() - start)
            for job, future in batch:
                if not future.done():  # a client that went away cancelled its future
                    future.set_result(job)

    def _depth_changed(self) -> None:
        if self.on_depth is not None:
            self.on_depth(len(self._pending))


def retry_after_header(error: ServeRequestError) -> dict[str, Any]:
    return {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else {}
