"""Steps: journaled once, replayed after a crash, retried with backoff, bounded by timeouts."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from typing import Any

import pytest

import corral

FAST = corral.RetryPolicy(max_attempts=3, initial_interval=0.001, jitter=0.0)

calls: Counter[str] = Counter()
holding: set[str] = set()  # steps that park until the runtime closes
keys: list[str] = []
attempt_times: list[float] = []
failures_left: dict[str, int] = {}


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    calls.clear()
    holding.clear()
    keys.clear()
    attempt_times.clear()
    failures_left.clear()


async def _park_if_held(name: str) -> None:
    if name in holding:
        await asyncio.get_running_loop().create_future()  # until cancelled by close()


@corral.step
async def record(name: str, value: int) -> int:
    calls[name] += 1
    await _park_if_held(name)
    return value


@corral.workflow
async def two_steps(ctx: corral.Context, n: int) -> int:
    a = await record("first", n + 1)
    b = await record("second", a * 2)
    return await record("third", b + 1)


async def test_step_results_are_journaled_in_order(rt: corral.Runtime) -> None:
    handle = await rt.start(two_steps, 1)

    assert await handle.result(timeout=5) == 5
    journal = (await rt.journal(handle.id))
    assert [(e.kind, e.name, e.status, e.value) for e in journal] == [
        ("step", "record", "ok", "2"),
        ("step", "record", "ok", "4"),
        ("step", "record", "ok", "5"),
    ]
    assert all(e.attempts == 1 for e in journal)
    assert (await rt.get(handle.id)).status == "completed"


async def test_completed_steps_are_not_executed_again_after_a_crash(
    runtime: Any, wait_until: Any, engine: str
) -> None:
    holding.add("second")
    async with runtime() as rt:
        handle = await rt.start(two_steps, 1)
        await wait_until(lambda: calls["second"] == 1, what="the second step to start")
    holding.clear()

    async with runtime(worker=False) as client:  # closing handed the run back to the store
        record = await client.get(handle.id)
        # (on Temporal a run is running until it ends, whichever workers come and go)
        assert (record.status, record.owner) == (
            ("queued", None) if engine == "embedded" else ("running", None))
        if engine == "embedded":  # (Temporal reads journals through a worker)
            assert [e.value for e in (await client.journal(handle.id))] == ["2"]

    async with runtime() as rt:
        assert await rt.handle(handle.id).result(timeout=5) == 5
        record = await rt.get(handle.id)

    assert calls == Counter(first=1, second=2, third=1)
    assert record.status == "completed"
    if engine == "embedded":
        assert record.attempts == 2  # claimed once by each runtime


@corral.step(retry=corral.RetryPolicy(max_attempts=4, initial_interval=0.01, backoff=2.0,
                                      jitter=0.0))
async def flaky(name: str, idempotency_key: str) -> str:
    calls[name] += 1
    keys.append(idempotency_key)
    attempt_times.append(time.monotonic())
    if failures_left.get(name, 0) > 0:
        failures_left[name] -= 1
        raise ConnectionError(f"{name}: upstream unavailable")
    return f"{name} done"


@corral.workflow
async def calls_flaky(ctx: corral.Context, names: list[str]) -> list[str]:
    return [await flaky(name) for name in names]


async def test_a_failing_step_is_retried_with_backoff_and_one_idempotency_key(
    rt: corral.Runtime,
) -> None:
    failures_left["charge"] = 3
    handle = await rt.start(calls_flaky, ["charge"])

    assert await handle.result(timeout=5) == ["charge done"]
    assert calls["charge"] == 4
    assert keys == [f"{handle.id}/0"] * 4
    gaps = [b - a for a, b in itertools.pairwise(attempt_times)]
    for gap, wanted in zip(gaps, [0.01, 0.02, 0.04], strict=True):
        assert gap >= wanted * 0.9
    [entry] = (await rt.journal(handle.id))
    assert (entry.status, entry.attempts) == ("ok", 4)


async def test_each_step_of_a_run_has_its_own_idempotency_key(rt: corral.Runtime) -> None:
    handle = await rt.start(calls_flaky, ["a", "b", "a"])

    assert await handle.result(timeout=5) == ["a done", "b done", "a done"]
    assert len(set(keys)) == 3
    assert all(key.startswith(f"{handle.id}/") for key in keys)


@corral.step(retry=FAST)
async def always_fails(name: str) -> str:
    calls[name] += 1
    raise ValueError(f"{name} is broken")


@corral.workflow
async def catches_step_failure(ctx: corral.Context) -> dict[str, Any]:
    try:
        await always_fails("x")
    except corral.StepFailed as exc:
        return {"step": exc.step, "type": exc.error_type, "error": exc.error,
                "attempts": exc.attempts, "message": str(exc)}
    raise AssertionError("unreachable")


async def test_exhausted_retries_raise_step_failed_in_the_workflow(rt: corral.Runtime) -> None:
    out = await rt.run(catches_step_failure)

    assert calls["x"] == 3
    assert out["step"] == "always_fails"
    assert (out["type"], out["error"], out["attempts"]) == ("ValueError", "x is broken", 3)
    assert "always_fails" in out["message"] and "3 attempts" in out["message"]


@corral.workflow
async def lets_step_failure_escape(ctx: corral.Context) -> None:
    await always_fails("y")


async def test_an_uncaught_step_failure_fails_the_run(rt: corral.Runtime) -> None:
    handle = await rt.start(lets_step_failure_escape)

    with pytest.raises(corral.RunFailed) as info:
        await handle.result(timeout=5)
    assert info.value.run_id == handle.id
    assert info.value.error_type == "StepFailed"
    assert "y is broken" in info.value.error
    assert (await rt.get(handle.id)).status == "failed"


class PaymentDeclined(Exception):
    pass


@corral.step(retries=5, non_retryable=(PaymentDeclined,))
async def charge(kind: str) -> str:
    calls[kind] += 1
    if kind == "declined":
        raise PaymentDeclined("card declined")
    if kind == "nonretryable":
        raise corral.NonRetryable("account closed")
    return "charged"


@corral.workflow
async def pays(ctx: corral.Context, kind: str) -> dict[str, Any]:
    try:
        return {"ok": await charge(kind)}
    except corral.StepFailed as exc:
        return {"type": exc.error_type, "attempts": exc.attempts}


@pytest.mark.parametrize(
    ("kind", "error_type"), [("declined", "PaymentDeclined"), ("nonretryable", "NonRetryable")]
)
async def test_non_retryable_errors_fail_the_step_at_once(
    rt: corral.Runtime, kind: str, error_type: str
) -> None:
    assert await rt.run(pays, kind) == {"type": error_type, "attempts": 1}
    assert calls[kind] == 1


@corral.step(retry=corral.RetryPolicy(max_attempts=5, initial_interval=0.001),
             non_retryable=(PaymentDeclined,))
async def charge_with_policy() -> str:
    calls["charge_with_policy"] += 1
    raise PaymentDeclined("card declined")


@corral.workflow
async def pays_with_policy(ctx: corral.Context) -> int:
    try:
        await charge_with_policy()
    except corral.StepFailed as exc:
        return int(exc.attempts)
    return 0


async def test_non_retryable_is_honoured_next_to_a_custom_retry_policy(
    rt: corral.Runtime,
) -> None:
    assert await rt.run(pays_with_policy) == 1
    assert calls["charge_with_policy"] == 1


@corral.step(timeout=0.05, retry=corral.RetryPolicy(max_attempts=2, initial_interval=0.001))
async def hangs() -> str:
    calls["hangs"] += 1
    await asyncio.sleep(30)
    return "never"


@corral.workflow
async def times_out(ctx: corral.Context) -> dict[str, Any]:
    try:
        await hangs()
    except corral.StepFailed as exc:
        return {"type": exc.error_type, "attempts": exc.attempts, "error": exc.error}
    return {}


async def test_each_attempt_is_bounded_by_the_step_timeout(rt: corral.Runtime) -> None:
    out = await rt.run(times_out)

    assert out == {"type": "TimeoutError", "attempts": 2, "error": "timed out after 0.05s"}
    assert calls["hangs"] == 2


@corral.step(retry=FAST)
async def keyed(name: str, idempotency_key: str) -> str:
    calls[name] += 1
    keys.append(idempotency_key)
    await _park_if_held(name)
    return idempotency_key


@corral.workflow
async def uses_keys(ctx: corral.Context) -> list[str]:
    first = await keyed("one")
    second = await keyed("two")
    return [first, second]


async def test_the_idempotency_key_is_the_same_after_a_crash(
    runtime: Any, wait_until: Any
) -> None:
    holding.add("two")
    async with runtime() as rt:
        handle = await rt.start(uses_keys)
        await wait_until(lambda: calls["two"] == 1, what="step two to start")
    holding.clear()

    async with runtime() as rt:
        result = await rt.handle(handle.id).result(timeout=5)

    first, second = result
    assert keys == [first, second, second]  # step two ran twice, with one key
    assert first != second
    assert calls == Counter(one=1, two=2)


@corral.workflow
async def fails_then_waits(ctx: corral.Context) -> str:
    try:
        await always_fails("once")
    except corral.StepFailed as exc:
        outcome = f"{exc.error_type} after {exc.attempts}"
    await record("after", 0)
    return outcome


async def test_a_failed_step_is_replayed_as_the_same_failure(
    runtime: Any, wait_until: Any
) -> None:
    holding.add("after")
    async with runtime() as rt:
        handle = await rt.start(fails_then_waits)
        await wait_until(lambda: calls["after"] == 1, what="the step after the failure")
    holding.clear()

    async with runtime() as rt:
        assert await rt.handle(handle.id).result(timeout=5) == "ValueError after 3"

    assert calls["once"] == 3  # not attempted again on replay


@corral.step(retries=0)
def blocking_io(n: int) -> int:
    calls["blocking_io"] += 1
    time.sleep(0.001)  # a plain function runs in a thread, off the event loop
    return n * 3


@corral.workflow
async def uses_sync_step(ctx: corral.Context, n: int) -> int:
    return await blocking_io(n)


async def test_a_plain_function_can_be_a_step(rt: corral.Runtime) -> None:
    handle = await rt.start(uses_sync_step, 4)

    assert await handle.result(timeout=5) == 12
    [entry] = (await rt.journal(handle.id))
    assert (entry.kind, entry.name, entry.value) == ("step", "blocking_io", "12")


@corral.step(retries=0)
async def returns_object() -> Any:
    return object()


@corral.workflow
async def stores_object(ctx: corral.Context) -> str:
    try:
        await returns_object()
    except corral.StepFailed as exc:
        return str(exc.error_type)
    return "stored"


async def test_a_step_result_that_is_not_json_fails_the_step(rt: corral.Runtime) -> None:
    assert await rt.run(stores_object) == "SerializationError"


async def test_a_step_called_outside_a_workflow_is_a_plain_call_with_retries() -> None:
    failures_left["plain"] = 2

    assert await flaky("plain", idempotency_key="order-7") == "plain done"
    assert calls["plain"] == 3
    assert keys == ["order-7"] * 3  # outside a run the caller passes the key


async def test_a_step_called_outside_a_workflow_raises_step_failed() -> None:
    with pytest.raises(corral.StepFailed) as info:
        await always_fails("plain")
    assert (info.value.error_type, info.value.attempts) == ("ValueError", 3)
