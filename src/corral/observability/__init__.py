"""Observability: what runs, waits and costs, for Prometheus (traces and the dashboard later)."""

from ._runs import RunCollector, run_metrics

__all__ = ["RunCollector", "run_metrics"]
