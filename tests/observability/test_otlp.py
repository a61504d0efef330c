"""Spans reach an OTLP/HTTP receiver on 127.0.0.1 that decodes them with the official
opentelemetry-proto classes: every field, in batches, through retries, and what is dropped when
the collector refuses, is down or falls behind."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus

from corral._errors import UsageError
from corral.observability._otlp import OTLPExporter, encode_traces
from corral.observability._spans import Span
from corral.testing import _free_port

if TYPE_CHECKING:
    from conftest import Receiver  # (the receiver fixture is in this folder's conftest.py)

TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def exporters() -> Iterator[list[OTLPExporter]]:
    """Exporters to close after the test, whatever it asserted."""
    made: list[OTLPExporter] = []
    yield made
    for exporter in made:
        exporter.close(timeout=5)


def spans(count: int, *, trace: str = TRACE) -> list[Span]:
    return [Span(trace_id=trace, span_id=f"{i + 1:016x}", parent_id=None, name=f"step {i}",
                 start=1_700_000_000.0, end=1_700_000_001.0) for i in range(count)]


def span_ids(found: list[PbSpan]) -> list[int]:
    return sorted(int.from_bytes(span.span_id, "big") for span in found)


def value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [value(item) for item in v.array_value.values]
    return getattr(v, which) if which else None


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_every_field_reaches_the_collector_as_the_official_decoder_reads_it(
        receiver: Receiver, exporters: list[OTLPExporter], compression: str) -> None:
    step = Span(
        trace_id=TRACE, span_id="b7ad6b7169203331", parent_id="00f067aa0ba902b7",
        name="step lookup_order", start=1_700_000_000.5, end=1_700_000_002.0, status="error",
        message="TimeoutError: the order service did not answer (ü)", kind="client",
        attributes={"corral.step": "lookup_order", "corral.cached": False, "corral.attempt": 3,
                    "corral.negative": -7, "corral.cost_usd": 0.25, "tags": ["a", "é"],
                    "sizes": [1, 2, 3], "scores": [0.5, 1.5], "flags": [True, False],
                    "none": []})
    run = Span(trace_id=TRACE, span_id="00f067aa0ba902b7", parent_id=None, name="run support",
               start=1_700_000_000.0, end=1_700_000_003.0, status="ok", kind="server")
    quiet = Span(trace_id=TRACE, span_id="00000000000000ff", parent_id="00f067aa0ba902b7",
                 name="wait", start=1_700_000_001.0, end=1_700_000_001.0)
    exporter = OTLPExporter(receiver.url, compression=compression,
                            resource={"service.name": "support", "replicas": 3})
    exporters.append(exporter)
    exporter.export([step, run, quiet])
    assert exporter.flush()

    [(_, headers, request)] = receiver.requests
    assert headers["Content-Type"] == "application/x-protobuf"
    assert headers.get("Content-Encoding") == ("gzip" if compression == "gzip" else None)
    [resource_spans] = request.resource_spans
    assert {kv.key: value(kv.value) for kv in resource_spans.resource.attributes} == {
        "service.name": "support", "replicas": 3}
    [scope_spans] = resource_spans.scope_spans
    assert scope_spans.scope.name == "corral"
    assert scope_spans.scope.version == metadata.version("corral")
    got_step, got_run, got_quiet = scope_spans.spans
    assert got_step.trace_id == bytes.fromhex(TRACE)
    assert got_step.span_id == bytes.fromhex("b7ad6b7169203331")
    assert got_step.parent_span_id == bytes.fromhex("00f067aa0ba902b7")
    assert got_step.name == "step lookup_order"
    assert got_step.kind == PbSpan.SPAN_KIND_CLIENT
    assert got_step.start_time_unix_nano == 1_700_000_000_500_000_000
    assert got_step.end_time_unix_nano == 1_700_000_002_000_000_000
    assert got_step.status.code == PbStatus.STATUS_CODE_ERROR
    assert got_step.status.message == "TimeoutError: the order service did not answer (ü)"
    attributes = {kv.key: value(kv.value) for kv in got_step.attributes}
    assert attributes == step.attributes
    assert [kv.value.WhichOneof("value") for kv in got_step.attributes][:5] == [
        "string_value", "bool_value", "int_value", "int_value", "double_value"]
    assert got_step.attributes[-1].value.HasField("array_value")  # (empty, but an array)
    assert got_run.parent_span_id == b""
    assert got_run.kind == PbSpan.SPAN_KIND_SERVER
    assert got_run.status.code == PbStatus.STATUS_CODE_OK
    assert got_run.status.message == ""
    assert got_quiet.kind == PbSpan.SPAN_KIND_INTERNAL
    assert got_quiet.status.code == PbStatus.STATUS_CODE_UNSET
    assert exporter.sent == 3
    assert (exporter.dropped, exporter.failed) == (0, 0)


def test_values_otlp_cannot_carry_are_sent_as_strings() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    attributes: dict[str, Any] = {
        "none": None, "dict": {"a": 1}, "mixed": [1, "a"], "nested": [[1]], "huge": 2**64,
        "object": Unprintable(), "surrogate": "file\udcff.txt"}
    span = Span(trace_id=TRACE, span_id="00000000000000aa", parent_id=None, name="x",
                start=1.0, end=2.0, attributes=attributes)
    request = ExportTraceServiceRequest.FromString(encode_traces([span], {}))
    got = request.resource_spans[0].scope_spans[0].spans[0]
    assert {kv.key: (kv.value.WhichOneof("value"), value(kv.value)) for kv in got.attributes} == {
        "none": ("string_value", "None"), "dict": ("string_value", "{'a': 1}"),
        "mixed": ("string_value", "[1, 'a']"), "nested": ("string_value", "[[1]]"),
        "huge": ("string_value", str(2**64)),
        "object": ("string_value", "<unprintable Unprintable>"),
        "surrogate": ("string_value", "file?.txt")}


def test_a_malformed_span_is_left_out_and_the_rest_is_sent(
        receiver: Receiver, exporters: list[OTLPExporter],
        caplog: pytest.LogCaptureFixture) -> None:
    exporter = OTLPExporter(receiver.url)
    exporters.append(exporter)
    bad = Span(trace_id="not hex", span_id="00000000000000aa", parent_id=None, name="bad",
               start=1.0, end=2.0)
    exporter.export([*spans(2), bad])
    assert exporter.flush()
    assert span_ids(receiver.accepted()) == [1, 2]
    assert (exporter.sent, exporter.failed) == (2, 1)
    assert "'bad'" in caplog.text and "cannot encode" in caplog.text


def test_spans_go_in_batches_of_max_batch_none_lost_none_twice(
        receiver: Receiver, exporters: list[OTLPExporter]) -> None:
    exporter = OTLPExporter(receiver.url, max_batch=512, interval=60)
    exporters.append(exporter)
    exporter.export(spans(1300))
    receiver.wait_for(2)  # (full batches go at once: no flush, and the interval is a minute)
    assert exporter.flush()
    sizes = [len(request.resource_spans[0].scope_spans[0].spans)
             for _, _, request in receiver.requests]
    assert sizes == [512, 512, 276]
    assert span_ids(receiver.accepted()) == list(range(1, 1301))
    assert (exporter.sent, exporter.dropped, exporter.failed) == (1300, 0, 0)


def test_503_is_retried_after_retry_after_and_every_span_arrives_once(
        receiver: Receiver, exporters: list[OTLPExporter]) -> None:
    receiver.answers = [(503, {"Retry-After": "0"}, b"busy")] * 2
    exporter = OTLPExporter(receiver.url, backoff=30)  # (so only Retry-After can be honoured)
    exporters.append(exporter)
    exporter.export(spans(10))
    assert exporter.flush()
    assert [status for status, _, _ in receiver.requests] == [503, 503, 200]
    assert span_ids(receiver.accepted()) == list(range(1, 11))
    assert (exporter.sent, exporter.failed) == (10, 0)


def test_429_without_retry_after_backs_off_then_gives_up_naming_the_endpoint(
        receiver: Receiver, exporters: list[OTLPExporter],
        caplog: pytest.LogCaptureFixture) -> None:
    receiver.answers = [(429, {}, b"slow down")] * 3
    exporter = OTLPExporter(receiver.url, attempts=3, backoff=0.01)
    exporters.append(exporter)
    exporter.export(spans(4))
    assert exporter.flush()
    assert len(receiver.requests) == 3
    assert (exporter.sent, exporter.failed) == (0, 4)
    assert f"gave up on 4 spans after 3 attempts to {receiver.url}; last: HTTP 429" in caplog.text


def test_400_drops_the_batch_with_the_collectors_answer(
        receiver: Receiver, exporters: list[OTLPExporter],
        caplog: pytest.LogCaptureFixture) -> None:
    receiver.answers = [(400, {"Content-Type": "text/plain"}, b"bad span: " + b"x" * 500)]
    exporter = OTLPExporter(receiver.url)
    exporters.append(exporter)
    exporter.export(spans(5))
    assert exporter.flush()
    assert len(receiver.requests) == 1  # (not retried)
    assert (exporter.sent, exporter.failed) == (0, 5)
    [record] = [r for r in caplog.records if r.name == "corral.observability"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert f"{receiver.url} answered HTTP 400, dropped 5 spans: bad span: xxx" in message
    assert message.endswith(": bad span: " + "x" * 190)  # (the answer's first 200 characters)


def test_partial_success_counts_the_rejected_spans_as_failed(
        receiver: Receiver, exporters: list[OTLPExporter],
        caplog: pytest.LogCaptureFixture) -> None:
    answer = ExportTraceServiceResponse(partial_success=ExportTracePartialSuccess(
        rejected_spans=2, error_message="spans older than 24h")).SerializeToString()
    receiver.answers = [(200, {}, answer)]
    exporter = OTLPExporter(receiver.url)
    exporters.append(exporter)
    exporter.export(spans(5))
    assert exporter.flush()
    assert (exporter.sent, exporter.failed) == (3, 2)
    assert "rejected 2 of 5 spans: spans older than 24h" in caplog.text


def test_a_collector_that_is_down_costs_retries_then_a_warning_not_an_exception(
        exporters: list[OTLPExporter], caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1/traces"  # (nothing listens there)
    exporter = OTLPExporter(url, attempts=3, backoff=0.01, timeout=2)
    exporters.append(exporter)
    exporter.export(spans(3))
    assert exporter.flush()
    assert (exporter.sent, exporter.failed) == (0, 3)
    assert f"gave up on 3 spans after 3 attempts to {url}; last: ConnectError" in caplog.text
    exporter.export(spans(1))  # (the thread is still there for the next batch)
    assert exporter.flush()
    assert exporter.failed == 4


def test_a_full_queue_drops_new_spans_and_warns_once_per_burst(
        receiver: Receiver, exporters: list[OTLPExporter],
        caplog: pytest.LogCaptureFixture) -> None:
    exporter = OTLPExporter(receiver.url, max_queue=10, max_batch=100, interval=60)
    exporters.append(exporter)
    exporter.export(spans(25))
    exporter.export(spans(5))
    assert exporter.dropped == 20
    warnings = [r for r in caplog.records if "dropped spans" in r.getMessage()]
    assert len(warnings) == 1
    assert "10 spans are already waiting" in warnings[0].getMessage()
    assert exporter.flush()
    assert span_ids(receiver.accepted()) == list(range(1, 11))
    exporter.export(spans(1))  # (room again: the burst is over)
    exporter.export(spans(25))
    assert exporter.dropped == 20 + 16
    assert len([r for r in caplog.records if "dropped spans" in r.getMessage()]) == 2


def test_close_sends_what_is_queued_and_is_idempotent(receiver: Receiver,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    exporter = OTLPExporter(receiver.url, interval=60)
    exporter.export(spans(7))
    exporter.close()
    exporter.close()
    assert span_ids(receiver.accepted()) == list(range(1, 8))
    assert not exporter._thread.is_alive()
    exporter.export(spans(2))
    assert exporter.dropped == 2
    assert "the exporter is closed" in caplog.text


def test_spans_that_fill_no_batch_go_after_the_interval(
        receiver: Receiver, exporters: list[OTLPExporter]) -> None:
    exporter = OTLPExporter(receiver.url, interval=0.05)
    exporters.append(exporter)
    exporter.export(spans(3))
    receiver.wait_for(1)  # (no flush)
    assert span_ids(receiver.accepted()) == [1, 2, 3]


def test_close_stops_retrying_when_its_timeout_runs_out(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1/traces"  # (nothing listens there)
    exporter = OTLPExporter(url, backoff=60, max_batch=2, interval=60)
    exporter.export(spans(3))  # (one batch of 2 retried, 1 span waiting behind it)
    exporter.close(timeout=0.2)
    assert not exporter._thread.is_alive()
    # every span is accounted for: the batch in its backoff given up on (when the thread had
    # taken it before close), the rest dropped, none sent
    assert exporter.sent == 0 and exporter.failed + exporter.dropped == 3
    assert exporter.failed in (0, 2)
    if exporter.failed:
        assert f"gave up on 2 spans after 1 attempt to {url}" in caplog.text
    assert f"spans not sent to {url}" in caplog.text


@pytest.mark.parametrize(("given", "used"), [
    ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
    ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/traces"),
    ("https://otel.example.com/custom/traces", "https://otel.example.com/custom/traces"),
])
def test_an_endpoint_without_a_path_gets_v1_traces(given: str, used: str) -> None:
    exporter = OTLPExporter(given)
    exporter.close()
    assert exporter.endpoint == used


@pytest.mark.parametrize(("endpoint", "problem"), [
    ("ftp://x", "uses ftp://, which OTLP/HTTP does not"),
    ("localhost:4318", "has no scheme"),
    ("http:///v1/traces", "has no host"),
    ("http://127.0.0.1:port/v1/traces", "has a port that is not a number"),
])
def test_a_bad_endpoint_says_what_is_wrong_and_what_to_pass(endpoint: str, problem: str) -> None:
    with pytest.raises(UsageError) as raised:
        OTLPExporter(endpoint)
    assert str(raised.value).startswith(f"OTLP endpoint {endpoint!r} {problem}")
    assert "pass an http:// or https:// URL with a host, such as " \
           "http://127.0.0.1:4318/v1/traces" in str(raised.value)


def test_bad_options_are_refused() -> None:
    with pytest.raises(UsageError, match="pass 'gzip' or 'none'"):
        OTLPExporter("http://127.0.0.1:4318", compression="zstd")
    with pytest.raises(UsageError, match="max_batch=0"):
        OTLPExporter("http://127.0.0.1:4318", max_batch=0)
    with pytest.raises(UsageError, match="not ASCII on one line"):
        OTLPExporter("http://127.0.0.1:4318", headers={"Authorization": "Bearer é"})
