"""Dynamic batching: requests that arrive together are generated together, on one worker thread.

The queue is bounded (in rows); a full queue refuses at once (the route answers 429 with Retry-After)
instead of letting clients hang. Rows of different requests join one batch when they sample alike;
each request gets its events on its own asyncio queue, fed thread-safely from the worker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ayar.serve.backend import Row, Sampling


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    """One request's rows. Events on `events`: ("delta", row, text) and ("finish", row, reason, n_tokens)."""
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    rows: list[Row] = field(default_factory=list)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def add_row(self, prompt_ids: list[int], max_tokens: int, model: str, stop: tuple[str, ...] = ()) -> Row:
        i = len(self.rows)
        put = self.loop.call_soon_threadsafe
        row = Row(prompt_ids, max_tokens, model, stop,
                  on_delta=lambda text: put(self.events.put_nowait, ("delta", i, text)),
                  on_finish=lambda reason, n: put(self.events.put_nowait, ("finish", i, reason, n)),
                  cancelled=lambda: self.cancelled)
        self.rows.append(row)
        return row

    def fail(self, message: str) -> None:
        for i, r in enumerate(self.rows):
            if r.finish is None:
                r.finish = "error"
                self.loop.call_soon_threadsafe(self.events.put_nowait, ("error", i, message))


class Scheduler:
    def __init__(self, backend, max_batch: int = 8, max_queue: int = 64, wait_ms: float = 5.0, on_depth=None):
        self.backend, self.max_batch, self.max_queue, self.wait = backend, max_batch, max_queue, wait_ms / 1000
        self.on_depth = on_depth or (lambda depth: None)
        self.pending: deque[Job] = deque()
        self.cv = threading.Condition()
        self.running = False
        self.busy_seconds = 1.0  # moving estimate of one batch's duration, for Retry-After
        self.thread: threading.Thread | None = None

    def depth(self) -> int:
        return sum(len(j.rows) for j in self.pending)

    def submit(self, job: Job) -> None:
        with self.cv:
            if self.depth() + len(job.rows) > self.max_queue:
                raise QueueFull(retry_after=max(1, round(self.busy_seconds)))
            self.pending.append(job)
            self.on_depth(self.depth())
            self.cv.notify()

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="ayar-generate", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cv:
            self.running = False
            for job in self.pending:
                job.fail("the server is shutting down")
            self.pending.clear()
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            rows = [r for j in jobs for r in j.rows]
            started = time.perf_counter()
            try:
                self.backend.run(rows, jobs[0].sampling)
            except Exception as e:  # a failed batch fails its requests, never the server
                for j in jobs:
                    j.fail(f"generation failed: {type(e).__name__}: {e}")
            self.busy_seconds = 0.8 * self.busy_seconds + 0.2 * (time.perf_counter() - started)

    def _next_batch(self) -> list[Job] | None:
        with self.cv:
            while self.running and not self.pending:
                self.cv.wait()
            if not self.running:
                return None
            # a short wait lets requests that arrive together share the batch
            deadline = time.monotonic() + self.wait
            while self.depth() < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self.cv.wait(left)
            first = self.pending.popleft()
            batch, size = [first], len(first.rows)
            # a seeded request runs alone: its random stream must not depend on who else is in the batch
            for job in [] if first.sampling.seed is not None else list(self.pending):
                if job.sampling == first.sampling and size + len(job.rows) <= self.max_batch:
                    self.pending.remove(job)
                    batch.append(job)
                    size += len(job.rows)
            self.on_depth(self.depth())
        live = [j for j in batch if not j.cancelled]
        for j in batch:
            if j.cancelled:
                for r in j.rows:
                    r.finish = "cancelled"
        return live or self._next_batch()
