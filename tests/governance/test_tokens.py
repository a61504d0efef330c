"""Capability tokens: scoped and time-bound, attenuated by their holders without the issuer,
verified offline with the issuer's public key alone, revocable in the shared database; expired,
forged, widened, revoked, out-of-scope and malformed tokens are rejected with the reason."""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral import CorralError, StoreError, UsageError
from corral.governance._tokens import (
    Grant,
    RevocationList,
    Scope,
    TokenIssuer,
    TokenRejected,
    attenuate,
    verify,
)
from corral.stores._migrations import upgrade

NOW = 1_800_000_000.0
ISSUER_KEY = Ed25519PrivateKey.generate()
ISSUER = TokenIssuer(ISSUER_KEY, clock=lambda: NOW)
PUBLIC = ISSUER_KEY.public_key()
CRM = Scope("crm", "accounts/acme/**", ("read", "write"))
MAIL = Scope("mail", "outbox/*", ("send",))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def append_raw(token: str, fields: dict[str, Any]) -> str:
    """What any holder can do by hand with the wire format: append a block with any fields,
    signed with the token's proof."""
    parts = token.split(".")
    proof = Ed25519PrivateKey.from_private_bytes(unb64(parts[-1]))
    following = Ed25519PrivateKey.generate()
    raw = json.dumps({"id": os.urandom(8).hex(), **fields,
                      "nxt": b64(following.public_key().public_bytes_raw())}).encode()
    signature = proof.sign(b"corral capability token v1\x00" + unb64(parts[-2]) + raw)
    return ".".join([*parts[:-1], b64(raw), b64(signature), b64(following.private_bytes_raw())])


def token_id(token: str) -> str:
    return str(json.loads(unb64(token.split(".")[1]))["id"])


def rejected(token: str, reason: str, *request: str, now: float = NOW + 1,
             revoked: Any = frozenset()) -> str:
    """The message of the rejection, asserting its reason."""
    with pytest.raises(TokenRejected) as caught:
        verify(token, PUBLIC, *(request or ("crm", "accounts/acme/1", "read")), now=now,
               revoked=revoked)
    assert caught.value.reason == reason, str(caught.value)
    assert str(caught.value).startswith(f"capability token rejected ({reason}): ")
    return str(caught.value)


def test_a_token_grants_its_scopes_and_nothing_else() -> None:
    token = ISSUER.issue("manager@2.0", "acme", [CRM, MAIL], ttl=600)
    assert token.startswith("ct1.") and len(token.split(".")) == 4
    grant = verify(token, PUBLIC, "crm", "accounts/acme/42/notes", "write", now=NOW + 1)
    assert grant == Grant(token_id=grant.token_id, block_ids=(grant.token_id,),
                          subject="manager@2.0", delegation=("manager@2.0",), tenant="acme",
                          scopes=(CRM, MAIL), expires=NOW + 600)
    assert verify(token, [PUBLIC], "mail", "outbox/ceo", "send", now=NOW + 1).tenant == "acme"
    for request in (("crm", "accounts/acme", "read"),  # '**' needs one segment at least
                    ("crm", "accounts/globex/1", "read"), ("crm", "accounts/acme/1", "delete"),
                    ("mail", "outbox/a/b", "send"), ("files", "accounts/acme/1", "read")):
        rejected(token, "out of scope", *request)


def test_each_rejection_says_why() -> None:
    token = ISSUER.issue("agent@1", "acme", [CRM], ttl=60, not_before=NOW + 10)
    assert "expired at 2027-01-15 08:01:00 UTC, 5s ago; ask for a new one" in rejected(
        token, "expired", now=NOW + 65)
    assert rejected(token, "expired", now=NOW + 60)  # the end is exclusive
    assert "valid from 2027-01-15 08:00:10 UTC, 9s from now" in rejected(
        token, "not yet valid", now=NOW + 1)
    assert verify(token, PUBLIC, "crm", "accounts/acme/1", "read", now=NOW + 10)
    other = TokenIssuer(Ed25519PrivateKey.generate(), clock=lambda: NOW).issue("a@1", "acme",
                                                                                 [CRM])
    assert "not signed by a trusted key" in rejected(other, "forged", now=NOW + 11)
    assert "crm:accounts/acme/**:read,write" in rejected(
        append_raw(token, {"scp": [["*", "accounts/acme/**", ["read"]]]}), "widened",
        now=NOW + 11)
    assert f"it was revoked, id {token_id(token)}; ask for a new one" in rejected(
        token, "revoked", now=NOW + 11, revoked={token_id(token)})
    message = rejected(token, "out of scope", "crm", "accounts/acme/7", "delete", now=NOW + 11)
    assert message.endswith("asked for 'delete' on 'accounts/acme/7' through 'crm'; the token "
                            "allows crm:accounts/acme/**:read,write")
    for garbage in ("", "ct1", "jwt.a.b.c", "ct1.a.b", "ct1.!!.b.c", token + ".x",
                    token.replace("ct1.", "ct2.", 1), "ct1." + "a." * 70 + "a", "x" * 70000):
        rejected(garbage, "malformed", now=NOW + 11)


def test_three_attenuations_narrow_step_by_step_and_revoke_downstream() -> None:
    root = ISSUER.issue("manager@1", "acme", [CRM, MAIL], ttl=3600)
    lead = attenuate(root, scopes=[Scope("crm", "accounts/acme/*", ("read", "write"))],
                     ttl=1800, subject="lead@1", now=NOW)
    specialist = attenuate(lead, scopes=[Scope("crm", "accounts/acme/*", ("read",))],
                           subject="specialist@3", now=NOW)
    intern = attenuate(specialist, scopes=[Scope("crm", "accounts/acme/7", ("read",))],
                       ttl=60, subject="intern@0.1", now=NOW)
    chain = [root, lead, specialist, intern]
    grants = [verify(t, PUBLIC, "crm", "accounts/acme/7", "read", now=NOW + 1) for t in chain]
    assert [g.subject for g in grants] == ["manager@1", "lead@1", "specialist@3", "intern@0.1"]
    assert grants[-1].delegation == ("manager@1", "lead@1", "specialist@3", "intern@0.1")
    assert [g.expires for g in grants] == [NOW + 3600, NOW + 1800, NOW + 1800, NOW + 60]
    assert {g.token_id for g in grants} == {token_id(root)}
    assert [len(g.block_ids) for g in grants] == [1, 2, 3, 4]
    assert grants[-1].scopes == (Scope("crm", "accounts/acme/7", ("read",)),)
    # what each may do: (root, lead, specialist, intern)
    table = {("crm", "accounts/acme/7", "read"): [True, True, True, True],
             ("crm", "accounts/acme/8", "read"): [True, True, True, False],
             ("crm", "accounts/acme/8", "write"): [True, True, False, False],
             ("crm", "accounts/acme/8/notes", "read"): [True, False, False, False],
             ("mail", "outbox/x", "send"): [True, False, False, False]}
    for request, allowed in table.items():
        for token, expected in zip(chain, allowed, strict=True):
            try:
                verify(token, PUBLIC, *request, now=NOW + 1)
                granted = True
            except TokenRejected as exc:
                assert exc.reason == "out of scope"
                granted = False
            assert granted == expected, (request, chain.index(token))
    rejected(intern, "expired", now=NOW + 61)
    assert verify(specialist, PUBLIC, "crm", "accounts/acme/7", "read", now=NOW + 61)
    # revoking the specialist's token revokes what was made from it, not what it came from
    cut = {grants[2].block_ids[-1]}
    assert "attenuated from was revoked (block 2)" in rejected(intern, "revoked", revoked=cut)
    rejected(specialist, "revoked", revoked=cut)
    assert verify(lead, PUBLIC, "crm", "accounts/acme/7", "read", now=NOW + 1, revoked=cut)


def test_attenuate_never_widens_and_never_extends() -> None:
    root = ISSUER.issue("manager@1", "acme", [Scope("crm", "accounts/acme/*", ("read",))],
                        ttl=100)
    for wider in (Scope("crm", "accounts/acme/*", ("read", "write")),
                  Scope("crm", "accounts/acme/*", ("*",)), Scope("*", "accounts/acme/*",
                                                                 ("read",)),
                  Scope("crm", "accounts/*/*", ("read",)), Scope("crm", "accounts/acme/**",
                                                                 ("read",)),
                  Scope("crm", "accounts/acme", ("read",))):
        with pytest.raises(UsageError, match=re.escape(f"cannot widen a token: {wider}")):
            attenuate(root, scopes=[Scope("crm", "accounts/acme/1", ("read",)), wider])
    later = attenuate(root, ttl=10_000, now=NOW)  # a later end is no end: the token's stays
    assert verify(later, PUBLIC, "crm", "accounts/acme/1", "read", now=NOW + 1).expires == (
        NOW + 100)
    with pytest.raises(UsageError, match="ttl is a number of seconds above 0"):
        attenuate(root, ttl=0)
    nothing = attenuate(root, scopes=[])  # narrowest of all: valid, allows nothing
    rejected(nothing, "out of scope", "crm", "accounts/acme/1", "read")


def test_a_hand_made_block_that_widens_invalidates_the_token() -> None:
    root = ISSUER.issue("manager@1", "acme", [CRM], ttl=100)
    narrow = attenuate(root, scopes=[Scope("crm", "accounts/acme/1", ("read",))], now=NOW)
    wide = append_raw(narrow, {"scp": [["crm", "accounts/acme/**", ["read", "write"]]]})
    assert "block 2 allows 'read' in crm:accounts/acme/**:read,write, beyond " \
           "crm:accounts/acme/1:read" in rejected(wide, "widened")
    assert "extends its end" in rejected(append_raw(narrow, {"exp": NOW + 500}), "widened")
    for fields in ({"ten": "globex"}, {"nbf": NOW - 100}, {"scp": "everything"},
                   {"scp": [["crm", "accounts/ac*", ["read"]]]}, {"exp": "never"}):
        rejected(append_raw(narrow, fields), "malformed")


def tampered(token: str, at: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    swap = alphabet[(alphabet.index(token[at]) + 1) % 64]
    return token[:at] + swap + token[at + 1:]


def test_changing_any_character_is_rejected() -> None:
    token = attenuate(attenuate(ISSUER.issue("m@1", "acme", [CRM, MAIL], ttl=100),
                                scopes=[CRM], subject="s@1", now=NOW), ttl=50, now=NOW)
    verify(token, PUBLIC, "crm", "accounts/acme/1", "read", now=NOW + 1)
    starts = [i + 1 for i, c in enumerate(token) if c == "."]
    kinds = {"payload": 0, "signature": 0, "proof": 0}
    for at, char in enumerate(token):
        if char == "." or at < 4:
            continue
        part = sum(1 for s in starts if s <= at)  # 1: the first block, 2: its signature...
        kind = "proof" if part == len(starts) else ("payload" if part % 2 else "signature")
        changed = tampered(token, at)
        piece = changed.split(".")[part]
        canonical = b64(unb64(piece)) == piece  # else one of the value's other spellings
        with pytest.raises(TokenRejected) as caught:
            verify(changed, PUBLIC, "crm", "accounts/acme/1", "read", now=NOW + 1)
        assert caught.value.reason == ("forged" if canonical else "malformed"), (at, kind)
        kinds[kind] += canonical
    assert min(kinds.values()) > 40, kinds


def test_blocks_cannot_be_removed_reordered_or_spliced() -> None:
    root = ISSUER.issue("m@1", "acme", [CRM, MAIL], ttl=100)
    one = attenuate(root, scopes=[CRM], now=NOW)
    two = attenuate(one, scopes=[Scope("crm", "accounts/acme/1", ("read",))], now=NOW)
    p = two.split(".")  # ct1, b0, s0, b1, s1, b2, s2, proof
    assert len(p) == 8
    forged = {
        "last block removed, proof kept": [*p[:5], p[7]],
        "middle block removed": [*p[:3], *p[5:]],
        "blocks swapped": [p[0], p[1], p[2], p[5], p[6], p[3], p[4], p[7]],
        "block and signature from another chain": [*p[:5], *attenuate(
            one, scopes=[CRM], now=NOW).split(".")[5:7], p[7]],
        "another token's proof": [*p[:7], root.split(".")[-1]],
        "signatures swapped": [p[0], p[1], p[4], p[3], p[2], p[5], p[6], p[7]],
    }
    for what, parts in forged.items():
        with pytest.raises(TokenRejected) as caught:
            verify(".".join(parts), PUBLIC, "crm", "accounts/acme/2", "read", now=NOW + 1)
        assert caught.value.reason == "forged", what
    rejected(".".join(p[:7]), "malformed")  # no proof


def test_verifying_offline_needs_the_public_key_alone(tmp_path: Path) -> None:
    pem = PUBLIC.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "issuer.pem").write_bytes(pem)
    # the holder narrows it without the issuer; another process checks it with the PEM only
    token = attenuate(ISSUER.issue("m@1", "acme", [CRM], ttl=10**6), subject="s@1",
                      scopes=[Scope("crm", "accounts/acme/9", ("read",))], now=NOW)
    script = (
        "import sys\n"
        "from cryptography.hazmat.primitives.serialization import load_pem_public_key\n"
        "from corral.governance._tokens import verify, TokenRejected\n"
        "key = load_pem_public_key(open('issuer.pem', 'rb').read())\n"
        "token = sys.stdin.read()\n"
        "print(verify(token, key, 'crm', 'accounts/acme/9', 'read', now=1.8e9 + 1).subject)\n"
        "try:\n"
        "    verify(token, key, 'crm', 'accounts/acme/1', 'read', now=1.8e9 + 1)\n"
        "except TokenRejected as exc:\n"
        "    print(exc.reason)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    done = subprocess.run([sys.executable, "-c", script], input=token, capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=60, check=False)
    assert (done.returncode, done.stdout) == (0, "s@1\nout of scope\n"), done.stderr


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = (str(tmp_path / "corral.db") if request.param == "sqlite"
           else str(request.getfixturevalue("pg_url")))
    upgrade(url)
    return url


def test_revocations_in_the_shared_database_reach_every_process(url: str) -> None:
    now = [0.0]
    elsewhere = RevocationList(url, refresh=5.0, clock=lambda: now[0])
    here = RevocationList(url)
    root = ISSUER.issue("m@1", "acme", [CRM], ttl=10**6)
    child = attenuate(root, scopes=[Scope("crm", "accounts/acme/1", ("read",))], now=NOW)
    assert verify(child, PUBLIC, "crm", "accounts/acme/1", "read", now=NOW + 1,
                  revoked=elsewhere)  # loaded now: nothing revoked
    revoked_id = here.revoke_token(child, reason="the specialist is done")
    here.revoke_token(child)  # again: no change
    rejected(child, "revoked", revoked=here)
    assert verify(root, PUBLIC, "crm", "accounts/acme/1", "read", now=NOW + 1, revoked=here)
    assert revoked_id not in elsewhere  # until its refresh
    now[0] += 5.1
    rejected(child, "revoked", revoked=elsewhere)
    here.revoke(token_id(root))
    now[0] += 5.1
    rejected(root, "revoked", revoked=elsewhere)
    # an id whose token has ended anyway is not kept in memory
    here.revoke("old-id", expires=1.0)
    assert "old-id" not in RevocationList(url)
    with pytest.raises(UsageError, match="token id is a non-empty string"):
        here.revoke("")


def test_the_revocation_list_needs_the_migration(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="corral db upgrade"):
        _ = "x" in RevocationList(str(tmp_path / "new.db"))


def test_scopes_are_checked_and_requests_are_concrete() -> None:
    assert Scope.parse("crm:accounts/acme/*:write,read") == Scope("crm", "accounts/acme/*",
                                                                  ("read", "write"))
    assert str(Scope("crm", "a/**", ("write", "read", "read"))) == "crm:a/**:read,write"
    for bad in (("crm", "accounts/ac*", ("read",)), ("crm", "**/x", ("read",)),
                ("crm", "a//b", ("read",)), ("c*m", "a", ("read",)), ("crm", "a", ()),
                ("crm", "a", ("re*d",))):
        with pytest.raises(UsageError, match="invalid scope"):
            Scope(*bad)
    with pytest.raises(UsageError, match="TOOL:RESOURCE:ACTIONS"):
        Scope.parse("crm")
    token = ISSUER.issue("m@1", "acme", [CRM])
    for request in (("*", "accounts/acme/1", "read"), ("crm", "accounts/*/1", "read"),
                    ("crm", "accounts/acme/1", "*"), ("crm", "", "read")):
        with pytest.raises(UsageError, match=r"verify\(\) asks about one"):
            verify(token, PUBLIC, *request, now=NOW + 1)
    with pytest.raises(UsageError, match="needs the issuer's Ed25519 public key"):
        verify(token, [], "crm", "accounts/acme/1", "read")
    with pytest.raises(UsageError, match="at least one Scope"):
        ISSUER.issue("m@1", "acme", [])
    with pytest.raises(UsageError, match="subject is a non-empty string"):
        ISSUER.issue("", "acme", [CRM])


def test_token_rejected_is_a_corral_error_that_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(TokenRejected("rejected", reason="expired")))
    assert isinstance(err, CorralError) and err.reason == "expired" and str(err) == "rejected"


# Property: whatever block a holder appends (through attenuate, or by hand), the token never
# allows a request its parent does not; what it allows is what both allow.
segments = st.sampled_from(["a", "b", "*"])
patterns = st.builds(lambda segs, rest: "/".join(segs + (["**"] if rest else [])),
                     st.lists(segments, min_size=1, max_size=3), st.booleans())
scopes = st.builds(lambda tool, resource, actions: Scope(tool, resource, tuple(actions)),
                   st.sampled_from(["crm", "mail", "*"]), patterns,
                   st.lists(st.sampled_from(["read", "write", "*"]), min_size=1, max_size=2))
requests = st.tuples(st.sampled_from(["crm", "mail"]),
                     st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4).map(
                         "/".join), st.sampled_from(["read", "write", "delete"]))


def allows(token: str, request: tuple[str, str, str]) -> bool:
    try:
        verify(token, PUBLIC, *request, now=NOW + 1)
    except TokenRejected as exc:
        assert exc.reason == "out of scope", str(exc)
        return False
    return True


def instances(scope: Scope) -> st.SearchStrategy[tuple[str, str, str]]:
    """Requests the scope allows, mostly (a '*' action becomes any action)."""
    def segment(pattern: str) -> st.SearchStrategy[str]:
        if pattern == "**":
            return st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=2).map(
                "/".join)
        return st.sampled_from(["a", "b", "c"]) if pattern == "*" else st.just(pattern)

    return st.tuples(
        st.sampled_from(["crm", "mail"]) if scope.tool == "*" else st.just(scope.tool),
        st.tuples(*map(segment, scope.resource.split("/"))).map("/".join),
        st.sampled_from(["read", "write", "delete", *scope.actions]).filter(lambda a: a != "*"))


def narrower(scope: Scope) -> st.SearchStrategy[Scope]:
    """Scopes within ``scope``."""
    def segment(pattern: str) -> st.SearchStrategy[str]:
        if pattern == "**":
            return st.sampled_from(["**", "*", "a", "a/**", "*/**"])
        return st.sampled_from(["*", "a", "b"]) if pattern == "*" else st.just(pattern)

    return st.builds(
        lambda tool, resource, actions: Scope(tool, resource, tuple(actions)),
        st.sampled_from(["crm", "mail", "*"]) if scope.tool == "*" else st.just(scope.tool),
        st.tuples(*map(segment, scope.resource.split("/"))).map("/".join),
        st.lists(st.sampled_from(["read", "write", "*"]) if "*" in scope.actions
                 else st.sampled_from(scope.actions), min_size=1, max_size=2))


def beside(scope: Scope) -> st.SearchStrategy[Scope]:
    """Scopes just outside ``scope`` (or equal to it): where a subset check goes wrong."""
    tool, resource, actions = scope.tool, scope.resource, scope.actions
    segs = resource.split("/")
    near = [Scope("*", resource, actions), Scope(tool, resource, (*actions, "*")),
            Scope(tool, resource, (*actions, "delete"))]
    if segs[-1] == "**":
        near += [Scope(tool, "/".join(segs[:-1]), actions)] if len(segs) > 1 else []
    else:
        near.append(Scope(tool, f"{resource}/**", actions))
        near += [Scope(tool, "/".join([*segs[:-1], "**"]), actions)]
    near += [Scope(tool, "/".join([*segs[:i], "*", *segs[i + 1:]]), actions)
             for i, seg in enumerate(segs) if seg != "**"]
    return st.sampled_from(near)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parent=st.lists(scopes, min_size=1, max_size=3), by_hand=st.booleans(), data=st.data())
def test_attenuation_never_widens(parent: list[Scope], by_hand: bool,
                                  data: st.DataObject) -> None:
    child = data.draw(st.lists(st.one_of(scopes, *map(narrower, parent), *map(beside, parent)),
                               min_size=1, max_size=3))
    asked = data.draw(st.lists(st.one_of(requests, *map(instances, parent + child)),
                               min_size=1, max_size=12))
    token = ISSUER.issue("m@1", "acme", parent)
    attenuate(token, scopes=[data.draw(narrower(parent[0]))])  # what is within is accepted
    hand_made = append_raw(token, {"scp": [[s.tool, s.resource, list(s.actions)]
                                           for s in child]})
    try:
        narrowed = attenuate(token, scopes=child, now=NOW)
    except UsageError:
        rejected(hand_made, "widened", *asked[0])  # refused exactly when verify says widened
        return
    for request in asked:
        granted = allows(hand_made if by_hand else narrowed, request)
        within = any(s.allows(*request) for s in child)
        assert granted == within  # what the child's scopes allow, the token allows: ...
        assert allows(token, request) or not within  # ... and its parent too
