"""Cancellation: of running, waiting and queued runs, down to children, with compensation."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from _journal import journal_is

import corral

calls: Counter[str] = Counter()
started: set[str] = set()


# a run waiting in a worker's memory: the embedded store lists it running (it lists it waiting
# once evicted); Temporal lists it waiting (the run upserts CorralWaitingOn)
WAITING_IN_MEMORY = {"embedded": "running", "temporal": "waiting"}


def status_is(rt: Any, run_id: str, status: str) -> Any:
    async def check() -> bool:
        return bool((await rt.get(run_id)).status == status)
    return check


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    calls.clear()
    started.clear()


@corral.step
async def long_task(label: str) -> str:
    calls[label] += 1
    started.add(label)
    await asyncio.sleep(30)
    return label


@corral.step
async def quick(label: str) -> str:
    calls[label] += 1
    return label


@corral.workflow
async def books_trip(ctx: corral.Context) -> str:
    await quick("reserve")
    await long_task("book flight")
    await quick("confirm")
    return "booked"


async def assert_cancelled(rt: corral.Runtime, run_id: str) -> None:
    with pytest.raises(corral.RunCancelled) as info:
        await rt.handle(run_id).result(timeout=5)
    assert info.value.run_id == run_id
    record = await rt.get(run_id)
    assert record.status == "cancelled"
    assert record.cancel_requested


async def test_cancelling_a_run_inside_a_step_stops_it(rt: corral.Runtime, wait_until: Any) -> None:
    handle = await rt.start(books_trip)
    await wait_until(lambda: "book flight" in started, what="the long step to start")

    await handle.cancel()

    await assert_cancelled(rt, handle.id)
    assert calls == Counter({"reserve": 1, "book flight": 1})


@corral.workflow
async def awaits_approval(ctx: corral.Context) -> Any:
    await quick("ask")
    return await ctx.wait_for("approval")


async def test_cancelling_a_run_waiting_in_memory(runtime: Any, engine: str,
                                                  wait_until: Any) -> None:
    async with runtime(idle_after=60) as rt:
        handle = await rt.start(awaits_approval)
        await wait_until(journal_is(rt, handle.id, lambda j: any(e.kind == "wait" for e in j)),
                         what="the run to wait")
        await wait_until(status_is(rt, handle.id, WAITING_IN_MEMORY[engine]),
                         what=f"the run listed {WAITING_IN_MEMORY[engine]}")

        await rt.cancel(handle.id)

        await assert_cancelled(rt, handle.id)


@pytest.mark.embedded_only  # a run evicted to the store is the embedded engine's own
async def test_cancelling_a_run_waiting_in_the_store(rt: corral.Runtime, wait_until: Any) -> None:
    handle = await rt.start(awaits_approval)
    await wait_until(lambda: _status_is(rt, handle.id, "waiting"), what="the run to be evicted")

    await rt.cancel(handle.id)

    await assert_cancelled(rt, handle.id)
    assert calls["ask"] == 1


async def _status_is(rt: corral.Runtime, run_id: str, wanted: str) -> bool:
    return (await rt.get(run_id)).status == wanted


@corral.workflow
async def sleeps_long(ctx: corral.Context) -> str:
    await ctx.sleep(3600)
    return "woke"


@pytest.mark.embedded_only  # a run evicted to the store is the embedded engine's own
async def test_cancelling_a_long_sleep(rt: corral.Runtime) -> None:
    handle = await rt.start(sleeps_long)
    await rt.drain()
    assert (await rt.get(handle.id)).status == "waiting"

    await rt.cancel(handle.id)

    await assert_cancelled(rt, handle.id)


async def test_a_queued_run_cancelled_before_it_starts_never_executes(
    runtime: Any, engine: str
) -> None:
    async with runtime(worker=False) as client:
        handle = await client.start(books_trip)
        await client.cancel(handle.id)
        record = await client.get(handle.id)
        if engine == "embedded":  # (Temporal reports a pending cancel only once it is done)
            assert (record.status, record.cancel_requested) == ("queued", True)

    async with runtime() as rt:
        await assert_cancelled(rt, handle.id)

    assert calls == Counter()


@corral.workflow
async def child_waits(ctx: corral.Context) -> Any:
    return await ctx.wait_for("never")


@corral.workflow
async def parent_of_waiting_child(ctx: corral.Context) -> Any:
    return await ctx.run_child(child_waits, id=f"{ctx.run_id}-child")


async def test_cancelling_a_parent_cancels_its_child(rt: corral.Runtime, wait_until: Any) -> None:
    await rt.start(parent_of_waiting_child, id="trip")
    await wait_until(journal_is(rt, "trip-child", lambda j: any(e.kind == "wait" for e in j)),
                     what="the child to wait")

    await rt.cancel("trip")

    await assert_cancelled(rt, "trip")
    await assert_cancelled(rt, "trip-child")


async def test_cancelling_a_parent_cancels_its_child_in_memory(
    runtime: Any, engine: str, wait_until: Any
) -> None:
    async with runtime(idle_after=60) as rt:
        await rt.start(parent_of_waiting_child, id="trip-2")
        await wait_until(journal_is(rt, "trip-2-child",
                                    lambda j: any(e.kind == "wait" for e in j)),
                         what="the child to wait")
        await wait_until(status_is(rt, "trip-2-child", WAITING_IN_MEMORY[engine]),
                         what=f"the child listed {WAITING_IN_MEMORY[engine]}")

        await rt.cancel("trip-2")

        await assert_cancelled(rt, "trip-2")
        await assert_cancelled(rt, "trip-2-child")


@corral.workflow
async def books_in_parallel(ctx: corral.Context) -> list[str]:
    return list(await asyncio.gather(long_task("hotel"), long_task("car")))


async def test_cancelling_a_run_stops_its_parallel_steps(
    rt: corral.Runtime, wait_until: Any
) -> None:
    handle = await rt.start(books_in_parallel)
    await wait_until(lambda: started == {"hotel", "car"}, what="both steps to start")

    await rt.cancel(handle.id)

    await assert_cancelled(rt, handle.id)
    assert (await rt.journal(handle.id)) == []


@corral.workflow
async def compensates(ctx: corral.Context) -> str:
    await quick("reserve")
    try:
        await long_task("book flight")
    except asyncio.CancelledError:
        await quick("release reservation")
        raise
    return "booked"


async def test_a_workflow_can_compensate_when_cancelled(
    rt: corral.Runtime, wait_until: Any
) -> None:
    handle = await rt.start(compensates)
    await wait_until(lambda: "book flight" in started, what="the long step to start")

    await rt.cancel(handle.id)

    await assert_cancelled(rt, handle.id)
    assert calls == Counter({"reserve": 1, "book flight": 1, "release reservation": 1})
    assert [e.name for e in (await rt.journal(handle.id))] == ["quick", "quick"]


@corral.workflow
async def compensates_while_waiting(ctx: corral.Context) -> str:
    await quick("reserve")
    try:
        await ctx.wait_for("confirm")
    except asyncio.CancelledError:
        await quick("release reservation")
        raise
    return "confirmed"


@pytest.mark.embedded_only  # a run evicted to the store is the embedded engine's own
async def test_a_workflow_evicted_while_waiting_can_compensate_when_cancelled(
    rt: corral.Runtime, wait_until: Any
) -> None:
    handle = await rt.start(compensates_while_waiting)
    await wait_until(lambda: _status_is(rt, handle.id, "waiting"), what="the run to be evicted")

    await rt.cancel(handle.id)

    await assert_cancelled(rt, handle.id)
    assert calls == Counter({"reserve": 1, "release reservation": 1})


@corral.workflow
async def finishes(ctx: corral.Context) -> str:
    return "done"


async def test_cancelling_a_finished_run_raises_run_finished(rt: corral.Runtime) -> None:
    handle = await rt.start(finishes)
    assert await handle.result(timeout=5) == "done"

    with pytest.raises(corral.RunFinished) as info:
        await rt.cancel(handle.id)
    assert info.value.status == "completed"


async def test_cancelling_an_unknown_run_raises_run_not_found(rt: corral.Runtime) -> None:
    with pytest.raises(corral.RunNotFound):
        await rt.cancel("no-such-run")


async def test_a_run_inside_a_long_step_is_listed_running_not_queued(
        rt: Any, wait_until: Any) -> None:
    """(Temporal's visibility indexes a run's history length when it starts: whether a worker
    has taken it comes from the run's description, in a list as in a get.)"""
    handle = await rt.start(books_trip)
    await wait_until(lambda: "book flight" in started, what="the long step to start")
    assert (await rt.get(handle.id)).status == "running"
    assert handle.id in [r.id for r in await rt.list_runs(status="running", limit=1000)]
    assert handle.id not in [r.id for r in await rt.list_runs(status="queued", limit=1000)]
    assert [r.status for r in await rt.list_runs(limit=1000) if r.id == handle.id] == ["running"]
    await handle.cancel()
    await assert_cancelled(rt, handle.id)
