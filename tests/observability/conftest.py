"""Fixtures for the observability tests: a real OTLP/HTTP receiver on 127.0.0.1 that decodes
what it gets with the official opentelemetry-proto classes."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan


class Receiver:
    """An OTLP/HTTP trace endpoint that keeps every request it decodes. ``answers`` are
    (status, headers, body) it gives, in order, before answering 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, dict[str, str], ExportTraceServiceRequest]] = []
        self.answers: list[tuple[int, dict[str, str], bytes]] = []
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.changed:
                    status, headers, answer = (receiver.answers.pop(0) if receiver.answers
                                               else (200, {}, b""))
                    receiver.requests.append((status, dict(self.headers), request))
                    receiver.changed.notify_all()
                self.send_response(status)
                for name, value in {"Content-Type": "application/x-protobuf", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,),
                                       daemon=True)

    def wait_for(self, requests: int, timeout: float = 10.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.requests) >= requests, timeout), \
                f"{len(self.requests)} requests, not {requests}"

    def accepted(self) -> list[PbSpan]:
        """The spans of every request answered 200."""
        with self.changed:
            return [span for status, _, request in self.requests if status == 200
                    for span in request.resource_spans[0].scope_spans[0].spans]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()
