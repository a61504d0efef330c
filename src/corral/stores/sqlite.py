"""The embedded store: one SQLite file in WAL mode, group-committed writes."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any, NamedTuple

from .._errors import RunFinished, RunNotFound, StoreError, UsageError
from ..observability._spans import Span
from ._base import (
    TERMINAL,
    Batch,
    Claimed,
    JournalEntry,
    Outcome,
    RunRecord,
    RunSpec,
    Signal,
    Store,
)

SCHEMA_VERSION = 3
EXPORT_KEPT = 7 * 86400
"""How long the run ends an endpoint has not sent are kept for it (its shipper refreshes its
cursor's time at least once a minute while it runs)."""

log = logging.getLogger("corral.stores")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    workflow TEXT NOT NULL,
    ref TEXT NOT NULL,
    input TEXT NOT NULL,
    input_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    run_at REAL,
    concurrency_key TEXT,
    concurrency_limit INTEGER,
    parent_id TEXT,
    owner TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    waiting_on TEXT,
    result TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_due ON runs(queue, priority DESC, run_at)
    WHERE status IN ('queued', 'waiting');
CREATE INDEX IF NOT EXISTS runs_owner ON runs(owner) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS runs_concurrency ON runs(concurrency_key) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS runs_parent ON runs(parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS runs_created ON runs(created_at);
CREATE TABLE IF NOT EXISTS journal (
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    value TEXT,
    enc INTEGER NOT NULL DEFAULT 0,
    started_at REAL NOT NULL,
    ended_at REAL,
    attempts INTEGER NOT NULL,
    PRIMARY KEY (run_id, key)
);
CREATE TABLE IF NOT EXISTS blobs (
    hash TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS signals (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    name TEXT NOT NULL,
    payload TEXT NOT NULL,
    consumed_key TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS signals_pending ON signals(run_id) WHERE consumed_key IS NULL;
"""

# Version 2: tenants and traces. Each upgrade is one transaction, applied in order.
_UPGRADES = {
    2: """
ALTER TABLE runs ADD COLUMN tenant TEXT;
ALTER TABLE runs ADD COLUMN trace_id TEXT;
CREATE INDEX IF NOT EXISTS runs_tenant ON runs(tenant, created_at);
CREATE TABLE IF NOT EXISTS spans (
    run_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, span_id)
);
""",
    3: """
CREATE TABLE IF NOT EXISTS exports (
    endpoint TEXT PRIMARY KEY,
    journal INTEGER NOT NULL,
    spans INTEGER NOT NULL,
    ends INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS run_ends (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL
);
""",
}

_RUN_COLUMNS = (
    "id, workflow, ref, input, input_hash, status, queue, priority, run_at, concurrency_key,"
    " concurrency_limit, parent_id, owner, cancel_requested, result, error, created_at,"
    " started_at, ended_at, attempts, tenant, trace_id, waiting_on"
)

# Values at least this long are split: every JSON object, array or string of at least
# _BLOB_MIN bytes inside them is stored once, by content hash, in `blobs`. A conversation
# passed from step to step then costs each message once, not once per step. (`journal` and
# `blobs` are rowid tables: their rows are too large for WITHOUT ROWID, which would put each
# value of a few hundred bytes or more in an overflow page of its own.)
_SPLIT_AT = 2048
_BLOB_MIN = 256
_CHUNK = 32  # a long list is stored as chunks of this many items: a list that grows by one
# item from step to step shares all its full chunks with the version before
_REF = "\x00"  # {"\x00": hash}: a value stored in `blobs`
_CHUNKS = "\x01"  # {"\x01": [chunk, ...]}: a long list, its chunks concatenated
_ESCAPED = "\x02"  # {"\x02": {marker: value}}: the user's own dict that looks like one of these
_MARKERS = frozenset({_REF, _CHUNKS, _ESCAPED})


EntryRow = tuple[int, str, str, str, str, str, str | None, float, float | None, int]
"""A journal row as the shipper reads it: (rowid, run id, key, kind, name, status, value (a
child's or an error's only), started at, ended at, attempts)."""


class RunEnd(NamedTuple):
    """What a run's span needs of a run that ended (`Committed.ended`)."""

    id: str
    workflow: str
    parent_id: str | None
    tenant: str | None
    status: str
    error: str | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    trace_id: str | None


@dataclass
class Committed:
    """What a span shipper reads in one round (`SQLiteStore.committed_since`)."""

    entries: list[EntryRow] = field(default_factory=list)
    """The journal rows, as they are read: no object per row."""
    spans: list[tuple[int, Span]] = field(default_factory=list)
    """(rowid, span): the stored spans."""
    ended: list[tuple[int, RunEnd]] = field(default_factory=list)
    """(seq, run): runs that ended."""
    traces: dict[str, str | None] = field(default_factory=dict)
    """The entries' runs' trace ids (None: derived from the run id)."""
    described: set[tuple[str, str]] = field(default_factory=set)
    """(run id, span id) stored for the entries' runs: a stored span says more than the
    journal entry of the same id."""


def _run(row: Sequence[Any]) -> RunRecord:
    return RunRecord(
        id=row[0],
        workflow=row[1],
        ref=row[2],
        input=row[3],
        input_hash=row[4],
        status=row[5],
        queue=row[6],
        priority=row[7],
        run_at=row[8],
        concurrency_key=row[9],
        concurrency_limit=row[10],
        parent_id=row[11],
        owner=row[12],
        cancel_requested=bool(row[13]),
        result=row[14],
        error=row[15],
        created_at=row[16],
        started_at=row[17],
        ended_at=row[18],
        attempts=row[19],
        tenant=row[20],
        trace_id=row[21],
        waiting_on=tuple(row[22].split("\n")) if row[22] else (),
    )


def _split(node: Any, blobs: dict[str, str]) -> Any:
    if isinstance(node, list):
        node = [_split(item, blobs) for item in node]
        if len(node) > _CHUNK:
            chunks = [node[i : i + _CHUNK] for i in range(0, len(node), _CHUNK)]
            node = {_CHUNKS: [_store(chunk, blobs) for chunk in chunks]}
    elif isinstance(node, dict):
        node = {key: _split(item, blobs) for key, item in node.items()}
        if len(node) == 1 and next(iter(node)) in _MARKERS:
            node = {_ESCAPED: node}
    elif not (isinstance(node, str) and len(node) >= _BLOB_MIN):
        return node
    return _store(node, blobs)


def _store(node: Any, blobs: dict[str, str]) -> Any:
    """A reference to ``node`` in `blobs` if it is large enough to be worth one."""
    data = json.dumps(node, separators=(",", ":"), ensure_ascii=False)
    if len(data) < _BLOB_MIN:
        return node
    digest = blake2b(data.encode(), digest_size=12).hexdigest()
    blobs[digest] = data
    return {_REF: digest}


def _join(node: Any, blobs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_join(item, blobs) for item in node]
    if isinstance(node, dict):
        if len(node) == 1 and _REF in node:
            return _join(blobs[node[_REF]], blobs)
        if len(node) == 1 and _CHUNKS in node:
            return [item for chunk in node[_CHUNKS] for item in _join(chunk, blobs)]
        if len(node) == 1 and _ESCAPED in node:
            node = node[_ESCAPED]
        return {key: _join(item, blobs) for key, item in node.items()}
    return node


class SQLiteStore(Store):
    """Runs, journals and signals in one SQLite file.

    ``durability="full"`` (the default) fsyncs every commit, so a power loss loses nothing that
    was acknowledged; ``"process"`` survives a crash of the process but not of the machine.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, timeout: float = 5.0, durability: str = "full"
    ) -> None:
        if durability not in ("full", "process"):
            raise UsageError(f'durability must be "full" or "process", not {durability!r}')
        self.path = os.fspath(path)
        self.log_ends = False
        """Log which runs ended, in commit order, for a span shipper (observability)."""
        self.reads_only = False
        self._lock = threading.RLock()
        if self.path != ":memory:":
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        try:
            with self._guard():
                self._open(durability)
        except BaseException:
            self._db.close()
            raise

    def reader(self, timeout: float = 5.0) -> SQLiteStore:
        """A read-only connection to the same file, for reads that must not queue behind this
        connection's commits (in WAL mode a reader sees the last commit and blocks no writer).
        An in-memory store has no other connection: it is its own reader."""
        if self.path == ":memory:":
            return self
        reader = object.__new__(SQLiteStore)
        reader.path, reader.log_ends, reader.reads_only = self.path, False, True
        reader._lock = threading.RLock()
        try:
            reader._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                         check_same_thread=False)
            reader._db.execute("PRAGMA query_only = 1")
            reader._db.execute("PRAGMA cache_size=-65536")
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        return reader

    # -- plumbing ---------------------------------------------------------------------------

    def _translate(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return StoreError(
                f"database {self.path} is locked by another process ({text}); wait for it to "
                "finish or stop it, then retry",
                path=self.path,
            )
        if isinstance(exc, sqlite3.DatabaseError) and (
            "not a database" in text or "malformed" in text or "corrupt" in text
        ):
            return StoreError(
                f"database {self.path} is corrupted ({text}); restore it from a backup or "
                "point --db at another file; corral changed nothing",
                path=self.path,
            )
        if "readonly" in text and self.reads_only:
            return StoreError(
                f"database {self.path}: this connection only reads (SQLiteStore.reader()); "
                "write through the store it came from",
                path=self.path,
            )
        if "unable to open" in text:
            return StoreError(
                f"cannot open database {self.path} ({text}); check that its folder exists "
                "and is writable",
                path=self.path,
            )
        return StoreError(
            f"database {self.path}: {text}; check the disk (space, permissions) and retry",
            path=self.path,
        )

    @contextmanager
    def _guard(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._guard() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _open(self, durability: str) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.path} was written by a newer corral (schema {version}, this "
                f"one knows {SCHEMA_VERSION}); upgrade corral",
                path=self.path,
            )
        if version == 0:
            tables = db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                " AND name NOT LIKE 'corral\\_%' ESCAPE '\\'"  # (the shared records' tables)
            ).fetchall()
            if tables:
                raise StoreError(
                    f"database {self.path} is not a corral database (it has tables "
                    f"{', '.join(t[0] for t in tables[:5])}); point --db at another file",
                    path=self.path,
                )
        if self.path != ":memory:":
            db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        db.execute("PRAGMA cache_size=-65536")  # KiB: the hot part of the journal stays cached
        scripts = [(1, _SCHEMA)] if version == 0 else []
        scripts += [(v, _UPGRADES[v]) for v in range(max(version, 1) + 1, SCHEMA_VERSION + 1)]
        for target, script in scripts:
            db.execute("BEGIN IMMEDIATE")
            try:
                if db.execute("PRAGMA user_version").fetchone()[0] < target:  # not raced
                    for statement in script.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version={target}")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- runs -------------------------------------------------------------------------------

    @staticmethod
    def _insert(db: sqlite3.Connection, specs: list[RunSpec], now: float) -> dict[int, RunRecord]:
        stored: dict[str, RunRecord] = {}
        for chunk in _chunks([s.id for s in specs if not s.generated_id]):
            rows = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            stored.update((row[0], _run(row)) for row in rows)
        existing: dict[int, RunRecord] = {}
        first: dict[str, RunSpec] = {}
        new: list[RunSpec] = []
        for position, spec in enumerate(specs):
            if spec.id in stored:
                existing[position] = stored[spec.id]
            elif spec.id in first:  # the first submission of an id in this batch wins
                existing[position] = first[spec.id].record(now)
            else:
                new.append(spec)
                first[spec.id] = spec
        # (runs without a tenant or trace leave those columns out: sqlite3 binds each None
        # through a slow adapter lookup, a measurable cost per run at thousands of runs/s)
        plain = [s for s in new if s.tenant is None and s.trace_id is None]
        for group, extra in ((plain, ""), ([s for s in new if s.tenant is not None
                                            or s.trace_id is not None], ", tenant, trace_id")):
            if group:
                _many(
                    db,
                    "INSERT OR IGNORE INTO runs (id, workflow, ref, input, input_hash, status,"
                    " queue, priority, run_at, concurrency_key, concurrency_limit, parent_id,"
                    f" created_at, owner, started_at, attempts{extra}) VALUES ",
                    [
                        (s.id, s.workflow, s.ref, s.input, s.input_hash,
                         "running" if s.owner else "queued", s.queue, s.priority, s.run_at,
                         s.concurrency_key, s.concurrency_limit, s.parent_id, now, s.owner,
                         now if s.owner else None, 1 if s.owner else 0,
                         *((s.tenant, s.trace_id) if extra else ()))
                        for s in group
                    ],
                )
        children = [s.id for s in new if s.parent_id is not None]
        for chunk in _chunks(children):  # a child of a run being cancelled is cancelled too
            db.execute(
                "UPDATE runs SET cancel_requested = 1 WHERE id IN"
                f" ({','.join('?' * len(chunk))}) AND (SELECT p.cancel_requested FROM runs p"
                " WHERE p.id = runs.parent_id) = 1",
                chunk,
            )
        return existing

    def claim(self, owner: str, queues: list[str], limit: int, now: float) -> list[Claimed]:
        if limit <= 0:
            return []
        marks = ",".join("?" * len(queues))
        with self._guard() as db:  # most polls find nothing: don't take the write lock for that
            due = db.execute(
                "SELECT 1 FROM runs WHERE status IN ('queued', 'waiting') AND run_at <= ?"
                f" AND queue IN ({marks}) LIMIT 1",
                (now, *queues),
            ).fetchone()
        if due is None:
            return []
        with self._tx() as db:
            rows = db.execute(  # runs whose concurrency key is full are not candidates
                f"SELECT {_RUN_COLUMNS} FROM runs r WHERE status IN ('queued', 'waiting')"
                f" AND run_at <= ? AND queue IN ({marks}) AND (concurrency_key IS NULL OR"
                " (SELECT COUNT(*) FROM runs x WHERE x.status = 'running'"
                " AND x.concurrency_key = r.concurrency_key) < concurrency_limit)"
                " ORDER BY priority DESC, run_at LIMIT ?",
                (now, *queues, limit * 2 + 16),
            ).fetchall()
            candidates = [_run(r) for r in rows]
            keys = {r.concurrency_key for r in candidates if r.concurrency_key is not None}
            running: dict[str, int] = {}
            if keys:
                key_marks = ",".join("?" * len(keys))
                running = dict(
                    db.execute(
                        "SELECT concurrency_key, COUNT(*) FROM runs WHERE status = 'running'"
                        f" AND concurrency_key IN ({key_marks}) GROUP BY concurrency_key",
                        tuple(keys),
                    ).fetchall()
                )
            chosen: list[RunRecord] = []
            for run in candidates:
                key = run.concurrency_key
                if key is not None and run.concurrency_limit is not None:
                    if running.get(key, 0) >= run.concurrency_limit:
                        continue
                    running[key] = running.get(key, 0) + 1
                chosen.append(run)
                if len(chosen) == limit:
                    break
            if not chosen:
                return []
            for ids in _chunks([r.id for r in chosen]):
                db.execute(
                    "UPDATE runs SET status = 'running', owner = ?, started_at ="
                    " COALESCE(started_at, ?), attempts = attempts + 1, waiting_on = NULL"
                    f" WHERE id IN ({','.join('?' * len(ids))})",
                    (owner, now, *ids),
                )
            resumed = [r.id for r in chosen if r.started_at is not None]
            journals = self._journals(db, resumed)
            signals = self._pending_signals(db, [r.id for r in chosen])
        claimed = []
        for run in chosen:
            run.status, run.owner, run.attempts = "running", owner, run.attempts + 1
            run.started_at = run.started_at or now
            claimed.append(Claimed(run, journals.get(run.id, {}), signals.get(run.id, [])))
        return claimed

    def _journals(
        self, db: sqlite3.Connection, run_ids: list[str]
    ) -> dict[str, dict[str, JournalEntry]]:
        out: dict[str, dict[str, JournalEntry]] = {}
        for chunk in _chunks(run_ids):
            rows = db.execute(
                "SELECT run_id, key, kind, name, status, value, enc, started_at, ended_at,"
                f" attempts FROM journal WHERE run_id IN ({','.join('?' * len(chunk))})"
                " ORDER BY started_at",
                chunk,
            ).fetchall()
            for run_id, key, kind, name, status, value, enc, started, ended, attempts in rows:
                if enc:
                    value = self._expand(db, value)
                out.setdefault(run_id, {})[key] = JournalEntry(
                    key=key,
                    kind=kind,
                    name=name,
                    status=status,
                    value=value,
                    started_at=started,
                    ended_at=ended,
                    attempts=attempts,
                )
        return out

    @staticmethod
    def _expand(db: sqlite3.Connection, value: str) -> str:
        cache: dict[str, Any] = {}
        pending = [value]
        while pending:
            refs: set[str] = set()
            for text in pending:
                _collect_refs(json.loads(text), refs)
            refs -= cache.keys()
            pending = []
            for chunk in _chunks(sorted(refs)):
                for digest, data in db.execute(
                    f"SELECT hash, data FROM blobs WHERE hash IN ({','.join('?' * len(chunk))})",
                    chunk,
                ):
                    cache[digest] = json.loads(data)
                    pending.append(data)
        return json.dumps(_join(json.loads(value), cache), separators=(",", ":"))

    @staticmethod
    def _pending_signals(db: sqlite3.Connection, run_ids: list[str]) -> dict[str, list[Signal]]:
        out: dict[str, list[Signal]] = {}
        for chunk in _chunks(run_ids):
            rows = db.execute(
                "SELECT seq, run_id, name, payload, created_at FROM signals"
                f" WHERE consumed_key IS NULL AND run_id IN ({','.join('?' * len(chunk))})"
                " ORDER BY seq",
                chunk,
            ).fetchall()
            for seq, run_id, name, payload, created in rows:
                out.setdefault(run_id, []).append(Signal(seq=seq, run_id=run_id, name=name,
                                                         payload=payload, created_at=created))
        return out

    def apply(self, batch: Batch, now: float) -> dict[int, RunRecord]:
        journal = []
        blobs: dict[str, str] = {}
        for run_id, key, kind, name, status, value, started, ended, attempts in batch.journal:
            if isinstance(value, bytes):
                value = value.decode()
            enc = 0
            if value is not None and len(value) >= _SPLIT_AT:
                value = json.dumps(_split(json.loads(value), blobs), separators=(",", ":"))
                enc = 1
            journal.append((run_id, key, kind, name, status, value, enc, started, ended, attempts))
        existing: dict[int, RunRecord] = {}
        with self._tx() as db:
            if batch.submits:
                existing = self._insert(db, batch.submits, now)
            if blobs:
                _many(db, "INSERT OR IGNORE INTO blobs (hash, data) VALUES ", list(blobs.items()))
            if journal:
                _many(
                    db,
                    "INSERT OR REPLACE INTO journal (run_id, key, kind, name, status, value, enc,"
                    " started_at, ended_at, attempts) VALUES ",
                    journal,
                )
            if batch.consumed:
                db.executemany("UPDATE signals SET consumed_key = ? WHERE seq = ?", batch.consumed)
            if batch.signals:
                self._signal(db, batch.signals, now)
            if batch.finished:
                _many(
                    db,
                    "UPDATE runs SET status = v.column2, result = v.column3, error = v.column4,"
                    " ended_at = v.column5, owner = NULL, run_at = NULL, waiting_on = NULL"
                    " FROM (VALUES ",
                    batch.finished,
                    ") AS v WHERE runs.id = v.column1",
                )
                if self.log_ends:
                    db.executemany("INSERT INTO run_ends (run_id) VALUES (?)",
                                   [(f[0],) for f in batch.finished])
            for run_id, wake_at, names in batch.suspended:
                wanted = ",".join("?" * len(names)) or "NULL"
                db.execute(
                    "UPDATE runs SET status = 'waiting', owner = NULL, waiting_on = ?,"
                    " run_at = CASE WHEN cancel_requested = 1 OR EXISTS (SELECT 1 FROM signals"
                    f" WHERE run_id = ? AND consumed_key IS NULL AND name IN ({wanted}))"
                    " THEN ? ELSE ? END WHERE id = ?",
                    ("\n".join(names), run_id, *names, now, wake_at, run_id),
                )
            if batch.spans:
                _many(db, "INSERT OR REPLACE INTO spans (run_id, span_id, data) VALUES ",
                      [(run_id, span.span_id, json.dumps(span.as_dict(), default=str))
                       for run_id, span in batch.spans])
            if batch.released:
                db.executemany(
                    "UPDATE runs SET status = 'queued', owner = NULL, run_at = ? WHERE id = ?"
                    " AND status = 'running'",
                    [(run_at, run_id) for run_id, run_at in batch.released],
                )
        return existing

    @staticmethod
    def _signal(db: sqlite3.Connection, signals: list[tuple[str, str, str]], now: float) -> None:
        db.executemany(
            "INSERT INTO signals (run_id, name, payload, created_at) VALUES (?, ?, ?, ?)",
            [(run_id, name, payload, now) for run_id, name, payload in signals],
        )
        db.executemany(
            "UPDATE runs SET run_at = ? WHERE id = ? AND status = 'waiting'"
            " AND instr(char(10) || waiting_on || char(10), char(10) || ? || char(10)) > 0",
            [(now, run_id, name) for run_id, name, _ in signals],
        )

    def get_run(self, run_id: str) -> RunRecord:
        with self._guard() as db:
            row = db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise RunNotFound(
                f"no run {run_id!r} in {self.path}; list runs with `corral runs ls`",
                run_id=run_id,
            )
        return _run(row)

    def list_runs(
        self, *, status: str | None = None, workflow: str | None = None, limit: int = 50,
        tenant: str | None = None, before: tuple[float, str] | None = None,
    ) -> list[RunRecord]:
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("status", status), ("workflow", workflow), ("tenant", tenant)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if before is not None:
            where.append("(created_at, id) < (?, ?)")
            args.extend(before)
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        with self._guard() as db:
            return [_run(r) for r in db.execute(sql, (*args, limit)).fetchall()]

    def trace(self, run_id: str) -> tuple[list[RunRecord], dict[str, list[JournalEntry]],
                                          list[Span]]:
        runs = [self.get_run(run_id)]
        with self._guard() as db:
            frontier = [run_id]
            while frontier and len(runs) < 10_000:  # children, grandchildren...
                found = [_run(r) for r in db.execute(
                    f"SELECT {_RUN_COLUMNS} FROM runs WHERE parent_id IN"
                    f" ({','.join('?' * len(frontier))})", frontier)]
                runs.extend(found)
                frontier = [r.id for r in found][:500]
            entries = self._journals(db, [r.id for r in runs])
            journals = {r.id: list(entries.get(r.id, {}).values()) for r in runs}
            spans = [Span(**json.loads(data)) for chunk in _chunks([r.id for r in runs])
                     for (data,) in db.execute(
                         f"SELECT data FROM spans WHERE run_id IN ({','.join('?' * len(chunk))})",
                         chunk)]
        return runs, journals, spans

    # -- export (observability._shipper tails the journal and the spans, by rowid) -----------
    # Rows are only ever inserted or replaced (a replaced row gets a new, higher rowid), so
    # "rowid above the cursor" is "committed since", in commit order.

    def export_cursor(self, endpoint: str, now: float) -> tuple[int, int, int]:
        """Where the export to ``endpoint`` is: (journal rowid, spans rowid, run_ends seq) sent
        up to. An endpoint seen for the first time starts at the end (history is not sent), and
        so does one not exported to for ``EXPORT_KEPT`` seconds (the run ends it had not sent
        are gone) or whose cursor is past a table's end (the file was rebuilt: rowids
        renumbered)."""
        ends = ("(SELECT IFNULL(MAX(rowid), 0) FROM journal),"
                " (SELECT IFNULL(MAX(rowid), 0) FROM spans),"
                " (SELECT IFNULL(MAX(seq), 0) FROM run_ends)")
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO exports (endpoint, journal, spans, ends,"
                       f" updated_at) VALUES (?, {ends}, ?)", (endpoint, now))
            row = db.execute(f"SELECT journal, spans, ends, updated_at, {ends} FROM exports"
                             " WHERE endpoint = ?", (endpoint,)).fetchone()
            cursor, updated, last = row[:3], row[3], row[4:]
            stale = updated < now - EXPORT_KEPT
            if stale or any(c > m for c, m in zip(cursor, last, strict=True)):
                log.warning("span export to %s starts again at the store's end (%s); what was "
                            "committed since its cursor is not sent", endpoint,
                            "not exported to for a week" if stale else "the file was rebuilt")
                db.execute("UPDATE exports SET journal = ?, spans = ?, ends = ?,"
                           " updated_at = ? WHERE endpoint = ?", (*last, now, endpoint))
                cursor = last
        return cursor[0], cursor[1], cursor[2]

    def save_export_cursor(self, endpoint: str, cursor: tuple[int, int, int],
                           now: float) -> None:
        """Move the cursor, and forget the run ends every endpoint has sent (an endpoint not
        exported to for ``EXPORT_KEPT`` seconds no longer holds them: see `export_cursor`)."""
        with self._tx() as db:
            db.execute("UPDATE exports SET journal = ?, spans = ?, ends = ?, updated_at = ?"
                       " WHERE endpoint = ?", (*cursor, now, endpoint))
            db.execute("DELETE FROM run_ends WHERE seq < (SELECT MIN(ends) FROM exports"
                       " WHERE updated_at > ?)", (now - EXPORT_KEPT,))

    def committed_since(self, cursor: tuple[int, int, int], limit: int) -> Committed:
        """Up to ``limit`` each of the journal entries, stored spans and run ends committed
        past ``cursor``, with what building their spans needs."""
        journal, spans, ends = cursor
        out = Committed()
        with self._guard() as db:
            db.execute("BEGIN")  # one snapshot for the three
            try:
                rows = db.execute(
                    "SELECT rowid, run_id, key, kind, name, status, CASE WHEN kind = 'child'"
                    " OR status = 'error' THEN value END, started_at, ended_at, attempts, enc"
                    " FROM journal WHERE rowid > ? ORDER BY rowid LIMIT ?",
                    (journal, limit)).fetchall()  # (a span reads the value of those two only)
                out.entries = [row[:10] if not row[10] or row[6] is None else
                               (*row[:6], self._expand(db, row[6]), *row[7:10]) for row in rows]
                out.spans = [(rowid, Span(**json.loads(data))) for rowid, data in db.execute(
                    "SELECT rowid, data FROM spans WHERE rowid > ? ORDER BY rowid LIMIT ?",
                    (spans, limit))]
                out.ended = [(row[0], RunEnd._make(row[1:])) for row in db.execute(
                    "SELECT e.seq, r.id, r.workflow, r.parent_id, r.tenant, r.status, r.error,"
                    " r.created_at, r.started_at, r.ended_at, r.trace_id FROM run_ends e"
                    " JOIN runs r ON r.id = e.run_id WHERE e.seq > ? ORDER BY e.seq LIMIT ?",
                    (ends, limit))]  # (not the input nor the result: a span has neither)
                run_ids = sorted({row[1] for row in rows})
                for chunk in _chunks(run_ids):
                    marks = ",".join("?" * len(chunk))
                    out.traces.update(db.execute(
                        f"SELECT id, trace_id FROM runs WHERE id IN ({marks})", chunk))
                    out.described.update(db.execute(
                        f"SELECT run_id, span_id FROM spans WHERE run_id IN ({marks})", chunk))
            finally:
                db.execute("COMMIT")
        return out

    def outcomes(self, run_ids: list[str]) -> dict[str, Outcome]:
        out: dict[str, Outcome] = {}
        with self._guard() as db:
            for chunk in _chunks(run_ids):
                for run_id, status, result, error in db.execute(
                    "SELECT id, status, result, error FROM runs WHERE status IN"
                    " ('completed', 'failed', 'cancelled')"
                    f" AND id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ):
                    out[run_id] = (status, result, error)
        return out

    def journal(self, run_id: str) -> list[JournalEntry]:
        with self._guard() as db:
            return list(self._journals(db, [run_id]).get(run_id, {}).values())

    def send_signal(self, run_id: str, name: str, payload: str, now: float) -> int:
        with self._tx() as db:
            row = db.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(
                    f"no run {run_id!r} in {self.path}; list runs with `corral runs ls`",
                    run_id=run_id,
                )
            if row[0] in TERMINAL:
                raise RunFinished(
                    f"run {run_id!r} is {row[0]}; a finished run takes no more signals",
                    run_id=run_id,
                    status=row[0],
                )
            self._signal(db, [(run_id, name, payload)], now)
            seq: int = db.execute("SELECT last_insert_rowid()").fetchone()[0]
            return seq

    def request_cancel(self, run_id: str, now: float) -> RunRecord:
        with self._tx() as db:
            row = db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(
                    f"no run {run_id!r} in {self.path}; list runs with `corral runs ls`",
                    run_id=run_id,
                )
            run = _run(row)
            if run.finished:
                raise RunFinished(
                    f"run {run_id!r} is already {run.status}; there is nothing to cancel",
                    run_id=run_id,
                    status=run.status,
                )
            db.execute(
                "WITH RECURSIVE tree(id) AS (SELECT ? UNION SELECT runs.id FROM runs JOIN tree"
                " ON runs.parent_id = tree.id) UPDATE runs SET cancel_requested = 1,"
                " run_at = CASE WHEN status IN ('queued', 'waiting') THEN ? ELSE run_at END"
                " WHERE id IN (SELECT id FROM tree)"
                " AND status NOT IN ('completed', 'failed', 'cancelled')",
                (run_id, now),
            )
            return run

    def signals_since(self, seq: int, owner: str) -> tuple[list[Signal], int]:
        with self._guard() as db:
            db.execute("BEGIN")
            try:
                rows = db.execute(
                    "SELECT s.seq, s.run_id, s.name, s.payload, s.created_at FROM signals s"
                    " JOIN runs r ON r.id = s.run_id WHERE s.seq > ? AND r.owner = ?"
                    " AND s.consumed_key IS NULL ORDER BY s.seq",
                    (seq, owner),
                ).fetchall()
                last = db.execute("SELECT COALESCE(MAX(seq), 0) FROM signals").fetchone()[0]
            finally:
                db.execute("COMMIT")
        signals = [Signal(seq=s, run_id=r, name=n, payload=p, created_at=c)
                   for s, r, n, p, c in rows]
        return signals, max(last, seq)

    def cancel_requests(self, owner: str) -> list[str]:
        with self._guard() as db:
            rows = db.execute(
                "SELECT id FROM runs WHERE owner = ? AND status = 'running'"
                " AND cancel_requested = 1",
                (owner,),
            ).fetchall()
        return [r[0] for r in rows]

    def running(self, owner: str) -> list[str]:
        with self._guard() as db:
            rows = db.execute(
                "SELECT id FROM runs WHERE owner = ? AND status = 'running'", (owner,)
            ).fetchall()
        return [r[0] for r in rows]

    def owners(self) -> list[str]:
        with self._guard() as db:
            rows = db.execute(
                "SELECT DISTINCT owner FROM runs WHERE status = 'running' AND owner IS NOT NULL"
            ).fetchall()
        return [r[0] for r in rows]

    def requeue(self, owner: str, now: float) -> int:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE runs SET status = 'queued', owner = NULL, run_at = ?"
                " WHERE owner = ? AND status = 'running'",
                (now, owner),
            )
            return cur.rowcount


def _collect_refs(node: Any, refs: set[str]) -> None:
    if isinstance(node, list):
        for item in node:
            _collect_refs(item, refs)
    elif isinstance(node, dict):
        if len(node) == 1 and _REF in node:
            refs.add(node[_REF])
            return
        if len(node) == 1 and _ESCAPED in node:
            node = node[_ESCAPED]
        for item in node.values():
            _collect_refs(item, refs)


def _many(
    db: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]], tail: str = ""
) -> None:
    """Write many rows with few statements: sqlite3 hands the GIL back and forth per statement,
    and each hand-off can wait for a busy event loop, so one statement per row is slow."""
    if not rows:
        return
    width = len(rows[0])
    group = "(" + ",".join("?" * width) + ")"
    step = max(1, 30000 // width)
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        db.execute(
            head + ",".join([group] * len(part)) + tail,
            [value for row in part for value in row],
        )


def _chunks(items: list[str], size: int = 500) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
