"""What the control plane reads about runs, from the engine that runs them: the embedded
store (through a read-only connection of its own, off the event loop) or Temporal (its
visibility store, and each run's own queries through a worker)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Sequence
from typing import Any

from .._errors import InvalidCursor, RunNotFound
from ..observability._runs import render, run_metrics
from ..observability._spans import Span
from ..stores import JournalEntry, RunRecord, SQLiteStore

Trace = tuple[list[RunRecord], dict[str, list[JournalEntry]], list[Span]]


BAD_CURSOR = "cursor is not one this server gave (use next_cursor as is)"


class EmbeddedReads:
    """Runs in the embedded store. Runs submitted from the CLI have no tenant: they are the
    ``default`` tenant's."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt
        # a GET does not queue behind a commit
        self.store = rt.store.reader() if isinstance(rt.store, SQLiteStore) else rt.store

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def get_run(self, run_id: str) -> RunRecord:
        run: RunRecord = await self._call(self.store.get_run, run_id)
        return self._shown(run)

    def _shown(self, run: RunRecord) -> RunRecord:
        """A run waiting in a worker's memory is waiting, not running."""
        names = self.rt.awaiting().get(run.id) if run.status == "running" else None
        if names:
            run.status, run.waiting_on = "waiting", names
        return run

    async def list_runs(self, *, status: str | None, workflow: str | None, limit: int,
                        tenant: str | None, cursor: str | None
                        ) -> tuple[list[RunRecord], str | None]:
        before = _decode(cursor, float) if cursor else None
        runs: list[RunRecord] = await self._call(
            self.store.list_runs, status=status, workflow=workflow, limit=limit + 1,
            tenant=tenant, before=before)
        if tenant == "default":  # runs from the CLI have no tenant: "default"'s
            more = await self._call(self.store.list_runs, status=status, workflow=workflow,
                                    limit=limit + 1, tenant=None, before=before)
            runs = sorted([*runs, *(r for r in more if r.tenant is None)],
                          key=lambda r: (r.created_at, r.id), reverse=True)
        runs, more_left = runs[:limit], len(runs) > limit  # (one more: is there a next page?)
        next_cursor = _encode([runs[-1].created_at, runs[-1].id]) if more_left else None
        return [self._shown(r) for r in runs], next_cursor

    async def waiting(self, tenant: str | None) -> list[RunRecord]:
        """Runs waiting for signals: those the store has, and those in this worker's memory."""
        runs, _ = await self.list_runs(status="waiting", workflow=None, limit=500,
                                       tenant=tenant, cursor=None)
        for run_id in self.rt.awaiting():
            try:
                runs.append(await self.get_run(run_id))
            except RunNotFound:
                continue
        return runs

    async def journal(self, run_id: str) -> list[JournalEntry]:
        entries: list[JournalEntry] = await self._call(self.store.journal, run_id)
        return entries

    async def trace(self, run_id: str) -> Trace:
        found: Trace = await self._call(self.store.trace, run_id)
        return found

    async def metrics(self) -> bytes:
        text: bytes = await self._call(run_metrics, getattr(self.store, "path", ""))
        return text

    def close(self) -> None:
        if self.store is not self.rt.store:
            self.store.close()


class TemporalReads:
    """Runs on Temporal: listed from its visibility store (by corral's search attributes),
    read in full through a worker's query."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt

    async def get_run(self, run_id: str) -> RunRecord:
        run: RunRecord = await self.rt.get(run_id)
        return run

    async def list_runs(self, *, status: str | None, workflow: str | None, limit: int,
                        tenant: str | None, cursor: str | None
                        ) -> tuple[list[RunRecord], str | None]:
        token = _page_token(cursor) if cursor else None
        try:
            runs, following = await self.rt.page(status=status, workflow=workflow, limit=limit,
                                                 tenant=tenant, all_queues=True, token=token)
        except InvalidCursor:
            raise InvalidCursor(BAD_CURSOR) from None
        next_cursor = None
        if following:
            next_cursor = _encode([base64.urlsafe_b64encode(following).decode(), ""])
        return runs, next_cursor

    async def waiting(self, tenant: str | None) -> list[RunRecord]:
        runs, _ = await self.list_runs(status="waiting", workflow=None, limit=500,
                                       tenant=tenant, cursor=None)
        return runs

    async def journal(self, run_id: str) -> list[JournalEntry]:
        entries: list[JournalEntry] = await self.rt.journal(run_id)
        return entries

    async def trace(self, run_id: str) -> Trace:
        found: Trace = await self.rt.trace(run_id)
        return found

    async def metrics(self) -> bytes:
        return render(*await self.rt.count_runs())

    def close(self) -> None:
        pass


def reads_for(rt: Any) -> EmbeddedReads | TemporalReads:
    return EmbeddedReads(rt) if hasattr(rt, "store") else TemporalReads(rt)


def _encode(value: Sequence[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(value)).encode()).decode()


def _page_token(cursor: str) -> bytes:
    """Temporal's page token in a cursor: a JSON object (visibility's position), checked here so
    that a made-up one is refused at once rather than after Temporal's retries."""
    try:
        token = base64.urlsafe_b64decode(_decode(cursor, str)[0])
        if isinstance(json.loads(token), dict):
            return token
    except ValueError:
        pass
    raise InvalidCursor(BAD_CURSOR)


def _decode(text: str, kind: type) -> tuple[Any, str]:
    """A cursor this server gave: (when the last run was created, its id) on the embedded
    engine, (Temporal's page token, "") on Temporal."""
    try:
        first, second = json.loads(base64.urlsafe_b64decode(text.encode()))
        if kind is str and not isinstance(first, str):
            raise ValueError(first)
        return kind(first), str(second)
    except Exception:
        raise InvalidCursor(BAD_CURSOR) from None
