"""The queue: priorities, deferred runs, concurrency limits, named queues, idempotent submission."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import corral

# the embedded engine's queue: priorities, concurrency keys, claims
pytestmark = pytest.mark.embedded_only

executed: list[str] = []
calls: Counter[str] = Counter()
active: Counter[str] = Counter()
peak: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    executed.clear()
    calls.clear()
    active.clear()
    peak.clear()


@corral.workflow
async def records_order(ctx: corral.Context, label: str) -> str:
    executed.append(label)
    return label


async def test_higher_priority_runs_first(runtime: Any) -> None:
    async with runtime(worker=False) as client:
        for label, priority in [("low", -1), ("mid", 5), ("urgent", 20), ("mid later", 5),
                                ("normal", 0)]:
            await client.start(records_order, label, priority=priority)

    async with runtime(max_runs=1) as worker:
        await worker.drain()

    assert executed == ["urgent", "mid", "mid later", "normal", "low"]


@corral.workflow
async def stamps_start(ctx: corral.Context) -> float:
    calls["stamps_start"] += 1
    return ctx.now().timestamp()


async def test_a_delayed_run_does_not_start_before_its_delay(rt: corral.Runtime) -> None:
    submitted = time.time()
    handle = await rt.start(stamps_start, delay=timedelta(seconds=0.5))

    await rt.drain()
    assert (await rt.get(handle.id)).status == "queued"
    assert calls["stamps_start"] == 0

    assert await handle.result(timeout=5) >= submitted + 0.5


async def test_a_run_at_in_the_future_does_not_start_before_then(rt: corral.Runtime) -> None:
    when = datetime.now(UTC) + timedelta(seconds=0.5)
    handle = await rt.start(stamps_start, run_at=when)

    await rt.drain()
    record = await rt.get(handle.id)
    assert record.status == "queued"
    assert record.run_at == pytest.approx(when.timestamp())

    assert await handle.result(timeout=5) >= when.timestamp()


async def test_run_at_must_be_timezone_aware(rt: corral.Runtime) -> None:
    with pytest.raises(corral.UsageError, match="timezone"):
        await rt.start(stamps_start, run_at=datetime.now() + timedelta(seconds=1))


@corral.step
async def uses_gpu(key: str) -> None:
    active[key] += 1
    peak[key] = max(peak[key], active[key])
    await asyncio.sleep(0.02)
    active[key] -= 1


@corral.workflow
async def needs_gpu(ctx: corral.Context, key: str) -> str:
    await uses_gpu(key)
    return key


@pytest.mark.parametrize("limit", [1, 2])
async def test_a_concurrency_limit_is_never_exceeded(rt: corral.Runtime, limit: int) -> None:
    handles = [
        await rt.start(needs_gpu, "gpu", concurrency_key="gpu", concurrency_limit=limit)
        for _ in range(6)
    ]

    await rt.drain()

    assert [(await rt.get(h.id)).status for h in handles] == ["completed"] * 6
    assert peak["gpu"] == limit


@pytest.mark.parametrize(
    "options",
    [{"concurrency_key": "gpu"}, {"concurrency_limit": 2},
     {"concurrency_key": "gpu", "concurrency_limit": 0}],
)
async def test_concurrency_options_are_checked(rt: corral.Runtime, options: Any) -> None:
    with pytest.raises(corral.UsageError):
        await rt.start(needs_gpu, "gpu", **options)


async def test_a_worker_runs_only_the_queues_it_serves(runtime: Any) -> None:
    async with runtime(queues=("a",)) as worker_a:
        on_a = await worker_a.start(records_order, "on a", queue="a")
        on_b = await worker_a.start(records_order, "on b", queue="b")
        assert await on_a.result(timeout=5) == "on a"
        await worker_a.drain()
        assert (await worker_a.get(on_b.id)).status == "queued"
        assert executed == ["on a"]

        async with runtime(queues=("b",)) as worker_b:
            assert await worker_b.handle(on_b.id).result(timeout=5) == "on b"

    assert executed == ["on a", "on b"]


@corral.workflow
async def counts_runs(ctx: corral.Context, label: str) -> str:
    calls[label] += 1
    return label


async def test_starting_the_same_id_again_returns_the_same_run(rt: corral.Runtime) -> None:
    first = await rt.start(counts_runs, "job", id="job-1")
    second = await rt.start(counts_runs, "job", id="job-1")
    assert first.id == second.id == "job-1"
    assert await first.result(timeout=5) == "job"

    third = await rt.start(counts_runs, "job", id="job-1")  # after it finished
    assert await third.result(timeout=5) == "job"
    await rt.drain()

    assert calls["job"] == 1
    assert len(rt.store.list_runs(workflow="counts_runs")) == 1


async def test_starting_an_id_again_with_other_input_raises_run_conflict(
    rt: corral.Runtime,
) -> None:
    await rt.start(counts_runs, "job", id="job-2")

    with pytest.raises(corral.RunConflict) as info:
        await rt.start(counts_runs, "another job", id="job-2")
    assert info.value.run_id == "job-2"
    with pytest.raises(corral.RunConflict):
        await rt.start(records_order, "job", id="job-2")


async def test_a_client_runtime_submits_without_executing(runtime: Any) -> None:
    async with runtime(worker=False) as client:
        handle = await client.start(counts_runs, "later")
        with pytest.raises(corral.UsageError):
            await client.drain()
        assert (await client.get(handle.id)).status == "queued"

        async with runtime() as worker:
            await worker.drain()

        assert await handle.result(timeout=5) == "later"
    assert calls["later"] == 1


async def test_start_takes_only_workflows(rt: corral.Runtime) -> None:
    async def not_a_workflow(ctx: corral.Context) -> None:
        return None

    with pytest.raises(corral.UsageError):
        await rt.start(not_a_workflow)  # type: ignore[arg-type]


async def test_concurrent_starts_of_one_id_execute_it_once(rt: corral.Runtime) -> None:
    first, second = await asyncio.gather(
        rt.start(counts_runs, "twin", id="job-3"), rt.start(counts_runs, "twin", id="job-3"))

    assert await first.result(timeout=2) == await second.result(timeout=2) == "twin"
    await rt.drain()
    assert calls["twin"] == 1


async def test_concurrent_starts_of_one_id_with_other_inputs_conflict(
    rt: corral.Runtime,
) -> None:
    outcomes = await asyncio.gather(
        rt.start(counts_runs, "one", id="job-4"), rt.start(counts_runs, "two", id="job-4"),
        return_exceptions=True)

    assert sum(isinstance(o, corral.RunConflict) for o in outcomes) == 1
    await rt.drain()
    assert calls["one"] + calls["two"] == 1
