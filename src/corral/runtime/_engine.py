"""The embedded engine: claims due runs, executes them in this process, journals every result.

A run's workflow function executes as an asyncio task. Each durable operation (step, timer,
signal wait, child run, clock read) has a key (see `_context`); its outcome is appended to the
journal, and after a crash the function is executed again with recorded outcomes returned
instead of re-executed. Writes from all runs are group-committed by one writer (`_Writer`) on a
single store thread, so thousands of concurrent runs share each fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import functools
import gc
import json
import logging
import os
import random
import socket
import time
import traceback
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from hashlib import blake2b
from pathlib import Path
from typing import Any, Generic, TypeVar

from .._errors import (
    CorralError,
    NonDeterminismError,
    RunConflict,
    StepFailed,
    StoreError,
    UsageError,
)
from .._serde import PydanticSerializationError, dumps, loads
from ..observability._runs import STEPS
from ..observability._shipper import ShipperProcess, settings_for
from ..observability._spans import Span, run_span_id, trace_id_for
from ..observability._traces import child_parent, journal_span, run_span
from ..observability._tracing import OpenSpan, Tracing, current_span, step_span
from ..observability._tracing import installed as installed_tracing
from ..stores import (
    Batch,
    Claimed,
    JournalEntry,
    RunRecord,
    RunSpec,
    Signal,
    SQLiteStore,
    Store,
    check_resubmission,
)
from ..stores._base import Outcome
from ._context import (
    Context,
    _Scope,
    check_trace_id,
    child_value,
    non_determinism,
    note_override,
    run_result,
    signal_value,
    start_time,
    task_factory,
    utc,
)
from ._definitions import Step, Workflow, current_scope, current_step, failed_step, resolve

log = logging.getLogger("corral.runtime")

O = TypeVar("O")  # noqa: E741
T = TypeVar("T")

DEFAULT_DB = ".corral/corral.db"
RECENT_OUTCOMES = 1024  # outcomes of runs finished here that nobody has asked for yet
_PYTHON_GC = (700, 10, 10)  # CPython's default collection thresholds
WORKER_GC = (20_000, 50, 100)  # a worker's, unless the process chose its own

# Runtimes open on each event loop: the loop keeps corral's task factory while any is.
_factory_users: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = (
    weakref.WeakKeyDictionary()
)
_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))


def new_run_id() -> str:
    """48 bits of milliseconds then 80 random bits, in hex: unique, and sorted by creation time
    so that the store's indexes grow at one end instead of everywhere."""
    return f"{int(time.time() * 1000):012x}{_ids.getrandbits(80):020x}"


class _Evicted(BaseException):
    """Unwinds a run out of memory (idle, shutting down, or its store failed); not an error."""


class _Waiter:
    __slots__ = ("deadline", "future", "names", "timer")

    def __init__(self, future: asyncio.Future[Signal | None], names: tuple[str, ...],
                 deadline: float | None) -> None:
        self.future = future
        self.names = names
        self.deadline = deadline
        self.timer: asyncio.TimerHandle | None = None


class _Run:
    """A run live in this process."""

    __slots__ = (
        "activity",
        "barrier",
        "broken",
        "busy",
        "cancel_delivered",
        "cancel_requested",
        "ctx",
        "evicting",
        "exported",
        "extras",
        "finalizing",
        "id",
        "idle_check",
        "journal",
        "mail",
        "notes",
        "record",
        "rt",
        "started",
        "started_early",
        "task",
        "unsubmitted",
        "waits",
        "wake",
        "wf",
    )

    def __init__(self, rt: Runtime, claimed: Claimed, wf: Workflow[Any, Any]) -> None:
        self.rt = rt
        self.record = claimed.run
        self.id = claimed.run.id
        self.wf = wf
        self.journal = claimed.journal
        self.mail: _Mailbox | None = None  # made when the run first meets a signal
        self.extras: dict[str, Any] = {}  # state other layers keep per run (agents' budget)
        self.waits: dict[str, _Waiter] = {}
        self.busy = 0
        self.activity = 0
        self.cancel_requested = claimed.run.cancel_requested
        self.cancel_delivered = False
        self.started = False
        self.finalizing = False
        self.evicting = False
        self.idle_check: asyncio.TimerHandle | None = None
        self.broken: NonDeterminismError | None = None
        self.wake: tuple[float | None, tuple[str, ...]] | None = None
        # The commit of this run's latest write. Results are returned before they are durable,
        # but nothing observable (a step body, the run's end) happens until they are.
        self.barrier: asyncio.Future[Any] | None = None
        self.started_early = False  # started before its submission committed
        self.unsubmitted = False  # ...and that commit failed: the run never existed
        self.task: asyncio.Task[None] | None = None
        self.notes: dict[str, tuple[str | None, dict[str, Any]]] | None = None  # step spans
        self.exported: tuple[str, str, bool] | None = None  # (trace id, run span, sampled)
        self.ctx = Context(self)
        for signal in claimed.signals:
            self.deliver(signal)

    @property
    def workflow_name(self) -> str:
        return self.record.workflow

    @property
    def parent_id(self) -> str | None:
        return self.record.parent_id

    @property
    def tenant(self) -> str | None:
        return self.record.tenant

    @property
    def trace_id(self) -> str:
        return self.record.trace_id or trace_id_for(self.id)

    # -- spans (see observability._tracing) --------------------------------------------------

    def export_ids(self, tracing: Tracing) -> tuple[str, str, bool]:
        """(trace id, run span id, sampled), hashed once per run."""
        trace_id = self.trace_id
        self.exported = (trace_id, run_span_id(self.id), tracing.sampled(trace_id))
        return self.exported

    def span(self, status: str, error: str | None, ended: float) -> Span:
        """The run's ``invoke_workflow`` span, as it ends."""
        record = self.record
        parent = child_parent(self.id, record.parent_id) if record.parent_id else None
        return run_span(record.id, self.trace_id, record.workflow, parent, record.tenant,
                        record.created_at, record.started_at or record.created_at, ended,
                        status, error)

    def describe(self, key: str, name: str | None, attributes: Mapping[str, Any]) -> None:
        """A step's body names its span or adds attributes (a model call's tokens...)."""
        if self.notes is None:
            self.notes = {}
        old_name, old = self.notes.get(key, (None, {}))
        self.notes[key] = (name or old_name, {**old, **attributes})

    def _step_span(self, key: str, step: str, started: float, ended: float,
                   failure: StepFailed | None, parent: OpenSpan | None) -> None:
        name, attributes = self.notes.pop(key, (None, {})) if self.notes else (None, {})
        self.rt._writer.batch.spans.append((self.id, step_span(
            self.id, self.trace_id, key, name or f"step {step}", started, ended,
            parent.span_id if parent is not None else run_span_id(self.id),
            "error" if failure or "error.type" in attributes else "ok",
            failure.error if failure else str(attributes.get(
                "corral.error.message", attributes.get("error.type", ""))),
            {"corral.step": step, "corral.run.id": self.id, **attributes})))

    def open_span(self, name: str, scope: _Scope, attributes: dict[str, Any]) -> OpenSpan:
        return OpenSpan.opening(self.id, scope, name, attributes)

    def close_span(self, span: OpenSpan, failure: BaseException | None) -> None:
        if not span.live or isinstance(failure, _Evicted) or self.evicting:
            return  # replayed to its end (emitted before), or not ending: being evicted
        if span.parent is not None:
            span.parent.live = True
        self.rt._writer.batch.spans.append(
            (self.id, span.closed(self.id, self.trace_id, time.time(), failure)))
        self.rt._writer.pending()

    # -- the journal ------------------------------------------------------------------------

    def _begin(self, key: str, kind: str, name: str) -> JournalEntry | None:
        if self.broken is not None:
            raise self.broken
        entry = self.journal.get(key)
        if entry is not None and (entry.kind != kind or entry.name != name):
            self.broken = non_determinism(self.id, key, (entry.kind, entry.name), (kind, name))
            raise self.broken
        if entry is None or entry.status == "pending":
            if self.evicting:
                self.wake = None  # a branch still had work: queue the run, don't park it
                raise _Evicted()
            if self.cancel_requested and not self.cancel_delivered:
                self.cancel_delivered = True
                if asyncio.current_task() is not self.task and self.task is not None:
                    self.task.cancel()
                raise asyncio.CancelledError()
        return entry

    def _write(self, key: str, kind: str, name: str, status: str, value: str | bytes | None,
               started: float, ended: float | None, attempts: int = 1) -> asyncio.Future[Any]:
        self.activity += 1
        self.barrier = self.rt._writer.journal(
            (self.id, key, kind, name, status, value, started, ended, attempts)
        )
        return self.barrier

    async def _commit(self, future: asyncio.Future[Any]) -> Any:
        try:
            return await future
        except CorralError as exc:
            self.evicting = True
            if not self.unsubmitted:  # (if it is, start() reports why)
                log.error("run %s: cannot write its journal (%s); it starts again from the "
                          "store", self.id, exc)
            raise _Evicted() from exc

    # -- operations -------------------------------------------------------------------------

    async def step(self, step: Step[Any, Any], scope: _Scope, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        key = scope.next()
        entry = self._begin(key, "step", step.name)
        parent = current_span.get()
        if entry is not None:
            if parent is not None:
                parent.saw(entry.started_at, False)
            if entry.status == "ok":
                return step.decode(entry.value or "null")
            raise _step_error(entry)
        self.busy += 1
        try:
            if self.barrier is not None and not self.barrier.done():
                await self._commit(self.barrier)
                if self.evicting:  # an earlier write of this run failed
                    raise _Evicted()
            started = time.time()
            if parent is not None:
                parent.saw(started, True)
            failure: StepFailed | None = None
            token = current_scope.set(None)  # the body is not workflow code
            step_token = current_step.set((self.id, self.record.workflow, key, self))
            try:
                value, attempts = await step.attempt(args, kwargs, f"{self.id}/{key}")
                data = dumps(value)
            except StepFailed as exc:
                failure = exc
            except PydanticSerializationError as exc:
                text = (f"returned a value corral cannot store as JSON ({exc}); return "
                        "JSON-compatible data, a dataclass or a pydantic model")
                failure = StepFailed(  # worded as replay words it (see _step_error)
                    f"step {step.name!r} failed after 1 attempt: SerializationError: {text}",
                    step=step.name, error_type="SerializationError", error=text, attempts=1,
                )
            except asyncio.CancelledError:
                if self.evicting:
                    raise _Evicted() from None
                raise
            finally:
                current_scope.reset(token)
                current_step.reset(step_token)
            ended = time.time()
            if failure is None:
                self._write(key, "step", step.name, "ok", data, started, ended, attempts)
                if parent is not None or (self.notes and key in self.notes):
                    self._step_span(key, step.name, started, ended, None, parent)
                # what replay will return, so that the code after a step sees the same thing
                return step.decode(data)
            error = json.dumps({"type": failure.error_type, "message": failure.error,
                                "attempts": failure.attempts})
            self._write(key, "step", step.name, "error", error, started, ended,
                        failure.attempts)
            if parent is not None or (self.notes and key in self.notes):
                self._step_span(key, step.name, started, ended, failure, parent)
            raise failure
        finally:
            self.busy -= 1
            self.activity += 1

    def now(self, scope: _Scope) -> datetime:
        key = scope.next()
        entry = self._begin(key, "now", "now")
        if entry is not None and entry.status == "ok":
            return utc(float(entry.value or 0))
        now = time.time()
        self._write(key, "now", "now", "ok", repr(now), now, now)
        return utc(now)

    async def sleep(self, scope: _Scope, seconds: float) -> None:
        key = scope.next()
        entry = self._begin(key, "sleep", "sleep")
        if entry is not None and entry.status == "ok":
            return
        now = time.time()
        if entry is None:
            started, fire_at = now, now + seconds
            self._write(key, "sleep", "sleep", "pending", json.dumps({"fire_at": fire_at}),
                        started, None)
        else:
            started, fire_at = entry.started_at, json.loads(entry.value or "{}")["fire_at"]
        if fire_at > now:
            await self._wait(key, (), fire_at)
        self._write(key, "sleep", "sleep", "ok", json.dumps({"fire_at": fire_at}), started,
                    time.time())

    async def wait_for(self, scope: _Scope, name: str, timeout: float | None, default: Any,
                       tp: Any) -> Any:
        key = scope.next()
        entry = self._begin(key, "wait", name)
        if entry is None or entry.status == "pending":
            outcome = await self._receive(key, "wait", name, name, entry, timeout)
        else:
            outcome = entry.value or "{}"
        return signal_value(self.id, name, json.loads(outcome), timeout, default, tp)

    async def _receive(self, key: str, kind: str, name: str, signal_name: str,
                       entry: JournalEntry | None, timeout: float | None,
                       pending: str | None = None) -> str:
        """Wait for the signal ``signal_name``; journal and return its outcome as JSON."""
        now = time.time()
        if entry is None:
            started = now
            deadline = None if timeout is None else now + timeout
            self._write(key, kind, name, "pending",
                        pending or json.dumps({"deadline": deadline}), started, None)
        else:
            started = entry.started_at
            deadline = json.loads(entry.value or "{}").get("deadline")
        signal = self._take(signal_name)
        if signal is None and (deadline is None or deadline > now):
            signal = await self._wait(key, (signal_name,), deadline)
        self.busy += 1
        try:
            if signal is None:
                outcome = '{"timeout":true}'
            else:
                outcome = f'{{"seq":{signal.seq},"value":{signal.payload}}}'
                self.rt._writer.batch.consumed.append((f"{self.id}/{key}", signal.seq))
            await self._commit(self._write(key, kind, name, "ok", outcome, started, time.time()))
            return outcome
        finally:
            self.busy -= 1

    async def run_child(self, scope: _Scope, wf: Workflow[Any, Any], value: Any,
                        child_id: str | None, queue: str | None, priority: int | None) -> Any:
        key = scope.next()
        entry = self._begin(key, "child", wf.name)
        if entry is None or entry.status == "pending":
            if entry is None:
                given = child_id is not None
                child_id = child_id or f"{self.id}/{key}"
                spec = self.rt._spec(wf, value, child_id, queue or self.record.queue,
                                     self.record.priority if priority is None else priority,
                                     time.time(), None, None, parent_id=self.id)
                spec.tenant, spec.trace_id = self.record.tenant, self.trace_id
                position = len(self.rt._writer.batch.submits)
                self.rt._writer.batch.submits.append(spec)
                if given:  # an id chosen by the workflow may be taken: find out first
                    existing = (await self._commit(self.rt._writer.pending())).get(position)
                    if existing is not None and existing.parent_id != self.id:
                        raise RunConflict(
                            f"child run id {child_id!r} is taken by a run that is not a child "
                            f"of {self.id!r}; choose another id",
                            run_id=child_id,
                        )
            else:
                child_id = json.loads(entry.value or "{}")["id"]
            pending = json.dumps({"id": child_id})
            outcome = await self._receive(key, "child", wf.name, f"$child:{child_id}", entry,
                                          None, pending)
        else:
            outcome = entry.value or "{}"
        return child_value(wf, json.loads(outcome)["value"])

    # -- waiting ----------------------------------------------------------------------------

    def deliver(self, signal: Signal) -> None:
        self.activity += 1
        mail = self.mail = self.mail or _Mailbox()
        if signal.seq in mail.seen:
            return
        mail.seen.add(signal.seq)
        waiters = mail.waiters.get(signal.name)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(signal)
                return
        mail.inbox.setdefault(signal.name, deque()).append(signal)

    def _take(self, name: str) -> Signal | None:
        queue = self.mail.inbox.get(name) if self.mail else None
        return queue.popleft() if queue else None

    async def _wait(self, key: str, names: tuple[str, ...], deadline: float | None
                    ) -> Signal | None:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), names, deadline)
        if names:
            mail = self.mail = self.mail or _Mailbox()
            for name in names:
                mail.waiters.setdefault(name, deque()).append(waiter)
        if deadline is not None:
            waiter.timer = loop.call_later(max(0.0, deadline - time.time()), _expire, waiter)
        self.waits[key] = waiter
        self.activity += 1
        self.rt._watch_idle(self)
        try:
            return await waiter.future
        finally:
            del self.waits[key]
            if waiter.timer is not None:
                waiter.timer.cancel()
            for name in names:
                queue = self.mail.waiters.get(name) if self.mail else None
                if queue and waiter in queue:
                    queue.remove(waiter)
            self.activity += 1

    @property
    def idle(self) -> bool:
        """Every branch waits for a timer or a signal that has not come yet."""
        return (
            self.busy == 0
            and bool(self.waits)
            and not self.finalizing
            and not any(w.future.done() for w in self.waits.values())
        )

    @property
    def wakes_at(self) -> float | None:
        """The earliest timer among its waits (None: only signals can wake it)."""
        return min((w.deadline for w in self.waits.values() if w.deadline is not None),
                   default=None)

    def evict(self) -> None:
        """Unwind the run out of memory; the store wakes it by timer or signal."""
        names = tuple(sorted({n for w in self.waits.values() for n in w.names}))
        self.evicting = True
        self.wake = (self.wakes_at, names)
        for waiter in list(self.waits.values()):
            if not waiter.future.done():
                waiter.future.set_exception(_Evicted())


class _Mailbox:
    """A run's signals: delivered and not yet taken, already seen, and waits by name."""

    __slots__ = ("inbox", "seen", "waiters")

    def __init__(self) -> None:
        self.inbox: dict[str, deque[Signal]] = {}
        self.seen: set[int] = set()
        self.waiters: dict[str, deque[_Waiter]] = {}


def _expire(waiter: _Waiter) -> None:
    if not waiter.future.done():
        waiter.future.set_result(None)


def _step_error(entry: JournalEntry) -> StepFailed:
    error = json.loads(entry.value or "{}")
    return failed_step(entry.name, error.get("type"), error.get("message"), entry.attempts)


class _Commit(asyncio.Future[dict[int, RunRecord]]):
    """A batch's commit. Many runs wait on it, so one waiter being cancelled must not cancel
    it for all: the cancelled task gets its CancelledError when the commit is done."""

    def cancel(self, msg: Any = None) -> bool:
        return False


class _Writer:
    """Group commit: writes from every run accumulate while the previous batch commits."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self.batch = Batch()
        self._future: asyncio.Future[dict[int, RunRecord]] | None = None
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), context=contextvars.Context()
        )

    def pending(self) -> asyncio.Future[dict[int, RunRecord]]:
        """The batch being filled; resolved on commit with the submitted runs that existed."""
        if self._future is None:
            self._future = _Commit(loop=asyncio.get_running_loop())
            self._future.add_done_callback(_consume)
            self._wakeup.set()
            self._idle.clear()
        return self._future

    def journal(self, row: Any) -> asyncio.Future[dict[int, RunRecord]]:
        self.batch.journal.append(row)
        return self._future or self.pending()

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, future = self.batch, self._future
            self.batch, self._future = Batch(), None
            if future is None:
                self._idle.set()
                continue
            try:
                existing = await self._rt._call(self._rt.store.apply, batch, time.time())
            except Exception as exc:  # the store failed: every waiter learns it
                self._rt._lost(batch)
                future.set_exception(exc)
            else:
                future.set_result(existing)
                if batch.signals:
                    self._rt._wake.set()
                if batch.journal:
                    STEPS.observe_journal(batch.journal)  # (the step latency histogram)
                if self._rt.tracing.exporter is not None and self._rt._shipper is None:
                    self._rt._export(batch)
            if self._future is None:
                self._idle.set()

    async def close(self) -> None:
        await self._idle.wait()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _resolve(futures: Any, outcome: Outcome) -> None:
    for future in futures:
        if not future.done():
            future.set_result(outcome)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class RunHandle(Generic[O]):
    """A submitted run: wait for its result, signal it, cancel it, look at it."""

    def __init__(self, rt: Runtime, run_id: str, output_type: Any = Any,
                 fresh: bool = False) -> None:
        self._rt = rt
        self.id = run_id
        self._output_type = output_type
        self._fresh = fresh  # just created by this process: no need to look it up first

    @property
    def created(self) -> bool:
        """This handle's `start` created the run (False: the id named an existing run)."""
        return self._fresh

    def __repr__(self) -> str:
        return f"RunHandle({self.id!r})"

    async def describe(self) -> RunRecord:
        return await self._rt._call(self._rt.store.get_run, self.id)

    async def result(self, timeout: float | None = None) -> O:
        """Wait for the run to finish; return its output, or raise RunFailed / RunCancelled."""
        if timeout is None:
            status, result, error_text = await self._rt._outcome(self.id, self._fresh)
        else:
            async with asyncio.timeout(timeout):
                status, result, error_text = await self._rt._outcome(self.id, self._fresh)
        value: O = run_result(self.id, status, result, json.loads(error_text or "{}"),
                              self._output_type)
        return value

    async def signal(self, name: str, value: Any = None) -> None:
        await self._rt.signal(self.id, name, value)

    async def cancel(self) -> None:
        await self._rt.cancel(self.id)


class Runtime:
    """The embedded runtime: a store plus, unless ``worker=False``, a worker in this process.

    Use it as ``async with Runtime() as rt:``. ``db`` is a SQLite path (default
    ``.corral/corral.db``) or a `Store`.
    """

    def __init__(
        self,
        db: str | os.PathLike[str] | Store = DEFAULT_DB,
        *,
        worker: bool = True,
        queues: tuple[str, ...] = ("default",),
        max_runs: int = 1000,
        poll_interval: float = 0.05,
        idle_after: float = 5.0,
        durability: str = "full",
        lock_timeout: float = 5.0,
        tune_gc: bool = True,
        tracing: Tracing | None = None,
    ) -> None:
        if isinstance(db, Store):
            self.store: Store = db
            self._path: str | None = getattr(db, "path", None)
            self._owns_store = False
        else:
            self._owns_store = True
            self._path = os.fspath(db)
            self.store = SQLiteStore(self._path, durability=durability, timeout=lock_timeout)
        self.worker = worker
        self.queues = list(queues)
        self.max_runs = max_runs
        self.poll_interval = poll_interval
        self.idle_after = idle_after
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-store")
        self._live: dict[str, _Run] = {}
        self._awaited: dict[str, list[asyncio.Future[Outcome]]] = {}
        self._recent: dict[str, Outcome] = {}
        self._next_outcome_poll = 0.0
        self._reserved = 0
        self._orphans: set[str] = set()
        self._early_signals: dict[str, list[Signal]] = {}
        self._saturated = False
        self._signal_seq = 0
        self._next_recovery = 0.0
        self._closing = False
        self._lock_fd: int | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._tuned_gc = False
        self._tune_gc = tune_gc
        self._tracing = tracing
        self._shipper: ShipperProcess | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Runtime:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._ticked = asyncio.Condition()
        self._ticks = 0
        self._claimed_last = 1
        self._events = 0
        if loop.get_task_factory() not in (None, task_factory):
            raise UsageError(
                "corral needs the event loop's task factory and another one is set; unset it "
                "(loop.set_task_factory(None)) or run corral on a loop of its own"
            )
        if self._tracing is None:  # (a mistake in [observability.tracing] fails here, now)
            self._tracing = installed_tracing()
        loop.set_task_factory(task_factory)
        _factory_users[loop] = _factory_users.get(loop, 0) + 1
        self._writer = _Writer(self)
        if self.worker:
            if self._tune_gc and gc.get_threshold() == _PYTHON_GC:
                # Thousands of suspended runs make every collection long, and the engine
                # allocates enough to trigger one every few hundred steps: collect less often.
                gc.set_threshold(*WORKER_GC)
                self._tuned_gc = True
            try:
                self._take_lock()
                self._signal_seq = (await self._call(self.store.signals_since, 0, self.id))[1]
                await self._start_shipper()
            except BaseException:  # e.g. cancelled by SIGTERM: give back what was taken
                await self.close()
                raise
            self._loop_task = loop.create_task(self._work(), context=contextvars.Context())

    async def close(self) -> None:
        """Stop working: runs in memory go back to the store, to resume wherever a worker is.
        The worker's lock, thread and store are released whatever happens on the way."""
        if self._closing:
            return
        self._closing = True
        try:
            if self._loop_task is not None:
                self._loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._loop_task
            await self._evict(list(self._live.values()), force=True)
            await self._writer.close()
        finally:
            try:
                if self._shipper is not None:  # (after the last commit: it sends that too)
                    await self._shipper.stop()
            finally:
                self._give_back()

    def _give_back(self) -> None:
        """What close gives back whatever happened before: the loop's task factory, the
        worker's lock, the store's thread and the store."""
        loop = asyncio.get_running_loop()
        _factory_users[loop] -= 1
        if not _factory_users[loop]:  # the last runtime on this loop
            del _factory_users[loop]
            loop.set_task_factory(None)
        self._release_lock()
        if self._tuned_gc and gc.get_threshold() == WORKER_GC:
            gc.set_threshold(*_PYTHON_GC)
        self._executor.shutdown(wait=True)
        if self._owns_store:
            self.store.close()

    async def _start_shipper(self) -> None:
        """An embedded worker exporting over OTLP does it from a span shipper (a process)."""
        from ..observability._otlp import OTLPExporter

        tracing = self.tracing  # (another kind of exporter is fed from the worker's thread)
        if (not isinstance(tracing.exporter, OTLPExporter) or tracing.export_from != "process"
                or not isinstance(self.store, SQLiteStore) or self._lock_dir() is None
                or not tracing.sample):
            return
        # the cursor starts here, before this worker commits anything, so nothing is missed
        await self._call(self.store.export_cursor, tracing.exporter.endpoint, time.time())
        self.store.log_ends = True
        self._shipper = ShipperProcess(settings_for(self.store.path, tracing))

    @property
    def tracing(self) -> Tracing:
        """Where spans go beyond the store: the one given, else the process's (corral.toml)."""
        if self._tracing is None:
            self._tracing = installed_tracing()
        return self._tracing

    def _export(self, batch: Batch) -> None:
        """A committed batch's spans, to the exporter: the explicit ones, the rest made from
        the journal rows and the runs that finished; only sampled traces'."""
        tracing = self.tracing
        if not tracing.sample:
            return
        spans = {span.span_id: span for _, span in batch.spans
                 if tracing.sampled(span.trace_id)}
        live = self._live
        for run_id, key, kind, name, status, value, started, ended, attempts in batch.journal:
            run = live.get(run_id)
            if run is None or ended is None or kind == "now":
                continue
            ids = run.exported or run.export_ids(tracing)
            if ids[2]:
                span = journal_span(run_id, ids[0], ids[1], key, kind, name, status, value,
                                    started, ended, attempts)
                spans.setdefault(span.span_id, span)
        for run_id, status, _, error, ended in batch.finished:
            run = live.get(run_id)
            if run is not None and (run.exported or run.export_ids(tracing))[2]:
                spans[run_span_id(run_id)] = run.span(status, error, ended)
        tracing.export(list(spans.values()))

    @property
    def healthy(self) -> bool:
        """The worker loop is alive (or this runtime has none)."""
        return self._loop_task is None or not self._loop_task.done()

    def _lock_dir(self) -> Path | None:
        if not self._path or self._path == ":memory:":
            return None
        return Path(self._path + "-workers")

    def _take_lock(self) -> None:
        folder = self._lock_dir()
        if folder is None:
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(folder / f"{self.id}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise StoreError(
                f"cannot create this worker's lock in {folder} ({exc}); check that the "
                "database's folder is writable",
                path=self._path,
            ) from None

    def _release_lock(self) -> None:
        folder = self._lock_dir()
        if self._lock_fd is None or folder is None:
            return
        (folder / f"{self.id}.lock").unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None

    def _alive(self, owner: str) -> bool:
        folder = self._lock_dir()
        if folder is None:
            return True
        path = folder / f"{owner}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        return False

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- the client API ---------------------------------------------------------------------

    def _spec(self, wf: Workflow[Any, Any], value: Any, run_id: str | None, queue: str,
              priority: int, run_at: float, concurrency_key: str | None,
              concurrency_limit: int | None, parent_id: str | None = None) -> RunSpec:
        data = dumps(value).decode()
        return RunSpec(
            id=run_id or new_run_id(),
            generated_id=run_id is None,
            workflow=wf.name,
            ref=wf.ref,
            input=data,
            input_hash=blake2b(data.encode(), digest_size=16).hexdigest(),
            queue=queue,
            priority=priority,
            run_at=run_at,
            concurrency_key=concurrency_key,
            concurrency_limit=concurrency_limit,
            parent_id=parent_id,
        )

    async def start(
        self,
        workflow: Workflow[Any, O],
        input: Any = None,
        *,
        id: str | None = None,
        queue: str = "default",
        priority: int = 0,
        run_at: datetime | float | None = None,
        delay: float | timedelta | None = None,
        concurrency_key: str | None = None,
        concurrency_limit: int | None = None,
        tenant: str | None = None,
        trace_id: str | None = None,
    ) -> RunHandle[O]:
        """Submit a run and return its handle once the submission is durable.

        ``id`` makes submission idempotent: the same id again returns the first run.
        ``priority``: higher runs first. ``run_at``/``delay`` defer it. ``concurrency_key`` with
        ``concurrency_limit`` caps how many runs sharing the key execute at once. ``tenant``
        is whose run it is (its model calls are on that tenant's account); ``trace_id`` (32
        hex digits) puts its spans in the caller's trace.
        """
        if not isinstance(workflow, Workflow):
            raise UsageError(f"start() takes a @corral.workflow, not {workflow!r}")
        if (concurrency_key is None) != (concurrency_limit is None):
            raise UsageError("concurrency_key and concurrency_limit go together; pass both")
        if concurrency_limit is not None and concurrency_limit < 1:
            raise UsageError(f"concurrency_limit must be at least 1, not {concurrency_limit}")
        check_trace_id(trace_id)
        value = workflow.validate_input(input)
        when = start_time(run_at, delay)
        spec = self._spec(workflow, value, id, queue, priority, when, concurrency_key,
                          concurrency_limit)
        spec.tenant, spec.trace_id = tenant, trace_id
        now = time.time()
        # A worker that can execute the run now takes it at once: no claim round trip. With a
        # fresh id (it cannot exist yet) the run starts before the submission commits; its
        # first step waits for that commit. With a given id it starts after, if it was new.
        mine = (
            self.worker and not self._closing and when <= now and concurrency_key is None
            and queue in self.queues and len(self._live) + self._reserved < self.max_runs
        )
        early = mine and id is None
        if mine:
            spec.owner = self.id
        position = len(self._writer.batch.submits)
        self._writer.batch.submits.append(spec)
        submitted = self._writer.pending()
        if early:
            self._launch(Claimed(spec.record(now), {}, []), barrier=submitted)
        elif mine:
            self._reserved += 1  # held until the commit says whether the run is new
        try:
            existing = (await submitted).get(position)
        finally:
            self._reserved -= mine and not early
        if existing is not None:
            check_resubmission(existing, spec)
        elif mine and not early and not self._closing:
            self._launch(Claimed(spec.record(now), {}, []))
        if not mine or existing is not None:
            self._wake.set()  # something for the worker to claim
        return RunHandle(self, spec.id, workflow.output_type, fresh=existing is None)

    async def run(self, workflow: Workflow[Any, O], input: Any = None, **options: Any) -> O:
        """Start a run and wait for its output."""
        handle = await self.start(workflow, input, **options)
        return await handle.result()

    def handle(self, run_id: str) -> RunHandle[Any]:
        return RunHandle(self, run_id)

    async def get(self, run_id: str) -> RunRecord:
        return await self._call(self.store.get_run, run_id)

    async def list_runs(self, *, status: str | None = None, workflow: str | None = None,
                        limit: int = 50) -> list[RunRecord]:
        """Runs, newest first."""
        return await self._call(
            functools.partial(self.store.list_runs, status=status, workflow=workflow,
                              limit=limit))

    def awaiting(self) -> dict[str, tuple[str, ...]]:
        """Runs in this worker's memory waiting for signals now, and the signals' names (the
        store marks a run waiting only once it is evicted, after ``idle_after``)."""
        return {run_id: names for run_id, run in self._live.items() if run.waits
                and (names := tuple(n for w in run.waits.values() for n in w.names
                                    if not n.startswith("$")))}

    async def journal(self, run_id: str) -> list[JournalEntry]:
        """What the run has done so far: one entry per durable operation, in order."""
        return await self._call(self.store.journal, run_id)

    async def signal(self, run_id: str, name: str, value: Any = None) -> None:
        """Send a signal; the run receives it in ``ctx.wait_for(name)``, now or later."""
        if name.startswith("$"):
            raise UsageError(f"signal names starting with '$' are corral's own, not {name!r}")
        await self._call(self.store.send_signal, run_id, name, dumps(value).decode(),
                         time.time())
        self._wake.set()
        await note_override(run_id, f"signal:{name}", value,
                            lambda: self._call(self.store.get_run, run_id))

    async def cancel(self, run_id: str) -> None:
        """Ask a run (and its children) to stop; it is cancelled at its next durable operation."""
        record = await self._call(self.store.request_cancel, run_id, time.time())
        self._wake.set()
        await note_override(run_id, "cancel", run=lambda: asyncio.sleep(0, record))

    async def _outcome(self, run_id: str, fresh: bool) -> Outcome:
        """Wait for a run to finish: told at once when it ends here, polled when elsewhere."""
        recent = self._recent.get(run_id)
        if recent is not None:
            return recent
        if not fresh and run_id not in self._awaited:
            record = await self._call(self.store.get_run, run_id)
            if record.finished:
                return (record.status, record.result, record.error)
        # one future per caller: cancelling one caller's wait leaves the others waiting
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._awaited.setdefault(run_id, []).append(future)
        if not self.worker:
            self._client_poller()
        try:
            return await future
        finally:
            waiters = self._awaited.get(run_id)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._awaited[run_id]

    def _client_poller(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(
                self._poll_outcomes_forever(), context=contextvars.Context()
            )

    async def _poll_outcomes_forever(self) -> None:
        while self._awaited:
            await self._poll_outcomes(force=True)
            await asyncio.sleep(self.poll_interval)

    async def _poll_outcomes(self, force: bool = False) -> None:
        """Resolve waiters on runs that finished in other processes (throttled)."""
        now = time.monotonic()
        remote = [run_id for run_id in self._awaited if run_id not in self._live]
        if not remote or (not force and now < self._next_outcome_poll):
            return
        self._next_outcome_poll = now + max(0.25, self.poll_interval)
        for run_id, outcome in (await self._call(self.store.outcomes, remote)).items():
            _resolve(self._awaited.pop(run_id, ()), outcome)

    # -- the worker -------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            try:
                more = await self._tick()
            except Exception:
                log.exception("worker %s: a round of work failed; retrying", self.id)
                more = False
            if more:
                await asyncio.sleep(0)
                continue
            try:
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def _tick(self) -> bool:
        """One round of work; True when there may be more due right away."""
        now = time.time()
        if now >= self._next_recovery:
            self._next_recovery = now + 1.0
            shipper = self._shipper
            if shipper is not None and shipper.exited():  # (its spans wait in the store)
                self._shipper = ShipperProcess(shipper.settings)
            for owner in await self._call(self.store.owners):
                if owner != self.id and not self._alive(owner):
                    count = await self._call(self.store.requeue, owner, now)
                    log.warning("worker %s is gone; runs queued again: %d", owner, count)
            # Runs the store says this worker runs but it does not (their end or hand-back
            # failed to commit): queue them again, if so twice in a row (not mid-launch).
            orphans = set(await self._call(self.store.running, self.id)) - self._live.keys()
            for run_id in orphans & self._orphans:
                log.warning("run %s was lost by this worker; it is queued again", run_id)
                self._writer.batch.released.append((run_id, now))
                self._early_signals.pop(run_id, None)
            if orphans & self._orphans:
                self._writer.pending()
            self._orphans = orphans - self._orphans
        more = claimed_any = False
        free = self.max_runs - len(self._live)
        if free > 0 and not self._closing:
            claimed = await self._call(self.store.claim, self.id, self.queues,
                                       min(free, 1000), now)
            for item in claimed:
                self._launch(item)
            claimed_any = bool(claimed)
            more = len(claimed) == min(free, 1000)
        self._saturated = more or free <= 0
        signals, self._signal_seq = await self._call(self.store.signals_since,
                                                     self._signal_seq, self.id)
        for signal in signals:
            run = self._live.get(signal.run_id)
            if run is not None:
                run.deliver(signal)
            else:  # claimed by this worker and not started yet: keep it for the start
                self._early_signals.setdefault(signal.run_id, []).append(signal)
        await self._poll_outcomes()
        for run_id in await self._call(self.store.cancel_requests, self.id):
            run = self._live.get(run_id)
            if run is not None:
                self._deliver_cancel(run)
        self._ticks += 1
        self._claimed_last = int(claimed_any or free <= 0)
        async with self._ticked:
            self._ticked.notify_all()
        return more

    def _lost(self, batch: Batch) -> None:
        """A batch failed to commit: its runs stop here and start again from the store."""
        submitted = {spec.id for spec in batch.submits}
        for run_id in {row[0] for row in batch.journal} | submitted:
            run = self._live.get(run_id)
            if run is not None:
                run.evicting = True
                run.wake = None
                run.unsubmitted = run.unsubmitted or (run_id in submitted and run.started_early)

    def _deliver_cancel(self, run: _Run) -> None:
        run.cancel_requested = True
        if run.started and not run.finalizing and not run.cancel_delivered and run.task:
            run.cancel_delivered = True
            run.task.cancel()

    def _launch(self, claimed: Claimed, barrier: asyncio.Future[Any] | None = None) -> None:
        record = claimed.run
        try:
            wf = resolve(record.workflow, record.ref)
        except Exception as exc:
            log.error("run %s: cannot load workflow %s (%s); retrying in 60 s", record.id,
                      record.ref, exc)
            self._writer.batch.released.append((record.id, time.time() + 60))
            self._writer.pending()
            return
        run = _Run(self, claimed, wf)
        for signal in self._early_signals.pop(run.id, ()):
            run.deliver(signal)
        run.barrier = barrier
        run.started_early = barrier is not None
        self._live[run.id] = run
        self._events += 1
        context = contextvars.Context()
        context.run(current_scope.set, _Scope(run, ""))
        run.task = asyncio.get_running_loop().create_task(self._execute(run), context=context)

    async def _execute(self, run: _Run) -> None:
        run.started = True
        status, result, error = "completed", None, None
        recorded = False
        try:
            try:
                if run.cancel_requested and not run.journal:
                    raise asyncio.CancelledError()
                if run.wf.takes_input:
                    output = await run.wf.fn(run.ctx, loads(run.record.input, run.wf.input_type))
                else:
                    output = await run.wf.fn(run.ctx)
                if run.broken is not None:
                    raise run.broken
                result = run.wf.dump_output(output)
            except asyncio.CancelledError:
                if not run.cancel_requested or run.evicting:
                    raise _Evicted() from None
                status = "cancelled"
            except _Evicted:
                raise
            except Exception as raised:
                exc: BaseException = run.broken or raised
                status = "failed"
                error = json.dumps({
                    "type": type(exc).__name__,
                    "message": str(exc),
                    "traceback": "".join(traceback.format_exception(exc)[-6:]),
                })
            run.finalizing = True
            batch = self._writer.batch
            batch.finished.append((run.id, status, result, error, time.time()))
            if run.record.parent_id is not None:
                outcome = {"id": run.id, "status": status,
                           "result": None if result is None else json.loads(result),
                           "error": None if error is None else json.loads(error)}
                batch.signals.append((run.record.parent_id, f"$child:{run.id}",
                                      json.dumps(outcome)))
            await self._writer.pending()
            recorded = True
        except _Evicted:
            await self._suspend(run)
        except CorralError as exc:  # the store failed while finishing: leave it to recovery
            log.error("run %s: cannot record its end (%s)", run.id, exc)
        finally:
            self._live.pop(run.id, None)
            if run.idle_check is not None:
                run.idle_check.cancel()
            if recorded:
                waiters = self._awaited.pop(run.id, None)
                if waiters:
                    _resolve(waiters, (status, result, error))
                else:  # for a result() that comes later: no store round trip
                    self._recent[run.id] = (status, result, error)
                    if len(self._recent) > RECENT_OUTCOMES:
                        del self._recent[next(iter(self._recent))]
            self._events += 1
            if self._saturated:  # capacity freed while due runs may be waiting for it
                self._wake.set()

    async def _suspend(self, run: _Run) -> None:
        if run.unsubmitted:
            return
        if run.wake is None:  # interrupted while busy: queue it again
            self._writer.batch.released.append((run.id, time.time()))
        else:  # idle: wait in the store until a timer or a signal wakes it
            self._writer.batch.suspended.append((run.id, *run.wake))
        try:
            await self._writer.pending()
        except CorralError as exc:
            log.error("run %s: cannot hand it back (%s); recovery will", run.id, exc)

    # -- idleness -----------------------------------------------------------------------------

    def _watch_idle(self, run: _Run) -> None:
        if run.idle_check is None and not self._closing:
            run.idle_check = asyncio.get_running_loop().call_later(
                self.idle_after, self._check_idle, run, run.activity
            )

    def _check_idle(self, run: _Run, activity: int) -> None:
        run.idle_check = None
        if run.id not in self._live or not run.waits:
            return
        if run.idle and run.activity == activity:
            soonest = run.wakes_at
            if soonest is None or soonest - time.time() > self.idle_after:
                run.evict()
                return
        self._watch_idle(run)

    async def _evict(self, runs: list[_Run], *, force: bool) -> None:
        tasks = []
        for run in runs:
            if run.finalizing or run.task is None:
                continue
            if run.idle:
                run.evict()
            elif force:
                run.evicting = True
                run.task.cancel()
            else:
                continue
            tasks.append(run.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _progress(self) -> int:
        return self._events + sum(run.activity for run in self._live.values())

    async def _settle(self) -> None:
        """Wait until two worker rounds in a row claim nothing and every live run is idle."""
        while True:
            progress, target = self._progress(), self._ticks + 2
            self._wake.set()
            async with self._ticked:
                await self._ticked.wait_for(lambda: self._ticks >= target)  # noqa: B023
            if (
                self._claimed_last == 0
                and progress == self._progress()
                and all(run.idle for run in self._live.values())
            ):
                return

    async def drain(self) -> None:
        """Execute until nothing is runnable now: every run finished or waiting for later."""
        if not self.worker:
            raise UsageError("drain() needs a worker; create the Runtime with worker=True")
        while True:
            await self._settle()
            live = list(self._live.values())
            if not live:
                return
            await self._evict(live, force=False)
