"""corral: run fleets of AI agents in production.

Durable workflows in plain async Python, resumed after any crash without repeating finished work.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
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

# The runtime and the agents load on first use: a process that needs neither (the span
# shipper, `corral --help`) does not pay for importing them (pydantic, httpx...).
_LAZY = {
    **dict.fromkeys(("Agent", "AgentResult", "Limits", "Tool", "ToolError", "tool"), "agents"),
    **dict.fromkeys(("Context", "RetryPolicy", "RunHandle", "Runtime", "Step", "Workflow",
                     "load_workflow", "step", "workflow"), "runtime"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

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
