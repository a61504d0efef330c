"""Runs and queues as Prometheus metrics: from the store, and from a worker's /metrics."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

import corral
from corral.observability import run_metrics
from corral.observability._runs import render
from corral.runtime._temporal import TemporalRuntime
from corral.testing import TemporalDevServer, _free_port


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


async def test_on_temporal_runs_come_from_visibility_and_the_depth_from_the_backlog(
        temporal_server: TemporalDevServer) -> None:
    """What `corral serve --engine temporal://` serves at /metrics: runs by status (every
    queue's), and its task queue's backlog as the queue's depth and age."""
    queue = f"metrics-{uuid.uuid4().hex[:8]}"

    def temporal(worker: bool) -> TemporalRuntime:
        return TemporalRuntime(temporal_server.address, task_queue=queue, worker=worker,
                               shutdown_grace=0.0)

    async def scraped(rt: TemporalRuntime) -> dict[Any, float]:
        return samples(render(*await rt.count_runs()).decode())

    depth = ("corral_queue_depth", (("queue", queue),))
    age = ("corral_queue_oldest_age_seconds", (("queue", queue),))
    running = ("corral_runs", (("status", "running"),))  # (not yet taken, on Temporal)
    completed = ("corral_runs", (("status", "completed"),))
    async with temporal(worker=False) as rt:  # no worker takes them: they wait in the queue
        before = await scraped(rt)  # (the namespace's counts: the other tests' runs too)
        handles = [await rt.start(job, n) for n in range(3)]
        await until(rt, scraped, lambda m: m[depth] == 3 and m[age] > 0
                    and m.get(running, 0) >= before.get(running, 0) + 3)
    async with temporal(worker=True) as rt:
        assert [await h.result(timeout=30) for h in handles] == [0, 1, 2]
        found = await until(rt, scraped, lambda m: m[depth] == 0
                            and m.get(completed, 0) >= before.get(completed, 0) + 3)
        assert found[age] == 0


async def until(rt: TemporalRuntime, read: Any, done: Any, timeout: float = 30) -> Any:
    """Read until ``done`` holds (Temporal's backlog counts are approximate, and lag)."""
    deadline = time.monotonic() + timeout
    while True:
        found = await read(rt)
        if done(found):
            return found
        assert time.monotonic() < deadline, f"never held; last read: {found}"
        await asyncio.sleep(0.2)
