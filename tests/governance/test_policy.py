"""The policy decision point: roles, attributes and relationships; deny by default; every
decision explained; mistakes reported with their line; row filters on real SQLite and
PostgreSQL that select exactly the rows `authorize` allows."""

from __future__ import annotations

import random
import sqlite3
from typing import Any

import pytest

from corral.governance._policy import (
    Policy,
    PolicyError,
    Resource,
    Subject,
    load_policy,
    parse_policy,
)

POLICY = """
types:
  team:
    member: [user]
  org:
    viewer: [user, team#member]
  account:
    owner: [team#member, user]
    parent: [org]
    viewer: [user, owner, parent.viewer]
roles:
  auditor: {account: [read]}
rules:
  - id: analysts-in-region
    allow: [read]
    on: account
    roles: [analyst]
    when:
      resource.region: {in: principal.regions}
      resource.classification: {ne: secret}
  - id: viewers-read
    allow: [read]
    on: account
    relation: viewer
  - id: owners-write
    allow: [write, transfer]
    on: account
    relation: owner
  - id: no-large-transfers
    deny: [transfer]
    on: account
    when:
      context.amount: {gt: 10000}
  - id: frozen
    deny: [read, write, transfer]
    on: account
    when:
      resource.status: {eq: frozen}
"""

TUPLES = [
    ("team:eng", "member", "user:alice"),
    ("team:ops", "member", "user:bob"),
    ("account:a1", "owner", "team:eng#member"),
    ("account:a2", "owner", "user:bob"),
    ("account:a3", "parent", "org:acme"),
    ("org:acme", "viewer", "team:ops#member"),
    ("account:a4", "viewer", "user:carol"),
]

ACCOUNTS: dict[str, dict[str, Any]] = {
    "a1": {"region": "eu", "classification": "internal", "status": "open"},
    "a2": {"region": "us", "classification": "secret", "status": "open"},
    "a3": {"region": "eu", "classification": "public", "status": "open"},
    "a4": {"region": "apac", "classification": None, "status": "frozen"},
    "a5": {"region": "us", "classification": "internal", "status": "open"},
}


@pytest.fixture
def policy() -> Policy:
    p = parse_policy(POLICY)
    p.relationships.add_many(TUPLES)
    return p


def user(name: str, **attributes: Any) -> Subject:
    return Subject("user", name, attributes=attributes)


def agent(acting_for: Subject, *roles: str) -> Subject:
    return Subject("agent", "support-bot", frozenset(roles), acting_for=acting_for)


def account(name: str) -> Resource:
    return Resource("account", name, ACCOUNTS[name])


def test_relationships_with_rewrites(policy: Policy) -> None:
    assert policy.check("account:a1", "viewer", "user:alice")  # owner team's member
    assert policy.check("account:a3", "viewer", "user:bob")  # the parent org's viewer team
    assert not policy.check("account:a3", "viewer", "user:alice")
    assert not policy.check("account:a1", "owner", "user:bob")
    assert policy.lookup("account", "viewer", "user:bob") == {"account:a2", "account:a3"}


def test_decisions_explain_themselves(policy: Policy) -> None:
    alice = user("alice", regions=["eu"])
    decision = policy.authorize(agent(alice), "read", account("a1"))
    assert decision and decision.rule == "viewers-read"
    # an agent acting for alice has her relationships, and its own roles
    assert policy.authorize(agent(alice, "analyst"), "read", account("a3")).rule == \
        "analysts-in-region"
    assert not policy.authorize(agent(alice, "analyst"), "read", account("a5"))
    denied = policy.authorize(agent(alice), "read", account("a5"))
    assert not denied and denied.rule is None and "deny by default" in denied.reason
    assert policy.authorize(Subject("agent", "x", frozenset({"auditor"})), "read",
                            account("a5")).rule == "role:auditor"


def test_a_deny_beats_every_allow(policy: Policy) -> None:
    bob = user("bob")
    assert policy.authorize(bob, "transfer", account("a2"), {"amount": 500}).rule == \
        "owners-write"
    big = policy.authorize(bob, "transfer", account("a2"), {"amount": 50_000})
    assert not big and big.rule == "no-large-transfers" and "denied by rule" in big.reason
    carol = user("carol")
    frozen = policy.authorize(carol, "read", account("a4"))
    assert not frozen and frozen.rule == "frozen"
    unknown_amount = policy.authorize(bob, "transfer", account("a2"))
    assert unknown_amount.rule == "owners-write"  # a missing attribute never satisfies gt


@pytest.mark.parametrize(("text", "error"), [
    ("types: [\n", "line 2: not valid YAML"),
    ("typos: {}\n", "line 1: unknown section 'typos'"),
    ("types:\n  account:\n    viewer: [usr]\n", "line 3: account.viewer: 'usr' is neither"),
    ("types:\n  account:\n    viewer: [parent.viewer]\n",
     "line 3: account.viewer: 'parent.viewer' follows 'parent'"),
    ("rules:\n  - allow: [read]\n    on: account\n", "line 2: every rule needs an id"),
    ("rules:\n  - id: r\n    allow: [read]\n    deny: [read]\n    on: a\n",
     "line 2: rule 'r' needs exactly one of allow: or deny:"),
    ("rules:\n  - id: r\n    allow: [read]\n    on: account\n    when:\n"
     "      resource.amount: {greater: 5}\n", "line 6: rule 'r': unknown operator 'greater'"),
    ("rules:\n  - id: r\n    allow: [read]\n    on: account\n    relation: owner\n",
     "line 5: rule 'r': account has no relation 'owner'"),
    ("rules:\n  - id: r\n    allow: [read]\n    on: account\n    when:\n"
     "      amount: {gt: 5}\n", "line 6: rule 'r': 'amount' must start with resource."),
    ("rules:\n  - id: r\n    allow: [read]\n    on: account\n  - id: r\n    allow: [x]\n"
     "    on: a\n", "line 5: two rules have the id 'r'"),
    ("rules:\n  - id: r\n    allow: [read]\n    on: account\n    effect: allow\n",
     "line 5: unknown rule key 'effect'"),
])
def test_a_mistake_is_reported_with_its_line(text: str, error: str) -> None:
    with pytest.raises(PolicyError, match=error):
        parse_policy(text, "policy.yaml")


def test_a_missing_file_says_what_to_do(tmp_path: Any) -> None:
    with pytest.raises(PolicyError, match="no policy file at"):
        load_policy(tmp_path / "nope.yaml")
    (tmp_path / "p.yaml").write_text(POLICY)
    assert len(load_policy(tmp_path / "p.yaml").rules) == 6


def test_check_and_lookup_agree_on_random_graphs() -> None:
    rng = random.Random(7)
    for _ in range(20):
        p = parse_policy(POLICY)
        users = [f"user:u{i}" for i in range(6)]
        for _ in range(40):
            kind = rng.randrange(5)
            if kind == 0:
                p.relationships.add(f"team:t{rng.randrange(3)}", "member", rng.choice(users))
            elif kind == 1:
                p.relationships.add(f"account:a{rng.randrange(8)}", "owner",
                                    rng.choice([*users, "team:t0#member", "team:t1#member"]))
            elif kind == 2:
                p.relationships.add(f"account:a{rng.randrange(8)}", "parent",
                                    f"org:o{rng.randrange(2)}")
            elif kind == 3:
                p.relationships.add(f"org:o{rng.randrange(2)}", "viewer",
                                    rng.choice([*users, "team:t2#member"]))
            else:
                p.relationships.add(f"account:a{rng.randrange(8)}", "viewer", rng.choice(users))
        for u in users:
            found = p.lookup("account", "viewer", u)
            assert found == {f"account:a{i}" for i in range(8)
                             if p.check(f"account:a{i}", "viewer", u)}


def _rows_allowed(policy: Policy, subject: Subject, action: str,
                  context: dict[str, Any]) -> set[str]:
    return {name for name in ACCOUNTS
            if policy.authorize(subject, action, account(name), context)}


SUBJECTS = [
    agent(user("alice", regions=["eu"])),
    agent(user("alice", regions=["eu", "us"]), "analyst"),
    agent(user("bob", regions=[]), "analyst"),
    user("carol"),
    user("nobody"),
    Subject("agent", "auditor-bot", frozenset({"auditor"})),
    agent(user("dave"), "analyst"),  # no regions attribute at all
]


def _load(conn: Any, mark: str) -> None:
    conn.execute("CREATE TABLE accounts (id TEXT PRIMARY KEY, region TEXT, "
                 "classification TEXT, status TEXT)")
    for name, a in ACCOUNTS.items():
        conn.execute(f"INSERT INTO accounts VALUES ({mark}, {mark}, {mark}, {mark})",
                     (name, a["region"], a["classification"], a["status"]))


@pytest.mark.parametrize("action", ["read", "write", "transfer"])
def test_row_filters_select_what_authorize_allows_on_sqlite(policy: Policy, action: str) -> None:
    conn = sqlite3.connect(":memory:")
    _load(conn, "?")
    for subject in SUBJECTS:
        for context in ({}, {"amount": 50_000}):
            where, params = policy.row_filter(subject, action, "account", context).to_sql()
            rows = {r[0] for r in conn.execute(f"SELECT id FROM accounts WHERE {where}",
                                               params)}
            assert rows == _rows_allowed(policy, subject, action, context), (subject, where)


def test_row_filters_on_postgresql(policy: Policy, pg_url: str) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        _load(conn, "%s")
        for action in ("read", "write", "transfer"):
            for subject in SUBJECTS:
                where, params = policy.row_filter(subject, action, "account").to_sql(
                    {"region": "accounts.region"}, dialect="postgresql")
                rows = {r[0] for r in conn.execute(
                    f"SELECT id FROM accounts WHERE {where}", params)}  # type: ignore[call-overload]
                assert rows == _rows_allowed(policy, subject, action, {}), (subject, where)


def test_a_filter_is_parameterized_never_spliced(policy: Policy) -> None:
    evil = agent(user("mallory", regions=["eu' OR '1'='1"]), "analyst")
    where, params = policy.row_filter(evil, "read", "account").to_sql()
    assert "OR '1'='1" not in where and any("OR '1'='1" in str(p) for p in params)
    conn = sqlite3.connect(":memory:")
    _load(conn, "?")
    assert conn.execute(f"SELECT id FROM accounts WHERE {where}", params).fetchall() == []
    with pytest.raises(Exception, match="not a plain column name"):
        policy.row_filter(evil, "read", "account").to_sql({"region": "region; DROP TABLE x"})


def test_groups_in_groups_and_cycles_terminate() -> None:
    p = parse_policy("types:\n  team:\n    member: [user, team#member]\n"
                     "  doc:\n    viewer: [team#member]\n")
    rel = p.relationships
    rel.add("team:a", "member", "team:b#member")
    rel.add("team:b", "member", "team:c#member")
    rel.add("team:c", "member", "team:a#member")  # a cycle
    rel.add("team:c", "member", "user:zoe")
    rel.add("doc:d", "viewer", "team:a#member")
    assert p.check("doc:d", "viewer", "user:zoe")
    assert not p.check("doc:d", "viewer", "user:nobody")
    assert p.lookup("team", "member", "user:zoe") == {"team:a", "team:b", "team:c"}
    assert p.lookup("doc", "viewer", "user:zoe") == {"doc:d"}


def test_nulls_and_single_values_mean_the_same_in_sql_and_authorize() -> None:
    p = parse_policy("""
rules:
  - id: mine
    allow: [read]
    on: account
    when: {resource.region: {in: principal.regions}}
  - id: hidden
    deny: [read]
    on: account
    when: {resource.classification: {eq: secret}}
""")
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE accounts (id TEXT, region TEXT, classification TEXT)")
    rows = [("a", "eu", None), ("b", "e", None), ("c", "", "secret"), ("d", "eu", "secret"),
            ("e", None, None)]
    conn.executemany("INSERT INTO accounts VALUES (?, ?, ?)", rows)
    for regions in ("eu", ["eu"], None):
        subject = Subject("user", "u", attributes={"regions": regions})
        where, params = p.row_filter(subject, "read", "account").to_sql()
        selected = {r[0] for r in conn.execute(f"SELECT id FROM accounts WHERE {where}",
                                               params)}
        allowed = {i for i, region, cls in rows if p.authorize(
            subject, "read", Resource("account", i, {"region": region,
                                                     "classification": cls}))}
        assert selected == allowed
        assert selected == ({"a"} if regions else set())  # "e" is not in "eu"
