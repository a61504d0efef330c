"""Schema migrations for the shared stores, on PostgreSQL (a cluster) or SQLite (one machine).

Every store that keeps shared records adds its tables here, as numbered migrations, and checks
at open that the database has them. `corral db upgrade` applies what is missing, in order, each
in its own transaction, under a lock so that two upgrades at once apply each migration once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .._errors import StoreError, UsageError


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    postgres: str
    sqlite: str


MIGRATIONS: list[Migration] = [
    Migration(
        1, "payload blobs: large workflow payloads stored once by content hash",
        postgres="CREATE TABLE corral_blobs (hash BYTEA PRIMARY KEY, data BYTEA NOT NULL)",
        sqlite="CREATE TABLE corral_blobs (hash BLOB PRIMARY KEY, data BLOB NOT NULL) "
               "WITHOUT ROWID",
    ),
    Migration(
        2, "cost ledger: one row per model call",
        postgres="CREATE TABLE corral_costs (id BIGSERIAL PRIMARY KEY, at DOUBLE PRECISION "
                 "NOT NULL, tenant TEXT NOT NULL, key_id TEXT, workflow TEXT, run_id TEXT, "
                 "agent TEXT, model TEXT NOT NULL, deployment TEXT, input_tokens BIGINT NOT "
                 "NULL, output_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL, cost "
                 "DOUBLE PRECISION NOT NULL, priced BOOLEAN NOT NULL, latency_ms DOUBLE "
                 "PRECISION NOT NULL, cache TEXT NOT NULL, status TEXT NOT NULL); "
                 "CREATE INDEX corral_costs_at ON corral_costs (at)",
        sqlite="CREATE TABLE corral_costs (id INTEGER PRIMARY KEY, at REAL NOT NULL, tenant "
               "TEXT NOT NULL, key_id TEXT, workflow TEXT, run_id TEXT, agent TEXT, model TEXT "
               "NOT NULL, deployment TEXT, input_tokens INTEGER NOT NULL, output_tokens INTEGER "
               "NOT NULL, cached_tokens INTEGER NOT NULL, cost REAL NOT NULL, priced INTEGER "
               "NOT NULL, latency_ms REAL NOT NULL, cache TEXT NOT NULL, status TEXT NOT NULL);"
               "CREATE INDEX corral_costs_at ON corral_costs (at)",
    ),
    Migration(
        3, "gateway keys: virtual API keys, stored hashed",
        postgres="CREATE TABLE corral_keys (id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, "
                 "tenant TEXT NOT NULL, name TEXT, models TEXT, rpm BIGINT, tpm BIGINT, "
                 "budget DOUBLE PRECISION, budget_period TEXT, created_at DOUBLE PRECISION "
                 "NOT NULL, revoked_at DOUBLE PRECISION)",
        sqlite="CREATE TABLE corral_keys (id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, "
               "tenant TEXT NOT NULL, name TEXT, models TEXT, rpm INTEGER, tpm INTEGER, "
               "budget REAL, budget_period TEXT, created_at REAL NOT NULL, revoked_at REAL)",
    ),
    Migration(
        4, "decision records: an append-only Merkle log (RFC 6962) with signed tree heads",
        postgres="CREATE TABLE corral_decision_records (idx BIGINT PRIMARY KEY, id TEXT NOT "
                 "NULL UNIQUE, data BYTEA NOT NULL, hash BYTEA NOT NULL); "
                 "CREATE TABLE corral_decision_nodes (level INTEGER NOT NULL, idx BIGINT NOT "
                 "NULL, hash BYTEA NOT NULL, PRIMARY KEY (level, idx)); "
                 "CREATE TABLE corral_decision_heads (size BIGINT PRIMARY KEY, root BYTEA NOT "
                 "NULL, at_ms BIGINT NOT NULL, key_id TEXT NOT NULL, signature BYTEA NOT NULL); "
                 "CREATE TABLE corral_decision_state (id INTEGER PRIMARY KEY CHECK (id = 1), "
                 "size BIGINT NOT NULL, frontier BYTEA NOT NULL); "
                 "INSERT INTO corral_decision_state (id, size, frontier) VALUES (1, 0, ''::bytea)",
        sqlite="CREATE TABLE corral_decision_records (idx INTEGER PRIMARY KEY, id TEXT NOT NULL "
               "UNIQUE, data BLOB NOT NULL, hash BLOB NOT NULL); "
               "CREATE TABLE corral_decision_nodes (level INTEGER NOT NULL, idx INTEGER NOT "
               "NULL, hash BLOB NOT NULL, PRIMARY KEY (level, idx)) WITHOUT ROWID; "
               "CREATE TABLE corral_decision_heads (size INTEGER PRIMARY KEY, root BLOB NOT "
               "NULL, at_ms INTEGER NOT NULL, key_id TEXT NOT NULL, signature BLOB NOT NULL); "
               "CREATE TABLE corral_decision_state (id INTEGER PRIMARY KEY CHECK (id = 1), "
               "size INTEGER NOT NULL, frontier BLOB NOT NULL); "
               "INSERT INTO corral_decision_state (id, size, frontier) VALUES (1, 0, X'')",
    ),
    Migration(
        5, "governance: the agent registry and revoked capability tokens",
        postgres="CREATE TABLE corral_agents (tenant TEXT NOT NULL, name TEXT NOT NULL, "
                 "version TEXT NOT NULL, owner TEXT NOT NULL, description TEXT, registered_at "
                 "DOUBLE PRECISION NOT NULL, deactivated_at DOUBLE PRECISION, PRIMARY KEY "
                 "(tenant, name, version)); "
                 "CREATE TABLE corral_revocations (id TEXT PRIMARY KEY, tenant TEXT, reason TEXT "
                 "NOT NULL, revoked_at DOUBLE PRECISION NOT NULL, expires DOUBLE PRECISION)",
        sqlite="CREATE TABLE corral_agents (tenant TEXT NOT NULL, name TEXT NOT NULL, version "
               "TEXT NOT NULL, owner TEXT NOT NULL, description TEXT, registered_at REAL NOT "
               "NULL, deactivated_at REAL, PRIMARY KEY (tenant, name, version)) WITHOUT ROWID;"
               "CREATE TABLE corral_revocations (id TEXT PRIMARY KEY, tenant TEXT, reason TEXT "
               "NOT NULL, revoked_at REAL NOT NULL, expires REAL)",
    ),
]

_LOCK_KEY = 0x636F7272616C  # "corral": the advisory lock that serializes upgrades


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url


def connect(url: str) -> Any:
    """A DB-API connection to a shared database URL (postgresql://... or a SQLite path)."""
    if is_postgres(url):
        try:
            import psycopg
        except ImportError:
            raise UsageError(
                "PostgreSQL needs the cluster extra; pip install 'corral[cluster]'"
            ) from None
        try:
            return psycopg.connect(url, connect_timeout=5)
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot connect to PostgreSQL at {_redact(url)}: {str(exc).strip()}; check "
                "the URL (database in corral.toml or $CORRAL_DATABASE_URL) and that the server "
                "is up", url=_redact(url),
            ) from None
    if "://" in url and not url.startswith("sqlite:///"):
        raise UsageError(
            f"database URL {_redact(url)!r} is neither postgresql://... nor a SQLite path "
            "(sqlite:///path or a plain path)"
        )
    try:
        conn = sqlite3.connect(sqlite_path(url), timeout=10, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        return conn
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the SQLite database {url}: {exc}; check the path",
                         url=url) from None


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, credentials = head.partition("//")
    return f"{scheme}//{credentials.split(':', 1)[0]}:***@{tail}"


@contextmanager
def _transaction(conn: Any, postgres: bool) -> Iterator[Any]:
    cur = conn.cursor()
    if postgres:
        with conn.transaction():
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            yield cur
    else:
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")


def _applied(cur: Any, postgres: bool) -> set[int]:
    cur.execute(
        "CREATE TABLE IF NOT EXISTS corral_migrations (version INTEGER PRIMARY KEY, "
        f"name TEXT NOT NULL, applied_at {'TIMESTAMPTZ' if postgres else 'TEXT'} NOT NULL "
        f"DEFAULT {'now()' if postgres else 'CURRENT_TIMESTAMP'})"
    )
    cur.execute("SELECT version FROM corral_migrations")
    return {row[0] for row in cur.fetchall()}


def upgrade(url: str) -> list[Migration]:
    """Apply the migrations the database lacks; return them (empty: it was up to date)."""
    postgres = is_postgres(url)
    conn = connect(url)
    done: list[Migration] = []
    try:
        for migration in MIGRATIONS:
            with _transaction(conn, postgres) as cur:
                if migration.version in _applied(cur, postgres):
                    continue
                for statement in (migration.postgres if postgres else migration.sqlite
                                  ).split(";"):
                    if statement.strip():
                        cur.execute(statement)
                cur.execute(
                    "INSERT INTO corral_migrations (version, name) VALUES "
                    + ("(%s, %s)" if postgres else "(?, ?)"),
                    (migration.version, migration.name),
                )
                done.append(migration)
    finally:
        conn.close()
    return done


def require(conn: Any, url: str, version: int) -> None:
    """Fail with what to do when the database lacks migration ``version``."""
    postgres = is_postgres(url)
    cur = conn.cursor()
    try:
        cur.execute("SELECT max(version) FROM corral_migrations")
        current = cur.fetchone()[0] or 0
    except Exception:
        current = 0
        if postgres:
            conn.rollback()
    if current < version:
        raise StoreError(
            f"the database {_redact(url)} is at schema version {current} and corral needs "
            f"{version}; run `corral db upgrade` (it applies the migrations, once, safely "
            "with several workers up)", url=_redact(url), version=current,
        )


def check_redis(url: str) -> None:
    """Fail with what to do when Redis at ``url`` does not answer."""
    try:
        import redis
    except ImportError:
        raise UsageError("Redis needs the cluster extra; pip install 'corral[cluster]'") from None
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise StoreError(
            f"Redis at {_redact(url)} does not answer ({exc}); check the URL (redis in "
            "corral.toml or $CORRAL_REDIS_URL) and that the server is up", url=_redact(url),
        ) from None
    finally:
        client.close()
