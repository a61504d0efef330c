"""Encoding spans for OTLP: microseconds per span with corral's hand-written protobuf encoder,
and with the official opentelemetry-proto message objects when that package is installed (the
way an OpenTelemetry SDK exporter builds a request), for comparison.

A typical span: a step of a run, with a parent, an error status and 8 attributes (strings, an
int, a float, a bool, a list of strings). Each measure encodes --spans spans into one request,
--runs times; the median is reported.

    python bench/otlp_encode.py [--spans 20000] [--runs 5]

Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from corral.observability._otlp import _version, encode_traces
from corral.observability._spans import Span, step_span_id, trace_id_for

RESOURCE = {"service.name": "support-agents", "service.version": "3.1.0",
            "deployment.environment": "production"}
VERSION = _version()


def spans(count: int) -> list[Span]:
    run = "run_7f3a9c"
    return [Span(
        trace_id=trace_id_for(run), span_id=step_span_id(run, f"step-{i}"),
        parent_id="b7ad6b7169203331", name="step lookup_order", start=1_700_000_000.0 + i,
        end=1_700_000_000.25 + i, status="error" if i % 10 == 0 else "ok",
        message="TimeoutError: order service did not answer" if i % 10 == 0 else "",
        kind="internal", attributes={
            "corral.run_id": run, "corral.workflow": "support", "corral.step": "lookup_order",
            "corral.attempt": 1 + i % 3, "corral.tenant": "acme", "gen_ai.request.model":
            "gpt-4o-mini", "corral.cost_usd": 0.000125, "corral.cached": i % 2 == 0,
        }) for i in range(count)]


def official(batch: Sequence[Span], resource: dict[str, Any]) -> bytes:
    """The same request through opentelemetry-proto's generated classes."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import (
        AnyValue,
        ArrayValue,
        InstrumentationScope,
        KeyValue,
    )
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
    from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

    def value(v: Any) -> AnyValue:
        if isinstance(v, bool):
            return AnyValue(bool_value=v)
        if isinstance(v, int):
            return AnyValue(int_value=v)
        if isinstance(v, float):
            return AnyValue(double_value=v)
        if isinstance(v, list):
            return AnyValue(array_value=ArrayValue(values=[value(x) for x in v]))
        return AnyValue(string_value=str(v))

    def attributes(attrs: dict[str, Any]) -> list[KeyValue]:
        return [KeyValue(key=k, value=value(v)) for k, v in attrs.items()]

    kinds: dict[str, Any] = {"internal": 1, "server": 2, "client": 3}
    codes: dict[str, Any] = {"unset": 0, "ok": 1, "error": 2}
    pb = [PbSpan(
        trace_id=bytes.fromhex(s.trace_id), span_id=bytes.fromhex(s.span_id),
        parent_span_id=bytes.fromhex(s.parent_id) if s.parent_id else b"", name=s.name,
        kind=kinds[s.kind], start_time_unix_nano=int(s.start * 1e9),
        end_time_unix_nano=int(s.end * 1e9), attributes=attributes(s.attributes),
        status=Status(code=codes[s.status], message=s.message)) for s in batch]
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=attributes(resource)),
        scope_spans=[ScopeSpans(scope=InstrumentationScope(name="corral", version=VERSION),
                                spans=pb)])])
    return request.SerializeToString()


def measure(encode: Callable[[Sequence[Span], dict[str, Any]], bytes], batch: list[Span],
            runs: int) -> tuple[float, int]:
    """Median µs per span over ``runs``, and the request's size."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        size = len(encode(batch, RESOURCE))
        times.append(time.perf_counter() - started)
    return statistics.median(times) / len(batch) * 1e6, size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    batch = spans(args.spans)
    encode_traces(batch[:100], RESOURCE)  # (warm up: the attribute key cache)
    us, size = measure(encode_traces, batch, args.runs)
    out: dict[str, Any] = {
        "bench": "otlp_encode", "spans": args.spans, "runs": args.runs,
        "attributes_per_span": len(batch[0].attributes), "cpus": os.cpu_count(),
        "python": platform.python_version(), "corral_us_per_span": round(us, 2),
        "corral_bytes_per_span": round(size / args.spans, 1),
    }
    try:
        import google.protobuf
        from google.protobuf.internal import api_implementation
    except ImportError:
        out["official"] = None  # (opentelemetry-proto is not installed)
    else:
        same = official(batch[:100], RESOURCE) == encode_traces(batch[:100], RESOURCE)
        official_us, official_size = measure(official, batch, args.runs)
        out.update(official_us_per_span=round(official_us, 2),
                   official_bytes_per_span=round(official_size / args.spans, 1),
                   official_protobuf=f"{google.protobuf.__version__} "
                                     f"({api_implementation.Type()})",
                   speedup=round(official_us / us, 2), identical_bytes=same)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
