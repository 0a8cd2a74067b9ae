"""The generation loop: one worker thread runs decoding steps; requests join the running batch between
steps (continuous batching) and leave it when done.

The queue of requests waiting to join is bounded (in rows); a full queue refuses at once (the route
answers 429 with Retry-After) instead of letting clients hang. Each request gets its events on its own
asyncio queue, fed thread-safely from the worker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ayar.serve.backend import Row, Sampling, fail_rows


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    """One request's rows. Events on `events`: ("delta", row, text), ("finish", row, reason, n_tokens) and
    ("error", row, message)."""

    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    rows: list[Row] = field(default_factory=list)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def add_row(
        self, prompt_ids: list[int], max_tokens: int, model: str, stop: tuple[str, ...] = (), sampling=None
    ) -> Row:
        i = len(self.rows)
        put = self.loop.call_soon_threadsafe

        def finished(reason: str, n: int) -> None:
            if reason.startswith("error: "):
                put(self.events.put_nowait, ("error", i, reason.removeprefix("error: ")))
            else:
                put(self.events.put_nowait, ("finish", i, reason, n))

        row = Row(
            prompt_ids,
            max_tokens,
            model,
            stop,
            sampling=sampling or self.sampling,
            on_delta=lambda text: put(self.events.put_nowait, ("delta", i, text)),
            on_finish=finished,
            cancelled=lambda: self.cancelled,
        )
        self.rows.append(row)
        return row

    def fail(self, message: str) -> None:
        fail_rows(self.rows, message)


class Scheduler:
    def __init__(self, backend, max_batch: int = 8, max_queue: int = 64, on_depth=None):
        self.backend, self.max_batch, self.max_queue = backend, max_batch, max_queue
        self.on_depth = on_depth or (lambda depth: None)
        self.pending: deque[Job] = deque()
        self.cv = threading.Condition()
        self.running = False
        self.row_seconds = 1.0  # moving estimate of how long a row stays in the batch, for Retry-After
        self.thread: threading.Thread | None = None

    def depth(self) -> int:
        return sum(len(j.rows) for j in self.pending)

    def submit(self, job: Job) -> None:
        with self.cv:
            if self.depth() + len(job.rows) > self.max_queue:
                raise QueueFull(retry_after=max(1, round(self.row_seconds)))
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
        self.backend.fail_all([], "the server is shutting down")

    def _loop(self) -> None:
        while True:
            new = self._admissible()
            if new is None:
                return
            if new:
                self._admit(new)
            try:
                if self.backend.active:
                    self.backend.step()
            except Exception as e:  # a failed step fails the requests in it, never the server
                self.backend.fail_all([], f"generation failed: {type(e).__name__}: {e}")

    def _admit(self, rows: list[Row]) -> None:
        """New rows join the batch together; if that fails, each is tried alone, so a row that cannot be
        prefilled fails by itself and neither the others nor the running batch are touched (a failed admit
        leaves the batch as it was)."""
        empty = [r for r in rows if not r.prompt_ids]  # nothing to continue from (the routes refuse these)
        fail_rows(empty, "generation failed: the prompt is empty")
        rows = [r for r in rows if r.prompt_ids]
        if not rows:
            return
        try:
            self.backend.admit(rows)
            return
        except Exception as e:
            if len(rows) == 1:
                fail_rows(rows, f"generation failed: {type(e).__name__}: {e}")
                return
        for row in rows:
            try:
                self.backend.admit([row])
            except Exception as e:
                fail_rows([row], f"generation failed: {type(e).__name__}: {e}")

    def _admissible(self) -> list[Row] | None:
        """Rows of waiting requests that fit in the batch now (whole requests, in arrival order)."""
        with self.cv:
            while self.running and not self.pending and not self.backend.active:
                self.cv.wait()
            if not self.running:
                return None
            new, room = [], self.max_batch - len(self.backend.active)
            while self.pending and (
                len(self.pending[0].rows) <= room - len(new) or (not new and not self.backend.active)
            ):
                job = self.pending.popleft()
                if job.cancelled:
                    job.fail("cancelled")
                    continue
                self.row_seconds = 0.9 * self.row_seconds + 0.1 * (time.perf_counter() - job.submitted)
                new += job.rows
            self.on_depth(self.depth())
            return new
