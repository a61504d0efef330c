"""Runs in the embedded store as Prometheus metrics, read when scraped.

- ``corral_runs{status}``: runs by status (queued, running, waiting, completed, failed, ...);
- ``corral_queue_depth{queue}``: runs due now and not yet claimed, per queue;
- ``corral_queue_oldest_age_seconds{queue}``: how long the oldest of them has been due: the
  signal an autoscaler should scale workers on (depth alone hides a stuck queue).

Each scrape is two indexed queries on a read-only connection (WAL: it never blocks writers).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class RunCollector(Collector):
    def __init__(self, db: str) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        runs = GaugeMetricFamily("corral_runs", "Runs by status", labels=["status"])
        depth = GaugeMetricFamily("corral_queue_depth", "Runs due and not yet claimed",
                                  labels=["queue"])
        oldest = GaugeMetricFamily("corral_queue_oldest_age_seconds",
                                   "How long the oldest due run has waited", labels=["queue"])
        now = time.time()
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            for status, count in conn.execute(
                    "SELECT status, count(*) FROM runs GROUP BY status ORDER BY status"):
                runs.add_metric([status], count)
            for queue, count, first in conn.execute(
                    "SELECT queue, count(*), min(run_at) FROM runs WHERE status = 'queued' "
                    "AND run_at <= ? GROUP BY queue ORDER BY queue", (now,)):
                depth.add_metric([queue], count)
                oldest.add_metric([queue], max(0.0, now - first))
        finally:
            conn.close()
        yield runs
        yield depth
        yield oldest


def run_metrics(db: str) -> bytes:
    """The store's run metrics in Prometheus's text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(db))
    return generate_latest(registry)
