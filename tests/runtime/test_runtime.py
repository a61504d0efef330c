"""The Runtime object itself: several on one event loop, opening and closing."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

import corral


@corral.step
async def double(x: int) -> int:
    return 2 * x


@corral.workflow
async def fan_out(ctx: corral.Context, n: int) -> list[int]:
    return list(await asyncio.gather(*(double(i) for i in range(n))))


async def test_closing_one_runtime_leaves_another_on_the_same_loop_working(
    tmp_path: Path,
) -> None:
    options = {"poll_interval": 0.01, "durability": "process"}
    first = corral.Runtime(tmp_path / "a.db", **options)
    async with corral.Runtime(tmp_path / "b.db", **options) as second:
        await first.open()
        await first.close()
        handle = await second.start(fan_out, 3)
        assert await handle.result(timeout=5) == [0, 2, 4]
        keys = sorted(entry.key for entry in second.store.journal(handle.id))
    # each branch of the gather kept its own deterministic scope
    assert keys == ["0/0", "1/0", "2/0"]
    assert asyncio.get_running_loop().get_task_factory() is None


async def test_a_run_the_store_says_this_worker_holds_but_it_does_not_is_queued_again(
    tmp_path: Path,
) -> None:
    # e.g. its end failed to commit: the row says running, under a worker that is alive
    async with corral.Runtime(tmp_path / "a.db", poll_interval=0.01, durability="process",
                              worker=False) as client:
        handle = await client.start(fan_out, 2)
    async with corral.Runtime(tmp_path / "a.db", poll_interval=0.01, durability="process",
                              queues=("nothing",)) as worker:
        with closing(sqlite3.connect(tmp_path / "a.db")) as db, db:
            db.execute("UPDATE runs SET status = 'running', owner = ?, queue = 'nothing'"
                       " WHERE id = ?", (worker.id, handle.id))
        assert await worker.handle(handle.id).result(timeout=10) == [0, 2]


async def test_a_worker_collects_garbage_less_often_and_puts_the_thresholds_back(
    tmp_path: Path,
) -> None:
    import gc

    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # Python's defaults
    try:
        async with corral.Runtime(tmp_path / "a.db", durability="process"):
            assert gc.get_threshold() == (20_000, 50, 100)
        assert gc.get_threshold() == (700, 10, 10)
        async with corral.Runtime(tmp_path / "a.db", durability="process", tune_gc=False):
            assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(5000, 10, 10)  # the process chose its own: left alone
        async with corral.Runtime(tmp_path / "a.db", durability="process"):
            assert gc.get_threshold() == (5000, 10, 10)
    finally:
        gc.set_threshold(*before)
