"""Durable timers and signals: runs wait in the store and wake when the time or the signal comes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from _journal import journal_is
from pydantic import BaseModel

import corral

calls: Counter[str] = Counter()
holding: set[str] = set()


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    calls.clear()
    holding.clear()


@corral.step
async def note(label: str) -> str:
    calls[label] += 1
    if label in holding:
        await asyncio.get_running_loop().create_future()  # until cancelled by close()
    return label


async def status(rt: corral.Runtime, run_id: str) -> str:
    return (await rt.get(run_id)).status


def has_pending_wait(rt: Any, run_id: str, name: str) -> Any:
    return journal_is(rt, run_id, lambda j: any(
        e.kind == "wait" and e.name == name and e.status == "pending" for e in j))


# -- timers ------------------------------------------------------------------------------------


@corral.workflow
async def naps(ctx: corral.Context, seconds: float) -> float:
    await note("before")
    start = ctx.now()
    await ctx.sleep(timedelta(seconds=seconds))
    await note("after")
    return (ctx.now() - start).total_seconds()


async def test_a_short_sleep_completes(rt: corral.Runtime) -> None:
    handle = await rt.start(naps, 0.01)

    assert await handle.result(timeout=5) >= 0.01
    sleeps = [e for e in (await rt.journal(handle.id)) if e.kind == "sleep"]
    assert [e.status for e in sleeps] == ["ok"]


@pytest.mark.embedded_only  # eviction from memory is the embedded engine's own
async def test_a_sleep_longer_than_idle_after_waits_in_the_store(
    rt: corral.Runtime, wait_until: Any
) -> None:
    submitted = time.time()
    handle = await rt.start(naps, 0.5)

    record = await wait_until(
        lambda: _record_if(rt, handle.id, "waiting"), what="the run to wait in the store")
    assert record.owner is None
    assert record.run_at is not None and record.run_at >= submitted + 0.5
    assert calls["after"] == 0

    assert await handle.result(timeout=5) >= 0.5
    assert calls == Counter(before=1, after=1)  # the step before the sleep was replayed
    assert await status(rt, handle.id) == "completed"


async def _record_if(rt: corral.Runtime, run_id: str, wanted: str) -> Any:
    record = await rt.get(run_id)
    return record if record.status == wanted else None


@pytest.mark.embedded_only  # eviction from memory is the embedded engine's own
async def test_drain_returns_while_a_long_sleep_waits_in_the_store(rt: corral.Runtime) -> None:
    handle = await rt.start(naps, 3600)

    await rt.drain()

    record = await rt.get(handle.id)
    assert record.status == "waiting"
    assert record.run_at is not None and record.run_at > time.time() + 3000
    assert calls == Counter(before=1)


async def test_a_sleeping_run_resumes_in_another_runtime(runtime: Any, wait_until: Any) -> None:
    async with runtime(idle_after=60) as rt:  # the run stays in memory while it sleeps
        handle = await rt.start(naps, 0.3)
        await wait_until(journal_is(rt, handle.id, lambda j: any(e.kind == "sleep" for e in j)),
                         what="the sleep to start")

    async with runtime() as rt:
        assert await rt.handle(handle.id).result(timeout=5) >= 0.3

    assert calls == Counter(before=1, after=1)


@corral.workflow
async def sleeps_negative(ctx: corral.Context) -> None:
    await ctx.sleep(-1)


async def test_a_negative_sleep_is_a_usage_error(rt: corral.Runtime) -> None:
    with pytest.raises(corral.RunFailed) as info:
        await rt.run(sleeps_negative)
    assert info.value.error_type == "UsageError"


# -- signals -----------------------------------------------------------------------------------


@corral.workflow
async def waits_for_approval(ctx: corral.Context) -> Any:
    await note("before")
    return await ctx.wait_for("approval", timeout=30)


async def test_a_signal_sent_before_the_wait_is_buffered(runtime: Any) -> None:
    async with runtime(worker=False) as client:
        handle = await client.start(waits_for_approval)
        await client.signal(handle.id, "approval", {"by": "ann"})
        assert calls["before"] == 0

    async with runtime() as rt:
        assert await rt.handle(handle.id).result(timeout=5) == {"by": "ann"}


async def test_a_signal_sent_while_the_run_waits_in_memory(
    runtime: Any, engine: str, wait_until: Any
) -> None:
    async with runtime(idle_after=60) as rt:
        handle = await rt.start(waits_for_approval)
        await wait_until(has_pending_wait(rt, handle.id, "approval"),
                         what="the run to wait")
        # (in a worker's memory: running on the embedded engine, listed waiting on Temporal)
        expected = {"embedded": "running", "temporal": "waiting"}[engine]
        await wait_until(lambda: _is(rt, handle.id, expected), what=f"the run {expected}")

        await rt.signal(handle.id, "approval", "yes")

        assert await handle.result(timeout=5) == "yes"


@pytest.mark.embedded_only  # eviction from memory is the embedded engine's own
async def test_a_signal_wakes_a_run_evicted_from_memory(
    rt: corral.Runtime, wait_until: Any
) -> None:
    handle = await rt.start(waits_for_approval)
    await wait_until(lambda: _record_if(rt, handle.id, "waiting"), what="the run to be evicted")

    await handle.signal("approval", 42)

    assert await handle.result(timeout=5) == 42
    assert calls["before"] == 1


@corral.workflow
async def waits_for_a_then_b(ctx: corral.Context) -> list[Any]:
    a = await ctx.wait_for("a")
    b = await ctx.wait_for("b")
    return [a, b]


async def test_signals_reach_their_waits_by_name_not_by_arrival(
    rt: corral.Runtime, wait_until: Any
) -> None:
    handle = await rt.start(waits_for_a_then_b)
    await wait_until(has_pending_wait(rt, handle.id, "a"), what="the wait for a")

    await rt.signal(handle.id, "b", "second")
    await rt.signal(handle.id, "a", "first")

    assert await handle.result(timeout=5) == ["first", "second"]


@corral.workflow
async def collects_items(ctx: corral.Context) -> list[Any]:
    first = await ctx.wait_for("item")
    await note("between")
    second = await ctx.wait_for("item")
    return [first, second]


async def test_signals_of_one_name_are_received_in_order(runtime: Any) -> None:
    async with runtime(worker=False) as client:
        handle = await client.start(collects_items)
        await client.signal(handle.id, "item", 1)
        await client.signal(handle.id, "item", 2)

    async with runtime() as rt:
        assert await rt.handle(handle.id).result(timeout=5) == [1, 2]


async def test_a_consumed_signal_is_not_received_again_after_a_crash(
    runtime: Any, wait_until: Any
) -> None:
    holding.add("between")
    async with runtime() as rt:
        handle = await rt.start(collects_items)
        await rt.signal(handle.id, "item", "one")
        await wait_until(lambda: calls["between"] == 1, what="the step between the waits")
    holding.clear()

    async with runtime() as rt:
        await rt.signal(handle.id, "item", "two")
        assert await rt.handle(handle.id).result(timeout=5) == ["one", "two"]


async def test_a_large_signal_value_survives_a_crash(runtime: Any, wait_until: Any) -> None:
    document = {"pages": [f"page {i} " + "text " * 100 for i in range(10)]}  # about 5 KB
    holding.add("between")
    async with runtime() as rt:
        handle = await rt.start(collects_items)
        await rt.signal(handle.id, "item", document)
        await wait_until(lambda: calls["between"] == 1, what="the step between the waits")
    holding.clear()

    async with runtime() as rt:
        await rt.signal(handle.id, "item", "small")
        assert await rt.handle(handle.id).result(timeout=5) == [document, "small"]


@corral.workflow
async def waits_with_default(ctx: corral.Context, timeout: float) -> Any:
    return await ctx.wait_for("never", timeout=timeout, default="fallback")


async def test_a_wait_that_times_out_returns_the_default(rt: corral.Runtime) -> None:
    assert await rt.run(waits_with_default, 0.02) == "fallback"


@pytest.mark.embedded_only  # eviction from memory is the embedded engine's own
async def test_a_wait_timeout_longer_than_idle_after_returns_the_default(
    rt: corral.Runtime, wait_until: Any
) -> None:
    handle = await rt.start(waits_with_default, 0.4)
    await wait_until(lambda: _record_if(rt, handle.id, "waiting"), what="the run to be evicted")

    assert await handle.result(timeout=5) == "fallback"


@corral.workflow
async def catches_signal_timeout(ctx: corral.Context) -> dict[str, Any]:
    try:
        await ctx.wait_for("never", timeout=timedelta(milliseconds=20))
    except corral.SignalTimeout as exc:
        return {"signal": exc.signal, "run_id": exc.run_id,
                "is_timeout": isinstance(exc, TimeoutError)}
    return {}


async def test_a_wait_without_default_raises_signal_timeout(rt: corral.Runtime) -> None:
    handle = await rt.start(catches_signal_timeout)

    assert await handle.result(timeout=5) == {
        "signal": "never", "run_id": handle.id, "is_timeout": True}


@corral.workflow
async def lets_signal_timeout_escape(ctx: corral.Context) -> None:
    await ctx.wait_for("never", timeout=0.02)


async def test_an_uncaught_signal_timeout_fails_the_run(rt: corral.Runtime) -> None:
    with pytest.raises(corral.RunFailed) as info:
        await rt.run(lets_signal_timeout_escape)
    assert info.value.error_type == "SignalTimeout"
    assert "never" in info.value.error


class Approval(BaseModel):
    by: str
    amount: int


@corral.workflow
async def waits_for_typed_approval(ctx: corral.Context) -> Approval:
    approval = await ctx.wait_for("approval", type=Approval)
    assert isinstance(approval, Approval)
    return Approval(by=approval.by.upper(), amount=approval.amount * 2)


async def test_a_signal_value_is_validated_into_the_requested_type(rt: corral.Runtime) -> None:
    handle = await rt.start(waits_for_typed_approval)
    await rt.signal(handle.id, "approval", {"by": "ann", "amount": "21"})

    assert await handle.result(timeout=5) == Approval(by="ANN", amount=42)


async def test_a_model_can_be_sent_as_a_signal(rt: corral.Runtime) -> None:
    handle = await rt.start(waits_for_typed_approval)
    await rt.signal(handle.id, "approval", Approval(by="bo", amount=1))

    assert await handle.result(timeout=5) == Approval(by="BO", amount=2)


async def test_a_signal_value_of_the_wrong_type_fails_the_run(rt: corral.Runtime) -> None:
    handle = await rt.start(waits_for_typed_approval)
    await rt.signal(handle.id, "approval", {"by": "ann"})

    with pytest.raises(corral.RunFailed) as info:
        await handle.result(timeout=5)
    assert info.value.error_type == "InvalidInput"
    assert "amount" in info.value.error and "signal 'approval'" in info.value.error
    assert "\n" not in info.value.error  # one line, no pydantic dump


async def test_signalling_a_finished_run_raises_run_finished(rt: corral.Runtime) -> None:
    handle = await rt.start(waits_with_default, 0.0)
    await handle.result(timeout=5)

    with pytest.raises(corral.RunFinished) as info:
        await rt.signal(handle.id, "never", 1)
    assert info.value.status == "completed"


async def test_signalling_an_unknown_run_raises_run_not_found(rt: corral.Runtime) -> None:
    with pytest.raises(corral.RunNotFound):
        await rt.signal("no-such-run", "approval", 1)


async def test_signal_names_starting_with_dollar_are_reserved(rt: corral.Runtime) -> None:
    handle = await rt.start(waits_for_approval)
    with pytest.raises(corral.UsageError):
        await rt.signal(handle.id, "$child:x", 1)
    await rt.cancel(handle.id)


reminders: list[str] = []


@corral.step
async def remind(run_id: str) -> None:
    reminders.append(run_id)


@corral.workflow
async def approval_with_reminder(ctx: corral.Context) -> str:
    async def reminder() -> None:
        await ctx.sleep(0.3)
        await remind(ctx.run_id)

    decision, _ = await asyncio.gather(ctx.wait_for("approve"), reminder())
    return str(decision)


async def test_an_evicted_run_wakes_for_its_timer_while_it_also_waits_for_a_signal(
    rt: corral.Runtime, wait_until: Any
) -> None:
    handle = await rt.start(approval_with_reminder)
    # evicted (idle_after is 0.05 s) while waiting for both: the timer alone must wake it
    await wait_until(lambda: handle.id in reminders, timeout=5, what="the reminder")
    await rt.signal(handle.id, "approve", "yes")
    assert await handle.result(timeout=5) == "yes"


@corral.workflow
async def wants_a_number(ctx: corral.Context) -> int:
    while True:
        try:
            return int(await ctx.wait_for("n", type=int))
        except corral.InvalidInput:
            continue  # ask again


async def test_a_signal_value_of_the_wrong_type_is_a_clear_error_the_workflow_can_catch(
    rt: corral.Runtime,
) -> None:
    handle = await rt.start(wants_a_number)
    await rt.signal(handle.id, "n", "abc")
    await rt.signal(handle.id, "n", 7)
    assert await handle.result(timeout=5) == 7


async def _is(rt: Any, run_id: str, expected: str) -> bool:
    return await status(rt, run_id) == expected
