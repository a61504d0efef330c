"""The agent registry: identities in the shared database (SQLite and PostgreSQL), one owner per
name within a tenant, deactivation, the in-memory check gateways and tools ask, and
`corral agents` as a user runs it."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from corral import CorralError, StoreError, UsageError
from corral.governance._registry import AgentIdentity, AgentRegistry, UnregisteredAgent
from corral.stores._migrations import upgrade


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = (str(tmp_path / "corral.db") if request.param == "sqlite"
           else str(request.getfixturevalue("pg_url")))
    upgrade(url)
    return url


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_registering_again_changes_nothing_and_a_new_version_is_a_new_row(url: str) -> None:
    registry = AgentRegistry(url)
    first = registry.register(tenant="acme", name="support-bot", version="1.0", owner="care",
                              description="answers tickets")
    again = registry.register(tenant="acme", name="support-bot", version="1.0", owner="care")
    assert again == first and again.active and again.ref == "support-bot@1.0"
    second = registry.register(tenant="acme", name="support-bot", version="1.1", owner="care")
    registry.register(tenant="acme", name="triage", version="7", owner="care")
    registry.register(tenant="globex", name="support-bot", version="1.0", owner="g-team")
    assert [(a.tenant, a.name, a.version) for a in registry.list()] == [
        ("acme", "support-bot", "1.0"), ("acme", "support-bot", "1.1"), ("acme", "triage", "7"),
        ("globex", "support-bot", "1.0")]
    assert [a.version for a in registry.list(tenant="acme")] == ["1.0", "1.1", "7"]
    assert registry.get("acme", "support-bot", "1.1") == second
    assert registry.get("acme", "support-bot", "9") is None
    updated = registry.register(tenant="acme", name="support-bot", version="1.0", owner="care",
                                description="answers tickets, politely")
    assert updated.description == "answers tickets, politely"
    assert updated.registered_at == first.registered_at


def test_a_name_keeps_one_owner_within_its_tenant(url: str) -> None:
    registry = AgentRegistry(url)
    registry.register(tenant="acme", name="billing", version="1", owner="finance")
    with pytest.raises(UsageError, match=r"'billing' in tenant 'acme' is owned by 'finance', "
                                         r"not 'mallory'.*--owner finance") as refused:
        registry.register(tenant="acme", name="billing", version="2", owner="mallory")
    assert (refused.value.tenant, refused.value.owner) == ("acme", "finance")
    registry.deactivate("billing", tenant="acme")
    with pytest.raises(UsageError, match="owned by 'finance'"):  # deactivating frees nothing
        registry.register(tenant="acme", name="billing", version="3", owner="mallory")
    # another tenant's namespace is its own
    assert registry.register(tenant="globex", name="billing", version="1", owner="mallory")
    assert [a.owner for a in registry.list(tenant="acme")] == ["finance"]


def test_racing_registrations_of_one_name_leave_one_owner(url: str) -> None:
    owners = [f"team-{n}" for n in range(8)]
    start = threading.Barrier(len(owners))
    won: list[str] = []
    lost: list[str] = []

    def claim(owner: str) -> None:
        registry = AgentRegistry(url)
        start.wait()
        try:
            registry.register(tenant="acme", name="contested", version=owner, owner=owner)
            won.append(owner)
        except UsageError:
            lost.append(owner)

    threads = [threading.Thread(target=claim, args=(owner,)) for owner in owners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(lost) == len(owners) - 1
    assert {a.owner for a in AgentRegistry(url).list()} == set(won)


def test_deactivating_one_version_or_every_version(url: str) -> None:
    registry = AgentRegistry(url)
    for version in ("1", "2", "3"):
        registry.register(tenant="acme", name="scraper", version=version, owner="data")
    [one] = registry.deactivate("scraper", version="2")
    assert (one.version, one.active) == ("2", False)
    assert [a.active for a in registry.list()] == [True, False, True]
    assert [a.version for a in registry.deactivate("scraper")] == ["1", "2", "3"]
    assert not any(a.active for a in registry.list())
    again = registry.register(tenant="acme", name="scraper", version="2", owner="data")
    assert again.active and again.registered_at == one.registered_at
    with pytest.raises(UsageError, match=r"no agent 'ghost'; `corral agents ls`"):
        registry.deactivate("ghost")
    with pytest.raises(UsageError, match="no agent 'scraper' version '9' in tenant 'acme'"):
        registry.deactivate("scraper", version="9")
    registry.register(tenant="globex", name="scraper", version="1", owner="g")
    with pytest.raises(UsageError, match="exists in tenants acme, globex; say which"):
        registry.deactivate("scraper")
    assert [a.tenant for a in registry.deactivate("scraper", tenant="globex")] == ["globex"]


def test_check_answers_from_memory_and_sees_changes_within_its_refresh(url: str) -> None:
    clock = Clock()
    gate = AgentRegistry(url, refresh=5.0, clock=clock)  # what a gateway holds
    admin = AgentRegistry(url)  # another process: the CLI
    admin.register(tenant="acme", name="bot", version="1", owner="ops")
    assert gate.check("acme", "bot", "1").owner == "ops"
    admin.deactivate("bot")
    assert gate.check("acme", "bot", "1").active  # from memory, until the refresh
    clock.now += 5.1
    with pytest.raises(UnregisteredAgent, match=r"'bot' version '1' of tenant 'acme' was "
                                                r"deactivated; register it: corral agents "
                                                r"register .*--owner ops"):
        gate.check("acme", "bot", "1")
    # an agent registered a moment ago works at once (an unknown one reloads, once a second)
    admin.register(tenant="acme", name="bot", version="2", owner="ops")
    clock.now += 1.1
    assert gate.check("acme", "bot", "2").version == "2"
    with pytest.raises(UnregisteredAgent) as shadow:
        gate.check("acme", "shadow", "0.1")
    assert str(shadow.value) == (
        "agent 'shadow' version '0.1' is not registered in tenant 'acme'; register it: corral "
        "agents register --tenant acme --name shadow --version 0.1 --owner TEAM")
    assert (shadow.value.tenant, shadow.value.name, shadow.value.version) == (
        "acme", "shadow", "0.1")
    with pytest.raises(UnregisteredAgent):  # names are per tenant
        gate.check("globex", "bot", "2")
    # what this registry itself changes counts at once
    gate.deactivate("bot", version="2")
    with pytest.raises(UnregisteredAgent, match="deactivated"):
        gate.check("acme", "bot", "2")


def test_bad_identities_are_refused_saying_what_is_allowed(tmp_path: Path) -> None:
    url = str(tmp_path / "corral.db")
    upgrade(url)
    registry = AgentRegistry(url)
    for field, value in (("name", "has space"), ("name", ""), ("tenant", "../etc"),
                         ("version", "-1"), ("name", "x" * 101)):
        identity = {"tenant": "acme", "name": "bot", "version": "1", field: value}
        with pytest.raises(UsageError, match=f"agent {field} .* is not valid: use letters"):
            registry.register(owner="ops", **identity)
    with pytest.raises(UsageError, match="an agent needs an owner"):
        registry.register(tenant="acme", name="bot", version="1", owner="  ")
    assert registry.list() == []


def test_a_database_without_the_tables_says_to_upgrade(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="run `corral db upgrade`"):
        AgentRegistry(str(tmp_path / "new.db")).list()
    with pytest.raises(StoreError, match="run `corral db upgrade`"):
        AgentRegistry(str(tmp_path / "new.db")).check("acme", "bot", "1")


def test_unregistered_agent_is_a_corral_error_that_survives_pickling() -> None:
    err = UnregisteredAgent("agent 'x' ...", tenant="t", name="x", version="1")
    copy = pickle.loads(pickle.dumps(err))
    assert isinstance(copy, CorralError) and not isinstance(copy, UsageError)
    assert (copy.tenant, copy.name, copy.version, str(copy)) == ("t", "x", "1", "agent 'x' ...")
    assert AgentIdentity(tenant="t", name="x", version="1", owner="o").public()["active"]


class Cli:
    def __init__(self, url: str, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {**os.environ, "CORRAL_DATABASE_URL": url}
        for name in ("CORRAL_CONFIG", "CORRAL_DB", "CORRAL_ENGINE"):
            self.env.pop(name, None)

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "corral", "agents", *args], env=self.env,
                              cwd=self.cwd, capture_output=True, text=True, timeout=60,
                              check=False)

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = self(*args)
        assert done.returncode == 0, done.stderr
        return done


def refused(done: subprocess.CompletedProcess[str], code: int, *phrases: str) -> None:
    """One line on stderr, "error: ...", with each phrase; nothing on stdout."""
    assert (done.returncode, done.stdout) == (code, ""), done
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ")
    for phrase in phrases:
        assert phrase in line, (phrase, line)


def test_corral_agents_register_ls_and_deactivate(url: str, tmp_path: Path) -> None:
    corral = Cli(url, tmp_path)
    done = corral.ok("register", "--name", "support-bot", "--version", "1.2.0", "--owner",
                     "care-team", "--tenant", "acme", "--description", "answers tickets")
    assert done.stdout == ""
    assert "registered support-bot@1.2.0 in tenant acme, owned by care-team" in done.stderr
    record = json.loads(corral.ok("register", "--name", "triage", "--version", "3",
                                  "--owner", "care-team", "--tenant", "acme", "--json").stdout)
    assert record["name"] == "triage" and record["active"] is True
    corral.ok("register", "--name", "ledger", "--version", "1", "--owner", "fin",
              "--tenant", "globex")
    table = corral.ok("ls").stdout.splitlines()
    assert table[0].split() == ["TENANT", "NAME", "VERSION", "OWNER", "STATUS", "REGISTERED",
                                "DESCRIPTION"]
    assert table[1].split()[:5] == ["acme", "support-bot", "1.2.0", "care-team", "active"]
    assert table[1].endswith("answers tickets") and len(table) == 4
    listed = json.loads(corral.ok("ls", "--json", "--tenant", "acme").stdout)
    assert [(a["name"], a["owner"]) for a in listed] == [("support-bot", "care-team"),
                                                         ("triage", "care-team")]
    done = corral.ok("deactivate", "triage", "--version", "3")
    assert "deactivated triage@3 in tenant acme" in done.stderr
    rows = corral.ok("ls").stdout.splitlines()[1:]
    statuses = {line.split()[1]: line.split()[4] for line in rows}
    assert statuses == {"support-bot": "active", "triage": "deactivated", "ledger": "active"}


def test_corral_agents_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    url = str(tmp_path / "corral.db")
    upgrade(url)
    corral = Cli(url, tmp_path)
    corral.ok("register", "--name", "bot", "--version", "1", "--owner", "ops", "--tenant", "a")
    corral.ok("register", "--name", "bot", "--version", "1", "--owner", "ops", "--tenant", "b")
    refused(corral("register", "--name", "bot", "--version", "2", "--owner", "eve",
                   "--tenant", "a"), 2, "owned by 'ops', not 'eve'", "--owner ops")
    refused(corral("register", "--name", "b o t", "--version", "1", "--owner", "ops",
                   "--tenant", "a"), 2, "agent name 'b o t' is not valid")
    refused(corral("deactivate", "ghost"), 2, "no agent 'ghost'", "corral agents ls")
    refused(corral("deactivate", "bot"), 2, "exists in tenants a, b", "--tenant")
    missing = corral("register", "--name", "bot", "--version", "1", "--tenant", "a")
    assert missing.returncode == 2 and "the following arguments are required: --owner" in (
        missing.stderr)
    assert corral("frobnicate").returncode == 2
    fresh = Cli(str(tmp_path / "never-upgraded.db"), tmp_path)
    refused(fresh("ls"), 1, "schema version 0", "corral db upgrade")
    assert len(json.loads(corral.ok("ls", "--json").stdout)) == 2  # nothing changed
