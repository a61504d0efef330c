"""corral: run fleets of AI agents in production.

Durable workflows in plain async Python, resumed after any crash without repeating finished work.
"""

from ._errors import (
    CorralError,
    InvalidInput,
    LoopDetected,
    NonDeterminismError,
    NonRetryable,
    OutputInvalid,
    ProviderError,
    RunCancelled,
    RunConflict,
    RunFailed,
    RunFinished,
    RunNotFound,
    SignalTimeout,
    StepFailed,
    StoreError,
    UsageError,
    UsageLimitExceeded,
    WorkflowNotFound,
)
from .agents import Agent, AgentResult, Limits, Tool, ToolError, tool
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
    "Agent",
    "AgentResult",
    "Context",
    "CorralError",
    "InvalidInput",
    "Limits",
    "LoopDetected",
    "NonDeterminismError",
    "NonRetryable",
    "OutputInvalid",
    "ProviderError",
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
    "Tool",
    "ToolError",
    "UsageError",
    "UsageLimitExceeded",
    "Workflow",
    "WorkflowNotFound",
    "__version__",
    "load_workflow",
    "step",
    "tool",
    "workflow",
]
