"""Spans: what a run did and how long it took, in OpenTelemetry's model.

Ids are derived, not random: a run's trace id comes from its root run, a step's span id from
(run id, journal key). A step replayed from the journal emits nothing (it does not execute), and
if an exporter does see a span twice it sees the same ids, so a store keeps one copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

AttributeValue = str | bool | int | float | list[str] | list[int] | list[float] | list[bool]


@dataclass(slots=True, kw_only=True)
class Span:
    trace_id: str
    """32 lowercase hex digits."""
    span_id: str
    """16 lowercase hex digits."""
    parent_id: str | None
    name: str
    start: float
    """Unix time, seconds."""
    end: float
    status: str = "unset"
    """"ok", "error" or "unset" (OpenTelemetry's status codes)."""
    message: str = ""
    """With status "error": what went wrong."""
    kind: str = "internal"
    """"internal", "server" or "client"."""
    attributes: dict[str, AttributeValue] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id, "span_id": self.span_id, "parent_id": self.parent_id,
            "name": self.name, "start": self.start, "end": self.end, "status": self.status,
            "message": self.message, "kind": self.kind, "attributes": self.attributes,
        }


# The hashes' initial states, copied for each id: cheaper than a new blake2b with its
# parameters (never updated themselves, so the copies are the same as new ones)
_TRACE = blake2b(digest_size=16, person=b"corral-trace")
_RUN = blake2b(digest_size=8, person=b"corral-run")
_OP = blake2b(digest_size=8, person=b"corral-op")


def trace_id_for(run_id: str) -> str:
    digest = _TRACE.copy()
    digest.update(run_id.encode())
    return digest.hexdigest()


def run_span_id(run_id: str) -> str:
    digest = _RUN.copy()
    digest.update(run_id.encode())
    return digest.hexdigest()


def step_span_id(run_id: str, key: str) -> str:
    digest = _OP.copy()
    digest.update(f"{run_id}\n{key}".encode())
    return digest.hexdigest()
