"""Prometheus text-format metrics (exposition format 0.0.4) without a client library.

    deltatune_queue_rows                 gauge      rows waiting for a batch
    deltatune_batch_rows                 histogram  rows per batch
    deltatune_batch_tasks                histogram  distinct tasks per batch
    deltatune_batch_groups               histogram  passes per batch (1 shared + 1 per own-group task)
    deltatune_passes_total{group}        counter    shared / own / retry passes
    deltatune_requests_total{endpoint,code}  counter
    deltatune_request_seconds{endpoint}  histogram  end-to-end latency
    deltatune_rejected_total{reason}     counter    overload (503), limits (413/422)
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in sorted(labels.items()))
    return "{" + ",".join(escaped) + "}"


class Metric:
    def __init__(self, name: str, kind: str, help_text: str):
        self.name, self.kind, self.help = name, kind, help_text
        self.lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(Metric):
    def __init__(self, name: str, help_text: str, kind: str = "counter"):
        super().__init__(name, kind, help_text)
        self.values: dict[tuple, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        with self.lock:
            self.values[tuple(sorted(labels.items()))] += amount

    def set(self, value: float, **labels: str) -> None:
        with self.lock:
            self.values[tuple(sorted(labels.items()))] = value

    def render(self) -> list[str]:
        with self.lock:
            items = sorted(self.values.items())
        return self.header() + [f"{self.name}{_labels(dict(k))} {v:g}" for k, v in items]


class Gauge(Counter):
    def __init__(self, name: str, help_text: str):
        super().__init__(name, help_text, kind="gauge")


class Histogram(Metric):
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        super().__init__(name, "histogram", help_text)
        self.buckets = buckets
        self.series: dict[tuple, list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            series = self.series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            bucket = bisect.bisect_left(self.buckets, value)  # the first bound >= value
            if bucket < len(self.buckets):
                series[bucket] += 1
            series[-2] += value
            series[-1] += 1

    def render(self) -> list[str]:
        lines = self.header()
        with self.lock:
            items = sorted((k, list(v)) for k, v in self.series.items())
        for key, series in items:
            labels, cumulative = dict(key), 0
            for bound, n in zip(self.buckets, series):
                cumulative += n
                lines.append(f"{self.name}_bucket{_labels({**labels, 'le': f'{bound:g}'})} {cumulative}")
            lines.append(f"{self.name}_bucket{_labels({**labels, 'le': '+Inf'})} {series[-1]}")
            lines.append(f"{self.name}_sum{_labels(labels)} {series[-2]:g}")
            lines.append(f"{self.name}_count{_labels(labels)} {series[-1]}")
        return lines


class ServeMetrics:
    """Every metric the server exports, and the Prometheus text of them all."""

    def __init__(self):
        self.queue_rows = Gauge("deltatune_queue_rows", "Rows waiting for a batch.")
        self.tasks = Gauge("deltatune_tasks", "Tasks served, by group (shared pass or own group).")
        self.batch_rows = Histogram("deltatune_batch_rows", "Rows per batch.", SIZE_BUCKETS)
        self.batch_tasks = Histogram("deltatune_batch_tasks", "Distinct tasks per batch.", SIZE_BUCKETS)
        self.batch_groups = Histogram("deltatune_batch_groups", "Passes per batch: the shared pass plus one "
                                      "per task run alone.", SIZE_BUCKETS)
        self.passes = Counter("deltatune_passes_total", "Backbone passes by group: shared (mixed tasks), own "
                              "(a task whose delta changes backbone weights), retry (a failed shared pass "
                              "rerun task by task).")
        self.requests = Counter("deltatune_requests_total", "HTTP requests by endpoint and status code.")
        self.latency = Histogram("deltatune_request_seconds", "End-to-end request latency.", LATENCY_BUCKETS)
        self.rejected = Counter("deltatune_rejected_total", "Requests refused before queueing, by reason.")
        self.failed_items = Counter("deltatune_failed_items_total", "Items that failed, by task.")

    def observe_batch(self, record) -> None:
        """A `BatchRecord` from the engine."""
        self.batch_rows.observe(record.rows)
        self.batch_tasks.observe(record.tasks)
        self.batch_groups.observe(len(record.groups))
        for group, _ in record.groups:
            self.passes.inc(group=group.split(":")[0])

    def render(self) -> str:
        metrics = [self.queue_rows, self.tasks, self.batch_rows, self.batch_tasks, self.batch_groups, self.passes,
                   self.requests, self.latency, self.rejected, self.failed_items]
        return "\n".join(line for m in metrics for line in m.render()) + "\n"
