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
import logging
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
from temporalio.api.enums.v1 import IndexedValueType, TaskQueueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
)
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from .._errors import (
    CorralError,
    InvalidCursor,
    NonDeterminismError,
    RunConflict,
    RunFinished,
    RunNotFound,
    StoreError,
    UsageError,
)
from .._serde import PydanticSerializationError, dumps, loads
from ..observability._runs import STEPS
from ..observability._spans import Span, run_span_id, trace_id_for
from ..observability._traces import child_parent, journal_span, run_span
from ..observability._tracing import CONTENT_KEYS, OpenSpan, current_span
from ..observability._tracing import installed as installed_tracing
from ..stores import JournalEntry, RunRecord
from ..stores.blobs import BlobStore
from ._context import (
    REPLAY_RULE,
    Context,
    _Scope,
    check_trace_id,
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
log = logging.getLogger("corral.runtime")

WORKFLOW = "corral.run"
STEP = "corral.step"
# Attempts a step may lose with its workers (or to its start-to-close timeout) beyond its own
# max_attempts before it fails: Temporal's count includes them, a step's policy does not.
LOST_ATTEMPTS = 5

# Visibility: whose run it is, which workflow, and the signals it waits for (a run waiting
# for a human is listed as waiting). `TemporalRuntime.open` registers them in the namespace.
TENANT = temporalio.common.SearchAttributeKey.for_keyword("CorralTenant")
WORKFLOW_NAME = temporalio.common.SearchAttributeKey.for_keyword("CorralWorkflow")
WAITING_ON = temporalio.common.SearchAttributeKey.for_keyword_list("CorralWaitingOn")
SEARCH_ATTRIBUTES = {TENANT.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
                     WORKFLOW_NAME.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
                     WAITING_ON.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST}
# runs that began before a worker upserted CorralWaitingOn replay without it
WAITING_PATCH = "corral.waiting-on"


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
    __slots__ = ("at", "attempts", "kind", "name", "span", "started", "status", "value")

    def __init__(self, kind: str, name: str, status: str, value: str, attempts: int = 1,
                 at: float = 0.0, started: float | None = None,
                 span: list[Any] | None = None) -> None:
        self.kind, self.name, self.status, self.value = kind, name, status, value
        self.attempts = attempts
        self.at = at
        self.started = at if started is None else started
        self.span = span
        """A step's span as its body described it: [name, attributes, parent span id]."""

    def row(self, key: str) -> tuple[str, str, str, str, str, int, float]:
        """The record as the journal query answers it and continue-as-new carries it (the
        shape every version of corral reads; the rest goes in `timing`)."""
        return key, self.kind, self.name, self.status, self.value, self.attempts, self.at

    def timing(self) -> list[Any] | None:
        """When it started and the span its step described, if they say more than `row`."""
        return None if self.started == self.at and not self.span else [self.started, self.span]

    def entry(self, key: str) -> JournalEntry:
        return JournalEntry(key=key, kind=self.kind, name=self.name, status=self.status,
                            value=self.value, started_at=self.started,
                            ended_at=None if self.status == "pending" else self.at,
                            attempts=self.attempts)


class _TemporalRun:
    """A run as the Temporal workflow holds it: the state `Context` works on."""

    def __init__(self, wf: Workflow[Any, Any], args: dict[str, Any]) -> None:
        info = workflow.info()
        self.id = info.workflow_id
        self.wf = wf
        self.args = args
        self.options: dict[str, Any] = args["options"]
        timing = args.get("timing") or {}
        self.journal: dict[str, _Record] = {
            e[0]: _Record(*e[1:7], *(timing.get(e[0]) or ())) for e in args.get("journal", ())
        }
        self.inbox: dict[str, deque[Any]] = {}
        for name, value in args.get("signals", ()):
            self.inbox.setdefault(name, deque()).append(value)
        self.tenant: str | None = args.get("tenant")
        self.trace_id: str = args.get("trace_id") or trace_id_for(self.id)
        self.spans: dict[str, dict[str, Any]] = {s["span_id"]: s
                                                 for s in args.get("spans", ())}
        """Spans of workflow code (an agent's loop) that closed, as `Span.as_dict` has them."""
        self.waits: dict[str, int] = {}
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
                attempts: int = 1, started: float | None = None,
                span: list[Any] | None = None) -> None:
        now = workflow.now().timestamp()
        if started is None:
            earlier = self.journal.get(key)
            started = earlier.started if earlier is not None else now
        record = self.journal[key] = _Record(kind, name, status, value, attempts, now,
                                             started, span)
        self.activity += 1
        if status != "pending" and kind != "now" and not workflow.unsafe.is_replaying():
            _export(self.trace_id, [_record_span(self.id, self.trace_id, record.entry(key),
                                                 span)])

    # -- spans of workflow code (see observability._tracing.workflow_span) --------------------

    def open_span(self, name: str, scope: _Scope, attributes: dict[str, Any]) -> OpenSpan:
        span = OpenSpan.opening(self.id, scope, name, attributes)
        span.start = workflow.now().timestamp()
        return span

    def close_span(self, span: OpenSpan, failure: BaseException | None) -> None:
        """Keep the span in the run's state (the trace reads it); export it once, when it
        closes live rather than in a replay of the history."""
        if span.span_id in self.spans or isinstance(failure, GeneratorExit):
            return  # closed in an earlier history and replayed, or evicted from the cache
        closed = span.closed(self.id, self.trace_id, workflow.now().timestamp(), failure)
        self.spans[span.span_id] = closed.as_dict()
        if not workflow.unsafe.is_replaying():
            _export(self.trace_id, [closed])

    def _waiting(self, name: str, change: int) -> None:
        """Count a wait for signal ``name``; the run's CorralWaitingOn lists the names."""
        if name.startswith("$"):
            return
        self.waits[name] = self.waits.get(name, 0) + change
        if not self.waits[name]:
            del self.waits[name]
        if workflow.patched(WAITING_PATCH):
            workflow.upsert_search_attributes([
                WAITING_ON.value_set(sorted(self.waits)) if self.waits
                else WAITING_ON.value_unset()])

    async def step(self, step: Step[Any, Any], scope: _Scope, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        key = scope.next()
        entry = self._begin(key, "step", step.name)
        if entry is not None:
            if entry.status == "ok":
                return step.decode(entry.value)
            error = json.loads(entry.value)
            raise failed_step(step.name, error["type"], error["message"], entry.attempts)
        parent = current_span.get()
        try:
            call = {"step": step.name, "origin": step.origin, "workflow": self.wf.name,
                    "ref": self.wf.ref, "key": f"{self.id}/{key}",
                    "args": to_jsonable_python(args), "kwargs": to_jsonable_python(kwargs),
                    "tenant": self.tenant, "trace_id": self.trace_id, "describe": True}
        except PydanticSerializationError as exc:
            raise UsageError(
                f"step {step.name!r}: on the Temporal engine a step's arguments travel to the "
                f"worker that runs it as JSON, and these cannot ({exc}); pass JSON-compatible "
                "data, dataclasses or pydantic models"
            ) from None
        await self._admit()
        policy = step.retry
        timeout = step.timeout
        scheduled = workflow.now().timestamp()
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
            # (attempt, result, span); workers of earlier versions answer (attempt, result)
            outcome = await handle
        except tex.ActivityError as exc:
            cause = exc.cause
            if isinstance(cause, tex.CancelledError):
                self.cancel_requested = True
                raise asyncio.CancelledError() from None
            described = None
            if isinstance(cause, tex.ApplicationError):
                error_type, message = cause.type or "Error", cause.message
                attempts, *more = cause.details or (1,)
                described = more[0] if more else None
            else:  # a Temporal timeout: the worker running it died, or the backstop fired
                error_type, message, attempts = "TimeoutError", str(cause or exc), 1
            self._record(key, "step", step.name, "error",
                         json.dumps({"type": error_type, "message": message}), attempts,
                         scheduled, _described(described, parent))
            raise failed_step(step.name, error_type, message, attempts) from None
        except asyncio.CancelledError:
            self.cancel_requested = True
            raise
        finally:
            self.inflight -= 1
        attempts, text = outcome[0], outcome[1]
        self._record(key, "step", step.name, "ok", text, attempts, scheduled,
                     _described(outcome[2] if len(outcome) > 2 else None, parent))
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
                self._waiting(signal, 1)
                try:
                    await _unscoped(workflow.wait_condition(lambda: bool(inbox),
                                                            timeout=remaining))
                except GeneratorExit:  # evicted from the worker's cache: no more commands
                    raise
                except BaseException:
                    self._waiting(signal, -1)
                    raise
                self._waiting(signal, -1)
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
        args = _args(wf, value, self.options, self.tenant, self.trace_id,
                     workflow.now().timestamp())
        self.inflight += 1
        try:
            try:
                text = await _unscoped(workflow.execute_child_workflow(
                    WORKFLOW, args, id=child_id,
                    task_queue=queue or workflow.info().task_queue,
                    memo=_memo(wf, args), search_attributes=_attributes(wf, self.tenant),
                    priority=_priority(priority),
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
        return [e.row(k) for k, e in self.journal.items()]

    def timings(self) -> dict[str, list[Any]]:
        return {k: t for k, e in self.journal.items() if (t := e.timing()) is not None}

    def carry(self) -> dict[str, Any]:
        """The arguments of this run's next history: its journal and unread signals."""
        return {
            **self.args,
            "journal": self.entries(),
            "timing": self.timings(),
            "spans": list(self.spans.values()),
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

    @workflow.query(name="corral.trace")
    def trace(self) -> dict[str, Any]:
        """What the journal query does not say: when entries started, what steps described,
        and the spans of workflow code."""
        if self.run is None:
            return {"timing": {}, "spans": []}
        return {"timing": self.run.timings(), "spans": list(self.run.spans.values())}

    @workflow.run
    async def execute(self, args: dict[str, Any]) -> str:
        try:
            wf = resolve(args["workflow"], args["ref"])
        except CorralError as exc:
            # not the run's failure but this worker's: fail the task, so that Temporal retries
            # it (on a worker that has the code); the worker logs why
            raise RuntimeError(f"this worker cannot run {args['workflow']!r}: {exc}") from None
        args.setdefault("started", workflow.now().timestamp())  # (kept as it continues as new)
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
            # (its waits start again in the next history, and list themselves again there)
            kept = [pair for pair in workflow.info().typed_search_attributes
                    if pair.key.name in (TENANT.name, WORKFLOW_NAME.name)]
            workflow.continue_as_new(run.carry(), search_attributes=(
                temporalio.common.TypedSearchAttributes(kept)))
        try:
            text: str = await task
        except asyncio.CancelledError:
            _ended_span(run, "cancelled", None)
            raise
        except Exception as exc:
            failure = run.broken or exc
            _ended_span(run, "failed", {"type": type(failure).__name__, "message": str(failure)})
            raise _application_error(failure) from None
        _ended_span(run, "completed", None)
        return text

    @staticmethod
    async def _body(run: _TemporalRun, wf: Workflow[Any, Any], args: dict[str, Any]) -> str:
        if wf.takes_input:
            output = await wf.fn(run.ctx, loads(args["input"], wf.input_type))
        else:
            output = await wf.fn(run.ctx)
        if run.broken is not None:
            raise run.broken
        return wf.dump_output(output)


def _ended_span(run: _TemporalRun, status: str, error: dict[str, str] | None) -> None:
    """Export the run's ``invoke_workflow`` span as it ends (live, not in a replay)."""
    if workflow.unsafe.is_replaying():
        return
    args = run.args
    parent = child_parent(run.id, run.parent_id) if run.parent_id else None
    started = args["started"]
    _export(run.trace_id, [run_span(
        run.id, run.trace_id, run.wf.name, parent, run.tenant, args.get("created", started),
        started, workflow.now().timestamp(), status, json.dumps(error) if error else None)])


def _export(trace_id: str, spans: list[Span]) -> None:
    tracing = installed_tracing()
    if tracing.exporter is not None and tracing.sampled(trace_id):
        tracing.export(spans)


def _described(described: Sequence[Any] | None, parent: OpenSpan | None) -> list[Any] | None:
    """What a step's journal record keeps of its span: the name and attributes its body gave
    it, and the span of workflow code it ran under."""
    name, attributes = described if described else (None, {})
    if name is None and not attributes and parent is None:
        return None
    return [name, attributes, parent.span_id if parent is not None else None]


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
async def run_step(call: dict[str, Any]) -> tuple[Any, ...]:
    """Run one attempt of a step (Temporal retries it under the step's policy); return the
    attempt's number, the result as JSON and, when the run asks (``describe``: workflow code
    of earlier versions unpacks two), what the step's body described of its span."""
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
    spans = _StepSpans(call.get("tenant"), call.get("trace_id") or trace_id_for(run_id))
    current_step.set((run_id, call["workflow"], call["key"], spans))  # (its own context)
    started, failed = time.time(), True
    try:
        value = await step.once(args, kwargs, call["key"])
        failed = False
        if call.get("describe"):
            return info.attempt, dumps(value).decode(), spans.described()
        return info.attempt, dumps(value).decode()
    except PydanticSerializationError as exc:
        raise tex.ApplicationError(
            f"returned a value corral cannot store as JSON ({exc}); return JSON-compatible "
            "data, a dataclass or a pydantic model", info.attempt, spans.described(),
            type="SerializationError", non_retryable=True,
        ) from None
    except Exception as exc:
        failure = step_failed(step.name, exc, info.attempt, step.timeout)
        raise tex.ApplicationError(
            failure.fields["error"], info.attempt, spans.described(),
            type=failure.fields["error_type"],
            non_retryable=last or not step.retry.retryable(exc),
        ) from None
    finally:
        beat.cancel()
        STEPS.observe(step.name, "error" if failed else "ok", time.time() - started)


class _StepSpans:
    """What a step's body describes of its span, on Temporal: it goes back to the run with
    the result, into the journal (the run exports the span, and its trace shows it)."""

    def __init__(self, tenant: str | None, trace_id: str) -> None:
        self.tenant = tenant
        self.trace_id = trace_id
        self.name: str | None = None
        self.attributes: dict[str, Any] = {}

    def described(self) -> list[Any] | None:
        """The name and attributes, without content (prompts, answers, tool arguments): it
        would go into the run's history, and every later history with it."""
        attributes = {k: v for k, v in self.attributes.items() if k not in CONTENT_KEYS}
        return [self.name, attributes] if self.name or attributes else None

    def describe(self, key: str, name: str | None, attributes: Mapping[str, Any]) -> None:
        self.name = name or self.name
        self.attributes.update(attributes)


async def _heartbeat(timeout: timedelta | None) -> None:
    every = (timeout.total_seconds() if timeout else 30.0) / 3
    while True:
        activity.heartbeat()
        await asyncio.sleep(every)


# -- the client and the worker ----------------------------------------------------------------


def _args(wf: Workflow[Any, Any], value: Any, options: dict[str, Any], tenant: str | None,
          trace_id: str | None, created: float) -> dict[str, Any]:
    return {"workflow": wf.name, "ref": wf.ref, "input": dumps(value).decode(),
            "options": options, "tenant": tenant, "trace_id": trace_id, "created": created}


def _memo(wf: Workflow[Any, Any], args: dict[str, Any]) -> dict[str, Any]:
    return {"workflow": wf.name, "ref": wf.ref,
            "input_hash": blake2b(args["input"].encode(), digest_size=16).hexdigest(),
            "tenant": args["tenant"], "trace_id": args["trace_id"], "created": args["created"]}


def _attributes(wf: Workflow[Any, Any],
                tenant: str | None) -> temporalio.common.TypedSearchAttributes:
    return temporalio.common.TypedSearchAttributes([
        temporalio.common.SearchAttributePair(TENANT, tenant or "default"),
        temporalio.common.SearchAttributePair(WORKFLOW_NAME, wf.name)])


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

    def __init__(self, rt: TemporalRuntime, run_id: str, output_type: Any = Any,
                 created: bool = False) -> None:
        self._rt = rt
        self.id = run_id
        self._output_type = output_type
        self.created = created
        """This start submitted the run (False: the id named a run submitted before)."""

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
        await self._register_attributes()
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

    async def _register_attributes(self) -> None:
        """corral's search attributes, in the namespace once (an operator may have to)."""
        client = self._client()
        try:
            try:
                have = await client.operator_service.list_search_attributes(
                    ListSearchAttributesRequest(namespace=self.namespace))
            except RPCError as exc:
                if exc.status not in (RPCStatusCode.PERMISSION_DENIED,
                                      RPCStatusCode.UNIMPLEMENTED):
                    raise
                log.warning("cannot list the search attributes of namespace %s (%s): corral "
                            "takes it that an operator registered %s", self.namespace,
                            exc.message, ", ".join(SEARCH_ATTRIBUTES))
                return
            missing = {name: kind for name, kind in SEARCH_ATTRIBUTES.items()
                       if name not in have.custom_attributes}
            if missing:
                await client.operator_service.add_search_attributes(AddSearchAttributesRequest(
                    namespace=self.namespace, search_attributes=missing))
        except RPCError as exc:
            if exc.status == RPCStatusCode.ALREADY_EXISTS:  # another process, just now
                return
            await self.close()
            types = {IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD: "Keyword",
                     IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST: "KeywordList"}
            commands = "; ".join(
                f"temporal operator search-attribute create --namespace {self.namespace} "
                f"--name {name} --type {types[kind]}" for name, kind in SEARCH_ATTRIBUTES.items())
            raise StoreError(
                f"corral lists runs by its search attributes, and Temporal at {self.address} "
                f"did not let it register them ({exc.message}); an operator can: {commands} "
                "(on Temporal Cloud: tcld namespace search-attributes add)",
                address=self.address,
            ) from None

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
        tenant: str | None = None,
        trace_id: str | None = None,
    ) -> TemporalRunHandle[O]:
        """Submit a run; the same ``id`` again returns the first run (see `Runtime.start`)."""
        if not isinstance(workflow, Workflow):
            raise UsageError(f"start() takes a @corral.workflow, not {workflow!r}")
        if concurrency_key is not None or concurrency_limit is not None:
            raise UsageError(
                "concurrency keys are not supported on the Temporal engine yet; cap concurrency "
                "with a task queue (queue=) served by workers with max_runs set"
            )
        check_trace_id(trace_id)
        value = workflow.validate_input(input)
        wait = start_time(run_at, delay) - time.time()
        start_delay = timedelta(seconds=wait) if wait > 0 else None
        from ._engine import new_run_id

        run_id = id or new_run_id()
        args = _args(workflow, value, self.options, tenant, trace_id, time.time())
        memo = _memo(workflow, args)
        try:
            await self._client().start_workflow(
                WORKFLOW, args, id=run_id, task_queue=queue or self.task_queue, memo=memo,
                search_attributes=_attributes(workflow, tenant), start_delay=start_delay,
                priority=_priority(priority),
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
        return TemporalRunHandle(self, run_id, workflow.output_type, created=True)

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
        if desc.workflow_type != WORKFLOW:  # (another application's, in the same namespace)
            raise RunNotFound(f"no run {run_id!r}; list runs with `corral runs ls`",
                              run_id=run_id)
        return await self._filled(self._record(desc, await desc.memo()), desc)

    async def _filled(self, record: RunRecord, desc: Any = None) -> RunRecord:
        """The record with its input (from its history's first event) and, once it has
        ended, its result or error. A running run's queued-or-running is decided from its
        description (``desc``, else asked for: a listing's history length is the one it had
        when last indexed)."""
        async def outcome() -> None:
            if record.finished:
                record.status, record.result, failure = await self._outcome(record.id)
                record.error = json.dumps(failure) if failure else None
            elif record.status == "running":  # (history length 2: no worker has taken it)
                taken = (desc or await self._workflow(record.id).describe()).history_length > 2
                record.status = "running" if taken else "queued"

        async def given() -> None:
            async for event in self._workflow(record.id).fetch_history_events(page_size=1):
                payloads = event.workflow_execution_started_event_attributes.input.payloads
                (args,) = await self._client().data_converter.decode(payloads, [dict])
                record.input = args["input"]
                break

        try:
            await asyncio.gather(outcome(), given())
        except RPCError as exc:
            raise self._not_found(record.id, exc) from None
        return record

    async def list_runs(self, *, status: str | None = None, workflow: str | None = None,
                        limit: int = 50, tenant: str | None = None,
                        all_queues: bool = False) -> list[RunRecord]:
        """Runs of this runtime's task queue (or of every queue), as Temporal's visibility
        lists them: those running first, then by when they ended, newest first."""
        runs, _ = await self.page(status=status, workflow=workflow, limit=limit, tenant=tenant,
                                  all_queues=all_queues)
        return runs

    async def page(self, *, status: str | None = None, workflow: str | None = None,
                   limit: int = 50, tenant: str | None = None, all_queues: bool = False,
                   token: bytes | None = None) -> tuple[list[RunRecord], bytes | None]:
        """A page of runs and the token of the next page (None: the last page)."""
        clauses = [f"WorkflowType = '{WORKFLOW}'",
                   "ExecutionStatus != 'ContinuedAsNew'"]  # (one row per run, its latest)
        if not all_queues:
            clauses.append(f"TaskQueue = {_literal(self.task_queue)}")
        if workflow is not None:
            clauses.append(f"{WORKFLOW_NAME.name} = {_literal(workflow)}")
        if tenant is not None:
            clauses.append(f"{TENANT.name} = {_literal(tenant)}")
        if status is not None:
            if status not in _QUERIES:
                raise UsageError(f"status must be one of {', '.join(_QUERIES)}, not {status!r}")
            clauses.append(_QUERIES[status])
        listing = self._client().list_workflows(" AND ".join(clauses), page_size=limit,
                                                next_page_token=token)
        try:
            await listing.fetch_next_page()
        except RPCError as exc:
            if token is not None and exc.status not in (RPCStatusCode.UNAVAILABLE,
                                                        RPCStatusCode.DEADLINE_EXCEEDED):
                raise InvalidCursor(f"Temporal refused the page token ({exc.message})") from None
            raise StoreError(f"Temporal at {self.address} failed to list runs: {exc}; retry "
                             "when it is up") from None
        found = [self._record(e, await e.memo()) for e in listing.current_page or ()]
        filled = await asyncio.gather(*map(self._filled, found), return_exceptions=True)
        for outcome in filled:  # (a run the retention removed since it was listed is left out)
            if isinstance(outcome, BaseException) and not isinstance(outcome, RunNotFound):
                raise outcome
        runs = [r for r in filled if isinstance(r, RunRecord)]
        if status in ("queued", "running"):  # (both are Running in visibility)
            runs = [r for r in runs if r.status == status]
        return runs, listing.next_page_token

    def _record(self, desc: Any, memo: Mapping[str, Any]) -> RunRecord:
        status = _STATUS.get(desc.status, "running") if desc.status else "running"
        waiting_on: tuple[str, ...] = ()
        if status == "running":  # (or queued: see _filled)
            waiting_on = tuple(desc.typed_search_attributes.get(WAITING_ON) or ())
            if waiting_on:
                status = "waiting"
        started = desc.start_time.timestamp()
        return RunRecord(
            id=desc.id, workflow=memo.get("workflow", "?"), ref=memo.get("ref", "?"),
            input="null", input_hash=memo.get("input_hash", ""), status=status,
            queue=desc.task_queue, priority=0, run_at=None, concurrency_key=None,
            concurrency_limit=None, parent_id=desc.parent_id, owner=None,
            cancel_requested=status == "cancelled", result=None, error=None,
            created_at=memo.get("created") or started, started_at=started,
            ended_at=desc.close_time.timestamp() if desc.close_time else None, attempts=1,
            tenant=memo.get("tenant"), trace_id=memo.get("trace_id"), waiting_on=waiting_on,
        )

    async def count_runs(self) -> tuple[dict[str, int], dict[str, tuple[int, float]]]:
        """Runs by status (from visibility), and this task queue's backlog: tasks no worker
        has taken yet, and the oldest one's age, for an autoscaler."""
        client = self._client()
        every = f"WorkflowType = '{WORKFLOW}' AND ExecutionStatus != 'ContinuedAsNew'"
        try:
            counted, waiting = await asyncio.gather(
                client.count_workflows(f"{every} GROUP BY ExecutionStatus"),
                client.count_workflows(f"{every} AND {_QUERIES['waiting']}"))
            backlogs = await asyncio.gather(*(
                client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
                    namespace=self.namespace, task_queue=TaskQueue(name=self.task_queue),
                    task_queue_type=kind, report_stats=True))
                for kind in (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                             TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY)))
        except RPCError as exc:
            raise StoreError(f"Temporal at {self.address} failed to count runs: {exc}; retry "
                             "when it is up") from None
        runs: dict[str, int] = {}
        for group in counted.groups:  # (visibility's names: Running, Canceled, TimedOut...)
            status = {"Running": "running", "Completed": "completed",
                      "Canceled": "cancelled"}.get(str(group.group_values[0]), "failed")
            runs[status] = runs.get(status, 0) + group.count
        if waiting.count:  # (two queries: runs may end between them)
            runs["waiting"] = waiting.count
            runs["running"] = max(0, runs.get("running", 0) - waiting.count)
        depth = sum(b.stats.approximate_backlog_count for b in backlogs)
        age = max(b.stats.approximate_backlog_age.ToTimedelta().total_seconds()
                  for b in backlogs)
        return runs, {self.task_queue: (depth, age if depth else 0.0)}

    async def journal(self, run_id: str) -> list[JournalEntry]:
        """What the run has done so far (asked of the run itself, through a worker)."""
        return [_entry(row) for row in await self._query(run_id, "corral.journal")]

    async def _query(self, run_id: str, name: str, unknown: Any = None) -> Any:
        """Ask the run (through a worker); ``unknown``: what a worker that does not know the
        query answers (one of an earlier version), else its failure is raised."""
        try:
            return await self._workflow(run_id).query(name)
        except WorkflowQueryFailedError:
            if unknown is None:
                raise
            return unknown
        except RPCError as exc:
            if exc.status == RPCStatusCode.FAILED_PRECONDITION:
                raise StoreError(
                    "no worker serves the run's task queue, and on Temporal a run's journal is "
                    "read through one; start `corral worker`", run_id=run_id,
                ) from None
            raise self._not_found(run_id, exc) from None

    async def trace(self, run_id: str
                    ) -> tuple[list[RunRecord], dict[str, list[JournalEntry]], list[Span]]:
        """The run and its children, their journals and the spans their steps and agents
        described: what `observability._traces.assemble` makes a tree of."""
        runs: list[RunRecord] = []
        journals: dict[str, list[JournalEntry]] = {}
        spans: list[Span] = []
        todo = [run_id]
        while todo:
            run = await self.get(todo.pop(0))
            rows, more = await asyncio.gather(self._query(run.id, "corral.journal"),
                                              self._query(run.id, "corral.trace", {}))
            runs.append(run)
            trace_id = run.trace_id or trace_id_for(run.id)
            timing = more.get("timing") or {}
            journals[run.id] = [_entry(row, timing.get(row[0])) for row in rows]
            spans += [Span(**span) for span in more.get("spans") or ()]
            for entry in journals[run.id]:
                described = (timing.get(entry.key) or (None, None))[1]
                if entry.kind == "step" and described:
                    spans.append(_record_span(run.id, trace_id, entry, described))
                if entry.kind == "child":
                    child = json.loads(entry.value or "{}")
                    child_id = child.get("id") or (child.get("value") or {}).get("id")
                    if child_id:
                        todo.append(child_id)
        return runs, journals, spans

    async def signal(self, run_id: str, name: str, value: Any = None) -> None:
        if name.startswith("$"):
            raise UsageError(f"signal names starting with '$' are corral's own, not {name!r}")
        try:
            await self._workflow(run_id).signal(name, to_jsonable_python(value))
        except RPCError as exc:
            raise await self._closed(run_id, exc, "signals") from None
        await note_override(run_id, f"signal:{name}", value, run=lambda: self.get(run_id))

    async def cancel(self, run_id: str) -> None:
        record = await self.get(run_id)
        if record.finished:
            raise RunFinished(f"run {run_id!r} has finished ({record.status}); it takes no "
                              "more cancel requests", run_id=run_id, status=record.status)
        try:
            await self._workflow(run_id).cancel()
        except RPCError as exc:
            raise await self._closed(run_id, exc, "cancel requests") from None
        await note_override(run_id, "cancel", run=lambda: self.get(run_id))

    async def _closed(self, run_id: str, exc: RPCError, what: str) -> Exception:
        """Temporal says NOT_FOUND for a run that has finished too: tell the two apart."""
        if exc.status == RPCStatusCode.NOT_FOUND:
            with contextlib.suppress(RunNotFound):
                record = await self.get(run_id)
                return RunFinished(f"run {run_id!r} has finished ({record.status}); it takes "
                                   f"no more {what}", run_id=run_id, status=record.status)
        return self._not_found(run_id, exc)



_QUERIES = {
    "queued": "ExecutionStatus = 'Running'",  # (then those no worker has taken)
    "running": f"ExecutionStatus = 'Running' AND {WAITING_ON.name} IS NULL",
    "waiting": f"ExecutionStatus = 'Running' AND {WAITING_ON.name} IS NOT NULL",
    "completed": "ExecutionStatus = 'Completed'",
    "failed": "ExecutionStatus IN ('Failed', 'Terminated', 'TimedOut')",
    "cancelled": "ExecutionStatus = 'Canceled'",
}


def _literal(text: str) -> str:
    """A string in a visibility query."""
    if "\0" in text:  # (Temporal's SQL visibility fails on it, after retrying for seconds)
        raise UsageError(f"a run filter cannot hold a NUL character, as {text[:40]!r} does")
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _entry(row: Sequence[Any], timing: Sequence[Any] | None = None) -> JournalEntry:
    """A journal entry from the run's journal query, with its start from the trace query
    (without it, the entry starts when it ended)."""
    key, kind, name, status, value, attempts, at = row[:7]
    return JournalEntry(key=key, kind=kind, name=name, status=status, value=value,
                        started_at=timing[0] if timing else at,
                        ended_at=None if status == "pending" else at, attempts=attempts)


def _record_span(run_id: str, trace_id: str, entry: JournalEntry,
                 described: Sequence[Any] | None) -> Span:
    """A journal record's span; a step's with the name and attributes its body gave it,
    under the span of workflow code it ran in."""
    span = journal_span(run_id, trace_id, run_span_id(run_id), entry.key, entry.kind,
                        entry.name, entry.status, entry.value, entry.started_at,
                        entry.ended_at, entry.attempts)
    if described:
        name, attributes, parent = described
        span.name, span.parent_id = name or span.name, parent or span.parent_id
        span.attributes.update(attributes)
        if "error.type" in attributes:
            span.status = "error"
    return span
