"""The Temporal engine: the same workflows, orchestrated by a Temporal cluster.

One Temporal workflow type (``corral.run``) runs any corral workflow, and one activity type
(``corral.step``) runs any step: a step becomes an activity with the step's retry policy and
timeout, ``ctx.sleep`` a durable timer, ``ctx.wait_for`` a signal, ``ctx.run_child`` a child
workflow, and cancelling a run cancels its workflow. Temporal keeps the history; corral keeps,
next to it, a journal of each operation's outcome under the same keys as the embedded engine,
so a run can continue as new (a fresh history) and replay its own journal to where it was.
Payloads are offloaded to the shared store by content hash (see `_offload`).

Workflows run without Temporal's sandbox: corral's rules for workflow code (steps for side
effects, ``ctx.now()``/``ctx.random()`` for what varies) are the same on both engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import time
import traceback
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from hashlib import blake2b
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qs, urlparse

import temporalio.common
import temporalio.converter
import temporalio.exceptions as tex
from pydantic_core import to_jsonable_python
from temporalio import activity, workflow
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from .._errors import (
    CorralError,
    NonDeterminismError,
    RunConflict,
    RunFinished,
    RunNotFound,
    StoreError,
    UsageError,
)
from .._serde import PydanticSerializationError, dumps, loads
from ..observability._spans import run_span_id, trace_id_for
from ..observability._tracing import installed as installed_tracing
from ..observability._tracing import step_span
from ..stores import JournalEntry, RunRecord
from ..stores.blobs import BlobStore
from ._context import (
    REPLAY_RULE,
    Context,
    _Scope,
    child_context,
    child_value,
    non_determinism,
    note_override,
    run_result,
    signal_value,
    start_time,
    utc,
)
from ._definitions import (
    Step,
    Workflow,
    current_scope,
    current_step,
    failed_step,
    find_step,
    resolve,
    step_failed,
)

O = TypeVar("O")  # noqa: E741

WORKFLOW = "corral.run"
STEP = "corral.step"
# Attempts a step may lose with its workers (or to its start-to-close timeout) beyond its own
# max_attempts before it fails: Temporal's count includes them, a step's policy does not.
LOST_ATTEMPTS = 5


def parse_engine_url(url: str) -> dict[str, Any]:
    """``temporal://host:port?namespace=N&task_queue=Q`` as keyword arguments."""
    parsed = urlparse(url)
    if parsed.scheme != "temporal" or not parsed.hostname:
        raise UsageError(f"engine URL {url!r} is not temporal://host:port[?namespace=&task_queue=]")
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    unknown = set(query) - {"namespace", "task_queue"}
    if unknown:
        raise UsageError(f"engine URL {url!r}: unknown option {sorted(unknown)[0]!r}; the "
                         "options are namespace and task_queue")
    return {"address": f"{parsed.hostname}:{parsed.port or 7233}", **query}


# -- inside the workflow ----------------------------------------------------------------------


class _Record:
    __slots__ = ("at", "attempts", "kind", "name", "status", "value")

    def __init__(self, kind: str, name: str, status: str, value: str, attempts: int = 1,
                 at: float = 0.0) -> None:
        self.kind, self.name, self.status, self.value = kind, name, status, value
        self.attempts = attempts
        self.at = at


class _TemporalRun:
    """A run as the Temporal workflow holds it: the state `Context` works on."""

    def __init__(self, wf: Workflow[Any, Any], args: dict[str, Any]) -> None:
        info = workflow.info()
        self.id = info.workflow_id
        self.wf = wf
        self.args = args
        self.options: dict[str, Any] = args["options"]
        self.journal: dict[str, _Record] = {
            e[0]: _Record(*e[1:]) for e in args.get("journal", ())
        }
        self.inbox: dict[str, deque[Any]] = {}
        for name, value in args.get("signals", ()):
            self.inbox.setdefault(name, deque()).append(value)
        self.extras: dict[str, Any] = {}
        self.activity = 0
        self.cancel_requested = False
        self.inflight = 0  # steps and children under way: a run continues as new without any
        self.draining = False
        self.broken: NonDeterminismError | None = None
        self.ctx = Context(self)

    @property
    def workflow_name(self) -> str:
        return self.wf.name

    @property
    def parent_id(self) -> str | None:
        parent = workflow.info().parent
        return parent.workflow_id if parent is not None else None

    def _begin(self, key: str, kind: str, name: str) -> _Record | None:
        if self.broken is not None:
            raise self.broken
        entry = self.journal.get(key)
        if entry is not None and (entry.kind, entry.name) != (kind, name):
            self.broken = non_determinism(self.id, key, (entry.kind, entry.name), (kind, name))
            raise self.broken
        return entry

    async def _admit(self) -> None:
        """Before new work: when the history is long, stop here until the run continues as
        new (it resumes this operation in the new history, from the journal)."""
        if not self.draining:
            info = workflow.info()
            if (info.get_current_history_length() >= self.options["max_history_events"]
                    or info.is_continue_as_new_suggested()):
                self.draining = True
        if self.draining and not self.cancel_requested:  # (cancelled: clean up, then end)
            await _unscoped(workflow.wait_condition(lambda: False))

    def _record(self, key: str, kind: str, name: str, status: str, value: str,
                attempts: int = 1) -> None:
        self.journal[key] = _Record(kind, name, status, value, attempts,
                                    workflow.now().timestamp())
        self.activity += 1

    async def step(self, step: Step[Any, Any], scope: _Scope, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        key = scope.next()
        entry = self._begin(key, "step", step.name)
        if entry is not None:
            if entry.status == "ok":
                return step.decode(entry.value)
            error = json.loads(entry.value)
            raise failed_step(step.name, error["type"], error["message"], entry.attempts)
        try:
            call = {"step": step.name, "origin": step.origin, "workflow": self.wf.name,
                    "ref": self.wf.ref, "key": f"{self.id}/{key}",
                    "args": to_jsonable_python(args), "kwargs": to_jsonable_python(kwargs)}
        except PydanticSerializationError as exc:
            raise UsageError(
                f"step {step.name!r}: on the Temporal engine a step's arguments travel to the "
                f"worker that runs it as JSON, and these cannot ({exc}); pass JSON-compatible "
                "data, dataclasses or pydantic models"
            ) from None
        await self._admit()
        policy = step.retry
        timeout = step.timeout
        self.inflight += 1
        try:
            handle = _unscoped_call(
                workflow.start_activity, STEP, call,
                start_to_close_timeout=timedelta(
                    seconds=timeout + 30 if timeout is not None else self.options["step_timeout"]
                ),
                heartbeat_timeout=timedelta(seconds=self.options["heartbeat_timeout"]),
                retry_policy=temporalio.common.RetryPolicy(
                    initial_interval=timedelta(seconds=max(policy.initial_interval, 0.001)),
                    backoff_coefficient=policy.backoff,
                    maximum_interval=timedelta(
                        seconds=max(policy.max_interval, policy.initial_interval, 0.001)
                    ),
                    # unlimited here: a worker lost mid-step is Temporal's to retry, never the
                    # step's failure; the activity stops at max_attempts of its own failures
                    maximum_attempts=0,
                ),
                # the key and the name: replaying changed code that calls another step here
                # is a non-determinism error, as on the embedded engine
                activity_id=f"{key} {step.name}", summary=step.name,
            )
            attempts, text = await handle
        except tex.ActivityError as exc:
            cause = exc.cause
            if isinstance(cause, tex.CancelledError):
                self.cancel_requested = True
                raise asyncio.CancelledError() from None
            if isinstance(cause, tex.ApplicationError):
                error_type = cause.type or "Error"
                message, attempts = cause.message, (cause.details or (1,))[0]
            else:  # a Temporal timeout: the worker running it died, or the backstop fired
                error_type, message, attempts = "TimeoutError", str(cause or exc), 1
            self._record(key, "step", step.name, "error",
                         json.dumps({"type": error_type, "message": message}), attempts)
            raise failed_step(step.name, error_type, message, attempts) from None
        except asyncio.CancelledError:
            self.cancel_requested = True
            raise
        finally:
            self.inflight -= 1
        self._record(key, "step", step.name, "ok", text, attempts)
        return step.decode(text)

    def now(self, scope: _Scope) -> datetime:
        key = scope.next()
        entry = self._begin(key, "now", "now")
        if entry is not None:
            return utc(float(entry.value))
        now = workflow.now().timestamp()
        self._record(key, "now", "now", "ok", repr(now))
        return utc(now)

    async def sleep(self, scope: _Scope, seconds: float) -> None:
        key = scope.next()
        entry = self._begin(key, "sleep", "sleep")
        if entry is not None and entry.status == "ok":
            return
        if entry is None:
            await self._admit()
            fire_at = workflow.now().timestamp() + seconds
            self._record(key, "sleep", "sleep", "pending", repr(fire_at))
        else:  # started in an earlier history
            fire_at = float(entry.value)
        remaining = fire_at - workflow.now().timestamp()
        try:
            if remaining > 0:
                await _unscoped(asyncio.sleep(remaining))
        except asyncio.CancelledError:
            self.cancel_requested = True
            raise
        self._record(key, "sleep", "sleep", "ok", repr(fire_at))

    async def wait_for(self, scope: _Scope, name: str, timeout: float | None, default: Any,
                       tp: Any) -> Any:
        key = scope.next()
        entry = self._begin(key, "wait", name)
        if entry is None or entry.status == "pending":
            outcome = await self._receive(key, "wait", name, name, entry, timeout)
        else:
            outcome = json.loads(entry.value)
        return signal_value(self.id, name, outcome, timeout, default, tp)

    async def _receive(self, key: str, kind: str, name: str, signal: str,
                       entry: _Record | None, timeout: float | None) -> dict[str, Any]:
        if entry is None:
            await self._admit()
            deadline = None if timeout is None else workflow.now().timestamp() + timeout
            self._record(key, kind, name, "pending", json.dumps({"deadline": deadline}))
        else:
            deadline = json.loads(entry.value)["deadline"]
        inbox = self.inbox.setdefault(signal, deque())
        remaining = None if deadline is None else deadline - workflow.now().timestamp()
        try:
            if not inbox and (remaining is None or remaining > 0):
                await _unscoped(workflow.wait_condition(lambda: bool(inbox), timeout=remaining))
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            self.cancel_requested = True
            raise
        outcome = {"value": inbox.popleft()} if inbox else {"timeout": True}
        self._record(key, kind, name, "ok", json.dumps(outcome))
        return outcome

    async def run_child(self, scope: _Scope, wf: Workflow[Any, Any], value: Any,
                        child_id: str | None, queue: str | None, priority: int | None) -> Any:
        key = scope.next()
        entry = self._begin(key, "child", wf.name)
        if entry is not None:
            return child_value(wf, json.loads(entry.value))
        await self._admit()
        child_id = child_id or f"{self.id}/{key}"
        args = _args(wf, value, self.options)
        self.inflight += 1
        try:
            try:
                text = await _unscoped(workflow.execute_child_workflow(
                    WORKFLOW, args, id=child_id,
                    task_queue=queue or workflow.info().task_queue,
                    memo=_memo(wf, args), priority=_priority(priority),
                    id_reuse_policy=temporalio.common.WorkflowIDReusePolicy.REJECT_DUPLICATE,
                ))
                outcome = {"id": child_id, "status": "completed", "result": json.loads(text),
                           "error": None}
            except tex.ChildWorkflowError as exc:
                if self.cancel_requested and isinstance(exc.cause, tex.CancelledError):
                    raise asyncio.CancelledError() from None  # cancelled with its parent
                outcome = {"id": child_id, **_ended(exc.cause)}
            except tex.WorkflowAlreadyStartedError:
                raise RunConflict(
                    f"child run id {child_id!r} is taken by a run that is not a child of "
                    f"{self.id!r}; choose another id",
                    run_id=child_id,
                ) from None
        except asyncio.CancelledError:
            self.cancel_requested = True
            raise
        finally:
            self.inflight -= 1
        self._record(key, "child", wf.name, "ok", json.dumps(outcome))
        return child_value(wf, outcome)

    def entries(self) -> list[tuple[str, str, str, str, str, int, float]]:
        return [(k, e.kind, e.name, e.status, e.value, e.attempts, e.at)
                for k, e in self.journal.items()]

    def carry(self) -> dict[str, Any]:
        """The arguments of this run's next history: its journal and unread signals."""
        return {
            **self.args,
            "journal": self.entries(),
            "signals": [(name, v) for name, queue in self.inbox.items() for v in queue],
        }


def _ended(cause: BaseException | None) -> dict[str, Any]:
    """A failed or cancelled workflow's outcome, in the embedded engine's terms."""
    if isinstance(cause, tex.CancelledError):
        return {"status": "cancelled", "result": None, "error": None}
    if isinstance(cause, tex.ApplicationError):
        kind, message = cause.type or "Error", cause.message
        if "Nondeterminism error" in message:  # Temporal's, found replaying its history
            kind = "NonDeterminismError"
            message += f"; {REPLAY_RULE}"
        return {"status": "failed", "result": None,
                "error": {"type": kind, "message": message}}
    if isinstance(cause, tex.TerminatedError):
        return {"status": "failed", "result": None,
                "error": {"type": "Terminated", "message": str(cause)}}
    return {"status": "failed", "result": None,
            "error": {"type": type(cause).__name__, "message": str(cause)}}


async def _unscoped(awaitable: Any) -> Any:
    """Await Temporal's own machinery outside the workflow's scopes: tasks it creates are not
    the workflow's and must not take operation keys."""
    token = current_scope.set(None)
    try:
        return await awaitable
    finally:
        _reset(token)


def _unscoped_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    token = current_scope.set(None)
    try:
        return fn(*args, **kwargs)
    finally:
        _reset(token)


def _reset(token: contextvars.Token[Any]) -> None:
    """A run evicted from Temporal's cache is unwound by the garbage collector, in whatever
    context is current then: that context is not the run's, so leave it alone."""
    with contextlib.suppress(ValueError):
        current_scope.reset(token)


@workflow.defn(name=WORKFLOW, sandboxed=False)
class CorralRun:
    """Runs any corral workflow; the arguments name it (see `_args`)."""

    def __init__(self) -> None:
        self.run: _TemporalRun | None = None
        self.early: list[tuple[str, Any]] = []

    @workflow.signal(dynamic=True)
    def deliver(self, name: str, args: Sequence[temporalio.common.RawValue]) -> None:
        value = workflow.payload_converter().from_payload(args[0].payload) if args else None
        if self.run is None:
            self.early.append((name, value))
        else:
            self.run.inbox.setdefault(name, deque()).append(value)

    @workflow.query(name="corral.journal")
    def journal(self) -> list[tuple[str, str, str, str, str, int, float]]:
        return self.run.entries() if self.run is not None else []

    @workflow.run
    async def execute(self, args: dict[str, Any]) -> str:
        try:
            wf = resolve(args["workflow"], args["ref"])
        except CorralError as exc:
            # not the run's failure but this worker's: fail the task, so that Temporal retries
            # it (on a worker that has the code); the worker logs why
            raise RuntimeError(f"this worker cannot run {args['workflow']!r}: {exc}") from None
        run = self.run = _TemporalRun(wf, args)
        for name, value in self.early:
            run.inbox.setdefault(name, deque()).append(value)
        loop = asyncio.get_running_loop()
        _scope_tasks(loop)
        context = contextvars.copy_context()
        context.run(current_scope.set, _Scope(run, ""))
        task = loop.create_task(self._body(run, wf, args), context=context)
        try:
            await workflow.wait_condition(
                lambda: task.done() or (run.draining and run.inflight == 0)
            )
        except asyncio.CancelledError:
            run.cancel_requested = True
            task.cancel()
        if not task.done() and not run.cancel_requested:
            workflow.continue_as_new(run.carry())
        try:
            return await task
        except Exception as exc:
            raise _application_error(run.broken or exc) from None

    @staticmethod
    async def _body(run: _TemporalRun, wf: Workflow[Any, Any], args: dict[str, Any]) -> str:
        if wf.takes_input:
            output = await wf.fn(run.ctx, loads(args["input"], wf.input_type))
        else:
            output = await wf.fn(run.ctx)
        if run.broken is not None:
            raise run.broken
        return wf.dump_output(output)


def _application_error(exc: BaseException) -> tex.ApplicationError:
    return tex.ApplicationError(
        str(exc), "".join(traceback.format_exception(exc)[-6:]),
        type=type(exc).__name__, non_retryable=True,
    )


def _scope_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Temporal's workflow event loop has no task factory: wrap its create_task so that tasks
    of workflow code get scopes of their own, as `task_factory` does on the embedded engine."""
    if getattr(loop, "_corral_scoped", False):
        return
    create = loop.create_task

    def create_task(coro: Any, *, name: str | None = None,
                    context: contextvars.Context | None = None) -> asyncio.Task[Any]:
        return create(coro, name=name,
                      context=context if context is not None else child_context())

    loop.create_task = create_task  # type: ignore[method-assign]
    loop._corral_scoped = True  # type: ignore[attr-defined]


# -- the activity -----------------------------------------------------------------------------


@activity.defn(name=STEP)
async def run_step(call: dict[str, Any]) -> tuple[int, str]:
    """Run one attempt of a step (Temporal retries it under the step's policy); return the
    attempt's number and the result as JSON."""
    info = activity.info()
    try:
        resolve(call["workflow"], call["ref"])  # loads the module that defines the steps
        step = find_step(call["origin"], call["step"])
        if step is None:
            raise UsageError(
                f"step {call['step']!r} is not defined in this worker; define steps at the top "
                f"level of the workflow's module (or one it imports) so every worker has them"
            )
    except Exception as exc:  # this worker's problem: another may have the code
        raise tex.ApplicationError(str(exc), info.attempt, type=type(exc).__name__,
                                   non_retryable=info.attempt > LOST_ATTEMPTS) from None
    if info.attempt > step.retry.max_attempts + LOST_ATTEMPTS:
        raise tex.ApplicationError(
            f"attempted {info.attempt - 1} times without an outcome (its workers were lost, or "
            "it ran past its start-to-close timeout); set a timeout on the step",
            info.attempt, type="TimeoutError", non_retryable=True,
        )
    try:
        args, kwargs = step.load_arguments(call["args"], call["kwargs"])
    except Exception as exc:
        raise tex.ApplicationError(str(exc), info.attempt, type=type(exc).__name__,
                                   non_retryable=True) from None
    last = info.attempt >= step.retry.max_attempts
    beat = asyncio.create_task(_heartbeat(info.heartbeat_timeout))
    run_id = info.workflow_id or ""
    spans = _StepSpans()
    current_step.set((run_id, call["workflow"], call["key"], spans))  # (its own context)
    started, failed = time.time(), True
    try:
        value = await step.once(args, kwargs, call["key"])
        failed = False
        return info.attempt, dumps(value).decode()
    except PydanticSerializationError as exc:
        raise tex.ApplicationError(
            f"returned a value corral cannot store as JSON ({exc}); return JSON-compatible "
            "data, a dataclass or a pydantic model", info.attempt, type="SerializationError",
            non_retryable=True,
        ) from None
    except Exception as exc:
        failure = step_failed(step.name, exc, info.attempt, step.timeout)
        raise tex.ApplicationError(
            failure.fields["error"], info.attempt, type=failure.fields["error_type"],
            non_retryable=last or not step.retry.retryable(exc),
        ) from None
    finally:
        beat.cancel()
        spans.export(run_id, call["key"], step.name, started, failed, info.attempt)


class _StepSpans:
    """A step's span on Temporal: each attempt is exported as it ends (activities are never
    replayed; there is no local store to keep spans in)."""

    tenant: str | None = None

    def __init__(self) -> None:
        self.name: str | None = None
        self.attributes: dict[str, Any] = {}

    def describe(self, key: str, name: str | None, attributes: Mapping[str, Any]) -> None:
        self.name = name or self.name
        self.attributes.update(attributes)

    def export(self, run_id: str, key: str, step: str, started: float, failed: bool,
               attempt: int) -> None:
        tracing = installed_tracing()
        if tracing.exporter is None or not tracing.sampled(trace_id_for(run_id)):
            return
        span = step_span(run_id, trace_id_for(run_id), f"{key}#{attempt}",
                         self.name or f"step {step}", started, time.time(),
                         run_span_id(run_id), "error" if failed else "ok", "",
                         {"corral.step": step, "corral.run.id": run_id,
                          "corral.attempts": attempt, **self.attributes})
        tracing.export([span])


async def _heartbeat(timeout: timedelta | None) -> None:
    every = (timeout.total_seconds() if timeout else 30.0) / 3
    while True:
        activity.heartbeat()
        await asyncio.sleep(every)


# -- the client and the worker ----------------------------------------------------------------


def _args(wf: Workflow[Any, Any], value: Any, options: dict[str, Any]) -> dict[str, Any]:
    return {"workflow": wf.name, "ref": wf.ref, "input": dumps(value).decode(),
            "options": options}


def _memo(wf: Workflow[Any, Any], args: dict[str, Any]) -> dict[str, Any]:
    return {"workflow": wf.name, "ref": wf.ref,
            "input_hash": blake2b(args["input"].encode(), digest_size=16).hexdigest()}


def _priority(priority: int | None) -> temporalio.common.Priority:
    """corral's priority (higher first, 0 by default) as Temporal's key (1 first, 3 default)."""
    if not priority:
        return temporalio.common.Priority.default
    return temporalio.common.Priority(priority_key=max(1, min(5, 3 - priority)))


_STATUS = {
    WorkflowExecutionStatus.RUNNING: "running",
    WorkflowExecutionStatus.COMPLETED: "completed",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
    WorkflowExecutionStatus.TERMINATED: "failed",
    WorkflowExecutionStatus.TIMED_OUT: "failed",
    WorkflowExecutionStatus.CONTINUED_AS_NEW: "running",
}


class TemporalRunHandle(Generic[O]):
    """A run on Temporal: wait for its result, signal it, cancel it, look at it."""

    def __init__(self, rt: TemporalRuntime, run_id: str, output_type: Any = Any) -> None:
        self._rt = rt
        self.id = run_id
        self._output_type = output_type

    def __repr__(self) -> str:
        return f"TemporalRunHandle({self.id!r})"

    async def describe(self) -> RunRecord:
        return await self._rt.get(self.id)

    async def result(self, timeout: float | None = None) -> O:
        async with asyncio.timeout(timeout):
            status, text, error = await self._rt._outcome(self.id)
        value: O = run_result(self.id, status, text, error, self._output_type)
        return value

    async def signal(self, name: str, value: Any = None) -> None:
        await self._rt.signal(self.id, name, value)

    async def cancel(self) -> None:
        await self._rt.cancel(self.id)


class TemporalRuntime:
    """Runs on a Temporal cluster: a client and, unless ``worker=False``, a worker.

    ``blobs`` is the shared database (``postgresql://...`` or a SQLite path) where payloads
    larger than ``offload_threshold`` bytes are stored by content hash. A run continues as new
    once its history has ``max_history_events`` events.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:7233",
        *,
        namespace: str = "default",
        task_queue: str = "corral",
        worker: bool = True,
        blobs: str | None = None,
        offload_threshold: int = 4096,
        max_history_events: int = 10_000,
        heartbeat_timeout: float = 30.0,
        step_timeout: float = 600.0,
        max_runs: int = 1000,
        max_steps: int = 200,
        shutdown_grace: float = 10.0,
    ) -> None:
        self.address = address
        self.namespace = namespace
        self.task_queue = task_queue
        self.worker = worker
        self.blobs_url = blobs
        self.offload_threshold = offload_threshold
        self.options = {"max_history_events": max_history_events,
                        "heartbeat_timeout": heartbeat_timeout, "step_timeout": step_timeout}
        self.max_runs = max_runs
        self.max_steps = max_steps
        self.shutdown_grace = shutdown_grace
        self.client: Client | None = None
        self._blobs: BlobStore | None = None
        self._worker: Worker | None = None
        self._worker_task: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> TemporalRuntime:
        return cls(**{**parse_engine_url(url), **options})

    async def __aenter__(self) -> TemporalRuntime:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        from ._offload import OffloadCodec

        converter = temporalio.converter.default()
        if self.blobs_url:
            self._blobs = await asyncio.to_thread(BlobStore, self.blobs_url)
            converter = temporalio.converter.DataConverter(
                payload_codec=OffloadCodec(self._blobs, threshold=self.offload_threshold)
            )
        try:
            self.client = await Client.connect(self.address, namespace=self.namespace,
                                               data_converter=converter)
        except RuntimeError as exc:
            await self.close()
            raise StoreError(
                f"cannot connect to Temporal at {self.address} ({exc}); check the engine URL "
                "(temporal://host:port) and that the server is up", address=self.address,
            ) from None
        if self.worker:
            self._worker = Worker(
                self.client, task_queue=self.task_queue, workflows=[CorralRun],
                activities=[run_step], workflow_runner=UnsandboxedWorkflowRunner(),
                max_concurrent_activities=self.max_steps,
                max_cached_workflows=self.max_runs,
                graceful_shutdown_timeout=timedelta(seconds=self.shutdown_grace),
                # changed code that no longer matches a run's history fails the run, with the
                # two calls named, instead of retrying its task forever
                workflow_failure_exception_types=[workflow.NondeterminismError],
            )
            self._worker_task = asyncio.create_task(self._worker.run(),
                                                    context=contextvars.Context())

    async def close(self) -> None:
        """Stop the worker (runs carry on in Temporal, on other workers or after a restart)."""
        try:
            if self._worker is not None and self._worker_task is not None:
                if not self._worker_task.done():
                    await self._worker.shutdown()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._worker_task
        finally:
            self._worker = self._worker_task = None
            if self._blobs is not None:
                self._blobs.close()
                self._blobs = None

    @property
    def healthy(self) -> bool:
        """The worker is polling (or this runtime has none to run)."""
        return self._worker_task is None or not self._worker_task.done()

    async def wait_closed(self) -> None:
        """Serve until the worker stops (it stops on close(), or when it fails)."""
        if self._worker_task is not None:
            await asyncio.shield(self._worker_task)

    def _client(self) -> Client:
        if self.client is None:
            raise UsageError("the runtime is not open; use `async with TemporalRuntime(...)`")
        return self.client

    async def start(
        self,
        workflow: Workflow[Any, O],
        input: Any = None,
        *,
        id: str | None = None,
        queue: str | None = None,
        priority: int = 0,
        run_at: datetime | float | None = None,
        delay: float | timedelta | None = None,
        concurrency_key: str | None = None,
        concurrency_limit: int | None = None,
    ) -> TemporalRunHandle[O]:
        """Submit a run; the same ``id`` again returns the first run (see `Runtime.start`)."""
        if not isinstance(workflow, Workflow):
            raise UsageError(f"start() takes a @corral.workflow, not {workflow!r}")
        if concurrency_key is not None or concurrency_limit is not None:
            raise UsageError(
                "concurrency keys are not supported on the Temporal engine yet; cap concurrency "
                "with a task queue (queue=) served by workers with max_runs set"
            )
        value = workflow.validate_input(input)
        wait = start_time(run_at, delay) - time.time()
        start_delay = timedelta(seconds=wait) if wait > 0 else None
        from ._engine import new_run_id

        run_id = id or new_run_id()
        args = _args(workflow, value, self.options)
        memo = _memo(workflow, args)
        try:
            await self._client().start_workflow(
                WORKFLOW, args, id=run_id, task_queue=queue or self.task_queue, memo=memo,
                start_delay=start_delay, priority=_priority(priority),
                id_reuse_policy=temporalio.common.WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )
        except tex.WorkflowAlreadyStartedError:
            existing = await self._client().get_workflow_handle(run_id).describe()
            theirs = await existing.memo()
            if (theirs.get("workflow"), theirs.get("input_hash")) != (
                    memo["workflow"], memo["input_hash"]):
                raise RunConflict(
                    f"run {run_id!r} already exists with "
                    + ("another workflow" if theirs.get("workflow") != memo["workflow"]
                       else "another input")
                    + "; use a new id, or the same workflow and input to get the first run",
                    run_id=run_id,
                ) from None
        return TemporalRunHandle(self, run_id, workflow.output_type)

    async def run(self, workflow: Workflow[Any, O], input: Any = None, **options: Any) -> O:
        handle = await self.start(workflow, input, **options)
        return await handle.result()

    def handle(self, run_id: str) -> TemporalRunHandle[Any]:
        return TemporalRunHandle(self, run_id)

    def _workflow(self, run_id: str) -> WorkflowHandle[Any, Any]:
        return self._client().get_workflow_handle(run_id)

    async def _outcome(self, run_id: str) -> tuple[str, str | None, dict[str, Any]]:
        try:
            text = await self._workflow(run_id).result()
            return "completed", text, {}
        except WorkflowFailureError as exc:
            ended = _ended(exc.cause)
            return ended["status"], None, ended["error"]
        except RPCError as exc:
            raise self._not_found(run_id, exc) from None

    def _not_found(self, run_id: str, exc: RPCError) -> Exception:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return RunNotFound(f"no run {run_id!r}; list runs with `corral runs ls`",
                               run_id=run_id)
        return StoreError(f"Temporal at {self.address} failed: {exc}; retry when it is up")

    async def get(self, run_id: str) -> RunRecord:
        try:
            desc = await self._workflow(run_id).describe()
        except RPCError as exc:
            raise self._not_found(run_id, exc) from None
        record = self._record(desc, await desc.memo())
        if record.finished:
            record.status, record.result, failure = await self._outcome(run_id)
            record.error = json.dumps(failure) if failure else None
        return record

    async def list_runs(self, *, status: str | None = None, workflow: str | None = None,
                        limit: int = 50) -> list[RunRecord]:
        """Runs of this runtime's task queue, newest first (Temporal's visibility store)."""
        query = (f"WorkflowType = '{WORKFLOW}' AND TaskQueue = '{self.task_queue}' "
                 "AND ExecutionStatus != 'ContinuedAsNew'")  # (one row per run, its latest)
        found: list[RunRecord] = []
        async for execution in self._client().list_workflows(query):
            record = self._record(execution, await execution.memo())
            if (status is None or record.status == status) and (
                    workflow is None or record.workflow == workflow):
                found.append(record)
                if len(found) >= limit:
                    break
        outcomes = await asyncio.gather(*(self._outcome(r.id) for r in found if r.finished))
        for record, (_, result, failure) in zip(
                [r for r in found if r.finished], outcomes, strict=True):
            record.result, record.error = result, json.dumps(failure) if failure else None
        return found

    def _record(self, desc: Any, memo: Mapping[str, Any]) -> RunRecord:
        status = _STATUS.get(desc.status, "running") if desc.status else "running"
        if status == "running" and desc.history_length <= 2:  # no worker has taken it yet
            status = "queued"
        return RunRecord(
            id=desc.id, workflow=memo.get("workflow", "?"), ref=memo.get("ref", "?"),
            input="null", input_hash=memo.get("input_hash", ""), status=status,
            queue=desc.task_queue, priority=0, run_at=None, concurrency_key=None,
            concurrency_limit=None, parent_id=desc.parent_id, owner=None,
            cancel_requested=status == "cancelled", result=None, error=None,
            created_at=desc.start_time.timestamp(), started_at=desc.start_time.timestamp(),
            ended_at=desc.close_time.timestamp() if desc.close_time else None, attempts=1,
        )

    async def journal(self, run_id: str) -> list[JournalEntry]:
        """What the run has done so far (asked of the run itself, through a worker)."""
        try:
            rows = await self._workflow(run_id).query("corral.journal")
        except RPCError as exc:
            if exc.status == RPCStatusCode.FAILED_PRECONDITION:
                raise StoreError(
                    f"no worker serves task queue {self.task_queue!r}, and on Temporal a run's "
                    "journal is read through one; start `corral worker`", run_id=run_id,
                ) from None
            raise self._not_found(run_id, exc) from None
        return [JournalEntry(key=k, kind=kind, name=name, status=status, value=value,
                             started_at=at, ended_at=None if status == "pending" else at,
                             attempts=attempts)
                for k, kind, name, status, value, attempts, at in rows]

    async def signal(self, run_id: str, name: str, value: Any = None) -> None:
        if name.startswith("$"):
            raise UsageError(f"signal names starting with '$' are corral's own, not {name!r}")
        try:
            await self._workflow(run_id).signal(name, to_jsonable_python(value))
        except RPCError as exc:
            raise await self._closed(run_id, exc, "signals") from None
        await note_override(run_id, f"signal:{name}", value)

    async def cancel(self, run_id: str) -> None:
        record = await self.get(run_id)
        if record.finished:
            raise RunFinished(f"run {run_id!r} has finished ({record.status}); it takes no "
                              "more cancel requests", run_id=run_id, status=record.status)
        try:
            await self._workflow(run_id).cancel()
        except RPCError as exc:
            raise await self._closed(run_id, exc, "cancel requests") from None
        await note_override(run_id, "cancel")

    async def _closed(self, run_id: str, exc: RPCError, what: str) -> Exception:
        """Temporal says NOT_FOUND for a run that has finished too: tell the two apart."""
        if exc.status == RPCStatusCode.NOT_FOUND:
            with contextlib.suppress(RunNotFound):
                record = await self.get(run_id)
                return RunFinished(f"run {run_id!r} has finished ({record.status}); it takes "
                                   f"no more {what}", run_id=run_id, status=record.status)
        return self._not_found(run_id, exc)

