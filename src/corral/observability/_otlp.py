"""Spans to an OpenTelemetry collector over OTLP/HTTP, with no OpenTelemetry SDK.

The SDK brings its own span model, context propagation and a protobuf runtime; corral already has
its spans (`_spans.Span`) and needs only the wire format, so the protobuf is written here by hand:
an `ExportTraceServiceRequest` is a few nested length-prefixed messages, and encoding every span
of every run this way costs a fraction of building the official message objects
(bench/otlp_encode.py). `OTLPExporter` queues spans and sends them from one background thread, so
a run never waits for the collector; when the collector is slow or down, spans are dropped and
counted rather than held without bound.

    exporter = OTLPExporter("http://127.0.0.1:4318", resource={"service.name": "support"})
    exporter.export(spans)
    exporter.close()
"""

from __future__ import annotations

import gzip
import logging
import numbers
import random
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from .._errors import UsageError
from ._spans import AttributeValue, Span

log = logging.getLogger("corral.observability")

__all__ = ["OTLPExporter", "encode_traces"]

# --- the protobuf wire format -----------------------------------------------------------------
# A field is a tag byte (field number << 3 | wire type) then its value; the tags below are
# spelled as bytes: 0x0a is field 1 length-delimited, 0x10 field 2 varint, 0x21 field 4 fixed64.

_SMALL = [bytes((n,)) for n in range(128)]
_INT64 = 1 << 63
_MASK64 = (1 << 64) - 1
_TIMES = struct.Struct("<BQBQ").pack  # Span fields 7 and 8, tags included: one call for both
_DOUBLE = struct.Struct("<Bd").pack  # AnyValue.double_value, tag included
_KINDS = {"internal": b"\x30\x01", "server": b"\x30\x02", "client": b"\x30\x03",
          "producer": b"\x30\x04", "consumer": b"\x30\x05"}  # Span.kind
_CODES = {"ok": b"\x18\x01", "error": b"\x18\x02"}  # Status.code (UNSET is the default: omitted)
_TRUE, _FALSE = b"\x10\x01", b"\x10\x00"  # AnyValue.bool_value
_KEYS: dict[str, bytes] = {}  # attribute key -> KeyValue.key field, tag and length included
_KEYS_MAX = 4096  # (keys are few and repeat; a program that makes them up is not cached)
_FIELDS: dict[tuple[str, str | bool], bytes] = {}  # (key, value) -> Span.attributes field
_FIELDS_MAX = 4096  # (emptied when full: run ids come and go)
_INTS: dict[tuple[str, int], bytes] = {}  # (key, int value) -> Span.attributes field
_NAMES: dict[str, bytes] = {}  # span name -> Span.name field, tag and length included
_STATUSES = {status: b"\x7a\x02" + code for status, code in _CODES.items()}  # (no message)


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _text(value: str) -> bytes:
    """UTF-8; a lone surrogate (a file name decoded with surrogateescape) becomes "?"."""
    try:
        return value.encode()
    except UnicodeEncodeError:
        return value.encode(errors="replace")


def _string(value: str) -> bytes:
    data = _text(value)
    return b"\x0a" + _varint(len(data)) + data


def _any(value: Any) -> bytes:
    """An AnyValue's body. What OTLP cannot carry (None, dicts, mixed lists) goes as its str()."""
    kind = type(value)
    if kind is str:
        data = _text(value)
        return b"\x0a" + _varint(len(data)) + data
    if kind is bool:
        return _TRUE if value else _FALSE
    if kind is int:
        if -_INT64 <= value < _INT64:
            return b"\x18" + _varint(value & _MASK64)
    elif kind is float:
        return _DOUBLE(0x21, value)
    elif kind is list or kind is tuple:
        return _array(value)
    elif isinstance(value, str):  # (a StrEnum: its plain value)
        return _any(str(value))
    elif isinstance(value, numbers.Integral):  # (an IntEnum, numpy's integers)
        return _any(int(value))
    elif isinstance(value, numbers.Real):  # (numpy's floats)
        return _any(float(value))
    try:
        return _string(str(value))
    except Exception:
        return _string(f"<unprintable {type(value).__name__}>")


def _array(values: Sequence[Any]) -> bytes:
    kinds = {type(v) for v in values}
    if len(kinds) > 1 or not kinds <= {str, bool, int, float}:
        return _string(str(values))  # (OTLP arrays hold one type, and no lists)
    items = [_any(v) for v in values]
    body = b"".join([b"\x0a" + _varint(len(item)) + item for item in items])
    return b"\x2a" + _varint(len(body)) + body


def _pair(key: str, value: Any) -> bytes:
    """A KeyValue, length first (the caller writes the tag)."""
    if type(key) is not str:
        key = str(key)
    name = _KEYS.get(key)
    if name is None:
        name = _string(key)
        if len(_KEYS) < _KEYS_MAX:
            _KEYS[key] = name
    body = _any(value)
    pair = b"".join((name, b"\x12", _varint(len(body)), body))
    return _varint(len(pair)) + pair


def _attributes(attributes: Mapping[str, Any], out: list[bytes]) -> None:
    """Span.attributes fields, appended to ``out``. A string, bool or int attribute is looked
    up whole: a run's spans repeat the same run id, workflow, step, tenant, attempt and model
    over and over. (Ints have a cache of their own: ``1 == True``.)"""
    fields, ints = _FIELDS, _INTS
    for item in attributes.items():  # (the item is the cache key: no tuple to build)
        key, value = item
        kind = type(value)
        cache: dict[Any, bytes] | None = None
        if type(key) is str:
            if kind is str or kind is bool:
                cache = fields
            elif kind is int:
                cache = ints
        if cache is None:
            out.append(b"\x4a" + _pair(key, value))
            continue
        field = cache.get(item)
        if field is None:
            if len(cache) >= _FIELDS_MAX:
                cache.clear()
            field = cache[item] = b"\x4a" + _pair(key, value)
        out.append(field)


def _name(name: str) -> bytes:
    """The Span.name field, tag and length included."""
    field = _NAMES.get(name)
    if field is None:
        data = _text(name)
        field = b"\x2a" + _varint(len(data)) + data
        if len(_NAMES) >= _FIELDS_MAX:
            _NAMES.clear()
        _NAMES[name] = field
    return field


def _span(span: Span) -> bytes:
    """One span as a ScopeSpans.spans field. Malformed ids or times raise ValueError."""
    trace_id, span_id, parent_id = span.trace_id, span.span_id, span.parent_id
    try:
        if len(trace_id) != 32 or len(span_id) != 16 or (parent_id is not None
                                                           and len(parent_id) != 16):
            raise ValueError
        ids = bytes.fromhex(f"0a10{trace_id}1208{span_id}" if parent_id is None else
                            f"0a10{trace_id}1208{span_id}2208{parent_id}")  # (tags in hex)
    except (ValueError, TypeError):
        raise ValueError(f"span {span.name!r} has ids {trace_id!r}/{span_id!r}/{parent_id!r} "
                         "(trace/span/parent): OTLP needs 32, 16 and 16 hex digits") from None
    try:
        times = _TIMES(0x39, int(span.start * 1e9), 0x41, int(span.end * 1e9))
    except (struct.error, OverflowError) as e:  # (negative; NaN is a ValueError already)
        raise ValueError(f"span {span.name!r} has times {span.start!r}..{span.end!r}") from e
    name = _NAMES.get(span.name) or _name(span.name)
    parts = [ids, name, _KINDS.get(span.kind, b""), times]
    if span.attributes:
        _attributes(span.attributes, parts)
    if span.message:
        message = _text(span.message)
        status = b"\x12" + _varint(len(message)) + message + _CODES.get(span.status, b"")
        parts += (b"\x7a", _varint(len(status)), status)
    else:
        parts.append(_STATUSES.get(span.status, b""))
    body = b"".join(parts)
    return b"\x12" + _varint(len(body)) + body


def _resource(attributes: Mapping[str, Any]) -> bytes:
    """A ResourceSpans.resource field."""
    body = b"".join([b"\x0a" + _pair(key, value) for key, value in attributes.items()])
    return b"\x0a" + _varint(len(body)) + body


@cache
def _version() -> str:
    try:
        return metadata.version("corral")
    except metadata.PackageNotFoundError:
        return "0"


@cache
def _scope() -> bytes:
    """The ScopeSpans.scope field: corral and its version."""
    version = _text(_version())
    body = _string("corral") + b"\x12" + _varint(len(version)) + version
    return b"\x0a" + _varint(len(body)) + body


def _request(resource: bytes, spans: list[bytes]) -> bytes:
    """ExportTraceServiceRequest { ResourceSpans { resource, ScopeSpans { scope, spans } } }"""
    scope = _scope()
    scope_size = len(scope) + sum(map(len, spans))
    scope_head = b"\x12" + _varint(scope_size)
    head = b"\x0a" + _varint(len(resource) + len(scope_head) + scope_size)
    return b"".join((head, resource, scope_head, scope, *spans))


def encode_traces(spans: Sequence[Span], resource: Mapping[str, AttributeValue]) -> bytes:
    """An OTLP `ExportTraceServiceRequest`: one resource, one scope ("corral"), these spans.

    An attribute value OTLP cannot carry is sent as its str(); a span with malformed ids or
    times raises ValueError.
    """
    return _request(_resource(resource), [_span(span) for span in spans])


# --- the exporter -------------------------------------------------------------------------------

_RETRY_STATUSES = frozenset({429, 502, 503, 504})  # what OTLP/HTTP says a client may retry
_MAX_DELAY = 30.0  # the longest wait between attempts, whatever Retry-After asks


def _endpoint(url: str) -> str:
    """The URL spans are POSTed to: `/v1/traces` added when it has no path, as the OpenTelemetry
    SDKs do with OTEL_EXPORTER_OTLP_ENDPOINT."""
    parts = urlsplit(url.strip())
    if "://" not in url:
        problem = "has no scheme"
    elif parts.scheme not in ("http", "https"):
        problem = f"uses {parts.scheme}://, which OTLP/HTTP does not"
    elif not parts.hostname:
        problem = "has no host"
    else:
        try:
            parts.port  # noqa: B018  (raises when the port is not a number from 0 to 65535)
        except ValueError:
            problem = "has a port that is not a number from 0 to 65535"
        else:
            path = parts.path if parts.path not in ("", "/") else "/v1/traces"
            return urlunsplit(parts._replace(path=path))
    raise UsageError(f"OTLP endpoint {url!r} {problem}: pass an http:// or https:// URL with a "
                     "host, such as http://127.0.0.1:4318/v1/traces", endpoint=url)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:  # (absent, or an HTTP date: the usual backoff then)
        return None
    return seconds if seconds >= 0 else None


def _rejected(body: bytes) -> tuple[int, str]:
    """ExportTraceServiceResponse.partial_success as (rejected_spans, error_message), read with
    just enough protobuf to find them; (0, "") for an empty body or anything unexpected."""
    rejected, message = 0, ""
    try:
        for number, value in _fields(body):
            if number == 1 and isinstance(value, bytes):
                for inner, item in _fields(value):
                    if inner == 1 and isinstance(item, int):
                        rejected = item
                    elif inner == 2 and isinstance(item, bytes):
                        message = item.decode(errors="replace")
    except (IndexError, ValueError):
        return 0, ""
    return rejected, message


def _fields(data: bytes) -> Iterable[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message's varint and length-delimited fields."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        if key & 7 == 0:
            value, i = _read_varint(data, i)
            yield key >> 3, value
        elif key & 7 == 2:
            size, i = _read_varint(data, i)
            if i + size > len(data):
                raise ValueError("truncated")
            yield key >> 3, data[i:i + size]
            i += size
        elif key & 7 in (1, 5):
            i += 8 if key & 7 == 1 else 4
        else:
            raise ValueError(f"wire type {key & 7}")


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


class OTLPExporter:
    """Sends spans to an OTLP/HTTP collector from a background thread.

    `export` only queues (it never waits for the network); a thread sends batches of up to
    ``max_batch`` spans every ``interval`` seconds, or at once when a full batch is waiting.
    Connection errors and 429/502/503/504 are retried ``attempts`` times with exponential
    backoff from ``backoff`` seconds (or what Retry-After says); other answers drop the batch.
    Nothing is ever held without bound: past ``max_queue`` spans, new ones are dropped.
    ``sent``, ``dropped`` (never queued) and ``failed`` (given up on) count spans.
    """

    def __init__(self, endpoint: str, *, headers: Mapping[str, str] | None = None,
                 resource: Mapping[str, AttributeValue] | None = None, timeout: float = 10.0,
                 max_batch: int = 512, interval: float = 1.0, max_queue: int = 20_000,
                 compression: str = "gzip", attempts: int = 5, backoff: float = 0.5) -> None:
        self.endpoint = _endpoint(endpoint)
        if compression not in ("gzip", "none"):
            raise UsageError(f"OTLP compression {compression!r} is not supported; "
                             "pass 'gzip' or 'none'", compression=compression)
        for name, number in (("max_batch", max_batch), ("max_queue", max_queue),
                             ("attempts", attempts), ("interval", interval),
                             ("timeout", timeout)):
            if number <= 0:
                raise UsageError(f"OTLPExporter {name}={number!r}: it must be above 0")
        if backoff < 0:
            raise UsageError(f"OTLPExporter backoff={backoff!r}: it must be 0 or more")
        for name, value in (headers or {}).items():
            if not (name + value).isascii() or "\n" in name + value or "\r" in name + value:
                raise UsageError(f"OTLP header {name!r} is not ASCII on one line; pass headers "
                                 "as HTTP sends them (a token: base64 or %-encoded)", header=name)
        self.headers = {**(headers or {}), "Content-Type": "application/x-protobuf",
                        "User-Agent": f"corral/{_version()}"}
        if compression == "gzip":
            self.headers["Content-Encoding"] = "gzip"
        self.compression = compression
        self.resource: dict[str, AttributeValue] = {"service.name": "corral", **(resource or {})}
        self._resource = _resource(self.resource)
        self.timeout, self.max_batch, self.interval = timeout, max_batch, interval
        self.max_queue, self.attempts, self.backoff = max_queue, attempts, backoff
        self.sent = self.dropped = self.failed = 0
        self._queue: deque[Span] = deque()
        self._wake = threading.Condition()
        self._queued = 0  # spans ever queued
        self._done = 0  # of them, spans sent or given up on
        self._flushing = 0  # flush() calls waiting: send what is queued without waiting
        self._dropping = False  # in a burst of drops (one warning for it)
        self._closing = self._closed = False
        self._stop = threading.Event()  # set by close(): stop waiting to retry
        self._thread: threading.Thread | None = None  # started by the first export
        self._client: httpx.Client | None = None  # deliver()'s

    def export(self, spans: Iterable[Span]) -> None:
        """Queue spans to send. Never blocks on the network; past ``max_queue``, drops."""
        spans = list(spans)
        if not spans:
            return
        with self._wake:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="corral-otlp",
                                                daemon=True)
                self._thread.start()
            room = 0 if self._closed else self.max_queue - len(self._queue)
            taken = spans[:room] if room < len(spans) else spans
            self._queue.extend(taken)
            self._queued += len(taken)
            lost = len(spans) - len(taken)
            self.dropped += lost
            warn = lost > 0 and not self._dropping
            self._dropping = lost > 0
            if len(self._queue) >= self.max_batch:
                self._wake.notify_all()
        if warn:
            why = ("the exporter is closed" if self._closed else
                   f"{self.max_queue} spans are already waiting (max_queue); is the collector "
                   "slow or down?")
            log.warning("OTLP exporter dropped spans for %s: %s; more are dropped without a "
                        "warning until spans are queued again", self.endpoint, why)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every span queued so far is sent or given up on; False on timeout."""
        with self._wake:
            if self._thread is None:
                return True  # (nothing was ever queued)
            target = self._queued
            self._flushing += 1
            self._wake.notify_all()
            try:
                return self._wake.wait_for(lambda: self._done >= target, timeout)
            finally:
                self._flushing -= 1

    def close(self, timeout: float = 10.0) -> None:
        """Flush (for up to ``timeout`` seconds), then stop the thread. Spans still queued
        then are dropped and counted; exporting after close drops too."""
        with self._wake:
            if self._closing:
                return
            self._closing = True
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> OTLPExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next(self) -> list[Span] | None:
        """The next batch: waits up to ``interval`` for a full one. None: closed."""
        with self._wake:
            deadline = time.monotonic() + self.interval
            while (len(self._queue) < self.max_batch and not self._closed
                   and not (self._flushing and self._queue)):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            if self._closed:
                left_over = len(self._queue)
                self._queue.clear()
                self.dropped += left_over
                self._done += left_over
                self._wake.notify_all()
                if left_over:
                    log.warning("OTLP exporter closed with %d spans not sent to %s (close's "
                                "timeout ran out)", left_over, self.endpoint)
                return None
            count = min(self.max_batch, len(self._queue))
            return [self._queue.popleft() for _ in range(count)]

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout, headers=self.headers) as client:
            while (batch := self._next()) is not None:
                if not batch:
                    continue
                try:
                    sent = self._send(client, batch)[0]
                except Exception:  # (a bug here must not kill the thread: spans would pile up)
                    log.exception("OTLP exporter failed to send %d spans to %s", len(batch),
                                  self.endpoint)
                    sent = 0
                with self._wake:
                    self.sent += sent
                    self.failed += len(batch) - sent
                    self._done += len(batch)
                    self._wake.notify_all()

    def _encode(self, batch: list[Span]) -> tuple[bytes, int]:
        """The request body, and how many spans it holds: a malformed span is left out."""
        encoded = []
        for span in batch:
            try:
                encoded.append(_span(span))
            except Exception as e:
                log.warning("OTLP exporter left out a span it cannot encode: %s", e)
        body = _request(self._resource, encoded)
        if self.compression == "gzip":
            body = gzip.compress(body, compresslevel=1)  # (4x cheaper than 6, 6% larger)
        return body, len(encoded)

    def deliver(self, spans: list[Span]) -> bool:
        """Send ``spans`` now, in one request, retrying what may be retried (for the shipper,
        which keeps its spans in the store until they are delivered). False: the collector
        could not be reached or asked to retry, every attempt; the spans are not taken. True:
        they were taken (or refused for good, and logged; sending again would not help)."""
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout, headers=self.headers)
        sent, retry = self._send(self._client, spans, quiet=True)
        with self._wake:
            self.sent += sent
            if not retry:
                self.failed += len(spans) - sent
        return not retry

    def _send(self, client: httpx.Client, batch: list[Span],
              quiet: bool = False) -> tuple[int, bool]:
        """POST one batch, retrying what may be retried: how many spans the collector took,
        and whether the rest may still be sent (the attempts ran out on a retryable failure)."""
        body, count = self._encode(batch)
        if not count:
            return 0, False
        problem = ""
        for attempt in range(self.attempts):
            delay: float | None = None
            try:
                response = client.post(self.endpoint, content=body)
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if response.is_success:
                    rejected, message = _rejected(response.content)
                    if rejected > 0:
                        log.warning("OTLP collector at %s rejected %d of %d spans: %s",
                                    self.endpoint, rejected, count, message or "(no reason)")
                    return count - min(rejected, count), False
                problem = f"HTTP {response.status_code}"
                if response.status_code not in _RETRY_STATUSES:
                    log.warning("OTLP collector at %s answered %s, dropped %d spans: %s",
                                self.endpoint, problem, count, response.text[:200])
                    return 0, False
                delay = _retry_after(response)
            if attempt + 1 == self.attempts:
                break
            if delay is None:
                delay = self.backoff * 2 ** attempt * random.uniform(1.0, 1.25)
            if self._stop.wait(min(delay, _MAX_DELAY)):  # (closing: give up now)
                break
        if quiet:
            log.warning("OTLP collector at %s not reached after %d attempt%s (last: %s); "
                        "%d spans wait to be sent again", self.endpoint, attempt + 1,
                        "" if attempt == 0 else "s", problem, count)
        else:
            log.warning("OTLP exporter gave up on %d spans after %d attempt%s to %s; last: %s; "
                        "they are dropped (is the collector up, and does it take OTLP/HTTP "
                        "there?)", count, attempt + 1, "" if attempt == 0 else "s",
                        self.endpoint, problem)
        return 0, True
