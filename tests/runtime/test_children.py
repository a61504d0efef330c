"""Child runs: runs of their own, started once, whose outcome returns to the parent."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from _journal import journal_is

import corral

calls: Counter[str] = Counter()
holding: set[str] = set()


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    calls.clear()
    holding.clear()


@corral.step
async def work(label: str, value: int) -> int:
    calls[label] += 1
    if label in holding:
        await asyncio.get_running_loop().create_future()  # until cancelled by close()
    return value


@corral.workflow
async def times_ten(ctx: corral.Context, n: int) -> int:
    calls[f"child body {n}"] += 1
    return await work(f"child {n}", n * 10)


@corral.workflow
async def adds_children(ctx: corral.Context, ns: list[int]) -> int:
    total = 0
    for n in ns:
        total += await ctx.run_child(times_ten, n)
    return total


async def children_of(rt: corral.Runtime, parent_id: str) -> list[Any]:
    return [r for r in await rt.list_runs(limit=1000) if r.parent_id == parent_id]


async def test_a_child_result_is_returned_to_the_parent(rt: corral.Runtime) -> None:
    handle = await rt.start(adds_children, [1, 2])

    assert await handle.result(timeout=5) == 30
    children = (await children_of(rt, handle.id))
    assert len(children) == 2
    assert {c.workflow for c in children} == {"times_ten"}
    assert {c.status for c in children} == {"completed"}
    assert sorted(c.result for c in children) == ["10", "20"]


@corral.workflow
async def names_its_child(ctx: corral.Context) -> dict[str, Any]:
    value = await ctx.run_child(times_ten, 7, id=f"{ctx.run_id}-child")
    return {"value": value, "parent": ctx.parent_id}


async def test_a_child_with_an_id_is_a_run_with_a_parent(rt: corral.Runtime) -> None:
    handle = await rt.start(names_its_child, id="order-1")

    assert await handle.result(timeout=5) == {"value": 70, "parent": None}
    child = await rt.get("order-1-child")
    assert (child.parent_id, child.workflow, child.status) == ("order-1", "times_ten",
                                                               "completed")
    assert await rt.handle("order-1-child").result(timeout=5) == 70


@corral.workflow
async def reports_parent(ctx: corral.Context) -> str | None:
    return ctx.parent_id


@corral.workflow
async def asks_child_for_parent(ctx: corral.Context) -> str | None:
    return await ctx.run_child(reports_parent)


async def test_a_child_sees_its_parent_id(rt: corral.Runtime) -> None:
    handle = await rt.start(asks_child_for_parent)

    assert await handle.result(timeout=5) == handle.id


@corral.workflow
async def breaks(ctx: corral.Context, message: str) -> None:
    raise ValueError(message)


@corral.workflow
async def survives_child_failure(ctx: corral.Context) -> dict[str, Any]:
    try:
        await ctx.run_child(breaks, "out of stock", id="failing-child")
    except corral.RunFailed as exc:
        return {"run_id": exc.run_id, "type": exc.error_type, "error": exc.error}
    return {}


async def test_a_child_failure_raises_run_failed_in_the_parent(rt: corral.Runtime) -> None:
    out = await rt.run(survives_child_failure)

    assert out == {"run_id": "failing-child", "type": "ValueError", "error": "out of stock"}
    assert (await rt.get("failing-child")).status == "failed"


@corral.workflow
async def lets_child_failure_escape(ctx: corral.Context) -> None:
    await ctx.run_child(breaks, "boom")


async def test_an_uncaught_child_failure_fails_the_parent(rt: corral.Runtime) -> None:
    handle = await rt.start(lets_child_failure_escape)

    with pytest.raises(corral.RunFailed) as info:
        await handle.result(timeout=5)
    assert info.value.error_type == "RunFailed"
    assert "boom" in info.value.error


@corral.workflow
async def slow_child(ctx: corral.Context, seconds: float) -> str:
    await ctx.sleep(seconds)
    return "slept"


@corral.workflow
async def waits_for_slow_child(ctx: corral.Context) -> str:
    await work("parent before", 0)
    return await ctx.run_child(slow_child, 0.4)


@pytest.mark.embedded_only  # eviction from memory is the embedded engine's own
async def test_a_parent_evicted_while_its_child_runs_wakes_when_the_child_ends(
    rt: corral.Runtime, wait_until: Any
) -> None:
    handle = await rt.start(waits_for_slow_child)

    async def both_waiting() -> bool:
        children = (await children_of(rt, handle.id))
        return (await rt.get(handle.id)).status == "waiting" and bool(children) and all(
            c.status == "waiting" for c in children)

    await wait_until(both_waiting, what="parent and child to wait in the store")

    assert await handle.result(timeout=5) == "slept"
    assert calls["parent before"] == 1


@corral.workflow
async def parent_of_held_child(ctx: corral.Context) -> int:
    return await ctx.run_child(times_ten, 5) + await work("parent after", 1)


async def test_a_child_is_started_once_across_a_crash(runtime: Any, wait_until: Any) -> None:
    holding.add("child 5")
    async with runtime() as rt:
        handle = await rt.start(parent_of_held_child)
        await wait_until(lambda: calls["child 5"] == 1, what="the child's step to start")
    holding.clear()

    async with runtime() as rt:
        assert await rt.handle(handle.id).result(timeout=5) == 51
        children = (await children_of(rt, handle.id))

    assert len(children) == 1
    assert calls == Counter({"child body 5": 2, "child 5": 2, "parent after": 1})


@corral.workflow
async def waits_forever(ctx: corral.Context) -> None:
    await ctx.wait_for("never")


@corral.workflow
async def survives_child_cancel(ctx: corral.Context) -> str:
    try:
        await ctx.run_child(waits_forever, id="cancelled-child")
    except corral.RunCancelled as exc:
        return f"child {exc.run_id} cancelled"
    return "child completed"


async def test_a_cancelled_child_raises_run_cancelled_in_the_parent(
    rt: corral.Runtime, wait_until: Any
) -> None:
    handle = await rt.start(survives_child_cancel)
    await wait_until(journal_is(rt, "cancelled-child", lambda j: any(e.kind == "wait" for e in j)),
                     what="the child to wait")

    await rt.cancel("cancelled-child")

    assert await handle.result(timeout=5) == "child cancelled-child cancelled"
    assert (await rt.get("cancelled-child")).status == "cancelled"


@corral.workflow
async def gathers_children(ctx: corral.Context) -> list[int]:
    return list(await asyncio.gather(*(ctx.run_child(times_ten, n) for n in range(3))))


async def test_children_started_in_parallel_each_return(rt: corral.Runtime) -> None:
    handle = await rt.start(gathers_children)

    assert await handle.result(timeout=5) == [0, 10, 20]
    assert len(await children_of(rt, handle.id)) == 3


@corral.workflow
async def passes_bad_input(ctx: corral.Context) -> int:
    return await ctx.run_child(times_ten, "not a number")


async def test_child_input_is_validated_in_the_parent(rt: corral.Runtime) -> None:
    with pytest.raises(corral.RunFailed) as info:
        await rt.run(passes_bad_input)

    assert info.value.error_type == "InvalidInput"
    assert await rt.list_runs(workflow="times_ten") == []


@corral.workflow
async def adopts_a_stranger(ctx: corral.Context, stranger: str) -> str:
    return str(await ctx.run_child(times_ten, 1, id=stranger))


async def test_a_child_id_taken_by_another_run_is_a_conflict_not_a_hang(
    rt: corral.Runtime,
) -> None:
    other = await rt.start(times_ten, 2, id="someone-else")
    await other.result(timeout=5)
    parent = await rt.start(adopts_a_stranger, "someone-else")
    with pytest.raises(corral.RunFailed, match="is taken by a run that is not a child"):
        await parent.result(timeout=5)
