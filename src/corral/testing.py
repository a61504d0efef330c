"""Test doubles shipped with corral, so your tests need no network and no keys."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from ._errors import UsageError
from .agents._messages import ModelRequest, ModelResponse, ToolCall, Usage

Turn = str | dict[str, Any] | list[dict[str, Any]] | ModelResponse | Callable[
    [ModelRequest], ModelResponse
]


class ScriptedModel:
    """A model that answers from a script, one entry per call.

    Each entry is the reply text (``"hello"``), tool calls (``{"tool": "lookup", "args":
    {...}}`` or a list of them), a full `ModelResponse`, or a function of the request. Every
    request is kept in ``requests`` for assertions.
    """

    def __init__(self, script: Sequence[Turn], *, name: str = "scripted",
                 tokens: tuple[int, int] = (10, 5)) -> None:
        self.name = name
        self.script = list(script)
        self.requests: list[ModelRequest] = []
        self.tokens = tokens

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.requests.append(request)
        turn = len(self.requests) - 1
        if turn >= len(self.script):
            raise UsageError(
                f"ScriptedModel {self.name!r} was called {turn + 1} times but its script has "
                f"{len(self.script)} entries; add entries for the extra calls"
            )
        entry = self.script[turn]
        usage = Usage(input_tokens=self.tokens[0], output_tokens=self.tokens[1])
        if callable(entry):
            return entry(request)
        if isinstance(entry, ModelResponse):
            return entry
        if isinstance(entry, str):
            return ModelResponse(model=self.name, content=entry, usage=usage)
        calls = entry if isinstance(entry, list) else [entry]
        return ModelResponse(
            model=self.name,
            usage=usage,
            tool_calls=[
                ToolCall(id=f"call_{turn}_{i}", name=call["tool"],
                         arguments=call["args"] if isinstance(call.get("args"), str)
                         else json.dumps(call.get("args", {})))
                for i, call in enumerate(calls)
            ],
        )
