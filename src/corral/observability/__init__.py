"""Observability: traces (OpenTelemetry GenAI spans, kept in the store, exported over OTLP),
run and step metrics for Prometheus, and alerts."""

from ._otlp import OTLPExporter
from ._runs import RunCollector, run_metrics
from ._spans import Span
from ._tracing import Tracing, describe_step, install

__all__ = ["OTLPExporter", "RunCollector", "Span", "Tracing", "describe_step", "install",
           "run_metrics"]
