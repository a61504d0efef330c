"""Durable workflows: steps, timers, signals and child runs, journaled and replayed."""

from ._context import Context
from ._definitions import RetryPolicy, Step, Workflow, load_workflow, step, workflow
from ._engine import DEFAULT_DB, RunHandle, Runtime

__all__ = [
    "DEFAULT_DB",
    "Context",
    "RetryPolicy",
    "RunHandle",
    "Runtime",
    "Step",
    "Workflow",
    "load_workflow",
    "step",
    "workflow",
]
