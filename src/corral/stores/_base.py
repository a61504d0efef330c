"""The store interface: everything the runtime persists goes through these few methods.

Methods are synchronous and thread-safe; the runtime calls them from one worker thread so that
the event loop never blocks on I/O. SQLite is the embedded default; PostgreSQL implements the
same interface for a cluster.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._errors import RunConflict

if TYPE_CHECKING:
    from ..observability._spans import Span

TERMINAL = frozenset({"completed", "failed", "cancelled"})


@dataclass(slots=True, kw_only=True)
class RunSpec:
    """A submission: what to run, when, where and under which limits."""

    id: str
    workflow: str
    ref: str
    input: str
    input_hash: str
    queue: str = "default"
    priority: int = 0
    run_at: float
    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    parent_id: str | None = None
    owner: str | None = None
    """Set when the submitting worker executes the run itself: it is inserted already claimed."""
    generated_id: bool = False
    """The id was generated for this submission, so no run can have it yet."""
    tenant: str | None = None
    trace_id: str | None = None
    """The trace the run joins (a child joins its parent's; a caller may pass its own)."""

    def record(self, now: float) -> RunRecord:
        """The run as the store holds it right after inserting this spec."""
        return RunRecord(
            id=self.id, workflow=self.workflow, ref=self.ref, input=self.input,
            input_hash=self.input_hash, status="running" if self.owner else "queued",
            queue=self.queue, priority=self.priority, run_at=self.run_at,
            concurrency_key=self.concurrency_key, concurrency_limit=self.concurrency_limit,
            parent_id=self.parent_id, owner=self.owner, cancel_requested=False, result=None,
            error=None, created_at=now, started_at=now if self.owner else None, ended_at=None,
            attempts=1 if self.owner else 0, tenant=self.tenant, trace_id=self.trace_id,
        )


@dataclass(slots=True, kw_only=True)
class RunRecord:
    id: str
    workflow: str
    ref: str
    input: str
    input_hash: str
    status: str
    queue: str
    priority: int
    run_at: float | None
    concurrency_key: str | None
    concurrency_limit: int | None
    parent_id: str | None
    owner: str | None
    cancel_requested: bool
    result: str | None
    error: str | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    attempts: int
    tenant: str | None = None
    trace_id: str | None = None
    waiting_on: tuple[str, ...] = ()
    """The signals a waiting run waits for."""

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def as_dict(self) -> dict[str, Any]:
        """The run as JSON values (input, result and error decoded)."""
        return {
            "id": self.id, "workflow": self.workflow, "status": self.status,
            "queue": self.queue, "priority": self.priority, "run_at": self.run_at,
            "concurrency_key": self.concurrency_key, "concurrency_limit": self.concurrency_limit,
            "parent_id": self.parent_id, "cancel_requested": self.cancel_requested,
            "input": json.loads(self.input),
            "result": None if self.result is None else json.loads(self.result),
            "error": None if self.error is None else json.loads(self.error),
            "created_at": self.created_at, "started_at": self.started_at,
            "ended_at": self.ended_at, "attempts": self.attempts, "tenant": self.tenant,
            "waiting_on": [n for n in self.waiting_on if not n.startswith("$")],
        }


@dataclass(slots=True, kw_only=True)
class JournalEntry:
    """One durable operation of a run: a step, a timer, a signal wait, a child run, a clock read."""

    key: str
    kind: str
    name: str
    status: str  # "ok" | "error" | "pending"
    value: str | None  # JSON text
    started_at: float
    ended_at: float | None
    attempts: int


@dataclass(slots=True, kw_only=True)
class Signal:
    seq: int
    run_id: str
    name: str
    payload: str  # JSON text
    created_at: float


@dataclass(slots=True)
class Claimed:
    """A run this worker now owns, with what it needs to replay it."""

    run: RunRecord
    journal: dict[str, JournalEntry]
    signals: list[Signal]


Outcome = tuple[str, "str | None", "str | None"]
JournalRow = tuple[str, str, str, str, str, "str | bytes | None", float, "float | None", int]


@dataclass(slots=True)
class Batch:
    """Writes committed in one transaction (group commit across concurrent runs)."""

    submits: list[RunSpec] = field(default_factory=list)
    """New runs (submissions and child runs); a run whose id exists is left as it is."""
    journal: list[JournalRow] = field(default_factory=list)
    """(run_id, key, kind, name, status, value, started_at, ended_at, attempts), upserted."""
    finished: list[tuple[str, str, str | None, str | None, float]] = field(default_factory=list)
    """(run_id, status, result, error, ended_at)."""
    signals: list[tuple[str, str, str]] = field(default_factory=list)
    """(run_id, name, payload): internal signals such as a child's completion."""
    consumed: list[tuple[str, int]] = field(default_factory=list)
    """(key, seq): the signal ``seq`` was consumed by the wait at ``key``."""
    suspended: list[tuple[str, float | None, tuple[str, ...]]] = field(default_factory=list)
    """(run_id, wake_at, signal names waited on): runs evicted from memory while they wait."""
    released: list[tuple[str, float]] = field(default_factory=list)
    """(run_id, run_at): runs handed back to the queue, e.g. by a worker shutting down."""
    spans: list[tuple[str, Span]] = field(default_factory=list)
    """(run_id, span): spans with more to say than the journal (see observability)."""


def check_resubmission(existing: RunRecord, spec: RunSpec) -> None:
    """The same id again is the same submission; anything else under that id is a conflict."""
    if existing.workflow != spec.workflow:
        raise RunConflict(
            f"run id {spec.id!r} is taken by a run of workflow {existing.workflow!r}; "
            "choose another id",
            run_id=spec.id,
        )
    if existing.input_hash != spec.input_hash:
        raise RunConflict(
            f"run id {spec.id!r} was submitted before with another input; an id names one "
            "submission, so choose another id",
            run_id=spec.id,
        )


class Store(abc.ABC):
    """Persistence for runs, journals and signals."""


    @abc.abstractmethod
    def claim(self, owner: str, queues: list[str], limit: int, now: float) -> list[Claimed]:
        """Take up to ``limit`` due runs, best priority first, within concurrency limits."""

    @abc.abstractmethod
    def apply(self, batch: Batch, now: float) -> dict[int, RunRecord]:
        """Commit a batch of writes atomically.

        Returns, by position in ``submits``, the runs that already existed under that id
        (earlier in the store, or earlier in the same batch).
        """

    @abc.abstractmethod
    def get_run(self, run_id: str) -> RunRecord:
        """The run, or RunNotFound."""

    @abc.abstractmethod
    def list_runs(
        self, *, status: str | None = None, workflow: str | None = None, limit: int = 50,
        tenant: str | None = None, before: tuple[float, str] | None = None,
    ) -> list[RunRecord]:
        """Newest first; ``before`` = (created_at, id) of the last run of the previous page."""

    @abc.abstractmethod
    def trace(self, run_id: str) -> tuple[list[RunRecord], dict[str, list[JournalEntry]],
                                          list[Span]]:
        """The run and its descendants, their journals, and their stored spans."""

    @abc.abstractmethod
    def outcomes(self, run_ids: list[str]) -> dict[str, Outcome]:
        """(status, result, error) of those runs that have finished."""

    @abc.abstractmethod
    def journal(self, run_id: str) -> list[JournalEntry]:
        """The run's journal, in the order operations started."""

    @abc.abstractmethod
    def send_signal(self, run_id: str, name: str, payload: str, now: float) -> int:
        """Record a signal and wake the run; RunNotFound or RunFinished if it cannot take it."""

    @abc.abstractmethod
    def request_cancel(self, run_id: str, now: float) -> RunRecord:
        """Ask a run and its unfinished children to stop; return the run as it was."""

    @abc.abstractmethod
    def signals_since(self, seq: int, owner: str) -> tuple[list[Signal], int]:
        """Signals after ``seq`` for runs ``owner`` executes, and the newest sequence number."""

    @abc.abstractmethod
    def cancel_requests(self, owner: str) -> list[str]:
        """Runs executed by ``owner`` that were asked to stop."""

    @abc.abstractmethod
    def running(self, owner: str) -> list[str]:
        """The runs the store has as running under ``owner``."""

    @abc.abstractmethod
    def owners(self) -> list[str]:
        """Workers that hold running runs."""

    @abc.abstractmethod
    def requeue(self, owner: str, now: float) -> int:
        """Give the running runs of a dead worker back to the queue; return how many."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store's resources."""
