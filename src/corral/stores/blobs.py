"""Content-addressed blobs in the shared database: large payloads stored once, by hash.

Methods are synchronous and thread-safe (one connection behind a lock); async callers run them
in a thread.
"""

from __future__ import annotations

import threading
from typing import Any, NoReturn

from .._errors import StoreError
from ._migrations import connect, is_postgres, require

BLOBS_VERSION = 1  # the migration that creates corral_blobs


class BlobStore:
    """Blobs by hash in PostgreSQL (``postgresql://...``) or SQLite (a path)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._postgres = is_postgres(url)
        self._conn = connect(url)
        self._lock = threading.Lock()
        try:
            if self._postgres:
                self._conn.autocommit = True
            require(self._conn, url, BLOBS_VERSION)
        except BaseException:
            self._conn.close()
            raise

    def put(self, blobs: dict[bytes, bytes]) -> None:
        """Store blobs by their hash; one already there is left as it is."""
        self._retrying("store", self._put, list(blobs.items()))

    def _put(self, rows: list[tuple[bytes, bytes]]) -> None:
        cur = self._conn.cursor()
        if self._postgres:
            cur.executemany("INSERT INTO corral_blobs (hash, data) VALUES (%s, %s) "
                            "ON CONFLICT DO NOTHING", rows)
            return
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.executemany("INSERT OR IGNORE INTO corral_blobs VALUES (?, ?)", rows)
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    def get(self, hashes: list[bytes]) -> dict[bytes, bytes]:
        """The blobs with these hashes that exist."""
        rows: list[Any] = self._retrying("read", self._get, hashes)
        return {bytes(h): bytes(d) for h, d in rows}

    def _get(self, hashes: list[bytes]) -> list[Any]:
        cur = self._conn.cursor()
        if self._postgres:
            cur.execute("SELECT hash, data FROM corral_blobs WHERE hash = ANY(%s)", (hashes,))
            return list(cur.fetchall())
        rows: list[Any] = []
        for start in range(0, len(hashes), 500):
            part = hashes[start:start + 500]
            cur.execute("SELECT hash, data FROM corral_blobs WHERE hash IN "
                        f"({','.join('?' * len(part))})", part)
            rows.extend(cur.fetchall())
        return rows

    def _retrying(self, what: str, fn: Any, arg: Any) -> Any:
        """Run ``fn``; after a failure (the database restarted, failed over) connect again and
        try once more before giving up."""
        with self._lock:
            try:
                return fn(arg)
            except Exception:
                try:
                    self._conn.close()
                    self._conn = connect(self.url)
                    if self._postgres:
                        self._conn.autocommit = True
                    return fn(arg)
                except Exception as exc:
                    self._failed(what, exc)

    def _failed(self, what: str, exc: Exception) -> NoReturn:
        raise StoreError(
            f"cannot {what} payload blobs in {self.url.split('@')[-1]}: "
            f"{type(exc).__name__}: {str(exc).strip()}; check that the database is up",
        ) from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()
