"""Agents on the durable runtime: the loop, tools, models, and runaway protection."""

from ._agent import PRICES, Agent, AgentResult, Limits
from ._messages import Message, ModelRequest, ModelResponse, ToolCall, ToolSpec, Usage
from ._models import Model, SimulatorModel, resolve_model
from ._tools import Tool, ToolError, ToolFailure, ToolResult, tool

__all__ = [
    "PRICES",
    "Agent",
    "AgentResult",
    "Limits",
    "Message",
    "Model",
    "ModelRequest",
    "ModelResponse",
    "SimulatorModel",
    "Tool",
    "ToolCall",
    "ToolError",
    "ToolFailure",
    "ToolResult",
    "ToolSpec",
    "Usage",
    "resolve_model",
    "tool",
]
