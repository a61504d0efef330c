"""Replay after a crash: parallel branches, recorded time and randomness, changed code, big values.

A crash is simulated by closing the runtime while a step is in progress and opening another on
the same database, which executes the workflow again with recorded results.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import Counter
from contextlib import closing
from datetime import datetime
from typing import Any

import pytest
from _journal import journal_is
from pydantic import BaseModel

import corral

calls: Counter[str] = Counter()
holding: set[str] = set()  # step labels that park until the runtime closes
seen: list[Any] = []  # what workflow code observed, execution after execution
switch = {"new_code": False}


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    calls.clear()
    holding.clear()
    seen.clear()
    switch["new_code"] = False


async def _park_if_held(label: str) -> None:
    if label in holding:
        await asyncio.get_running_loop().create_future()  # until cancelled by close()


@corral.step
async def square(i: int, delay: float = 0.0) -> int:
    calls[f"square {i}"] += 1
    await asyncio.sleep(delay)
    await _park_if_held(f"square {i}")
    return i * i


@corral.step
async def increment(i: int) -> int:
    calls[f"increment {i}"] += 1
    await _park_if_held(f"increment {i}")
    return i + 1


@corral.workflow
async def fan_out_steps(ctx: corral.Context, n: int) -> list[int]:
    # Later steps finish first: keys must not depend on completion order.
    return list(await asyncio.gather(*(square(i, (n - i) * 0.005) for i in range(n))))


async def test_gathered_steps_replay_without_running_finished_ones_again(
    runtime: Any, wait_until: Any
) -> None:
    holding.add("square 0")
    async with runtime() as rt:
        handle = await rt.start(fan_out_steps, 4)
        await wait_until(
            journal_is(rt, handle.id, lambda j: sum(e.status == "ok" for e in j) == 3),
            what="three of four parallel steps to finish",
        )
    holding.clear()

    async with runtime() as rt:
        assert await rt.handle(handle.id).result(timeout=5) == [0, 1, 4, 9]
        journal = await rt.journal(handle.id)

    assert calls == Counter({"square 0": 2, "square 1": 1, "square 2": 1, "square 3": 1})
    assert sorted(e.value for e in journal) == ["0", "1", "4", "9"]


async def branch(i: int) -> int:
    a = await square(i, (3 - i) * 0.005)
    return await increment(a)


@corral.workflow
async def fan_out_branches(ctx: corral.Context) -> list[int]:
    return list(await asyncio.gather(*(branch(i) for i in range(3))))


async def test_gathered_branches_of_several_steps_replay_correctly(
    runtime: Any, wait_until: Any
) -> None:
    holding.add("increment 4")  # branch 2's second step
    async with runtime() as rt:
        handle = await rt.start(fan_out_branches)
        await wait_until(journal_is(rt, handle.id, lambda j: calls["increment 4"] == 1 and len(
            [e for e in j if e.status == "ok"]) == 5),
            what="five of six steps to finish")
    holding.clear()

    async with runtime() as rt:
        assert await rt.handle(handle.id).result(timeout=5) == [1, 2, 5]

    assert calls == Counter({
        "square 0": 1, "square 1": 1, "square 2": 1,
        "increment 0": 1, "increment 1": 1, "increment 4": 2,
    })


@corral.workflow
async def task_group_branches(ctx: corral.Context) -> list[int]:
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(branch(i)) for i in range(3)]
    return [task.result() for task in tasks]


async def test_task_group_branches_replay_correctly(runtime: Any, wait_until: Any) -> None:
    holding.add("increment 1")  # branch 1's second step
    async with runtime() as rt:
        handle = await rt.start(task_group_branches)
        await wait_until(journal_is(rt, handle.id, lambda j: calls["increment 1"] == 1 and len(
            [e for e in j if e.status == "ok"]) == 5),
            what="five of six steps to finish")
    holding.clear()

    async with runtime() as rt:
        assert await rt.handle(handle.id).result(timeout=5) == [1, 2, 5]

    assert calls["increment 1"] == 2
    assert sum(calls.values()) == 7


@corral.workflow
async def reads_clock_and_dice(ctx: corral.Context) -> dict[str, Any]:
    observed = {
        "now": ctx.now().isoformat(),
        "random": ctx.random().random(),
        "randint": ctx.random().randint(0, 10**9),
        "uuid": str(ctx.uuid4()),
    }
    seen.append(dict(observed))
    await increment(0)
    observed["later"] = ctx.now().isoformat()
    return observed


async def test_now_random_and_uuid4_are_the_same_on_replay(
    runtime: Any, wait_until: Any
) -> None:
    holding.add("increment 0")
    async with runtime() as rt:
        handle = await rt.start(reads_clock_and_dice)
        await wait_until(lambda: calls["increment 0"] == 1, what="the step to start")
    holding.clear()

    async with runtime() as rt:
        out = await rt.handle(handle.id).result(timeout=5)

    first, replayed = seen
    assert replayed == first
    assert {k: out[k] for k in first} == first
    assert datetime.fromisoformat(out["later"]) >= datetime.fromisoformat(first["now"])
    assert datetime.fromisoformat(first["now"]).tzinfo is not None


async def test_two_runs_draw_different_random_values(rt: corral.Runtime) -> None:
    one = await rt.run(reads_clock_and_dice)
    two = await rt.run(reads_clock_and_dice)

    assert one["uuid"] != two["uuid"]
    assert one["random"] != two["random"]


@corral.step
async def send_invoice() -> str:
    calls["send_invoice"] += 1
    return "invoice sent"


@corral.step
async def charge_card() -> str:
    calls["charge_card"] += 1
    return "card charged"


@corral.workflow
async def bills(ctx: corral.Context) -> str:
    first = await (charge_card() if switch["new_code"] else send_invoice())
    await increment(1)
    return first


async def test_changed_workflow_code_fails_the_run_with_non_determinism_error(
    runtime: Any, wait_until: Any, engine: str
) -> None:
    holding.add("increment 1")
    async with runtime() as rt:
        handle = await rt.start(bills)
        await wait_until(lambda: calls["increment 1"] == 1, what="the second step to start")
    holding.clear()
    switch["new_code"] = True  # a deploy changed the code while the run was in flight

    async with runtime() as rt:
        with pytest.raises(corral.RunFailed) as info:
            await rt.handle(handle.id).result(timeout=5)
        record = await rt.get(handle.id)

    assert info.value.error_type == "NonDeterminismError"
    assert "send_invoice" in info.value.error and "charge_card" in info.value.error
    assert record.status == "failed"
    # nothing ran on replay (Temporal retries a step that was in flight at the crash on its
    # own, whatever the workflow code has become: that is an activity retry, not a replay)
    in_flight = 1 if engine == "embedded" else 2
    assert calls == Counter(send_invoice=1, **{"increment 1": in_flight})


@corral.workflow
async def hides_non_determinism(ctx: corral.Context) -> str:
    # Swallowing the error must not let the run go on with a journal that does not match.
    with contextlib.suppress(corral.NonDeterminismError):
        await (charge_card() if switch["new_code"] else send_invoice())
    await increment(2)
    return "done"


async def test_non_determinism_error_cannot_be_swallowed_by_the_workflow(
    runtime: Any, wait_until: Any, engine: str
) -> None:
    holding.add("increment 2")
    async with runtime() as rt:
        handle = await rt.start(hides_non_determinism)
        await wait_until(lambda: calls["increment 2"] == 1, what="the second step to start")
    holding.clear()
    switch["new_code"] = True

    async with runtime() as rt:
        with pytest.raises(corral.RunFailed) as info:
            await rt.handle(handle.id).result(timeout=5)

    assert info.value.error_type == "NonDeterminismError"
    assert calls["increment 2"] == (1 if engine == "embedded" else 2)  # (see above)


class Answer(BaseModel):
    text: str
    tokens: int


@corral.step
async def ask_model(prompt: str):  # type: ignore[no-untyped-def]  # no return annotation
    calls["ask_model"] += 1
    return Answer(text=prompt.upper(), tokens=len(prompt))


@corral.workflow
async def uses_an_unannotated_step(ctx: corral.Context) -> str:
    answer = await ask_model("hello")
    seen.append(type(answer).__name__)
    await increment(3)
    return f"{answer['text']} ({answer['tokens']} tokens)"


async def test_a_step_value_has_the_same_type_on_replay_as_on_first_execution(
    runtime: Any, wait_until: Any
) -> None:
    """Without a return annotation a step gives back JSON data, on first execution as on
    replay: code that works before a crash works after it."""
    holding.add("increment 3")
    async with runtime() as rt:
        handle = await rt.start(uses_an_unannotated_step)
        await wait_until(lambda: calls["increment 3"] == 1, what="the second step to start")
    holding.clear()

    async with runtime() as rt:
        assert await rt.handle(handle.id).result(timeout=5) == "HELLO (5 tokens)"

    assert seen == ["dict", "dict"]
    assert calls["ask_model"] == 1


MESSAGE = "é" + "x" * 1022  # 1 KB, not only ASCII


@corral.step
async def append_message(history: list[str], i: int) -> list[str]:
    calls["append_message"] += 1
    await _park_if_held(f"append {i}")
    return [*history, f"{i:04d}{MESSAGE}"]


@corral.workflow
async def grows_a_conversation(ctx: corral.Context, steps: int) -> list[str]:
    history: list[str] = []
    for i in range(steps):
        history = await append_message(history, i)
    return history


def _stored_bytes(path: str, run_id: str) -> int:
    with closing(sqlite3.connect(path)) as db, db:
        journal = db.execute(
            "SELECT COALESCE(SUM(LENGTH(value)), 0) FROM journal WHERE run_id = ?", (run_id,)
        ).fetchone()[0]
        blobs = db.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM blobs").fetchone()[0]
    db.close()
    return int(journal) + int(blobs)


@pytest.mark.embedded_only  # the embedded store's layout
async def test_a_growing_value_passed_step_to_step_is_stored_about_once(
    runtime: Any, wait_until: Any, db: str
) -> None:
    steps = 50
    holding.add("append 30")
    async with runtime() as rt:
        handle = await rt.start(grows_a_conversation, steps)
        await wait_until(lambda: calls["append_message"] == 31, what="step 30 to start")
    holding.clear()

    async with runtime() as rt:
        history = await rt.handle(handle.id).result(timeout=5)

    assert history == [f"{i:04d}{MESSAGE}" for i in range(steps)]
    assert calls["append_message"] == steps + 1  # only the interrupted step ran twice
    message = len(f"0000{MESSAGE}".encode())
    quadratic = message * steps * (steps + 1) // 2  # every step storing the whole list
    stored = _stored_bytes(db, handle.id)
    assert stored < quadratic / 5
    assert stored < 4 * message * steps
