"""The agent registry: who each agent is (tenant, name, version) and who owns it, in the shared
database (SQLite on one machine, PostgreSQL on a cluster).

A name belongs to one owner within its tenant: every version of ``support-bot`` in ``acme`` has
the same owner, so nobody can slip a version under someone else's name. Registering the same
identity again is harmless (it updates the description and reactivates it); a new version is a
new row. Deactivating keeps the row, so ``corral agents ls`` still says who the agent was.

`AgentRegistry.check` is the question the gateway and the tool pipeline ask with enforcement on:
it answers from memory, reloaded every ``refresh`` seconds (and at most once a second when asked
about an agent it does not know, so a freshly registered agent works at once), so a deactivation
in any process takes effect everywhere within ``refresh`` seconds.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from .._errors import CorralError, UsageError
from ..stores._migrations import connect, is_postgres, require

log = logging.getLogger("corral.governance")
GOVERNANCE_VERSION = 5  # the migration that creates corral_agents and corral_revocations
DEFAULT_REFRESH = 5.0
_MISS_RELOAD = 1.0  # an unknown agent reloads the registry at most this often
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_COLUMNS = "tenant, name, version, owner, description, registered_at, deactivated_at"

Execute = Callable[..., list[tuple[Any, ...]]]


class UnregisteredAgent(CorralError):
    """An agent that is not in the registry, or was deactivated, tried to act; ``tenant``,
    ``name`` and ``version`` say which."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentIdentity:
    tenant: str
    name: str
    version: str
    owner: str
    description: str | None = None
    registered_at: float = 0.0
    deactivated_at: float | None = None

    @property
    def active(self) -> bool:
        return self.deactivated_at is None

    @property
    def ref(self) -> str:
        """``name@version``: how tokens and records name the agent."""
        return f"{self.name}@{self.version}"

    def public(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "name": self.name, "version": self.version,
                "owner": self.owner, "description": self.description,
                "registered_at": self.registered_at, "deactivated_at": self.deactivated_at,
                "active": self.active}


def _row(row: tuple[Any, ...]) -> AgentIdentity:
    tenant, name, version, owner, description, registered, deactivated = row
    return AgentIdentity(tenant=tenant, name=name, version=version, owner=owner,
                         description=description, registered_at=registered,
                         deactivated_at=deactivated)


def _valid(label: str, value: str, pattern: re.Pattern[str], longest: int) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise UsageError(f"agent {label} {value!r} is not valid: use letters, digits, '.', '_' "
                         f"and '-', starting with a letter or digit, at most {longest} "
                         "characters", **{label: value})
    return value


class Database:
    """Short transactions on the shared database, one connection each (as the key store does);
    checks first that the schema has the governance tables."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.postgres = is_postgres(url)

    @contextmanager
    def transaction(self, lock: str | None = None) -> Iterator[Execute]:
        """Yield ``execute(sql, *params) -> rows`` (``?`` marks parameters); ``lock`` names what
        concurrent transactions on the same thing wait for (an advisory lock on PostgreSQL, the
        write lock on SQLite)."""
        conn = connect(self.url)
        try:
            require(conn, self.url, GOVERNANCE_VERSION)
            cur = conn.cursor()

            def execute(sql: str, *params: Any) -> list[tuple[Any, ...]]:
                cur.execute(sql.replace("?", "%s") if self.postgres else sql, params)
                return list(cur.fetchall()) if cur.description else []

            if self.postgres:
                if lock is not None:
                    key = int.from_bytes(hashlib.sha256(lock.encode()).digest()[:8], "big",
                                         signed=True)
                    execute("SELECT pg_advisory_xact_lock(?)", key)
                yield execute
                conn.commit()
            else:
                cur.execute("BEGIN IMMEDIATE" if lock is not None else "BEGIN")
                try:
                    yield execute
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
        finally:
            conn.close()


class AgentRegistry:
    """The agents in the shared database at ``url`` (a SQLite path or postgresql://...)."""

    def __init__(self, url: str, *, refresh: float = DEFAULT_REFRESH,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.db = Database(url)
        self.refresh = refresh
        self._clock = clock
        self._known: dict[tuple[str, str, str], AgentIdentity] = {}
        self._loaded = float("-inf")

    def register(self, *, tenant: str, name: str, version: str, owner: str,
                 description: str | None = None) -> AgentIdentity:
        """Record the agent (idempotent for the same identity; a new version is a new row);
        a name owned by someone else in the tenant is refused."""
        _valid("tenant", tenant, _NAME, 100)
        _valid("name", name, _NAME, 100)
        _valid("version", version, _VERSION, 64)
        if not isinstance(owner, str) or not owner.strip():
            raise UsageError("an agent needs an owner: the team or person answering for it, "
                             "e.g. --owner support-team")
        owner = owner.strip()
        with self.db.transaction(lock=f"corral-agent\0{tenant}\0{name}") as execute:
            rows = [_row(r) for r in execute(
                f"SELECT {_COLUMNS} FROM corral_agents WHERE tenant = ? AND name = ? "
                "ORDER BY registered_at", tenant, name)]
            others = sorted({r.owner for r in rows} - {owner})
            if others:
                raise UsageError(
                    f"agent {name!r} in tenant {tenant!r} is owned by {others[0]!r}, not "
                    f"{owner!r}; a name keeps one owner: register it with --owner "
                    f"{others[0]}, or choose another name", tenant=tenant, name=name,
                    owner=others[0])
            same = next((r for r in rows if r.version == version), None)
            if same is None:
                agent = AgentIdentity(tenant=tenant, name=name, version=version, owner=owner,
                                      description=description, registered_at=time.time())
                execute(f"INSERT INTO corral_agents ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        tenant, name, version, owner, description, agent.registered_at, None)
            else:
                agent = replace(same, deactivated_at=None,
                                description=same.description if description is None
                                else description)
                if agent != same:
                    execute("UPDATE corral_agents SET description = ?, deactivated_at = NULL "
                            "WHERE tenant = ? AND name = ? AND version = ?",
                            agent.description, tenant, name, version)
        self._known[(tenant, name, version)] = agent
        return agent

    def get(self, tenant: str, name: str, version: str) -> AgentIdentity | None:
        with self.db.transaction() as execute:
            rows = execute(f"SELECT {_COLUMNS} FROM corral_agents WHERE tenant = ? AND "
                           "name = ? AND version = ?", tenant, name, version)
        return _row(rows[0]) if rows else None

    def deactivate(self, name: str, *, tenant: str | None = None,
                   version: str | None = None) -> list[AgentIdentity]:
        """Deactivate one version of the agent, or all of them; return what was deactivated.
        Without ``tenant`` the name must exist in one tenant only."""
        with self.db.transaction(lock=f"corral-agents-deactivate\0{name}") as execute:
            if tenant is None:
                tenants = sorted(t for (t,) in execute(
                    "SELECT DISTINCT tenant FROM corral_agents WHERE name = ?", name))
                if len(tenants) > 1:
                    raise UsageError(f"agent {name!r} exists in tenants {', '.join(tenants)}; "
                                     "say which with --tenant", name=name)
                tenant = tenants[0] if tenants else None
            rows = [] if tenant is None else execute(
                "UPDATE corral_agents SET deactivated_at = coalesce(deactivated_at, ?) WHERE "
                "tenant = ? AND name = ?" + (" AND version = ?" if version is not None else "")
                + f" RETURNING {_COLUMNS}",
                time.time(), tenant, name, *(() if version is None else (version,)))
        if not rows:
            which = f"agent {name!r}" + (f" version {version!r}" if version is not None else "")
            where = f" in tenant {tenant!r}" if tenant is not None else ""
            raise UsageError(f"no {which}{where}; `corral agents ls` lists them", name=name)
        agents = sorted((_row(r) for r in rows), key=lambda a: (a.registered_at, a.version))
        for agent in agents:
            self._known[(agent.tenant, agent.name, agent.version)] = agent
        return agents

    def check(self, tenant: str, name: str, version: str) -> AgentIdentity:
        """The agent's identity, from memory; `UnregisteredAgent` when it is not registered or
        was deactivated."""
        now = self._clock()
        if now - self._loaded > self.refresh:
            self._reload(now)
        agent = self._known.get((tenant, name, version))
        if agent is None and now - self._loaded > _MISS_RELOAD:
            self._reload(now)
            agent = self._known.get((tenant, name, version))
        if agent is not None and agent.active:
            return agent
        how = (f"register it: corral agents register --tenant {tenant} --name {name} "
               f"--version {version} --owner TEAM")
        if agent is None:
            message = (f"agent {name!r} version {version!r} is not registered in tenant "
                       f"{tenant!r}; {how}")
        else:
            message = (f"agent {name!r} version {version!r} of tenant {tenant!r} was "
                       f"deactivated; {how.replace('TEAM', agent.owner)}")
        raise UnregisteredAgent(message, tenant=tenant, name=name, version=version)

    def _reload(self, now: float) -> None:
        try:
            with self.db.transaction() as execute:
                rows = execute(f"SELECT {_COLUMNS} FROM corral_agents")
        except Exception as exc:
            if self._loaded == float("-inf"):
                raise
            log.error("agent registry: cannot reload it from the database (%s); using the %d "
                      "identities loaded before", exc, len(self._known))
            self._loaded = now
            return
        known = {}
        for row in rows:
            agent = _row(row)
            known[(agent.tenant, agent.name, agent.version)] = agent
        self._known = known
        self._loaded = now

    def list(self, tenant: str | None = None) -> list[AgentIdentity]:
        """Every agent (deactivated ones too), by tenant, name and registration."""
        where, params = ("WHERE tenant = ? ", (tenant,)) if tenant is not None else ("", ())
        with self.db.transaction() as execute:
            rows = execute(f"SELECT {_COLUMNS} FROM corral_agents {where}"
                           "ORDER BY tenant, name, registered_at, version", *params)
        return [_row(r) for r in rows]
