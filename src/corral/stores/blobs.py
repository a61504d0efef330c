"""Content-addressed blobs in the shared database: large payloads stored once, by hash.

Methods are synchronous and thread-safe (one connection behind a lock); async callers run them
in a thread.
"""

from __future__ import annotations

import threading
from typing import Any

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
        sql = ("INSERT INTO corral_blobs (hash, data) VALUES (%s, %s) ON CONFLICT DO NOTHING"
               if self._postgres else "INSERT OR IGNORE INTO corral_blobs VALUES (?, ?)")
        with self._lock:
            try:
                cur = self._conn.cursor()
                if not self._postgres:
                    cur.execute("BEGIN IMMEDIATE")
                cur.executemany(sql, list(blobs.items()))
                if not self._postgres:
                    cur.execute("COMMIT")
            except Exception as exc:
                self._failed("store", exc)

    def get(self, hashes: list[bytes]) -> dict[bytes, bytes]:
        """The blobs with these hashes that exist."""
        with self._lock:
            try:
                cur = self._conn.cursor()
                if self._postgres:
                    cur.execute("SELECT hash, data FROM corral_blobs WHERE hash = ANY(%s)",
                                (hashes,))
                    rows: list[Any] = cur.fetchall()
                else:
                    rows = []
                    for start in range(0, len(hashes), 500):
                        part = hashes[start:start + 500]
                        cur.execute("SELECT hash, data FROM corral_blobs WHERE hash IN "
                                    f"({','.join('?' * len(part))})", part)
                        rows.extend(cur.fetchall())
            except Exception as exc:
                self._failed("read", exc)
        return {bytes(h): bytes(d) for h, d in rows}

    def _failed(self, what: str, exc: Exception) -> None:
        raise StoreError(
            f"cannot {what} payload blobs in {self.url.split('@')[-1]}: "
            f"{type(exc).__name__}: {str(exc).strip()}; check that the database is up",
        ) from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()
