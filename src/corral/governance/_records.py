"""Decision records: what each model call, tool call, policy decision, human override and budget
stop decided, for whom and why, in an append-only log an auditor can check.

The log is an RFC 6962 Merkle tree (`._merkle`) in the shared database (SQLite or PostgreSQL).
`DecisionLog.append` queues a record and returns at once; one sequencer thread per process
writes the queue in batches, each in one transaction that holds the database's lock (an advisory
lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite): it reads the tree's size and compact range,
gives the records the next indexes, stores them with their leaf hashes, the tree nodes every 8
levels (so proofs read a few rows, not the log) and a tree head signed with Ed25519. Writers in
many processes therefore extend one tree and never fork it.

A leaf is the record's canonical JSON (sorted keys, no whitespace, UTF-8) with its index:
``{"index":7,"record":{...}}``, so a record cannot be moved without its hash changing.
`DecisionLog.verify` recomputes every leaf hash, every stored node and every signed head's root
from the records, and names the first record that does not fit: changed, missing, moved or
inserted. Since all heads are recomputed from one sequence of leaves, each is consistent with
the ones before it. `prove` gives a record's inclusion proof and `consistency` the proof that one
signed head extends another; `verify_proof` checks either with nothing but its JSON.

The log keeps what it is given: callers redact inputs and outputs before they append.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, get_args

from .._errors import StoreError, UsageError
from ..stores._migrations import _redact, connect, is_postgres, require, sqlite_path
from ._merkle import (
    CompactRange,
    Subtrees,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    perfect_root,
    verify_consistency,
    verify_inclusion,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ..config import Config

log = logging.getLogger("corral.governance")

RECORDS_VERSION = 4  # the migration that creates the corral_decision_* tables
Kind = Literal["model_call", "tool_call", "policy_decision", "human_override", "budget_stop"]
KINDS: tuple[str, ...] = get_args(Kind)
NODE_STRIDE = 8
"""Tree nodes are stored at every 8th level: a proof reads at most 128 rows per step."""
SIGNING_KEY_ENV = "CORRAL_SIGNING_KEY"
"""The signing key itself (PEM, or base64 of the 32-byte Ed25519 seed), e.g. from a secret."""
DEFAULT_KEY_FILE = "decision-log.key"
"""Generated beside an embedded (SQLite) database when no key is configured."""
INCLUSION_FORMAT = "corral-inclusion-proof/v1"
CONSISTENCY_FORMAT = "corral-consistency-proof/v1"
_SEQUENCER_LOCK = 0x636F7272616C + 4  # the advisory lock that serializes appends
_HEAD_TAG = b"corral decision log v1"


def _new_id() -> str:
    """``dr_``, the time in ms (so ids sort by time, and index at the end) and 64 random bits."""
    return f"dr_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(8)}"


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                            allow_nan=False)


def _canonical(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


@dataclass(kw_only=True, frozen=True, slots=True)
class DecisionRecord:
    """One decision, as the log keeps it; the log gives it its index."""

    kind: Kind
    tenant: str
    agent: str | None = None
    agent_version: str | None = None
    acting_for: str | None = None
    """The user the agent acts for."""
    inputs: Any = None
    """What was decided on, as JSON values, already redacted: the log keeps it as given."""
    prompt: str | None = None
    prompt_version: str | None = None
    model: str | None = None
    tools: Sequence[Mapping[str, Any]] = ()
    """The tool invocations: name, arguments (redacted), outcome."""
    outputs: Any = None
    decision: str | None = None
    """What was decided: allow, deny, stop, approve, the model's answer's finish..."""
    rule: str | None = None
    """The rule, policy or limit that decided it."""
    run_id: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    at: float = field(default_factory=time.time)
    id: str = field(default_factory=_new_id, init=False)
    """Given at creation, unique: it names the record for `DecisionLog.prove`."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"a decision record's kind is one of {', '.join(KINDS)}, not "
                             f"{self.kind!r}")
        if not self.tenant:
            raise UsageError("a decision record needs its tenant")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "tenant": self.tenant, "agent": self.agent,
            "agent_version": self.agent_version, "acting_for": self.acting_for,
            "inputs": self.inputs, "prompt": self.prompt, "prompt_version": self.prompt_version,
            "model": self.model, "tools": list(self.tools), "outputs": self.outputs,
            "decision": self.decision, "rule": self.rule, "run_id": self.run_id,
            "trace_id": self.trace_id, "span_id": self.span_id, "at": self.at, "id": self.id,
        }

    def canonical(self) -> bytes:
        """The record as canonical JSON: sorted keys, no whitespace, UTF-8."""
        try:
            return _canonical(self.to_dict())
        except (TypeError, ValueError) as exc:
            raise UsageError(f"decision record {self.id} ({self.kind}) holds a value that is "
                             f"not JSON ({exc}); pass JSON values (str, numbers, lists, "
                             "dicts, None) in inputs, tools and outputs") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecisionRecord:
        """The record of `to_dict` (as read back from a leaf)."""
        names = set(cls.__dataclass_fields__) - {"id"}
        record = cls(**{k: v for k, v in data.items() if k in names})
        if "id" in data:
            object.__setattr__(record, "id", data["id"])
        return record


def leaf_data(index: int, body: bytes) -> bytes:
    """The leaf of the record whose canonical JSON is ``body``, at ``index``."""
    return b'{"index":%d,"record":%s}' % (index, body)


# -- signing ----------------------------------------------------------------------------------


def _crypto() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise UsageError("decision records sign their tree heads with Ed25519, which needs the "
                         "cryptography package; pip install 'cryptography>=42'") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{what} is not base64") from None


def key_id(public_key: bytes) -> str:
    """A short name for a raw Ed25519 public key: its SHA-256, first 16 hex digits."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def raw_public_key(key: Ed25519PrivateKey) -> bytes:
    """The 32 bytes of the key's public half."""
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def parse_private_key(text: bytes, source: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (PKCS#8) or the base64 of its 32-byte seed."""
    _crypto()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        if text.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(text, password=None)
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise ValueError("not an Ed25519 key")
            return key
        seed = base64.b64decode(text.strip(), validate=True)
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise UsageError(f"the signing key in {source} is not an Ed25519 private key ({exc}); "
                         "use `corral audit keygen` to make one") from None


def parse_public_key(text: bytes, source: str) -> bytes:
    """A raw Ed25519 public key from PEM (SubjectPublicKeyInfo) or base64 of its 32 bytes."""
    _crypto()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        if text.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise ValueError("not an Ed25519 key")
            return bytes(key.public_bytes(serialization.Encoding.Raw,
                                          serialization.PublicFormat.Raw))
        raw = base64.b64decode(text.strip(), validate=True)
        ed25519.Ed25519PublicKey.from_public_bytes(raw)
        return raw
    except (ValueError, TypeError, binascii.Error) as exc:
        raise UsageError(f"{source} is not an Ed25519 public key ({exc}); `corral audit "
                         "public-key` prints the log's") from None


def generate_key_file(path: str | Path) -> Ed25519PrivateKey:
    """Write a new Ed25519 private key (PEM, mode 0600) to ``path``; never overwrites."""
    _crypto()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key: Ed25519PrivateKey = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.link(temporary, path)  # (atomic, and fails when another process was first)
    finally:
        os.unlink(temporary)
    return key


def public_key_pem(public_key: bytes) -> str:
    _crypto()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PublicKey.from_public_bytes(public_key)
    return str(key.public_bytes(serialization.Encoding.PEM,
                                serialization.PublicFormat.SubjectPublicKeyInfo).decode())


def _load_key_file(path: str | Path) -> Ed25519PrivateKey:
    try:
        return parse_private_key(Path(path).read_bytes(), str(path))
    except FileNotFoundError:
        raise UsageError(f"the signing key file {path} does not exist; check [governance] "
                         "signing_key in corral.toml, or make one with `corral audit keygen "
                         f"--out {path}`") from None


def resolve_signing_key(url: str, key: str | Path | Ed25519PrivateKey | None = None, *,
                        generate: bool = True) -> Ed25519PrivateKey:
    """The key that signs tree heads: ``key`` (a key or a PEM file), else
    ``$CORRAL_SIGNING_KEY``, else for an embedded (SQLite) database the file beside it,
    generated on first use (when ``generate``)."""
    if key is not None and not isinstance(key, (str, Path)):
        return key
    if key is not None:
        return _load_key_file(key)
    if os.environ.get(SIGNING_KEY_ENV):
        return parse_private_key(os.environ[SIGNING_KEY_ENV].encode(), f"${SIGNING_KEY_ENV}")
    if is_postgres(url) and not generate:
        raise UsageError(
            "checking the decision log needs its public key: pass --public-key FILE (`corral "
            "audit public-key` prints it where the signing key is), or configure the signing "
            f"key: [governance] signing_key in corral.toml or ${SIGNING_KEY_ENV}")
    if is_postgres(url):
        raise UsageError(
            "decision records on PostgreSQL need one signing key shared by every writer: make "
            "one with `corral audit keygen --out FILE`, then set [governance] signing_key = "
            f'"FILE" in corral.toml or put the key in ${SIGNING_KEY_ENV}')
    path = Path(sqlite_path(url)).resolve().parent / DEFAULT_KEY_FILE
    if path.exists():
        return _load_key_file(path)
    if not generate:
        raise UsageError(f"no signing key at {path} to check the decision log with; pass the "
                         "log's public key (--public-key FILE), or configure its signing key: "
                         f"[governance] signing_key in corral.toml or ${SIGNING_KEY_ENV}")
    try:
        created = generate_key_file(path)
    except FileExistsError:  # another process made it first
        return _load_key_file(path)
    log.warning("decision records: generated the signing key %s (Ed25519, key id %s) for the "
                "embedded database; back it up with the database, and give auditors its "
                "public key (`corral audit public-key`). To use your own, set [governance] "
                "signing_key in corral.toml or $%s", path, key_id(raw_public_key(created)),
                SIGNING_KEY_ENV)
    return created


def _verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    _crypto()
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class TreeHead:
    """A signed statement that the log's tree of ``size`` leaves has ``root``."""

    size: int
    root: bytes
    timestamp_ms: int
    key_id: str
    signature: bytes

    def message(self) -> bytes:
        """The bytes signed: a tag, then size, base64 root and time in ms, one per line."""
        return b"%s\n%d\n%s\n%d\n" % (_HEAD_TAG, self.size, base64.b64encode(self.root),
                                      self.timestamp_ms)

    def verify(self, public_key: bytes) -> bool:
        return key_id(public_key) == self.key_id and _verify_signature(
            public_key, self.signature, self.message())

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "root": self.root.hex(), "timestamp_ms": self.timestamp_ms,
                "key_id": self.key_id, "signature": _b64(self.signature)}

    @classmethod
    def from_json(cls, data: Any) -> TreeHead:
        try:
            return cls(int(data["size"]), bytes.fromhex(data["root"]), int(data["timestamp_ms"]),
                       str(data["key_id"]), _unb64(data["signature"], "a head's signature"))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"a tree head lacks or garbles a field ({exc!r})") from None

    @classmethod
    def sign(cls, size: int, root: bytes, timestamp_ms: int, key: Ed25519PrivateKey,
             kid: str) -> TreeHead:
        unsigned = cls(size, root, timestamp_ms, kid, b"")
        return cls(size, root, timestamp_ms, kid, key.sign(unsigned.message()))


# -- the log ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verification:
    """What `DecisionLog.verify` found: ``ok``, or the first ``problem`` and the record it is
    about (``index``, and ``record_id`` when the record is there)."""

    ok: bool
    records: int
    heads: int
    root: str | None
    seconds: float
    problem: str | None = None
    index: int | None = None
    record_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "heads": self.heads, "root": self.root,
                "seconds": round(self.seconds, 3), "problem": self.problem,
                "index": self.index, "record_id": self.record_id}


class _Bad(Exception):
    def __init__(self, problem: str, index: int | None = None, record_id: str | None = None
                 ) -> None:
        super().__init__(problem)
        self.problem, self.index, self.record_id = problem, index, record_id


_open_logs: weakref.WeakSet[DecisionLog] = weakref.WeakSet()


@atexit.register
def _close_open_logs() -> None:
    for decisions in list(_open_logs):
        try:
            decisions._close()
        except Exception as exc:
            log.error("decision records: at exit, %s", exc)


class DecisionLog:
    """The decision log in the shared database at ``url`` (a SQLite path or postgresql://).

    ``append`` queues; the sequencer writes at most ``batch`` records per transaction, waiting
    up to ``flush_every`` seconds for a batch to fill; past ``max_pending`` queued records
    ``append`` raises rather than let a decision go unrecorded. ``await flush()`` returns when
    everything appended before is written; ``await close()`` (or leaving ``async with``, or the
    process's exit) writes what is left.
    """

    def __init__(self, url: str, *, signing_key: str | Path | Ed25519PrivateKey | None = None,
                 public_keys: Sequence[bytes] = (), batch: int = 2000,
                 flush_every: float = 0.2, max_pending: int = 200_000) -> None:
        self.url = url
        self._postgres = is_postgres(url)
        self._mark = "%s" if self._postgres else "?"
        conn = connect(url)
        try:
            require(conn, url, RECORDS_VERSION)
        finally:
            conn.close()
        self._key_source = signing_key
        self._key: Ed25519PrivateKey | None = None
        self._kid = ""
        self._public_keys = list(public_keys)
        self.batch = batch
        self.flush_every = flush_every
        self.max_pending = max_pending
        self._pending: deque[tuple[str, bytes]] = deque()
        self._cond = threading.Condition()
        self._appended = self._written = self._failures = self._waiters = 0
        self._failure: BaseException | None = None
        self._closed = self._stopping = False
        self._thread: threading.Thread | None = None
        self._conn: Any = None

    @classmethod
    def from_config(cls, config: Config, **options: Any) -> DecisionLog:
        """The log in the configured database, signed with ``[governance] signing_key`` (a
        file; ``$CORRAL_SIGNING_KEY`` overrides it)."""
        configured = ((config.sections or {}).get("governance") or {}).get("signing_key")
        if configured is not None and not isinstance(configured, str):
            raise UsageError(f"config file {config.source}: [governance] signing_key must be "
                             "the path of a PEM file")
        if configured and not os.environ.get(SIGNING_KEY_ENV):
            options.setdefault("signing_key", configured)
        return cls(config.shared_db, **options)

    async def __aenter__(self) -> DecisionLog:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- keys

    def signing_key(self, *, generate: bool = True) -> Ed25519PrivateKey:
        """The key that signs this process's tree heads (see `resolve_signing_key`)."""
        if self._key is None:
            self._key = resolve_signing_key(self.url, self._key_source, generate=generate)
            self._kid = key_id(raw_public_key(self._key))
        return self._key

    def public_key(self) -> bytes:
        """The raw public key of the signing key (never generates one)."""
        return raw_public_key(self.signing_key(generate=False))

    def _trusted(self) -> dict[str, bytes]:
        keys = self._public_keys or [self.public_key()]
        return {key_id(k): k for k in keys}

    # -- appending

    def append(self, record: DecisionRecord) -> str:
        """Queue ``record`` to be written; return its id. Never blocks; thread-safe."""
        body = record.canonical()
        if self._key is None:
            self.signing_key()  # (fails here, saying what to do, when there is none)
        with self._cond:
            if self._closed:
                raise UsageError("the decision log is closed; append before close()")
            if len(self._pending) >= self.max_pending:
                why = f"is not taking writes ({self._failure})" if self._failure \
                    else "does not keep up"
                raise StoreError(
                    f"decision records: {len(self._pending)} wait to be written to "
                    f"{_redact(self.url)}, which {why}; refusing more so that no decision goes "
                    "unrecorded", url=_redact(self.url))
            self._pending.append((record.id, body))
            self._appended += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._sequence, daemon=True,
                                                name="corral-decision-log")
                self._thread.start()
                _open_logs.add(self)
            if len(self._pending) >= self.batch:
                self._cond.notify_all()
        return record.id

    def _sequence(self) -> None:
        """The sequencer: writes the queue in batches until stopped."""
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                deadline = time.monotonic() + self.flush_every
                while len(self._pending) < self.batch and not self._stopping \
                        and not self._waiters:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                rows = [self._pending.popleft()
                        for _ in range(min(self.batch, len(self._pending)))]
            try:
                self._write(rows)
            except Exception as exc:
                with self._cond:
                    self._pending.extendleft(reversed(rows))
                    self._failure = exc
                    self._failures += 1
                    self._cond.notify_all()
                    if self._stopping:
                        return
                    log.warning("decision records: writing %d to %s failed (%s); retrying",
                                len(rows), _redact(self.url), exc)
                    self._cond.wait(0.5)
                continue
            with self._cond:
                self._written += len(rows)
                self._failure = None
                self._cond.notify_all()

    def _write(self, rows: list[tuple[str, bytes]]) -> None:
        """Append ``rows`` (id, canonical record) in one transaction, with a signed head."""
        key = self.signing_key()
        if self._conn is None:
            self._conn = connect(self.url)
        conn, postgres = self._conn, self._postgres
        cur = conn.cursor()
        try:
            if postgres:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SEQUENCER_LOCK,))
            else:
                cur.execute("BEGIN IMMEDIATE")
            cur.execute("SELECT size, frontier FROM corral_decision_state WHERE id = 1")
            size, frontier = cur.fetchone()
            tree = CompactRange.from_bytes(size, bytes(frontier))
            sha256 = hashlib.sha256
            records: list[tuple[int, str, bytes, bytes]] = []
            nodes: list[tuple[int, int, bytes]] = []
            frontier = tree.hashes
            for index, (record_id, body) in enumerate(rows, size):
                data = b'{"index":%d,"record":%s}' % (index, body)
                h = sha256(b"\x00" + data).digest()
                records.append((index, record_id, data, h))
                if index & 1:  # (CompactRange.append, inlined: this loop is the hot path)
                    level = 0
                    while index >> level & 1:
                        h = sha256(b"\x01" + frontier.pop() + h).digest()
                        level += 1
                        if level % NODE_STRIDE == 0:
                            nodes.append((level, index >> level, h))
                frontier.append(h)
            tree.size = size + len(rows)
            head = TreeHead.sign(tree.size, tree.root(), int(time.time() * 1000), key,
                                 self._kid)
            if postgres:
                with cur.copy("COPY corral_decision_records (idx, id, data, hash) FROM STDIN "
                              "(FORMAT BINARY)") as copy:
                    copy.set_types(["int8", "text", "bytea", "bytea"])
                    for record in records:
                        copy.write_row(record)
            else:
                cur.executemany("INSERT INTO corral_decision_records (idx, id, data, hash) "
                                "VALUES (?, ?, ?, ?)", records)
            m = self._mark
            if nodes:
                cur.executemany(f"INSERT INTO corral_decision_nodes (level, idx, hash) VALUES "
                                f"({m}, {m}, {m})", nodes)
            cur.execute(f"UPDATE corral_decision_state SET size = {m}, frontier = {m} "
                        "WHERE id = 1", (tree.size, tree.to_bytes()))
            cur.execute(f"INSERT INTO corral_decision_heads (size, root, at_ms, key_id, "
                        f"signature) VALUES ({m}, {m}, {m}, {m}, {m})",
                        (head.size, head.root, head.timestamp_ms, head.key_id, head.signature))
        except BaseException:
            with contextlib.suppress(Exception):
                if postgres:
                    conn.rollback()
                else:
                    cur.execute("ROLLBACK")
            with contextlib.suppress(Exception):
                conn.close()  # (the next try reconnects: the server may have restarted)
            self._conn = None
            raise
        if postgres:
            conn.commit()
        else:
            cur.execute("COMMIT")

    def _wait_written(self) -> None:
        with self._cond:
            target, failures = self._appended, self._failures
            self._waiters += 1
            self._cond.notify_all()
            try:
                while self._written < target:
                    if self._failures != failures:
                        raise StoreError(
                            f"decision records: {target - self._written} could not be written "
                            f"to {_redact(self.url)} ({self._failure}); they stay queued",
                            url=_redact(self.url))
                    self._cond.wait()
            finally:
                self._waiters -= 1

    async def flush(self) -> None:
        """Return when every record appended before is written (raise when a write fails)."""
        await asyncio.to_thread(self._wait_written)

    def _close(self) -> None:
        with self._cond:
            self._closed = True
        try:
            self._wait_written()
        finally:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            if self._thread is not None:
                self._thread.join()
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            _open_logs.discard(self)
            if self._pending:
                log.error("decision records: %d were not written to %s (%s)",
                          len(self._pending), _redact(self.url), self._failure)

    async def close(self) -> None:
        """Write what is queued, then stop the sequencer."""
        await asyncio.to_thread(self._close)

    # -- reading

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Any]:
        """A connection on one snapshot of the database."""
        conn = connect(self.url)
        try:
            require(conn, self.url, RECORDS_VERSION)
            cur = conn.cursor()
            if self._postgres:
                conn.rollback()
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            else:
                cur.execute("BEGIN")
            yield conn
        finally:
            with contextlib.suppress(Exception):
                conn.rollback()
            conn.close()

    def _query(self, conn: Any, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        cur = conn.cursor()
        cur.execute(sql.replace("?", self._mark), params)
        return list(cur.fetchall())

    @contextlib.contextmanager
    def _stream(self, conn: Any, sql: str) -> Iterator[Iterable[Any]]:
        """The rows of ``sql``, read a few thousand at a time."""
        if self._postgres:
            cur = conn.cursor(name="corral_decision_stream")
            cur.itersize = 10_000
        else:
            cur = conn.cursor()
        try:
            cur.execute(sql)
            yield cur
        finally:
            cur.close()

    def _heads(self, conn: Any, where: str = "", params: tuple[Any, ...] = ()
               ) -> list[TreeHead]:
        return [TreeHead(int(s), bytes(r), int(t), k, bytes(g)) for s, r, t, k, g in self._query(
            conn, "SELECT size, root, at_ms, key_id, signature FROM corral_decision_heads "
            f"{where} ORDER BY size", params)]

    def heads(self) -> list[TreeHead]:
        """Every signed tree head, smallest first."""
        with self._reading() as conn:
            return self._heads(conn)

    def head(self) -> TreeHead | None:
        """The latest signed tree head (None: the log is empty)."""
        with self._reading() as conn:
            heads = self._heads(conn, "WHERE size = (SELECT max(size) FROM "
                                      "corral_decision_heads)")
        return heads[0] if heads else None

    def _subtrees(self, conn: Any) -> Subtrees:
        def subtrees(level: int, index: int) -> bytes:
            stored = level // NODE_STRIDE * NODE_STRIDE
            count = 1 << (level - stored)
            start = index * count
            if stored == 0:
                rows = self._query(conn, "SELECT hash FROM corral_decision_records WHERE "
                                         "idx >= ? AND idx < ? ORDER BY idx",
                                   (start, start + count))
            else:
                rows = self._query(conn, "SELECT hash FROM corral_decision_nodes WHERE "
                                         "level = ? AND idx >= ? AND idx < ? ORDER BY idx",
                                   (stored, start, start + count))
            if len(rows) != count:
                raise StoreError(f"the decision log lacks rows under tree level {level}, node "
                                 f"{index}; run `corral audit verify`", url=_redact(self.url))
            return perfect_root([bytes(r[0]) for r in rows])

        return subtrees

    def _head_at(self, conn: Any, size: int | None) -> TreeHead:
        if size is None:
            heads = self._heads(conn, "WHERE size = (SELECT max(size) FROM "
                                      "corral_decision_heads)")
            if not heads:
                raise UsageError("the decision log is empty: no tree head is signed yet")
        else:
            heads = self._heads(conn, "WHERE size = ?", (size,))
            if not heads:
                raise UsageError(f"no signed tree head has size {size}; `corral audit verify "
                                 "--json` gives the latest")
        return heads[0]

    def _public_for(self, head: TreeHead) -> bytes:
        trusted = self._trusted()
        if head.key_id not in trusted:
            raise UsageError(f"tree head {head.size} is signed by key {head.key_id}, which is "
                             f"not among the log's keys ({', '.join(trusted)}); pass its "
                             "public key")
        return trusted[head.key_id]

    def prove(self, record_id: str, *, size: int | None = None) -> dict[str, Any]:
        """The inclusion proof of record ``record_id`` in the tree of the latest signed head
        (or the head of ``size``): JSON that `verify_proof` checks offline."""
        with self._reading() as conn:
            rows = self._query(conn, "SELECT idx, data FROM corral_decision_records WHERE "
                                     "id = ?", (record_id,))
            if not rows:
                raise UsageError(f"no decision record {record_id!r}; `corral audit export` "
                                 "lists them")
            index, data = int(rows[0][0]), bytes(rows[0][1])
            head = self._head_at(conn, size)
            if index >= head.size:
                raise UsageError(f"record {record_id} is #{index}, not in the tree of "
                                 f"{head.size}; prove it against a later head")
            path = inclusion_proof(index, head.size, self._subtrees(conn))
        proof = {
            "format": INCLUSION_FORMAT, "record_id": record_id, "index": index,
            "leaf": data.decode(), "leaf_hash": leaf_hash(data).hex(),
            "audit_path": [p.hex() for p in path], "tree_head": head.to_json(),
            "public_key": _b64(self._public_for(head)),
        }
        check = verify_proof(proof)
        if not check.ok:
            raise StoreError(f"the stored log does not reproduce its signed tree head "
                             f"{head.size} ({check.message}); run `corral audit verify`",
                             url=_redact(self.url))
        return proof

    def consistency(self, old_size: int, new_size: int | None = None) -> dict[str, Any]:
        """The proof that the signed head of ``new_size`` (default: the latest) extends the
        one of ``old_size``: JSON that `verify_proof` checks offline."""
        with self._reading() as conn:
            old, new = self._head_at(conn, old_size), self._head_at(conn, new_size)
            if old.size > new.size:
                raise UsageError(f"tree head {old.size} is after {new.size}; give the older "
                                 "first")
            path = consistency_proof(old.size, new.size, self._subtrees(conn))
        keys = {h.key_id: _b64(self._public_for(h)) for h in (old, new)}
        proof = {"format": CONSISTENCY_FORMAT, "old": old.to_json(), "new": new.to_json(),
                 "path": [p.hex() for p in path], "public_keys": keys}
        check = verify_proof(proof)
        if not check.ok:
            raise StoreError(f"the stored log does not reproduce its signed tree heads "
                             f"({check.message}); run `corral audit verify`",
                             url=_redact(self.url))
        return proof

    def export(self, out: IO[bytes]) -> int:
        """Write the log as JSON lines: a header, then each record's leaf exactly as hashed
        (``{"index":N,"record":{...}}``), each signed head after the record that completes
        it (``{"tree_head":{...}}``). Return the number of records."""
        with self._reading() as conn:
            heads = self._heads(conn)
            used = {h.key_id for h in heads}
            try:
                keys = {k: _b64(v) for k, v in self._trusted().items() if k in used}
            except UsageError:  # (no key here: the auditor has it)
                keys = {}
            out.write(_canonical({
                "corral_decision_log": "v1", "public_keys": keys,
                "hashing": "RFC 6962: leaf = SHA-256(0x00 || the record's line), "
                           "node = SHA-256(0x01 || left || right)",
            }) + b"\n")
            at, count = 0, 0
            with self._stream(conn, "SELECT data FROM corral_decision_records ORDER BY idx"
                              ) as rows:
                for (data,) in rows:
                    out.write(bytes(data) + b"\n")
                    count += 1
                    while at < len(heads) and heads[at].size == count:
                        out.write(_canonical({"tree_head": heads[at].to_json()}) + b"\n")
                        at += 1
        return count

    # -- verifying

    def verify(self) -> Verification:
        """Recompute the log from its records: every leaf hash, stored node, signed head
        (root and signature) and the sequencer's state. Stops at the first problem."""
        trusted = self._trusted()
        started = time.perf_counter()
        seen = _Progress()
        with self._reading() as conn:
            heads = self._heads(conn)
            nodes = {(int(lv), int(i)): bytes(h) for lv, i, h in self._query(
                conn, "SELECT level, idx, hash FROM corral_decision_nodes")}
            state = self._query(conn, "SELECT size, frontier FROM corral_decision_state")
            try:
                with self._stream(conn, "SELECT idx, id, data, hash FROM "
                                        "corral_decision_records ORDER BY idx") as rows:
                    tree = self._check(conn, rows, heads, nodes, trusted, seen)
                size, frontier = int(state[0][0]), bytes(state[0][1])
                if size != tree.size or frontier != tree.to_bytes():
                    raise _Bad(f"the sequencer's state says the tree has {size} records, and "
                               f"{tree.size} are stored with another compact range: the next "
                               "append would not extend the signed tree")
            except _Bad as bad:
                return Verification(False, seen.records, seen.heads, seen.root,
                                    time.perf_counter() - started, bad.problem, bad.index,
                                    bad.record_id)
        return Verification(True, seen.records, seen.heads, seen.root,
                            time.perf_counter() - started)

    def _check(self, conn: Any, rows: Iterable[Any], heads: list[TreeHead],
               nodes: dict[tuple[int, int], bytes], trusted: dict[str, bytes], seen: _Progress
               ) -> CompactRange:
        sha256 = hashlib.sha256
        tree = CompactRange()
        frontier = tree.hashes
        at = 0  # the next head to check
        next_head = heads[0].size if heads else -1
        good = CompactRange()  # the tree at the last head that checked out
        expected = 0
        for idx, record_id, data, stored in rows:
            if type(data) is not bytes:  # (a value rewritten as text, say)
                data = data.encode() if isinstance(data, str) else bytes(data)
            if idx != expected:
                raise _Bad(f"record #{expected} is missing: the log goes from #{expected - 1} "
                           f"to #{idx}; it was deleted", expected)
            h = sha256(b"\x00" + data).digest()
            if h != stored:
                raise _Bad(f"record #{idx} ({record_id}) does not match its leaf hash: it "
                           "was changed after it was written", idx, record_id)
            if not data.startswith(b'{"index":%d,' % idx):
                claimed = _claimed_index(data)
                if claimed is not None and claimed < idx:
                    inserted = self._inserted(conn, claimed, idx, good, h,
                                              heads[at] if at < len(heads) else None)
                    raise _Bad(f"records #{claimed} and #{idx} both say they are #{claimed}: "
                               f"record #{inserted[0]} ({inserted[1]}) was inserted", *inserted)
                raise _Bad(f"record #{idx} ({record_id}) was written as #{claimed}: records "
                           "were reordered, or deleted and renumbered", idx, record_id)
            if idx & 1:  # (CompactRange.append, inlined: this loop is the hot path)
                level = 0
                while idx >> level & 1:
                    h = sha256(b"\x01" + frontier.pop() + h).digest()
                    level += 1
                    if level % NODE_STRIDE == 0 and nodes.pop((level, idx >> level), None) != h:
                        first = idx >> level << level
                        raise _Bad(f"the stored tree node over records #{first}..#{idx} does "
                                   "not match them: it was changed or deleted", first)
            frontier.append(h)
            expected = idx + 1
            if expected == next_head:
                tree.size = expected
                head = heads[at]
                first = good.size
                if head.key_id not in trusted:
                    raise _Bad(f"signed tree head {head.size} is signed by key {head.key_id}, "
                               f"not by a trusted key ({', '.join(trusted)})", first)
                if not head.verify(trusted[head.key_id]):
                    raise _Bad(f"signed tree head {head.size} has a bad signature: it was "
                               "changed", first)
                if tree.root() != head.root:
                    raise _Bad(f"records #{first}..#{head.size - 1} do not reproduce signed "
                               f"tree head {head.size}: one of them was changed (with its "
                               "hash), moved or inserted", first)
                at += 1
                next_head = heads[at].size if at < len(heads) else -1
                good = tree.copy()
                seen.records, seen.heads, seen.root = expected, at, head.root.hex()
        if at < len(heads):
            raise _Bad(f"records #{expected}..#{heads[-1].size - 1} are missing: signed tree "
                       f"head {heads[-1].size} covers them; they were deleted", expected)
        if expected > good.size:
            raise _Bad(f"record #{good.size} and after are not covered by a signed tree head "
                       "(every write signs one): they were inserted", good.size)
        if nodes:
            level, index = min(nodes)
            raise _Bad(f"a tree node is stored at level {level}, #{index}, beyond the "
                       f"{expected} records: it was inserted")
        seen.records = tree.size = expected
        return tree

    def _inserted(self, conn: Any, claimed: int, idx: int, good: CompactRange, h: bytes,
                  head: TreeHead | None) -> tuple[int, str | None]:
        """Two records claim #claimed, at #claimed and at #idx: the signed head decides
        which one the log wrote."""
        ids = dict(self._query(conn, "SELECT idx, id FROM corral_decision_records WHERE idx "
                                     "IN (?, ?)", (claimed, idx)))
        if head is not None and claimed >= good.size:
            tree = good.copy()
            for (leaf,) in self._query(conn, "SELECT hash FROM corral_decision_records WHERE "
                                             "idx >= ? AND idx < ? ORDER BY idx",
                                       (good.size, claimed)):  # (checked already)
                tree.append(bytes(leaf))
            tree.append(h)  # this record in its claimed place, the later ones after it
            for (leaf,) in self._query(conn, "SELECT hash FROM corral_decision_records WHERE "
                                             "idx > ? AND idx <= ? ORDER BY idx",
                                       (idx, head.size)):
                if tree.size == head.size:
                    break
                tree.append(bytes(leaf))
            if tree.size == head.size and tree.root() == head.root:
                return claimed, ids.get(claimed)
        return idx, ids.get(idx)


@dataclass(slots=True)
class _Progress:
    records: int = 0
    heads: int = 0
    root: str | None = None


def _claimed_index(data: bytes) -> int | None:
    try:
        value = json.loads(data)["index"]
        return value if isinstance(value, int) else None
    except (ValueError, KeyError, TypeError):
        return None


# -- offline checks ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProofCheck:
    """What `verify_proof` found: ``ok`` and a sentence saying what was (not) proven."""

    ok: bool
    message: str
    key_id: str | None = None


def _hexes(values: Any, what: str) -> list[bytes]:
    if not isinstance(values, list):
        raise UsageError(f"the proof's {what} is not a list")
    try:
        return [bytes.fromhex(v) for v in values]
    except (TypeError, ValueError):
        raise UsageError(f"the proof's {what} holds a value that is not hex") from None


def verify_proof(proof: Mapping[str, Any], public_keys: Sequence[bytes] = ()) -> ProofCheck:
    """Check an inclusion or consistency proof with nothing but its JSON (and, to be sure it
    is the log's, the log's ``public_keys``). Raises `UsageError` when it is not a proof."""
    if not isinstance(proof, Mapping):
        raise UsageError("not a corral proof: expected a JSON object")
    kind = proof.get("format")
    try:
        if kind == INCLUSION_FORMAT:
            return _verify_inclusion(proof, public_keys)
        if kind == CONSISTENCY_FORMAT:
            return _verify_consistency(proof, public_keys)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"not a complete {kind}: {exc!r} is missing or malformed") from None
    raise UsageError(f"not a corral proof: its format is {kind!r}, not {INCLUSION_FORMAT} or "
                     f"{CONSISTENCY_FORMAT}")


def _check_key(head: TreeHead, public_key: bytes, public_keys: Sequence[bytes]
               ) -> str | None:
    if public_keys and public_key not in public_keys:
        return (f"it is signed by key {key_id(public_key)}, which is not among the trusted "
                f"keys ({', '.join(key_id(k) for k in public_keys)})")
    if not head.verify(public_key):
        return f"the signature of tree head {head.size} does not verify with key {head.key_id}"
    return None


def _trust_note(public_keys: Sequence[bytes]) -> str:
    return "" if public_keys else " (by the key the proof carries: pass the log's public key " \
        "to be sure it is the log's)"


def _verify_inclusion(proof: Mapping[str, Any], public_keys: Sequence[bytes]) -> ProofCheck:
    head = TreeHead.from_json(proof["tree_head"])
    public_key = _unb64(proof["public_key"], "the proof's public key")
    leaf = str(proof["leaf"]).encode()
    index, path = int(proof["index"]), _hexes(proof["audit_path"], "audit_path")
    record = json.loads(leaf)
    name = f"record {proof.get('record_id')} (#{index})"
    if record.get("index") != index or (record.get("record") or {}).get("id") != proof.get(
            "record_id"):
        return ProofCheck(False, f"{name}: the leaf is another record's (#"
                                 f"{record.get('index')})", head.key_id)
    if leaf_hash(leaf).hex() != proof.get("leaf_hash", leaf_hash(leaf).hex()):
        return ProofCheck(False, f"{name}: the leaf does not match its leaf hash", head.key_id)
    problem = _check_key(head, public_key, public_keys)
    if problem:
        return ProofCheck(False, f"{name}: {problem}", head.key_id)
    if not verify_inclusion(leaf_hash(leaf), index, head.size, path, head.root):
        return ProofCheck(False, f"{name}: the audit path does not lead to the root of signed "
                                 f"tree head {head.size}", head.key_id)
    return ProofCheck(True, f"{name} is in the log's tree of {head.size} records, whose head "
                            f"is signed by key {head.key_id}{_trust_note(public_keys)}",
                      head.key_id)


def _verify_consistency(proof: Mapping[str, Any], public_keys: Sequence[bytes]) -> ProofCheck:
    old, new = TreeHead.from_json(proof["old"]), TreeHead.from_json(proof["new"])
    keys = {k: _unb64(v, "a public key") for k, v in dict(proof["public_keys"]).items()}
    for head in (old, new):
        if head.key_id not in keys:
            return ProofCheck(False, f"the proof lacks the public key of tree head {head.size}")
        problem = _check_key(head, keys[head.key_id], public_keys)
        if problem:
            return ProofCheck(False, problem, head.key_id)
    if not verify_consistency(old.size, new.size, old.root, new.root,
                              _hexes(proof["path"], "path")):
        return ProofCheck(False, f"the tree of {new.size} records does not extend the tree of "
                                 f"{old.size}: the log was rewritten", new.key_id)
    return ProofCheck(True, f"the log's tree of {new.size} records extends its tree of "
                            f"{old.size}: nothing before was changed{_trust_note(public_keys)}",
                      new.key_id)
