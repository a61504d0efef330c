"""Runs and queues as Prometheus metrics: from the store, and from a worker's /metrics."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

import corral
from corral.observability import run_metrics
from corral.testing import _free_port


@corral.workflow
async def job(ctx: corral.Context, n: int) -> int:
    return n


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def fill(db: str) -> None:
    async with corral.Runtime(db, worker=False) as rt:
        for n in range(3):
            await rt.start(job, n)
        for n in range(2):
            await rt.start(job, n, queue="slow")
        await rt.start(job, 9, queue="slow", delay=3600)  # not due: not in the depth


async def test_runs_by_status_and_the_depth_and_age_of_each_queue(tmp_path: Path) -> None:
    db = str(tmp_path / "corral.db")
    await fill(db)
    found = samples(run_metrics(db).decode())
    assert found[("corral_runs", (("status", "queued"),))] == 6
    assert found[("corral_queue_depth", (("queue", "default"),))] == 3
    assert found[("corral_queue_depth", (("queue", "slow"),))] == 2
    assert found[("corral_queue_oldest_age_seconds", (("queue", "default"),))] > 0
    assert ("corral_queue_depth", (("queue", "other"),)) not in found  # (no runs: no series)


async def test_a_worker_serves_them_at_metrics(tmp_path: Path) -> None:
    db = str(tmp_path / "corral.db")
    await fill(db)
    port = _free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "corral", "worker", "--db", db, "--queue", "other",
         "--health-port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
                break
            except httpx.TransportError:
                assert worker.poll() is None and time.monotonic() < deadline, "no /metrics"
                time.sleep(0.1)
        assert reply.status_code == 200
        found = samples(reply.text)
        assert found[("corral_queue_depth", (("queue", "default"),))] == 3
        assert ("corral_runs", (("status", "queued"),)) in found
    finally:
        worker.terminate()
        worker.communicate(timeout=30)
