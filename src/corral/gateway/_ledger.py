"""The cost ledger: one row per model call, written in batches off the request path.

A response never waits for its row: rows go to a queue that a background task writes every
``flush_every`` seconds (or sooner when ``batch`` are waiting), in one transaction, from a thread.
`close()` writes what is left, so a clean shutdown loses nothing; a write that fails is retried
at the next flush, and rows are dropped (and counted, and logged) only past ``max_pending``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import astuple, dataclass
from typing import Any

from ..stores._migrations import connect, is_postgres, require

log = logging.getLogger("corral.gateway")

LEDGER_VERSION = 2  # the migration that creates corral_costs
_COLUMNS = ("at, tenant, key_id, workflow, run_id, agent, model, deployment, input_tokens, "
            "output_tokens, cached_tokens, cost, priced, latency_ms, cache, status")


@dataclass(slots=True, frozen=True)
class Call:
    """What one model call cost, and on whose account."""

    at: float
    tenant: str
    key_id: str | None
    workflow: str | None
    run_id: str | None
    agent: str | None
    model: str
    deployment: str | None
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost: float
    priced: bool
    latency_ms: float
    cache: str  # "miss" | "hit" | "off"
    status: str  # "ok" | "error" | "cut"


class Ledger:
    def __init__(self, url: str, *, flush_every: float = 0.2, batch: int = 1000,
                 max_pending: int = 1_000_000) -> None:
        self.url = url
        self._postgres = is_postgres(url)
        self._conn = connect(url)
        try:
            require(self._conn, url, LEDGER_VERSION)
        except BaseException:
            self._conn.close()
            raise
        if self._postgres:
            self._conn.rollback()  # (end the check's transaction: writes make their own)
        self._pending: deque[Call] = deque()
        self.flush_every = flush_every
        self.batch = batch
        self.max_pending = max_pending
        self.dropped = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def record(self, call: Call) -> None:
        """Queue a row; never blocks, never raises."""
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error("cost ledger: %d rows dropped, the database at %s is not taking "
                          "writes", self.dropped, self.url.split("@")[-1])
            return
        self._pending.append(call)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        if len(self._pending) >= self.batch:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.flush_every):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # kept; retried at the next flush
                log.warning("cost ledger: a write failed (%s); retrying", exc)

    async def flush(self) -> None:
        """Write every queued row now."""
        async with self._lock:
            while self._pending:
                rows = [self._pending.popleft()
                        for _ in range(min(self.batch, len(self._pending)))]
                try:
                    await asyncio.to_thread(self._write, rows)
                except BaseException:
                    self._pending.extendleft(reversed(rows))
                    raise

    def _write(self, rows: list[Call]) -> None:
        mark = "%s" if self._postgres else "?"
        sql = (f"INSERT INTO corral_costs ({_COLUMNS}) VALUES "
               f"({', '.join([mark] * 16)})")
        cur = self._conn.cursor()
        if not self._postgres:
            cur.execute("BEGIN IMMEDIATE")
        try:
            cur.executemany(sql, [astuple(r) for r in rows])
        except BaseException:
            if self._postgres:
                self._conn.rollback()
            else:
                cur.execute("ROLLBACK")
            raise
        if self._postgres:
            self._conn.commit()
        else:
            cur.execute("COMMIT")

    def spent_since(self, scope: str, name: str, since: float) -> float:
        """What ``scope`` (tenant or key) ``name`` has spent since ``since``, as written."""
        column = {"tenant": "tenant", "key": "key_id"}[scope]
        mark = "%s" if self._postgres else "?"
        conn = connect(self.url)
        try:
            cur = conn.cursor()
            cur.execute(f"SELECT coalesce(sum(cost), 0) FROM corral_costs WHERE {column} = "
                        f"{mark} AND at >= {mark}", (name, since))
            return float(cur.fetchone()[0])
        finally:
            conn.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        finally:
            self._conn.close()


def report(url: str, *, by: str, since: float | None = None) -> list[dict[str, Any]]:
    """Cost and tokens grouped ``by`` tenant, workflow, agent, model or day, most expensive
    first."""
    postgres = is_postgres(url)
    group = {
        "tenant": "tenant", "workflow": "coalesce(workflow, '-')",
        "agent": "coalesce(agent, '-')", "model": "model",
        "day": ("to_char(to_timestamp(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')" if postgres
                else "strftime('%Y-%m-%d', at, 'unixepoch')"),
    }[by]
    mark = "%s" if postgres else "?"
    conn = connect(url)
    try:
        require(conn, url, LEDGER_VERSION)
        cur = conn.cursor()
        cur.execute(
            f"SELECT {group} AS k, count(*), sum(input_tokens), sum(output_tokens), "
            f"sum(cost), sum(CASE WHEN priced THEN 0 ELSE 1 END) FROM corral_costs "
            f"WHERE at >= {mark} GROUP BY k ORDER BY sum(cost) DESC, k",
            (since if since is not None else 0.0,),
        )
        return [{by: k, "calls": n, "input_tokens": int(i or 0), "output_tokens": int(o or 0),
                 "cost": round(float(c or 0), 6), "unpriced_calls": int(u or 0)}
                for k, n, i, o, c, u in cur.fetchall()]
    finally:
        conn.close()

