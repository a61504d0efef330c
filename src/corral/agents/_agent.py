"""The agent loop: model -> tool calls -> tool results -> model, until a valid final output.

Inside a workflow every model call and every tool call is a journaled step, so a crash mid-loop
repeats no completed call. Runaway protection stops the loop on limits of turns, tokens and cost,
and on loops a turn counter cannot see: the same tool call again and again, the same answer
again and again, or turns that bring no new information.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from .._errors import LoopDetected, OutputInvalid, UsageError, UsageLimitExceeded
from ..observability._runs import MODELS
from ..observability._tracing import describe_step, workflow_span
from ..observability._tracing import installed as installed_tracing
from ..runtime import RetryPolicy, Step
from ..runtime._definitions import current_scope
from ._messages import Message, ModelRequest, ModelResponse, ToolCall, ToolSpec, Usage
from ._models import Model, resolve_model
from ._tools import Tool, ToolFailure, ToolResult, safe_error

O = TypeVar("O")  # noqa: E741

# The agent whose model call is under way (in its model step's body).
calling_agent: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "corral_calling_agent", default=None)
"""The (name, version) of the agent whose model call is being made."""

# USD per million tokens (input, output). Extend or override with Agent(prices=...).
PRICES: dict[str, tuple[float, float]] = {
    "openai:gpt-4o-mini": (0.15, 0.60),
    "openai:gpt-4o": (2.50, 10.00),
    "simulator:default": (0.15, 0.60),  # priced like a small model, so demos show costs
}


@dataclass(frozen=True, kw_only=True)
class Limits:
    """When an agent must stop. ``None`` means no limit."""

    max_turns: int | None = 20
    max_tokens: int | None = None
    max_cost: float | None = None
    """USD, from the usage each model reports and the price table."""
    repeated_tool_call: int | None = 3
    """Stop when the same tool is called with the same arguments this many times."""
    repeated_output: int | None = 3
    """Stop when the model gives the same answer this many times in a row."""
    turns_without_news: int | None = 3
    """Stop after this many turns whose tool results were all seen before."""
    on_loop: Literal["stop", "escalate"] = "stop"
    """On a detected loop: raise LoopDetected, or wait for a human's signal
    ``escalation:<agent name>`` with ``{"continue": true}`` (carry on) or anything else (stop)."""


class _RunBudget:
    """Usage of all the agents of one run, against the run's limits (see `limit_run`)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.turns = 0
        self.usage = Usage()
        self.cost = 0.0


def limit_run(*, max_turns: int | None = None, max_tokens: int | None = None,
              max_cost: float | None = None) -> None:
    """Limit every agent of the current run together: turns, tokens and cost (USD) summed over
    all of them. Call it in the workflow before the agents run."""
    scope = current_scope.get()
    if scope is None:
        raise UsageError("limit_run() limits a run, so it must be called inside a workflow")
    scope.run.extras["agents.budget"] = _RunBudget(
        Limits(max_turns=max_turns, max_tokens=max_tokens, max_cost=max_cost)
    )


def _run_budget() -> _RunBudget | None:
    scope = current_scope.get()
    return None if scope is None else scope.run.extras.get("agents.budget")


class AgentResult(BaseModel, Generic[O]):
    output: O
    agent: str
    """The agent that gave the output (another one than was asked, after a handoff)."""
    turns: int
    usage: Usage
    """Tokens of this agent's model calls and of the specialists it delegated to."""
    cost: float
    messages: list[Message]


class _Progress:
    """What the loop has seen, to tell a loop from progress."""

    def __init__(self, agent: str, limits: Limits) -> None:
        self.agent, self.limits = agent, limits
        self.calls: Counter[str] = Counter()
        self.outputs: list[str] = []
        self.facts: set[str] = set()
        self.stale = 0

    def tool_calls(self, calls: list[ToolCall]) -> str | None:
        limit = self.limits.repeated_tool_call
        for call in calls:
            try:
                arguments = json.dumps(json.loads(call.arguments), sort_keys=True)
            except ValueError:
                arguments = call.arguments
            key = f"{call.name}({arguments})"
            self.calls[key] += 1
            if limit is not None and self.calls[key] >= limit:
                return f"called {key} {self.calls[key]} times"
        return None

    def tool_calls_done(self, results: list[str]) -> str | None:
        news = set(results) - self.facts
        self.facts |= news
        self.stale = 0 if news else self.stale + 1
        limit = self.limits.turns_without_news
        if limit is not None and self.stale >= limit:
            return f"{self.stale} turns in a row brought no new tool results"
        return None

    def output(self, text: str) -> str | None:
        self.outputs.append(text)
        limit = self.limits.repeated_output
        if limit is not None and len(self.outputs) >= limit and len(
            set(self.outputs[-limit:])
        ) == 1:
            return f"gave the same answer {limit} times in a row"
        return None

    def reset(self) -> None:
        self.calls.clear()
        self.outputs.clear()
        self.stale = 0


class Agent(Generic[O]):
    """An agent: instructions, a model, tools, and the type of its final output.

    ``await agent.run("...")`` inside a workflow is durable: each model call and tool call is a
    journaled step. Outside a workflow it runs the same loop without a journal.
    """

    def __init__(
        self,
        name: str,
        *,
        instructions: str,
        model: str | Model,
        tools: list[Tool] | tuple[Tool, ...] = (),
        output_type: type[O] | Any = str,
        output_retries: int = 2,
        limits: Limits | None = None,
        prices: dict[str, tuple[float, float]] | None = None,
        handoffs: list[Agent[Any]] | tuple[Agent[Any], ...] = (),
        description: str | None = None,
        version: str = "1",
        roles: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.version = version
        self.roles = frozenset(roles)
        """What the policy may grant it for (roles it is given in code, reviewed with it)."""
        self.description = description or instructions.split(".")[0][:200]
        self.handoffs = {f"transfer_to_{a.name}": a for a in handoffs}
        self.instructions = instructions
        self.model = resolve_model(model)
        self.tools = {t.name: t for t in tools}
        if len(self.tools) != len(tools):
            raise UsageError(f"agent {name!r} has two tools with the same name")
        for t in tools:
            if not isinstance(t, Tool):
                raise UsageError(f"agent {name!r}: {t!r} is not a tool; decorate it with "
                                 "@corral.tool")
        self.output_type = output_type
        self._output = TypeAdapter(output_type)
        self.output_retries = output_retries
        self.limits = limits or Limits()
        self.prices = {**PRICES, **(prices or {})}
        self._model_step: Step[Any, ModelResponse] = Step(
            self._complete, name=f"{name}:model",
            retry=RetryPolicy(max_attempts=3, initial_interval=0.5), timeout=None,
            origin=sys._getframe(1).f_globals.get("__name__"),  # where the agent is defined
        )

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, model={self.model.name!r})"

    async def _complete(self, request: ModelRequest) -> ModelResponse:
        model = getattr(self.model, "model", self.model.name)
        described = describe_step(f"chat {model}", {
            "gen_ai.operation.name": "chat", "gen_ai.request.model": model,
            "gen_ai.provider.name": self.model.name.partition(":")[0],
            "gen_ai.agent.name": self.name, "gen_ai.agent.version": self.version})
        token = calling_agent.set((self.name, self.version))  # (the gateway's labels)
        started, status = time.perf_counter(), "error"
        try:
            response = await self.model.complete(request)
            status = "ok"
        finally:
            calling_agent.reset(token)
            MODELS.observe(model, status, time.perf_counter() - started)
        if described:
            attributes: dict[str, Any] = {}
            if not getattr(self.model, "accounted", False):  # (else the gateway said it all)
                attributes = {"gen_ai.response.model": response.model,
                              "gen_ai.usage.input_tokens": response.usage.input_tokens,
                              "gen_ai.usage.output_tokens": response.usage.output_tokens,
                              "corral.cost_usd": self.cost(response)}
            tracing = installed_tracing()
            if tracing.content:
                attributes["gen_ai.input.messages"] = tracing.content_attribute(
                    [m.model_dump(exclude_none=True) for m in request.messages])
                attributes["gen_ai.output.messages"] = tracing.content_attribute(
                    [{"role": "assistant", "content": response.content,
                      "tool_calls": [c.model_dump() for c in response.tool_calls]}])
            describe_step(None, attributes)
        return response

    def cost(self, response: ModelResponse) -> float:
        price_in, price_out = self.prices.get(response.model, self.prices.get(
            self.model.name, (0.0, 0.0)))
        usage = response.usage
        return (usage.input_tokens * price_in + usage.output_tokens * price_out) / 1e6

    @functools.cached_property
    def _output_schema(self) -> dict[str, Any] | None:
        return None if self.output_type is str else self._output.json_schema()

    def _schema(self) -> dict[str, Any] | None:
        return self._output_schema

    async def run(self, prompt: str | list[Message]) -> AgentResult[O]:
        """Run the loop until a final output that validates, or a limit stops it."""
        with workflow_span(f"invoke_agent {self.name}", {
                "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": self.name,
                "gen_ai.agent.version": self.version}):
            return await self._loop(prompt)

    async def _loop(self, prompt: str | list[Message]) -> AgentResult[O]:
        messages = [Message(role="system", content=self.instructions)]
        if isinstance(prompt, str):
            messages.append(Message(role="user", content=prompt))
        else:
            messages.extend(prompt)
        limits, progress = self.limits, _Progress(self.name, self.limits)
        usage, cost, turns, invalid = Usage(), 0.0, 0, 0
        agent: Agent[Any] = self
        specs, schema = agent._specs(), agent._schema()
        while True:
            turns += 1
            if limits.max_turns is not None and turns > limits.max_turns:
                raise self._over("turns", turns - 1, limits.max_turns)
            response = await agent._model_step(  # (its parts are validated already)
                ModelRequest.model_construct(messages=list(messages), tools=specs,
                                             output_schema=schema)
            )
            usage += response.usage
            cost += agent.cost(response)
            if limits.max_tokens is not None and usage.total_tokens > limits.max_tokens:
                raise self._over("tokens", usage.total_tokens, limits.max_tokens)
            if limits.max_cost is not None and cost > limits.max_cost:
                raise self._over("cost", round(cost, 6), limits.max_cost)
            budget = _run_budget()
            if budget is not None:
                self._charge(budget, response, agent.cost(response))
            if response.tool_calls:
                messages.append(Message(role="assistant", content=response.content,
                                        tool_calls=response.tool_calls))
                await self._check(progress.tool_calls(response.tool_calls), progress)
                handoff = next((c for c in response.tool_calls if c.name in agent.handoffs),
                               None)
                if handoff is not None:  # the conversation goes on with another agent
                    target = agent.handoffs[handoff.name]
                    messages.extend(
                        Message(role="tool", tool_call_id=c.id, name=c.name,
                                content=f"transferred to {target.name}" if c is handoff
                                else "not run: the conversation was handed off")
                        for c in response.tool_calls
                    )
                    messages[0] = Message(role="system", content=target.instructions)
                    agent, invalid = target, 0
                    specs, schema = agent._specs(), agent._schema()
                    continue
                calls = response.tool_calls
                results = ([await agent._call(calls[0])] if len(calls) == 1
                           else list(await asyncio.gather(*(agent._call(c) for c in calls))))
                contents = [r.for_model() for r in results]
                for r, content in zip(results, contents, strict=True):
                    usage += r.usage
                    cost += r.cost
                    messages.append(Message.model_construct(
                        role="tool", tool_call_id=r.call_id, name=r.name, content=content,
                        tool_calls=[]))
                await self._check(progress.tool_calls_done(contents), progress)
                continue
            text = response.content or ""
            messages.append(Message(role="assistant", content=text))
            try:
                output = agent._parse(text)
            except ValidationError as exc:
                invalid += 1
                await self._check(progress.output(text), progress)
                if invalid > agent.output_retries:
                    raise OutputInvalid(
                        f"agent {agent.name!r} gave no valid output in {invalid} tries; last "
                        f"error: {_first(exc)}; make the instructions say what to return, or "
                        "allow more output_retries",
                        agent=agent.name, error=_first(exc),
                    ) from None
                messages.append(Message(role="user", content=(
                    "Your answer does not match the required output: "
                    f"{_first(exc)}. Answer again with output that matches the schema."
                )))
                continue
            return AgentResult(output=output, agent=agent.name, turns=turns, usage=usage,
                               cost=round(cost, 8), messages=messages)

    def _specs(self) -> list[ToolSpec]:
        return self._tool_specs

    @functools.cached_property
    def _tool_specs(self) -> list[ToolSpec]:
        handoffs = [
            ToolSpec(name=name, description=f"Hand the conversation to {target.name}: "
                     f"{target.description}", parameters={"type": "object", "properties": {}})
            for name, target in self.handoffs.items()
        ]
        return [t.spec() for t in self.tools.values()] + handoffs

    def as_tool(self, *, name: str | None = None, description: str | None = None,
                scopes: list[str] | tuple[str, ...] = ()) -> Tool:
        """This agent as a tool of another (supervisor -> specialist). Inside a workflow its
        model and tool calls are journaled steps of their own, like the supervisor's.
        ``scopes`` (``"tool:resource:actions"``) narrow the capability token the supervisor
        holds to what the specialist gets: never wider."""
        return AgentTool(self, name=name or self.name,
                         description=description or self.description, scopes=scopes)

    def _parse(self, text: str) -> O:
        if self.output_type is str:
            if not text.strip():
                raise ValidationError.from_exception_data(
                    "output", [{"type": "string_too_short", "loc": ("output",),
                                "input": text, "ctx": {"min_length": 1}}]
                )
            return text  # type: ignore[return-value]
        value: O = self._output.validate_json(text)
        return value

    async def _call(self, call: ToolCall) -> ToolResult:
        found = self.tools.get(call.name)
        if found is None:
            known = ", ".join(self.tools) or "none"
            return ToolResult(call_id=call.id, name=call.name, failure=ToolFailure(
                kind="unknown_tool", retryable=False,
                message=f"there is no tool {call.name!r}; the tools are: {known}",
            ))
        from ..governance._chain import installed as governance

        gate = governance()
        if gate is not None:  # the tool chain: registry, policy, a decision record
            denied = await gate.tool_gate(self.name, self.version, self.roles, call.name,
                                          call.arguments, found.resource)
            if denied is not None:
                return ToolResult(call_id=call.id, name=call.name, failure=ToolFailure(
                    kind="denied", retryable=False, message=denied))
        if isinstance(found, AgentTool):
            return await found.delegate(call)
        result: ToolResult = await found.step(call.id, call.arguments)
        return result

    async def _check(self, pattern: str | None, progress: _Progress) -> None:
        if pattern is None:
            return
        if self.limits.on_loop == "escalate":
            scope = current_scope.get()
            if scope is None:
                raise UsageError("on_loop='escalate' needs the agent to run inside a workflow")
            decision = await scope.run.ctx.wait_for(f"escalation:{self.name}")
            if isinstance(decision, dict) and decision.get("continue") is True:
                progress.reset()
                return
        from ..observability._alerts import alerts

        message = (f"agent {self.name!r} is looping: it {pattern}; change its instructions or "
                   "tools, or raise the limit in Limits")
        alerts().fire("loop_detected", f"{self.name}: {pattern}", message, agent=self.name)
        raise LoopDetected(message, agent=self.name, pattern=pattern)

    def _charge(self, budget: _RunBudget, response: ModelResponse, cost: float) -> None:
        budget.turns += 1
        budget.usage += response.usage
        budget.cost += cost
        run_limits = budget.limits
        for limit, used, allowed in (
            ("turns", budget.turns, run_limits.max_turns),
            ("tokens", budget.usage.total_tokens, run_limits.max_tokens),
            ("cost", round(budget.cost, 6), run_limits.max_cost),
        ):
            if allowed is not None and used > allowed:
                raise UsageLimitExceeded(
                    f"the run's agents used {used} {limit} together (agent {self.name!r} "
                    f"crossed it), over the run's limit of {allowed}; the run stops here; "
                    f"raise limit_run(max_{limit}=...) if this is expected",
                    agent=self.name, limit=limit, used=used, allowed=allowed, scope="run",
                )

    def _over(self, limit: str, used: Any, allowed: Any) -> UsageLimitExceeded:
        return UsageLimitExceeded(
            f"agent {self.name!r} used {used} {limit}, over its limit of {allowed}; the run "
            "stops here; raise Limits(max_" + limit + "=...) if this is expected",
            agent=self.name, limit=limit, used=used, allowed=allowed, scope="agent",
        )


def _first(exc: ValidationError) -> str:
    return safe_error(exc.errors()[0], "output")


class AgentTool(Tool):
    """An agent exposed as a tool: the model gives it a task, it answers with its output."""

    def __init__(self, agent: Agent[Any], *, name: str, description: str,
                 scopes: list[str] | tuple[str, ...] = ()) -> None:
        async def delegate(task: str) -> Any:
            """The task for the specialist, with everything it needs to know."""
            raise AssertionError("delegated through AgentTool.delegate")

        delegate.__doc__ = f"{description}\n\nArgs:\n    task: what {agent.name} should do"
        super().__init__(delegate, name=name, timeout=None, retries=0)
        self.agent = agent
        self.scopes = tuple(scopes)

    async def delegate(self, call: ToolCall) -> ToolResult:
        """Run the specialist in the caller's workflow scope, so its calls are journaled."""
        try:
            task = self.arguments.model_validate_json(call.arguments or "{}").task
        except ValidationError:
            return ToolResult(call_id=call.id, name=self.name, failure=ToolFailure(
                kind="invalid_arguments", retryable=False,
                message=f"{self.name} takes one argument, task: a string",
            ))
        from ..governance._chain import narrowed
        from ..governance._tokens import TokenRejected

        try:
            with narrowed(self.scopes):
                result = await self.agent.run(task)
        except TokenRejected as exc:
            return ToolResult(call_id=call.id, name=self.name, failure=ToolFailure(
                kind="denied", retryable=False, message=f"{self.name}: {exc}"))
        except (UsageLimitExceeded, LoopDetected, OutputInvalid) as exc:
            if exc.fields.get("scope") == "run":  # the run's budget: the whole run stops
                raise
            return ToolResult(call_id=call.id, name=self.name, failure=ToolFailure(
                kind="error", retryable=False, detail=str(exc),
                message=f"{self.name} could not finish the task ({type(exc).__name__})",
            ))
        value = self.agent._output.dump_python(result.output, mode="json")
        return ToolResult(call_id=call.id, name=self.name, value=value, usage=result.usage,
                          cost=result.cost)
