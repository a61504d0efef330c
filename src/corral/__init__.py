"""corral: run fleets of AI agents in production.

Durable workflows in plain async Python, resumed after any crash without repeating finished work.
"""

from ._errors import (
    CorralError,
    InvalidInput,
    NonDeterminismError,
    NonRetryable,
    RunCancelled,
    RunConflict,
    RunFailed,
    RunFinished,
    RunNotFound,
    SignalTimeout,
    StepFailed,
    StoreError,
    UsageError,
    WorkflowNotFound,
)
from .runtime import (
    Context,
    RetryPolicy,
    RunHandle,
    Runtime,
    Step,
    Workflow,
    load_workflow,
    step,
    workflow,
)

__version__ = "0.1.0"

__all__ = [
    "Context",
    "CorralError",
    "InvalidInput",
    "NonDeterminismError",
    "NonRetryable",
    "RetryPolicy",
    "RunCancelled",
    "RunConflict",
    "RunFailed",
    "RunFinished",
    "RunHandle",
    "RunNotFound",
    "Runtime",
    "SignalTimeout",
    "Step",
    "StepFailed",
    "StoreError",
    "UsageError",
    "Workflow",
    "WorkflowNotFound",
    "__version__",
    "load_workflow",
    "step",
    "workflow",
]
