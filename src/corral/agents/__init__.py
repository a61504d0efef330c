"""Agents on the durable runtime: the loop, tools, models, and runaway protection."""

from ._agent import PRICES, Agent, AgentResult, Limits, limit_run
from ._messages import Message, ModelRequest, ModelResponse, ToolCall, ToolSpec, Usage
from ._models import Model, SimulatorModel, resolve_model
from ._patterns import END, START, CrewResult, Graph, Task, crew, interrupt
from ._report import AgentStats, agent_report
from ._tools import Tool, ToolError, ToolFailure, ToolResult, tool

__all__ = [
    "END",
    "PRICES",
    "START",
    "Agent",
    "AgentResult",
    "AgentStats",
    "CrewResult",
    "Graph",
    "Limits",
    "Message",
    "Model",
    "ModelRequest",
    "ModelResponse",
    "SimulatorModel",
    "Task",
    "Tool",
    "ToolCall",
    "ToolError",
    "ToolFailure",
    "ToolResult",
    "ToolSpec",
    "Usage",
    "agent_report",
    "crew",
    "interrupt",
    "limit_run",
    "resolve_model",
    "tool",
]
