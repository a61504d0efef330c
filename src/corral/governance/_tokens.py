"""Capability tokens: what an agent may do through which tools, for how long, signed so that any
process holding the issuer's public key can check them offline.

A token is a chain of blocks, in the spirit of Biscuit and macaroons. The first, signed with the
issuer's Ed25519 key, names the subject (an agent, ``name@version``), its tenant, its scopes
(tool, resource pattern, actions), when it ends (and may say when it starts) and an id. Every
block commits to the public half of a fresh key pair, and the token carries the private half of
the last one: its *proof*. Whoever holds a token can so append a block, signed with the proof,
that narrows it (fewer scopes, an earlier end, a delegate as subject) and hand the result on,
without the issuer; nobody can remove or reorder blocks, as each signature covers the one before
and the proof fits the last block only. Verification checks that each block narrows what came
before (a block that widens makes the token invalid), so the scopes in force are the last
block's, within every earlier block's.

    ct1.<block>.<signature>[.<block>.<signature>...].<proof>

Parts are base64url without padding; a block is canonical JSON with short keys: ``id``, ``sub``,
``ten``, ``scp`` ([tool, resource, [actions]]...), ``nbf``, ``exp`` (UNIX seconds), ``nxt`` (the
next public key). Revoking a block's id revokes the token that block ends and every token
attenuated from it; revoking the first block's id (`Grant.token_id`) revokes them all.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .._errors import CorralError, UsageError
from ._registry import DEFAULT_REFRESH, Database

log = logging.getLogger("corral.governance")
PREFIX = "ct1"
DEFAULT_TTL = 900.0
MAX_BLOCKS = 32
MAX_LENGTH = 64 * 1024
_DOMAIN = b"corral capability token v1\x00"  # signed before each block: no other use verifies

Reason = Literal["expired", "not yet valid", "forged", "widened", "revoked", "out of scope",
                 "malformed"]
_ROOT_FIELDS = frozenset({"id", "sub", "ten", "scp", "nbf", "exp", "nxt"})
_ROOT_REQUIRED = frozenset({"id", "sub", "ten", "scp", "exp", "nxt"})
_BLOCK_FIELDS = frozenset({"id", "sub", "scp", "exp", "nxt"})
_BLOCK_REQUIRED = frozenset({"id", "nxt"})


class TokenRejected(CorralError):
    """A capability token does not grant what was asked. ``reason`` is one of: expired, not yet
    valid, forged (a signature or the proof does not verify), widened (a block allows more than
    the blocks before it), revoked, out of scope, malformed."""

    reason: Reason


def _reject(reason: Reason, detail: str) -> TokenRejected:
    return TokenRejected(f"capability token rejected ({reason}): {detail}", reason=reason)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pattern_problem(resource: object, *, concrete: bool = False) -> str | None:
    if not isinstance(resource, str) or not resource:
        return "a resource is a non-empty string"
    segments = resource.split("/")
    if "" in segments:
        return f"resource {resource!r} has an empty segment"
    for i, segment in enumerate(segments):
        if concrete and "*" in segment:
            return (f"resource {resource!r} is a pattern; ask about one resource, e.g. "
                    f"{resource.replace('**', 'x').replace('*', 'x')!r}")
        if "*" in segment and segment != "*" and not (segment == "**" and
                                                       i == len(segments) - 1):
            return (f"resource pattern {resource!r}: '*' stands for a whole segment, and '**' "
                    "only for the last one")
    return None


def _scope_problem(tool: object, resource: object, actions: object) -> str | None:
    if not isinstance(tool, str) or not tool or ":" in tool or ("*" in tool and tool != "*"):
        return f"tool {tool!r} is not a tool's name or '*'"
    if (problem := _pattern_problem(resource)) is not None:
        return problem
    if not isinstance(actions, list | tuple) or not actions:
        return f"actions {actions!r} are not a non-empty list of names"
    for action in actions:
        if not isinstance(action, str) or not action or "," in action or (
                "*" in action and action != "*"):
            return f"action {action!r} is not an action's name or '*'"
    return None


def _matches(pattern: tuple[str, ...], segments: list[str]) -> bool:
    if pattern[-1] == "**":
        head = pattern[:-1]
        if len(segments) <= len(head):
            return False
    elif len(segments) != len(pattern):
        return False
    else:
        head = pattern
    return all(p == "*" or p == s for p, s in zip(head, segments, strict=False))


def _covers(outer: tuple[str, ...], inner: tuple[str, ...]) -> bool:
    """Whether every resource ``inner`` matches, ``outer`` matches too."""
    if outer[-1] == "**":
        head = outer[:-1]
        if len(inner) <= len(head):
            return False
    elif inner[-1] == "**" or len(inner) != len(outer):
        return False
    else:
        head = outer
    return all(o == "*" or o == i for o, i in zip(head, inner, strict=False))


@dataclass(frozen=True, slots=True)
class Scope:
    """``actions`` on the resources matching ``resource``, through ``tool``.

    ``tool`` is a tool's name or ``*`` (any tool). ``resource`` is a path of ``/``-separated
    segments where ``*`` matches any one segment and a last ``**`` one or more: ``accounts/acme``,
    ``accounts/acme/*``, ``files/**``. ``actions`` are names, or ``*`` for any action.
    """

    tool: str
    resource: str
    actions: tuple[str, ...]
    _segments: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (problem := _scope_problem(self.tool, self.resource, self.actions)) is not None:
            raise UsageError(f"invalid scope: {problem}")
        object.__setattr__(self, "actions", tuple(sorted(set(self.actions))))
        object.__setattr__(self, "_segments", tuple(self.resource.split("/")))

    @classmethod
    def parse(cls, text: str) -> Scope:
        """``tool:resource:action[,action...]``, as `str` writes it."""
        tool, sep, rest = text.partition(":")
        resource, sep2, actions = rest.rpartition(":")
        if not (sep and sep2):
            raise UsageError(f"scope {text!r} is not TOOL:RESOURCE:ACTIONS, e.g. "
                             "crm:accounts/acme/*:read,write")
        return cls(tool, resource, tuple(actions.split(",")))

    def __str__(self) -> str:
        return f"{self.tool}:{self.resource}:{','.join(self.actions)}"

    def allows(self, tool: str, resource: str, action: str) -> bool:
        return ((self.tool == "*" or self.tool == tool)
                and ("*" in self.actions or action in self.actions)
                and _matches(self._segments, resource.split("/")))

    def _wire(self) -> list[Any]:
        return [self.tool, self.resource, list(self.actions)]


def _uncovered(scope: Scope, allowed: Sequence[Scope]) -> str | None:
    """The first of ``scope``'s actions that no scope in ``allowed`` covers for its tool and
    resources (``*`` is covered by ``*`` only)."""
    for action in scope.actions:
        if not any((a.tool == "*" or a.tool == scope.tool)
                   and ("*" in a.actions or action in a.actions)
                   and _covers(a._segments, scope._segments) for a in allowed):
            return action
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """What a verified token grants."""

    token_id: str
    """The issuer's block id: revoking it revokes every token derived from this one's root."""
    block_ids: tuple[str, ...]
    subject: str
    """Who holds it: the last delegate a block named, else the agent it was issued to."""
    delegation: tuple[str, ...]
    """The agent it was issued to, then each delegate, in order."""
    tenant: str
    scopes: tuple[Scope, ...]
    """The scopes in force: the last block's that names scopes (within every earlier one's)."""
    expires: float
    not_before: float | None = None


@dataclass(frozen=True, slots=True)
class _Block:
    id: str
    next_key: bytes
    subject: str | None = None
    tenant: str | None = None
    scopes: tuple[Scope, ...] | None = None
    not_before: float | None = None
    expires: float | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        data = None
    if data is None or _b64(data) != text:  # one spelling per value: no padding, no other bits
        raise _reject("malformed", f"its {what} is not base64url")
    return data


def _canonical(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _parse_block(raw: bytes, index: int) -> _Block:
    where = "the issuer's block" if index == 0 else f"block {index}"
    try:
        data = json.loads(raw.decode(), object_pairs_hook=_unique, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError):
        raise _reject("malformed", f"{where} is not JSON") from None
    if not isinstance(data, dict):
        raise _reject("malformed", f"{where} is not a JSON object")
    allowed, required = ((_ROOT_FIELDS, _ROOT_REQUIRED) if index == 0 else
                         (_BLOCK_FIELDS, _BLOCK_REQUIRED))
    if unknown := set(data) - allowed:
        raise _reject("malformed", f"{where} has fields a token may not have there: "
                                   f"{', '.join(sorted(unknown))}")
    if missing := required - set(data):
        raise _reject("malformed", f"{where} lacks {', '.join(sorted(missing))}")

    def text(name: str) -> str | None:
        value = data.get(name)
        if value is not None and (not isinstance(value, str) or not value or len(value) > 200):
            raise _reject("malformed", f"{where}: {name} is not a non-empty string")
        return value

    def moment(name: str) -> float | None:
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value)):
            raise _reject("malformed", f"{where}: {name} is not a time in UNIX seconds")
        return None if value is None else float(value)

    next_key = _unb64(text("nxt") or "", f"{where}'s next key")
    if len(next_key) != 32:
        raise _reject("malformed", f"{where}'s next key is not an Ed25519 public key")
    scopes = None
    if "scp" in data:
        if not isinstance(data["scp"], list):
            raise _reject("malformed", f"{where}: scp is not a list of scopes")
        for item in data["scp"]:
            problem = (_scope_problem(*item) if isinstance(item, list) and len(item) == 3
                       else "a scope is [tool, resource, [actions]]")
            if problem is not None:
                raise _reject("malformed", f"{where}: {problem}")
        scopes = tuple(Scope(tool, resource, tuple(actions))
                       for tool, resource, actions in data["scp"])
    return _Block(id=text("id") or "", next_key=next_key, subject=text("sub"),
                  tenant=text("ten"), scopes=scopes, not_before=moment("nbf"),
                  expires=moment("exp"))


def _split(token: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The blocks (payload, signature) and the proof, undecoded; checks the shape only."""
    if not isinstance(token, str) or len(token) > MAX_LENGTH:
        raise _reject("malformed", f"a token is a string of at most {MAX_LENGTH} characters")
    parts = token.split(".")
    if parts[0] != PREFIX or len(parts) < 4 or len(parts) % 2:
        raise _reject("malformed", f"a token is {PREFIX}.BLOCK.SIGNATURE[.BLOCK.SIGNATURE...]"
                                   ".PROOF; this one has another shape")
    if (len(parts) - 2) // 2 > MAX_BLOCKS:
        raise _reject("malformed", f"it has more than {MAX_BLOCKS} blocks")
    blocks = []
    for i in range(1, len(parts) - 1, 2):
        index = i // 2
        signature = _unb64(parts[i + 1], f"signature {index}")
        if len(signature) != 64:
            raise _reject("malformed", f"signature {index} is not an Ed25519 signature")
        blocks.append((_unb64(parts[i], f"block {index}"), signature))
    proof = _unb64(parts[-1], "proof")
    if len(proof) != 32:
        raise _reject("malformed", "its proof is not an Ed25519 private key")
    return blocks, proof


def _signed(previous_signature: bytes, raw: bytes) -> bytes:
    return _DOMAIN + previous_signature + raw


def _key_of(proof: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(proof).public_key().public_bytes_raw()


@dataclass(frozen=True, slots=True)
class _Chain:
    blocks: tuple[_Block, ...]
    scopes: tuple[Scope, ...]
    expires: float
    delegation: tuple[str, ...]


def _narrowed(blocks: Sequence[_Block]) -> _Chain:
    """What the blocks allow together; `TokenRejected` (widened) when one allows more than the
    blocks before it."""
    root = blocks[0]
    assert root.scopes is not None and root.expires is not None and root.subject is not None
    scopes, expires, delegation = root.scopes, root.expires, [root.subject]
    for index, block in enumerate(blocks[1:], start=1):
        if block.expires is not None:
            if block.expires > expires:
                raise _reject("widened", f"block {index} extends its end from "
                                         f"{_when(expires)} to {_when(block.expires)}")
            expires = block.expires
        if block.scopes is not None:
            for scope in block.scopes:
                if (action := _uncovered(scope, scopes)) is not None:
                    raise _reject("widened", f"block {index} allows {action!r} in {scope}, "
                                             f"beyond {'; '.join(map(str, scopes))}")
            scopes = block.scopes
        if block.subject is not None:
            delegation.append(block.subject)
    return _Chain(tuple(blocks), scopes, expires, tuple(delegation))


def _open(token: str, public_keys: Sequence[Ed25519PublicKey]) -> _Chain:
    """The token's blocks, each signature and the proof verified, checked to narrow."""
    raw_blocks, proof = _split(token)
    blocks: list[_Block] = []
    previous = b""
    for index, (raw, signature) in enumerate(raw_blocks):
        message = _signed(previous, raw)
        if index == 0:
            if not any(_verifies(key, signature, message) for key in public_keys):
                raise _reject("forged", "the issuer's block is not signed by a trusted key; "
                                        "check the public keys the verifier trusts")
        elif not _verifies(blocks[-1].next_key, signature, message):
            raise _reject("forged", f"block {index}'s signature does not verify")
        blocks.append(_parse_block(raw, index))
        previous = signature
    if _key_of(proof) != blocks[-1].next_key:
        raise _reject("forged", "its proof does not fit its last block: a block was removed "
                                "or the proof replaced")
    return _narrowed(blocks)


def _verifies(key: Ed25519PublicKey | bytes, signature: bytes, message: bytes) -> bool:
    try:
        if isinstance(key, bytes):
            key = Ed25519PublicKey.from_public_bytes(key)
        key.verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _new_id() -> str:
    return secrets.token_hex(16)


def _append(token_body: str, previous_signature: bytes, signing_key: Ed25519PrivateKey,
            fields: dict[str, Any]) -> str:
    following = Ed25519PrivateKey.generate()
    raw = _canonical({**fields, "nxt": _b64(following.public_key().public_bytes_raw())})
    signature = signing_key.sign(_signed(previous_signature, raw))
    return (f"{token_body}.{_b64(raw)}.{_b64(signature)}."
            f"{_b64(following.private_bytes_raw())}")


def _name(label: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 200:
        raise UsageError(f"a token's {label} is a non-empty string of at most 200 characters, "
                         f"not {value!r}")
    return value


class TokenIssuer:
    """Issues tokens signed with an Ed25519 private key; verifying needs its public key only."""

    def __init__(self, private_key: Ed25519PrivateKey, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._key = private_key
        self._clock = clock

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def issue(self, subject: str, tenant: str, scopes: Sequence[Scope], *,
              ttl: float = DEFAULT_TTL, not_before: float | None = None) -> str:
        """A token for ``subject`` (the agent, ``name@version``) in ``tenant``, allowing
        ``scopes`` for ``ttl`` seconds from now (and not before ``not_before``, if given)."""
        if not scopes or not all(isinstance(s, Scope) for s in scopes):
            raise UsageError("a token needs at least one Scope(tool, resource, actions)")
        if not ttl > 0 or not math.isfinite(ttl):
            raise UsageError(f"a token's ttl is a number of seconds above 0, not {ttl!r}")
        fields: dict[str, Any] = {
            "id": _new_id(), "sub": _name("subject", subject), "ten": _name("tenant", tenant),
            "scp": [s._wire() for s in scopes], "exp": round(self._clock() + ttl, 3)}
        if not_before is not None:
            fields["nbf"] = round(not_before, 3)
        return _append(PREFIX, b"", self._key, fields)


def attenuate(token: str, *, scopes: Sequence[Scope] | None = None, ttl: float | None = None,
              subject: str | None = None, now: float | None = None) -> str:
    """A narrower token, made by its holder (no issuer needed): only ``scopes`` (each within
    the token's), ending within ``ttl`` seconds (or when the token does, if sooner), held by
    ``subject`` (a delegate). Asking for more than the token allows is a `UsageError`."""
    raw_blocks, proof = _split(token)
    blocks = [_parse_block(raw, index) for index, (raw, _) in enumerate(raw_blocks)]
    chain = _narrowed(blocks)
    if _key_of(proof) != blocks[-1].next_key:
        raise _reject("forged", "its proof does not fit its last block: a block was removed "
                                "or the proof replaced")
    fields: dict[str, Any] = {"id": _new_id()}
    if scopes is not None:
        if not all(isinstance(s, Scope) for s in scopes):
            raise UsageError("scopes are Scope(tool, resource, actions) values")
        for scope in scopes:
            if (action := _uncovered(scope, chain.scopes)) is not None:
                raise UsageError(f"cannot widen a token: {scope} asks for {action!r} beyond "
                                 f"what it allows: {'; '.join(map(str, chain.scopes))}")
        fields["scp"] = [s._wire() for s in scopes]
    if ttl is not None:
        if not ttl > 0 or not math.isfinite(ttl):
            raise UsageError(f"a token's ttl is a number of seconds above 0, not {ttl!r}")
        expires = round((time.time() if now is None else now) + ttl, 3)
        if expires < chain.expires:
            fields["exp"] = expires
    if subject is not None:
        fields["sub"] = _name("subject", subject)
    return _append(token.rpartition(".")[0], raw_blocks[-1][1],
                   Ed25519PrivateKey.from_private_bytes(proof), fields)


def verify(token: str, public_keys: Ed25519PublicKey | Sequence[Ed25519PublicKey], tool: str,
           resource: str, action: str, *, now: float | None = None,
           revoked: Container[str] = frozenset()) -> Grant:
    """The grant for ``action`` on ``resource`` through ``tool``, or `TokenRejected` saying why
    not. ``public_keys`` are the issuer keys trusted (several while keys rotate); ``revoked``
    holds revoked ids (a set, or a `RevocationList`)."""
    if not isinstance(tool, str) or not tool or "*" in tool:
        raise UsageError(f"verify() asks about one tool by name, not {tool!r}")
    if (problem := _pattern_problem(resource, concrete=True)) is not None:
        raise UsageError(f"verify() asks about one resource: {problem}")
    if not isinstance(action, str) or not action or "*" in action:
        raise UsageError(f"verify() asks about one action by name, not {action!r}")
    keys = [public_keys] if isinstance(public_keys, Ed25519PublicKey) else list(public_keys)
    if not keys or not all(isinstance(key, Ed25519PublicKey) for key in keys):
        raise UsageError("verify() needs the issuer's Ed25519 public key, or a list of them")
    chain = _open(token, keys)
    for index, block in enumerate(chain.blocks):
        if block.id in revoked:
            which = ("it was revoked" if index == len(chain.blocks) - 1 else
                     f"the token it was attenuated from was revoked (block {index})")
            raise _reject("revoked", f"{which}, id {block.id}; ask for a new one")
    now = time.time() if now is None else now
    not_before = chain.blocks[0].not_before
    if not_before is not None and now < not_before:
        raise _reject("not yet valid", f"it is valid from {_when(not_before)}, "
                                       f"{not_before - now:.0f}s from now")
    if now >= chain.expires:
        raise _reject("expired", f"it expired at {_when(chain.expires)}, "
                                 f"{now - chain.expires:.0f}s ago; ask for a new one")
    for block in chain.blocks:
        if block.scopes is not None and not any(s.allows(tool, resource, action)
                                                for s in block.scopes):
            raise _reject("out of scope", f"asked for {action!r} on {resource!r} through "
                                          f"{tool!r}; the token allows "
                                          f"{'; '.join(map(str, chain.scopes))}")
    root = chain.blocks[0]
    assert root.tenant is not None
    return Grant(token_id=root.id, block_ids=tuple(b.id for b in chain.blocks),
                 subject=chain.delegation[-1], delegation=chain.delegation, tenant=root.tenant,
                 scopes=chain.scopes, expires=chain.expires, not_before=not_before)


class RevocationList:
    """Revoked token ids in the shared database, asked through an in-memory set reloaded every
    ``refresh`` seconds: pass it to `verify` as ``revoked``. A revocation made here counts at
    once here, and in every other process within ``refresh`` seconds."""

    def __init__(self, url: str, *, refresh: float = DEFAULT_REFRESH,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.db = Database(url)
        self.refresh = refresh
        self._clock = clock
        self._ids: frozenset[str] = frozenset()
        self._loaded = float("-inf")

    def revoke(self, token_id: str, *, reason: str = "", tenant: str | None = None,
               expires: float | None = None) -> None:
        """Revoke the token whose block has this id, and every token attenuated from it
        (``expires``: when it ends anyway, after which the id need not be kept in memory)."""
        if not isinstance(token_id, str) or not token_id:
            raise UsageError(f"a token id is a non-empty string, not {token_id!r}")
        with self.db.transaction() as execute:
            execute("INSERT INTO corral_revocations (id, tenant, reason, revoked_at, expires) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                    token_id, tenant, reason, time.time(), expires)
        self._ids = self._ids | {token_id}

    def revoke_token(self, token: str, *, reason: str = "") -> str:
        """Revoke this token and every token attenuated from it; return the id revoked."""
        raw_blocks, _ = _split(token)
        blocks = [_parse_block(raw, index) for index, (raw, _) in enumerate(raw_blocks)]
        expires = min(b.expires for b in blocks if b.expires is not None)
        self.revoke(blocks[-1].id, reason=reason, tenant=blocks[0].tenant, expires=expires)
        return blocks[-1].id

    def __contains__(self, token_id: object) -> bool:
        now = self._clock()
        if now - self._loaded > self.refresh:
            self._reload(now)
        return token_id in self._ids

    def _reload(self, now: float) -> None:
        try:
            with self.db.transaction() as execute:
                rows = execute("SELECT id FROM corral_revocations WHERE expires IS NULL OR "
                               "expires > ?", time.time())
        except Exception as exc:
            if self._loaded == float("-inf"):
                raise
            log.error("revocation list: cannot reload it from the database (%s); using the %d "
                      "ids loaded before", exc, len(self._ids))
        else:
            self._ids = frozenset(r[0] for r in rows)
        self._loaded = now
