"""Virtual keys: API keys per tenant or team, with the models they may use, their own rate
limits and budget. Only a key's SHA-256 is stored; the key itself is shown once, at creation.

A key is ``sk-corral-`` followed by 32 random bytes (base64url), so a fast hash is enough: no
dictionary can guess it. The gateway keeps the keys in memory and reloads them every
``keys_refresh`` seconds, so a key created or revoked in any process takes effect in every
replica within that time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .._errors import UsageError
from ..stores._migrations import connect, is_postgres, require

log = logging.getLogger("corral.gateway")
KEYS_VERSION = 3  # the migration that creates corral_keys
PREFIX = "sk-corral-"
_COLUMNS = "id, tenant, name, models, rpm, tpm, budget, budget_period, created_at, revoked_at"


@dataclass(frozen=True, slots=True)
class Key:
    id: str
    tenant: str
    name: str | None = None
    models: tuple[str, ...] | None = None
    """The models it may ask for (None: all)."""
    rpm: int | None = None
    tpm: int | None = None
    budget: float | None = None
    budget_period: str | None = None
    created_at: float = 0.0
    revoked_at: float | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "tenant": self.tenant, "name": self.name,
                "models": list(self.models) if self.models is not None else None,
                "rpm": self.rpm, "tpm": self.tpm, "budget": self.budget,
                "budget_period": self.budget_period, "created_at": self.created_at,
                "revoked_at": self.revoked_at}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _row(row: tuple[Any, ...]) -> Key:
    id_, tenant, name, models, rpm, tpm, budget, period, created, revoked = row
    return Key(id_, tenant, name, tuple(json.loads(models)) if models is not None else None,
               rpm, tpm, budget, period, created, revoked)


class KeyStore:
    """The keys in the shared database (SQLite or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._mark = "%s" if is_postgres(url) else "?"

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = connect(self.url)
        try:
            require(conn, self.url, KEYS_VERSION)
            cur = conn.cursor()
            cur.execute(sql.replace("?", self._mark), params)
            rows = cur.fetchall() if cur.description else []
            conn.commit()
            return rows
        finally:
            conn.close()

    def create(self, tenant: str, *, name: str | None = None,
               models: list[str] | None = None, rpm: int | None = None,
               tpm: int | None = None, budget: float | None = None,
               budget_period: str = "month") -> tuple[str, Key]:
        """A new key: the secret (shown once) and its record."""
        if not tenant:
            raise UsageError("a key needs a tenant: --tenant NAME")
        for label, value in (("rpm", rpm), ("tpm", tpm), ("budget", budget)):
            if value is not None and value <= 0:
                raise UsageError(f"--{label} must be above 0, not {value}")
        if budget_period not in ("hour", "day", "month", "total"):
            raise UsageError(f"--budget-period must be hour, day, month or total, not "
                             f"{budget_period!r}")
        secret = PREFIX + secrets.token_urlsafe(32)
        key = Key(f"key_{secrets.token_hex(6)}", tenant, name,
                  tuple(models) if models else None, rpm, tpm, budget,
                  budget_period if budget is not None else None, time.time())
        self._run(f"INSERT INTO corral_keys (hash, {_COLUMNS}) VALUES "
                  "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (digest(secret), key.id, key.tenant, key.name,
                   json.dumps(list(key.models)) if key.models is not None else None,
                   key.rpm, key.tpm, key.budget, key.budget_period, key.created_at, None))
        return secret, key

    def revoke(self, key_id: str) -> Key:
        rows = self._run(f"UPDATE corral_keys SET revoked_at = coalesce(revoked_at, ?) "
                         f"WHERE id = ? RETURNING {_COLUMNS}", (time.time(), key_id))
        if not rows:
            raise UsageError(f"no key {key_id!r}; `corral keys ls` lists them")
        return _row(rows[0])

    def list(self) -> list[Key]:
        return [_row(r) for r in
                self._run(f"SELECT {_COLUMNS} FROM corral_keys ORDER BY created_at")]

    def active(self) -> dict[str, Key]:
        """The keys that work, by their hash."""
        rows = self._run(f"SELECT hash, {_COLUMNS} FROM corral_keys WHERE revoked_at IS NULL")
        return {r[0]: _row(r[1:]) for r in rows}


class KeyCache:
    """The active keys of a `KeyStore`, in memory, reloaded when older than ``refresh``
    seconds (a failed reload keeps the keys it had, and is logged)."""

    def __init__(self, store: KeyStore, refresh: float) -> None:
        self.store = store
        self.refresh = refresh
        self._keys: dict[str, Key] = {}
        self._loaded = float("-inf")
        self._loading: asyncio.Task[None] | None = None

    async def _reload(self) -> None:
        try:
            self._keys = await asyncio.to_thread(self.store.active)
        except Exception as exc:
            log.error("gateway keys: cannot reload them from the database (%s); using the "
                      "%d keys loaded before", exc, len(self._keys))
        self._loaded = time.monotonic()

    async def find(self, secret: str) -> Key | None:
        """The key's record (None: no such key, or revoked). A known key is answered from
        memory while a due reload runs behind it; an unknown one waits for the reload, so a
        key created a moment ago works."""
        stale = time.monotonic() - self._loaded > self.refresh
        if stale and (self._loading is None or self._loading.done()):
            self._loading = asyncio.ensure_future(self._reload())
        key = self._keys.get(digest(secret))
        if key is None and stale and self._loading is not None:
            await asyncio.shield(self._loading)
            key = self._keys.get(digest(secret))
        return key
