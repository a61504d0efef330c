"""Runs as Prometheus metrics, read when scraped, from the embedded store or from Temporal.

- ``corral_runs{status}``: runs by status (queued, running, waiting, completed, failed, ...);
- ``corral_queue_depth{queue}``: runs due now and not yet claimed, per queue;
- ``corral_queue_oldest_age_seconds{queue}``: how long the oldest of them has been due: the
  signal an autoscaler should scale workers on (depth alone hides a stuck queue);
- ``corral_step_duration_seconds{step,status}`` and ``corral_model_duration_seconds{model,
  status}``: histograms of this process's steps and agents' model calls.

Embedded, each scrape is two indexed queries on a read-only connection (WAL: it never blocks
writers). On Temporal the counts come from its visibility store, and the queue's depth and
age from its task queue's backlog (workflow and activity tasks not yet taken by a worker).
"""

from __future__ import annotations

import sqlite3
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Timings(Collector):
    """A latency histogram per (name, status), counted into buckets when scraped (and every
    few thousand observations, so memory stays bounded)."""

    FOLD_AT = 4096

    def __init__(self, metric: str, help: str, label: str) -> None:
        self.metric, self.help, self.label = metric, help, label
        self.series: dict[tuple[str, str], list[float]] = {}
        self._seen: list[tuple[str, str, float]] = []
        self._rows: list[list[Any]] = []  # committed journal rows, by batch
        self._held = 0

    def observe(self, name: str, status: str, seconds: float) -> None:
        self._seen.append((name, status, seconds))
        if len(self._seen) >= self.FOLD_AT:
            self._fold()

    def observe_journal(self, rows: list[Any]) -> None:
        """A committed batch's journal rows: its steps' durations are in them, so the
        runtime's step path does nothing for this histogram (one append per batch)."""
        self._rows.append(rows)
        self._held += len(rows)
        if self._held >= self.FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        seen, self._seen = self._seen, []
        batches, self._rows, self._held = self._rows, [], 0
        for name, status, seconds in seen:
            observed = self._counts(name, status)
            observed[bisect_left(BUCKETS, seconds)] += 1
            observed[-1] += seconds
        last: tuple[str, str] | None = None
        counts: list[float] = []
        for rows in batches:  # (run id, key, kind, name, status, value, started, ended, tries)
            for row in rows:  # (every step of every batch: no tuple made per row)
                if row[2] != "step" or row[7] is None:
                    continue
                if last is None or row[3] != last[0] or row[4] != last[1]:
                    last = (row[3], row[4])  # (a batch repeats its steps' names)
                    counts = self._counts(*last)
                seconds = row[7] - row[6]
                counts[bisect_left(BUCKETS, seconds)] += 1
                counts[-1] += seconds

    def _counts(self, name: str, status: str) -> list[float]:
        """The buckets of (name, status), then the sum of the seconds."""
        counts = self.series.get((name, status))
        if counts is None:
            counts = self.series[(name, status)] = [0.0] * (len(BUCKETS) + 2)
        return counts

    def collect(self) -> Iterator[Metric]:
        self._fold()
        family = HistogramMetricFamily(self.metric, self.help, labels=[self.label, "status"])
        for (name, status), counts in list(self.series.items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip((*BUCKETS, float("inf")), counts, strict=False):
                cumulative += count
                buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
            family.add_metric([name, status], buckets, counts[-1])
        yield family


# this process's: the runtime observes its steps, agents their model calls
STEPS = Timings("corral_step_duration_seconds", "Step latency (executed, not replayed)", "step")
MODELS = Timings("corral_model_duration_seconds", "Model call latency, by the agents", "model")


Queues = dict[str, tuple[int, float]]
"""Per queue: how many runs (or tasks) are due and not yet taken, and the oldest one's age."""


def _families(runs: dict[str, int], queues: Queues) -> Iterator[Metric]:
    by_status = GaugeMetricFamily("corral_runs", "Runs by status", labels=["status"])
    for status, count in sorted(runs.items()):
        by_status.add_metric([status], count)
    depth = GaugeMetricFamily("corral_queue_depth", "Runs due and not yet claimed",
                              labels=["queue"])
    oldest = GaugeMetricFamily("corral_queue_oldest_age_seconds",
                               "How long the oldest due run has waited", labels=["queue"])
    for queue, (count, age) in sorted(queues.items()):
        depth.add_metric([queue], count)
        oldest.add_metric([queue], age)
    yield from (by_status, depth, oldest)


class RunCollector(Collector):
    def __init__(self, db: str) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            runs = dict(conn.execute("SELECT status, count(*) FROM runs GROUP BY status"))
            queues = {queue: (count, max(0.0, now - first)) for queue, count, first in
                      conn.execute("SELECT queue, count(*), min(run_at) FROM runs WHERE "
                                   "status = 'queued' AND run_at <= ? GROUP BY queue", (now,))}
        finally:
            conn.close()
        yield from _families(runs, queues)


class _Counted(Collector):
    def __init__(self, runs: dict[str, int], queues: Queues) -> None:
        self.runs, self.queues = runs, queues

    def collect(self) -> Iterator[Metric]:
        yield from _families(self.runs, self.queues)


def run_metrics(db: str) -> bytes:
    """The store's run metrics and this process's step and model latencies, in Prometheus's
    text format."""
    return _render(RunCollector(db))


def render(runs: dict[str, int], queues: Queues) -> bytes:
    """Run metrics counted elsewhere (Temporal's visibility and task queues), with this
    process's step and model latencies."""
    return _render(_Counted(runs, queues))


def _render(collector: Collector) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    registry.register(STEPS)
    registry.register(MODELS)
    return generate_latest(registry)
