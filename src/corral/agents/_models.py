"""Models: one small interface, and names that find them ("simulator:default")."""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any, Protocol, runtime_checkable

from .._errors import UsageError
from ._messages import ModelRequest, ModelResponse, ToolCall, Usage


@runtime_checkable
class Model(Protocol):
    """Answers one chat request. The gateway (issue 5) wraps every model behind this."""

    name: str

    async def complete(self, request: ModelRequest) -> ModelResponse: ...


def resolve_model(model: str | Model) -> Model:
    """A model object, or one named ``provider:model`` (today: ``simulator:NAME``)."""
    if not isinstance(model, str):
        if not isinstance(model, Model):
            raise UsageError(f"{model!r} is not a model: give a name like 'simulator:default' "
                             "or an object with `name` and `async complete(request)`")
        return model
    provider, _, name = model.partition(":")
    if provider == "simulator":
        return SimulatorModel(name or "default")
    if provider == "gateway" and name:
        from ..gateway._inprocess import GatewayModel

        return GatewayModel(name)
    if provider == "openai" and name:
        from ._openai import OpenAIChat  # httpx is imported only for HTTP models

        return OpenAIChat(name)
    raise UsageError(
        f"unknown model {model!r}; name one as 'simulator:NAME', 'gateway:MODEL' (through "
        "corral's gateway, configured in corral.toml) or 'openai:MODEL' (any "
        "OpenAI-compatible server via OPENAI_BASE_URL), or pass a Model object"
    )


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


class SimulatorModel:
    """A model that answers plausibly and deterministically, for demos and benchmarks.

    It calls the tools it is given (once each, with arguments made from their schemas and the
    user's words), then answers: with an instance of the output schema if there is one, or with
    a sentence built from what the tools returned. The same conversation and ``seed`` always give
    the same answer. ``latency`` (seconds) is awaited per call. Token counts are ~4 characters a
    token, so costs are plausible; ``input_tokens``/``output_tokens`` fix them per call instead
    (for budget and cost tests).
    """

    def __init__(self, name: str = "default", *, seed: int = 0, latency: float = 0.0,
                 max_tool_calls: int = 2, input_tokens: int | None = None,
                 output_tokens: int | None = None) -> None:
        self.name = f"simulator:{name}"
        self.seed = seed
        self.latency = latency
        self.max_tool_calls = max_tool_calls
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens

    def _usage(self, input_tokens: int, output_tokens: int) -> Usage:
        return Usage(input_tokens=self.input_tokens if self.input_tokens is not None
                     else input_tokens,
                     output_tokens=self.output_tokens if self.output_tokens is not None
                     else output_tokens)

    async def complete(self, request: ModelRequest) -> ModelResponse:
        if self.latency:
            await asyncio.sleep(self.latency)
        messages = request.messages
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
        prompt = messages[last_user].content or "" if last_user >= 0 else ""
        rng = random.Random(f"{self.seed}|{len(messages)}|{prompt}")
        offered = {spec.name for spec in request.tools}
        called = [m for m in messages[last_user + 1:] if m.role == "tool" and m.name in offered]
        input_tokens = sum(_tokens(m.content or "") for m in messages) + 20 * len(request.tools)
        words = re.findall(r"[A-Za-z][\w@.-]*", prompt) or ["example"]
        if request.tools and not called:
            chosen = request.tools[: self.max_tool_calls]
            calls = [
                ToolCall(id=f"call_{len(messages)}_{i}", name=spec.name,
                         arguments=json.dumps(_instance(spec.parameters, rng, words)))
                for i, spec in enumerate(chosen)
            ]
            arguments = sum(_tokens(c.arguments) for c in calls)
            return ModelResponse(model=self.name, tool_calls=calls,
                                 usage=self._usage(input_tokens, arguments + 5 * len(calls)))
        if request.output_schema is not None:
            content = json.dumps(_instance(request.output_schema, rng, words))
        else:
            facts = "; ".join((m.content or "")[:80] for m in called)
            content = (f"Here is what I found about {' '.join(words[:6])}: {facts}."
                       if facts else f"Understood: {' '.join(words[:12])}.")
        return ModelResponse(model=self.name, content=content,
                             usage=self._usage(input_tokens, _tokens(content)))


def _instance(schema: dict[str, Any], rng: random.Random, words: list[str],
              defs: dict[str, Any] | None = None) -> Any:
    """A plausible value for a JSON schema (the subset pydantic produces)."""
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        return _instance(defs[schema["$ref"].rsplit("/", 1)[-1]], rng, words, defs)
    for combined in ("anyOf", "oneOf", "allOf"):
        if combined in schema:
            options = [s for s in schema[combined] if s.get("type") != "null"] or schema[combined]
            return _instance(options[0], rng, words, defs)
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type", "object")
    if kind == "object":
        properties = schema.get("properties", {})
        return {key: _instance(sub, rng, words, defs) for key, sub in properties.items()}
    if kind == "array":
        return [_instance(schema.get("items", {}), rng, words, defs)
                for _ in range(rng.randint(1, 2))]
    if kind == "integer":
        low = int(schema.get("minimum", schema.get("exclusiveMinimum", 0) + 1))
        high = int(schema.get("maximum", schema.get("exclusiveMaximum", low + 100) - 1))
        return rng.randint(low, max(low, high))
    if kind == "number":
        floor = float(schema.get("minimum", schema.get("exclusiveMinimum", 0.0)))
        ceiling = float(schema.get("maximum", schema.get("exclusiveMaximum", floor + 1.0)))
        return round(rng.uniform(floor, max(floor, ceiling)), 3)
    if kind == "boolean":
        return rng.random() < 0.5
    return " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
