"""The workflow's view of its run: durable time, randomness, timers, signals and child runs.

Every operation takes a key from its task's scope: the Nth operation of a task, under the key of
the operation that created the task. Tasks created by ``asyncio.gather`` or a ``TaskGroup`` get
their scope from a task factory, in creation order, so keys do not depend on the order in which
parallel branches happen to finish, and replay finds each result where it was recorded.
"""

from __future__ import annotations

import asyncio
import contextvars
import random as _random
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from .._errors import (
    InvalidInput,
    NonDeterminismError,
    RunCancelled,
    RunFailed,
    SignalTimeout,
    UsageError,
)
from .._serde import adapter, loads
from ._definitions import Step, Workflow, _first_error, current_scope

O = TypeVar("O")  # noqa: E741

MISSING: Any = object()


class _RunState(Protocol):
    """What an engine keeps for a run live in it: the embedded `_Run`, or the Temporal one."""

    id: str
    ctx: Context
    activity: int
    cancel_requested: bool
    extras: dict[str, Any]

    @property
    def workflow_name(self) -> str: ...
    @property
    def parent_id(self) -> str | None: ...
    async def step(self, step: Step[Any, Any], scope: _Scope, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any: ...
    def now(self, scope: _Scope) -> datetime: ...
    async def sleep(self, scope: _Scope, seconds: float) -> None: ...
    async def wait_for(self, scope: _Scope, name: str, timeout: float | None, default: Any,
                       tp: Any) -> Any: ...
    async def run_child(self, scope: _Scope, wf: Workflow[Any, Any], value: Any,
                        child_id: str | None, queue: str | None, priority: int | None
                        ) -> Any: ...


class _Scope:
    __slots__ = ("n", "prefix", "run")

    def __init__(self, run: _RunState, prefix: str) -> None:
        self.run = run
        self.prefix = prefix
        self.n = 0

    def next(self) -> str:
        key = f"{self.prefix}{self.n}"
        self.n += 1
        return key


def child_context() -> contextvars.Context | None:
    """The context of a task created now: in workflow code, a scope of its own."""
    scope = current_scope.get()
    if scope is None:
        return None
    context = contextvars.copy_context()
    context.run(current_scope.set, _Scope(scope.run, scope.next() + "/"))
    scope.run.activity += 1
    return context


def task_factory(
    loop: asyncio.AbstractEventLoop, coro: Any, *, context: contextvars.Context | None = None
) -> asyncio.Task[Any]:
    """Give each task created inside a workflow its own deterministic scope."""
    if context is None:
        context = child_context()
    if context is None:
        return asyncio.Task(coro, loop=loop)
    return asyncio.Task(coro, loop=loop, context=context)


def check_trace_id(trace_id: str | None) -> None:
    if trace_id is not None and (len(trace_id) != 32 or trace_id.strip("0123456789abcdef")
                                 or not trace_id.strip("0")):
        raise UsageError(f"trace_id must be 32 lowercase hex digits, not all zero (a W3C "
                         f"trace id), not {trace_id!r}")


def start_time(run_at: datetime | float | None, delay: float | timedelta | None) -> float:
    """When a run submitted now with ``run_at`` and/or ``delay`` may start (epoch seconds)."""
    when = time.time()
    if isinstance(run_at, datetime):
        if run_at.tzinfo is None:
            raise UsageError("run_at must be timezone-aware, e.g. datetime.now(UTC)")
        when = run_at.timestamp()
    elif run_at is not None:
        when = float(run_at)
    if delay is not None:
        when += delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    return when


def _seconds(duration: float | timedelta) -> float:
    seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
    if seconds < 0:
        raise UsageError(f"a duration must not be negative, got {seconds:g}s")
    return seconds


class Context:
    """Passed to every workflow as its first argument."""

    __slots__ = ("_rng", "_run")

    def __init__(self, run: _RunState) -> None:
        self._run = run
        self._rng: _random.Random | None = None

    def _scope(self, what: str) -> _Scope:
        scope = current_scope.get()
        if scope is None or scope.run is not self._run:
            raise UsageError(
                f"ctx.{what} can only be used in the workflow's own code, not inside a step "
                "or another run; move the call into the workflow function"
            )
        return scope

    @property
    def run_id(self) -> str:
        return self._run.id

    @property
    def workflow(self) -> str:
        return self._run.workflow_name

    @property
    def parent_id(self) -> str | None:
        return self._run.parent_id

    @property
    def cancel_requested(self) -> bool:
        return self._run.cancel_requested

    def now(self) -> datetime:
        """The current time, recorded on first execution and the same on every replay."""
        return self._run.now(self._scope("now()"))

    def random(self) -> _random.Random:
        """A random generator seeded by the run id: the same sequence on every replay."""
        self._scope("random()")
        return self._seeded()

    def _seeded(self) -> _random.Random:
        if self._rng is None:
            self._rng = _random.Random(self._run.id)
        return self._rng

    def uuid4(self) -> uuid.UUID:
        """A random UUID that is the same on every replay."""
        self._scope("uuid4()")
        return uuid.UUID(int=self._seeded().getrandbits(128), version=4)

    async def sleep(self, duration: float | timedelta) -> None:
        """A durable timer: survives crashes and restarts, and costs no memory while long."""
        await self._run.sleep(self._scope("sleep()"), _seconds(duration))

    async def wait_for(
        self,
        name: str,
        *,
        timeout: float | timedelta | None = None,
        default: Any = MISSING,
        type: Any = Any,
    ) -> Any:
        """Wait for the signal ``name`` and return its value (validated as ``type``).

        Signals sent before the wait are buffered. On timeout return ``default`` if given,
        otherwise raise `corral.SignalTimeout`.
        """
        seconds = None if timeout is None else _seconds(timeout)
        return await self._run.wait_for(self._scope("wait_for()"), name, seconds, default, type)

    async def run_child(
        self,
        workflow: Workflow[Any, O],
        input: Any = None,
        *,
        id: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
    ) -> O:
        """Run another workflow as a child run and return its output.

        The child is a run of its own (its own journal, visible in ``corral runs``), started
        exactly once; cancelling the parent cancels it. A failed child raises `RunFailed`.
        """
        scope = self._scope("run_child()")
        value = workflow.validate_input(input)
        result: O = await self._run.run_child(scope, workflow, value, id, queue, priority)
        return result


REPLAY_RULE = ("workflow code must make the same calls in the same order on replay (use steps "
               "and ctx.now()/ctx.random() for anything that varies)")


def non_determinism(run_id: str, key: str, recorded: tuple[str, str], called: tuple[str, str]
                    ) -> NonDeterminismError:
    """Replay met another call than the journal recorded at ``key``: (kind, name) of each."""
    return NonDeterminismError(
        f"run {run_id!r} is not deterministic: at operation {key} its journal recorded "
        f"{recorded[0]} {recorded[1]!r} but the workflow now calls {called[0]} {called[1]!r}; "
        f"{REPLAY_RULE}; the run fails, its journal is kept for `corral runs show`",
        run_id=run_id, key=key,
    )


def signal_value(run_id: str, name: str, record: dict[str, Any], timeout: float | None,
                 default: Any, tp: Any) -> Any:
    """What ``wait_for`` returns for a journaled outcome ``{"value": ...}`` or a timeout."""
    if record.get("timeout"):
        if default is not MISSING:
            return default
        raise SignalTimeout(
            f"run {run_id!r}: no signal {name!r} within {timeout or 0:g}s; pass default= to "
            "carry on without one, or catch corral.SignalTimeout", run_id=run_id, signal=name,
        )
    if tp is Any:
        return record["value"]
    try:
        return adapter(tp).validate_python(record["value"])
    except ValueError as exc:
        raise InvalidInput(
            f"run {run_id!r}: the value of signal {name!r} ({record['value']!r:.60}) is "
            f"not a {getattr(tp, '__name__', tp)}: {_first_error(exc)}; catch "
            "corral.InvalidInput to ask again, or send a valid value",
            run_id=run_id, signal=name,
        ) from None


def child_value(wf: Workflow[Any, Any], record: dict[str, Any]) -> Any:
    """What ``run_child`` returns for a child's outcome ``{"id", "status", "result", "error"}``."""
    if record["status"] == "completed":
        result = record["result"]
        return result if wf.output_type is Any else adapter(wf.output_type).validate_python(
            result
        )
    child = record["id"]
    if record["status"] == "cancelled":
        raise RunCancelled(f"child run {child!r} was cancelled", run_id=child)
    error = record["error"] or {}
    raise RunFailed(
        f"child run {child!r} failed: {error.get('type')}: {error.get('message')}",
        run_id=child, error_type=error.get("type"), error=error.get("message"),
    )


def run_result(run_id: str, status: str, result: str | None, error: dict[str, Any],
               output_type: Any) -> Any:
    """What a handle's ``result()`` returns for a finished run, or raises."""
    if status == "completed":
        return loads(result, output_type)
    if status == "cancelled":
        raise RunCancelled(f"run {run_id!r} was cancelled", run_id=run_id)
    raise RunFailed(
        f"run {run_id!r} failed: {error.get('type')}: {error.get('message')}",
        run_id=run_id, error_type=error.get("type"), error=error.get("message"),
    )


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


async def note_override(run_id: str, what: str, value: Any = None,
                        run: Callable[[], Awaitable[Any]] | None = None) -> None:
    """A human's signal or cancel, for the decision log (when governance records them).
    ``run`` reads the run's record (its tenant and trace), only when a record is made."""
    from ..governance._chain import overridden

    await overridden(run_id, what, value, run)
