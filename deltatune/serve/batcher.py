"""Dynamic batching over a bounded queue, run by one worker thread.

    submit(items) ──> queue (bounded in rows: full -> Overloaded at once, the caller answers 503)
                        │ a batch forms when the queued rows reach max_batch_size,
                        │ or max_wait after the oldest queued request arrived
                        ▼
                 worker: engine.classify(all rows of the batch's requests)   (mixed tasks, one call)
                         engine.generate(...) for generation requests
                        ▼
                 each request's future gets its items' results, in order

A request is never split: a batch takes whole requests while they fit in max_batch_size rows (and
always at least one). Requests queued for a task that is removed meanwhile fail with that error only.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from deltatune.serve.metrics import ServeMetrics


class Overloaded(Exception):
    """The queue is full: answer 503 with Retry-After."""

    def __init__(self, retry_after: float):
        super().__init__(f"server overloaded: the request queue is full; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


@dataclass
class Job:
    kind: str  # "classify": items (task, text); "generate": items (task, prompt, max_new_tokens)
    items: list[tuple]
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """Queue requests and feed the engine batches of at most max_batch_size rows."""

    def __init__(self, engine, max_batch_size: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256,
                 metrics: ServeMetrics | None = None):
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_ms >= 0")
        self.engine = engine
        self.max_batch_size, self.max_wait, self.max_queue = max_batch_size, max_wait_ms / 1000, max_queue
        self.metrics = metrics or ServeMetrics()
        self.queue: deque[Job] = deque()
        self.queued_rows = 0
        self.cond = threading.Condition()
        self.stopping = False
        self.batch_seconds = 0.05  # running estimate of one batch, for Retry-After
        self.thread = threading.Thread(target=self._loop, name="deltatune-batcher", daemon=True)

    def start(self) -> Batcher:
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout)

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained one batch's worth (at least 1)."""
        batches = self.queued_rows / self.max_batch_size + 1
        return max(1.0, batches * (self.batch_seconds + self.max_wait))

    def submit(self, kind: str, items: list[tuple]) -> Future:
        """Queue a request; raises Overloaded when its rows do not fit in the queue."""
        job = Job(kind, list(items))
        with self.cond:
            if self.stopping:
                raise Overloaded(self.retry_after())
            if self.queued_rows + len(job.items) > self.max_queue:
                self.metrics.rejected.inc(reason="overload")
                raise Overloaded(self.retry_after())
            self.queue.append(job)
            self.queued_rows += len(job.items)
            self.metrics.queue_rows.set(self.queued_rows)
            self.cond.notify_all()
        return job.future

    def _take(self) -> list[Job] | None:
        """Wait for a batch to form; None when stopping."""
        with self.cond:
            while True:
                if self.stopping:
                    return None
                if self.queue:
                    deadline = self.queue[0].queued_at + self.max_wait
                    now = time.monotonic()
                    if self.queued_rows >= self.max_batch_size or now >= deadline:
                        break
                    self.cond.wait(deadline - now)
                else:
                    self.cond.wait()
            jobs, rows = [], 0
            while self.queue and (not jobs or rows + len(self.queue[0].items) <= self.max_batch_size):
                job = self.queue.popleft()
                jobs.append(job)
                rows += len(job.items)
            self.queued_rows -= rows
            self.metrics.queue_rows.set(self.queued_rows)
            return jobs

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            start = time.perf_counter()
            for kind in ("classify", "generate"):
                group = [j for j in jobs if j.kind == kind]
                if group:
                    self._run(kind, group)
            self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * (time.perf_counter() - start)
        with self.cond:  # stopping: whatever is left is refused
            for job in self.queue:
                job.future.set_exception(Overloaded(1.0))
            self.queue.clear()

    def _run(self, kind: str, jobs: list[Job]) -> None:
        items = [item for job in jobs for item in job.items]
        try:
            if kind == "classify":
                results = self.engine.classify(items)
                record = self.engine.stats.last
                if record is not None:
                    self.metrics.observe_batch(record)
            else:
                results = self.engine.generate(items)
        except Exception as exc:  # noqa: BLE001 - an engine bug fails this batch's requests, not the worker
            results = [exc] * len(items)
        start = 0
        for job in jobs:
            part = results[start:start + len(job.items)]
            start += len(job.items)
            for item, result in zip(job.items, part):
                if isinstance(result, Exception):
                    self.metrics.failed_items.inc(task=item[0])
            job.future.set_result(part)
