"""Tracing: OpenTelemetry GenAI spans for runs, agents, model calls and tools.

A run's trace is mostly made of things the runtime records anyway: the run itself (the
``invoke_workflow`` span) and its journal (one span per step, timer, signal wait, child run).
Only spans with more to say than the journal are written as spans: an agent's loop
(``invoke_agent``), a model call (``chat``) with its tokens and cost, a tool call
(``execute_tool``), a ``retrieval``. They go into the run's own store in the transaction that
journals the step, so a step that replays from the journal emits nothing, and the embedded
store needs nothing else. With an OTLP endpoint configured, each committed batch is also
exported, in the background:

```toml
[observability.tracing]
otlp_endpoint = "http://collector:4318"     # or $OTEL_EXPORTER_OTLP_ENDPOINT
headers_env = "CORRAL_OTLP_HEADERS"          # "key=value,key=value", from the environment
service_name = "corral"                      # or $OTEL_SERVICE_NAME
content = false                              # prompts and answers on chat spans (redacted)
sample = 1.0                                 # the share of traces exported (by trace id)
export = "process"                           # or "thread": see below
```

An embedded worker exports from a process of its own, the span shipper (`_shipper`), which
tails the store: the worker pays nothing more than keeping its spans, and spans wait in the
store, not in memory, while the collector is down. ``export = "thread"`` exports each committed
batch from a thread of the worker instead (spans queued in memory; dropped past the queue's
bound). Spans that are in no store (the HTTP gateway's, a Temporal worker's) always go from
the thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, Protocol

from .._errors import UsageError
from ._spans import AttributeValue, Span, run_span_id, step_span_id, trace_id_for

if TYPE_CHECKING:
    from ..config import Config
    from ..governance._pii import Redactor

log = logging.getLogger("corral.observability")

CONTENT_KEYS = frozenset({"gen_ai.input.messages", "gen_ai.output.messages",
                          "gen_ai.tool.call.arguments", "gen_ai.tool.call.result"})
"""The attributes that carry content, only with ``content = true`` (and redacted)."""


class SpanSink(Protocol):
    """Where a step's span goes: the run executing it (embedded) or the exporter (Temporal)."""

    @property
    def tenant(self) -> str | None: ...

    def describe(self, key: str, name: str | None, attributes: Mapping[str, Any]) -> None: ...


class OpenSpan:
    """A span open in workflow code (an agent's loop), closed when the code leaves it."""

    __slots__ = ("attributes", "live", "name", "parent", "span_id", "start")

    def __init__(self, name: str, span_id: str, parent: OpenSpan | None,
                 attributes: dict[str, AttributeValue]) -> None:
        self.name = name
        self.span_id = span_id
        self.parent = parent
        self.attributes = attributes
        self.start = time.time()
        self.live = False
        """Something in it executed in this process, rather than replayed from the journal:
        it ends here, so it is emitted here."""

    @classmethod
    def opening(cls, run_id: str, scope: Any, name: str,
                attributes: dict[str, AttributeValue]) -> OpenSpan:
        """A span opening in a run. Where it opens (the key its first operation will take)
        names it, so a replay of the run reopens the same span."""
        return cls(name, step_span_id(run_id, f"span:{scope.prefix}{scope.n}:{name}"),
                   current_span.get(), attributes)

    def closed(self, run_id: str, trace_id: str, end: float,
               failure: BaseException | None) -> Span:
        """The span as it closes at ``end``, ``failure`` having left it (or not)."""
        return Span(
            trace_id=trace_id, span_id=self.span_id,
            parent_id=self.parent.span_id if self.parent else run_span_id(run_id),
            name=self.name, start=self.start, end=end,
            status="error" if failure is not None else "ok",
            message="cancelled" if isinstance(failure, asyncio.CancelledError)
            else str(failure or ""),
            attributes={**self.attributes, "corral.run.id": run_id,
                        **({"error.type": type(failure).__name__} if failure else {})})

    def saw(self, started: float, live: bool) -> None:
        """A step under this span started at ``started`` (replayed steps carry the first
        execution's time, so the span starts when it first did)."""
        span: OpenSpan | None = self
        while span is not None:
            span.start = min(span.start, started)
            span.live = span.live or live
            span = span.parent


# In workflow code: the innermost open span (an agent's), under which steps are recorded.
current_span: contextvars.ContextVar[OpenSpan | None] = contextvars.ContextVar(
    "corral_span", default=None)


class Tracing:
    """This process's tracing settings and exporter."""

    def __init__(self, *, exporter: Any = None, content: bool = False,
                 redactor: Redactor | None = None, service_name: str = "corral",
                 sample: float = 1.0, export: str = "process") -> None:
        if export not in ("process", "thread"):
            raise UsageError(f"observability.tracing.export is 'process' (a span shipper "
                             f"tailing the store) or 'thread' (from the worker), not {export!r}")
        if not 0 <= sample <= 1:
            raise UsageError(f"observability.tracing.sample is the share of traces exported, "
                             f"from 0 to 1, not {sample!r}")
        self.exporter = exporter
        self.content = content
        self.service_name = service_name
        self.sample = sample
        self.export_from = export
        self._threshold = int(sample * 2**32)
        self._redactor = redactor

    def sampled(self, trace_id: str) -> bool:
        """Whether a trace is exported: decided by its id, so every span of a trace, made in
        any process, is kept or left out together (the local store keeps every trace)."""
        return self._threshold >= 2**32 or int(trace_id[:8], 16) < self._threshold

    @classmethod
    def from_config(cls, config: Config, env: Mapping[str, str] | None = None) -> Tracing:
        env = os.environ if env is None else env
        section = ((config.sections or {}).get("observability") or {}).get("tracing") or {}
        known = {"otlp_endpoint", "headers_env", "service_name", "content", "sample", "export"}
        unknown = set(section) - known
        if unknown:
            raise UsageError(f"{config.source}: observability.tracing has no "
                             f"{sorted(unknown)[0]!r}; it takes {', '.join(sorted(known))}")
        # a base URL gets /v1/traces (OpenTelemetry's rule for OTEL_EXPORTER_OTLP_ENDPOINT);
        # the traces endpoint is used as it is
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        base = section.get("otlp_endpoint") or (
            None if endpoint else env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        if base:
            endpoint = str(base).rstrip("/")
            if not endpoint.endswith("/v1/traces"):
                endpoint += "/v1/traces"
        service = section.get("service_name") or env.get("OTEL_SERVICE_NAME") or "corral"
        content = section.get("content", False)
        if not isinstance(content, bool):
            raise UsageError(f"{config.source}: observability.tracing.content must be true or "
                             f"false, not {content!r}")
        sample = section.get("sample")
        if sample is None and env.get("OTEL_TRACES_SAMPLER") in ("traceidratio",
                                                                 "parentbased_traceidratio"):
            sample = env.get("OTEL_TRACES_SAMPLER_ARG", "1")
        try:
            sample = 1.0 if sample is None else float(sample)
        except (TypeError, ValueError):
            raise UsageError(f"{config.source}: observability.tracing.sample must be a number "
                             f"from 0 to 1, not {sample!r}") from None
        exporter = None
        if endpoint:
            from ._otlp import OTLPExporter

            headers = _headers(env.get(section.get("headers_env") or "OTEL_EXPORTER_OTLP_HEADERS",
                                       ""), config.source)
            exporter = OTLPExporter(endpoint, headers=headers,
                                    resource={"service.name": service})
        return cls(exporter=exporter, content=content, service_name=service, sample=sample,
                   export=section.get("export", "process"))

    @property
    def redactor(self) -> Redactor:
        """Content on spans is always redacted: with governance's redactor when there is one,
        else with the default (structured PII masked)."""
        if self._redactor is None:
            from ..governance._chain import installed
            from ..governance._pii import Redactor

            governance = installed()
            self._redactor = (governance.redactor if governance is not None
                              and governance.redactor is not None else Redactor())
        return self._redactor

    def content_attribute(self, value: Any) -> str:
        return json.dumps(self.redactor.redact_json(value), default=str, ensure_ascii=False)

    def export(self, spans: list[Span]) -> None:
        if self.exporter is not None and spans:
            self.exporter.export(spans)

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()


def _headers(text: str, source: str) -> dict[str, str]:
    headers = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"{source}: OTLP headers must be name=value pairs separated by "
                             f"commas; {item!r} is not")
        headers[name.strip()] = value.strip()
    return headers


_installed: Tracing | None = None


def install(tracing: Tracing | None) -> None:
    """Make ``tracing`` this process's (None: back to the configuration's)."""
    global _installed
    if _installed is not None and _installed is not tracing:
        _installed.close()
    _installed = tracing


def installed() -> Tracing:
    """The process's tracing; the first use builds it from corral.toml."""
    global _installed
    if _installed is None:
        from ..config import load_config

        _installed = Tracing.from_config(load_config())
    return _installed


# -- recording --------------------------------------------------------------------------------

def describe_step(name: str | None = None, attributes: Mapping[str, Any] | None = None) -> bool:
    """In a step's body: name the step's span (``retrieval``, ``chat gpt-4o``...) and add
    attributes to it. Returns False outside a step (nothing to describe)."""
    from ..runtime._definitions import current_step

    step = current_step.get()
    if step is None or len(step) < 4:
        return False
    step[3].describe(step[2], name, attributes or {})
    return True


def step_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the step running now, if any."""
    from ..runtime._definitions import current_step

    step = current_step.get()
    if step is None:
        return None
    trace_id = getattr(step[3], "trace_id", None) or trace_id_for(step[0])
    return trace_id, step_span_id(step[0], step[2])


def current_run_id() -> str | None:
    """The run whose step is running now, if any."""
    from ..runtime._definitions import current_step

    step = current_step.get()
    return step[0] if step is not None else None


def standalone(name: str, start: float, attributes: dict[str, AttributeValue], *,
               status: str = "ok", message: str = "", kind: str = "client",
               parent: tuple[str, str] | None = None) -> None:
    """A span outside any run (a call to the HTTP gateway), exported if an exporter is set.
    ``parent`` is (trace id, span id) from the caller's ``traceparent``."""
    tracing = installed()
    if tracing.exporter is None:
        return
    trace_id, parent_id = parent if parent is not None else (secrets.token_hex(16), None)
    if not tracing.sampled(trace_id):
        return
    tracing.export([Span(trace_id=trace_id, span_id=secrets.token_hex(8), parent_id=parent_id,
                         name=name, start=start, end=time.time(), status=status,
                         message=message, kind=kind, attributes=attributes)])


def parse_traceparent(header: str | None) -> tuple[str, str] | None:
    """W3C ``traceparent`` (version 00): (trace id, parent span id), or None if malformed."""
    found = _TRACEPARENT.fullmatch(header.strip()) if header else None
    if found is None or found[1] == "0" * 32 or found[2] == "0" * 16:
        return None
    return found[1], found[2]


_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")


@contextmanager
def workflow_span(name: str, attributes: dict[str, AttributeValue]) -> Iterator[None]:
    """A span around workflow code (an agent's loop). Its id is derived from where it starts
    in the run, so replaying the run reopens the same span; it is emitted when it closes, if
    anything in it executed in this process."""
    from ..runtime._definitions import current_scope

    scope = current_scope.get()
    run = getattr(scope, "run", None)
    opened = getattr(run, "open_span", None)
    if run is None or opened is None:  # outside a run, or an engine that cannot trace it
        yield
        return
    span = opened(name, scope, attributes)
    token = current_span.set(span)
    failure: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        failure = exc
        raise
    finally:
        with suppress(ValueError):  # (unwound by the collector, in another context)
            current_span.reset(token)
        run.close_span(span, failure)


def step_span(run_id: str, trace_id: str, key: str, name: str, start: float, end: float,
              parent: str, status: str, message: str,
              attributes: dict[str, AttributeValue]) -> Span:
    return Span(trace_id=trace_id, span_id=step_span_id(run_id, key), parent_id=parent,
                name=name, start=start, end=end, status=status, message=message,
                attributes=attributes)
