"""Multi-agent patterns on the durable runtime: crew and graph.

(Supervisor -> specialists is `Agent.as_tool`; handoff is `Agent(handoffs=[...])`.)
Both run as plain workflow code: every model and tool call inside is a journaled step, and a
graph's interrupt is a durable wait for a signal.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from .._errors import UsageError, UsageLimitExceeded
from ..runtime._definitions import current_scope
from ._agent import Agent, AgentResult
from ._messages import Usage

S = TypeVar("S", bound=BaseModel)

START, END = "__start__", "__end__"


@dataclass(frozen=True)
class Task:
    """A crew member's job: what to do, and who does it."""

    description: str
    agent: Agent[Any]


class CrewResult(BaseModel):
    outputs: list[Any]
    results: list[AgentResult[Any]]
    usage: Usage
    cost: float


async def crew(tasks: list[Task], *, process: Literal["sequential", "parallel"] = "sequential"
               ) -> CrewResult:
    """Role-based agents working through tasks: one after another, each seeing the earlier
    outputs (``sequential``), or all at once (``parallel``)."""
    if process == "parallel":
        results = list(await asyncio.gather(*(t.agent.run(t.description) for t in tasks)))
    elif process == "sequential":
        results = []
        for task in tasks:
            prompt = task.description
            if results:
                earlier = "\n".join(f"- {t.agent.name}: {r.output}"
                                    for t, r in zip(tasks, results, strict=False))
                prompt += f"\n\nWhat the crew has done so far:\n{earlier}"
            results.append(await task.agent.run(prompt))
    else:
        raise UsageError(f"process must be 'sequential' or 'parallel', not {process!r}")
    usage = Usage()
    for result in results:
        usage += result.usage
    return CrewResult(outputs=[r.output for r in results], results=results, usage=usage,
                      cost=round(sum(r.cost for r in results), 8))


async def interrupt(name: str, *, timeout: float | None = None, default: Any = None) -> Any:
    """Pause the graph (or any workflow code) until a human answers with the signal ``name``;
    return its value. Durable: the run may wait for days, out of memory."""
    scope = current_scope.get()
    if scope is None:
        raise UsageError("interrupt() waits for a signal, so it must run inside a workflow")
    if timeout is None:
        return await scope.run.ctx.wait_for(name)
    return await scope.run.ctx.wait_for(name, timeout=timeout, default=default)


Node = Callable[[Any], Awaitable[dict[str, Any] | BaseModel | None]]
Router = Callable[[Any], str | list[str]]


class Graph(Generic[S]):
    """Nodes over a typed shared state, run in supersteps.

    Each node is an async function of the state returning an update (a dict of fields, or
    None). The nodes of one step run in parallel on the same state, their updates are applied
    in the order the nodes were added, and the next step runs every node an edge leads to, once:
    so parallel branches join. Cycles are allowed; ``max_steps`` bounds them.
    """

    def __init__(self, state: type[S], *, max_steps: int = 25) -> None:
        self.state = state
        self.max_steps = max_steps
        self.nodes: dict[str, Node] = {}
        self.edges: dict[str, list[str | Router]] = {}

    def node(self, fn: Node | None = None, *, name: str | None = None) -> Any:
        def add(f: Node) -> Node:
            key = name or f.__name__
            if key in (START, END) or key in self.nodes:
                raise UsageError(f"graph node name {key!r} is reserved or taken")
            self.nodes[key] = f
            return f

        return add(fn) if fn is not None else add

    def add_agent(self, agent: Agent[Any], *, prompt: Callable[[S], str], output: str,
                  name: str | None = None) -> None:
        """A node that runs an agent on a prompt made from the state and stores its output."""

        async def run_agent(state: S) -> dict[str, Any]:
            return {output: (await agent.run(prompt(state))).output}

        self.node(run_agent, name=name or agent.name)

    def edge(self, source: str, target: str | list[str] | Router) -> None:
        """``target``: a node, several nodes (parallel branches), or a function of the state
        that names the next node(s) (a conditional edge); END ends the graph."""
        targets = target if isinstance(target, list) else [target]
        self.edges.setdefault(source, []).extend(targets)

    def _next(self, done: list[str], state: S) -> list[str]:
        following: list[str] = []
        for source in done:
            for target in self.edges.get(source, []):
                chosen = target(state) if callable(target) else target
                for name in chosen if isinstance(chosen, list) else [chosen]:
                    if name != END and name not in self.nodes:
                        raise UsageError(f"an edge from {source!r} leads to {name!r}, which is "
                                         f"not a node; the nodes are {', '.join(self.nodes)}")
                    if name not in following:
                        following.append(name)
        order = list(self.nodes)
        return sorted((n for n in following if n != END), key=order.index)

    async def run(self, state: S) -> S:
        """Run from START until no edge leads anywhere but END."""
        frontier = self._next([START], state)
        steps = 0
        while frontier:
            steps += 1
            if steps > self.max_steps:
                raise UsageLimitExceeded(
                    f"graph ran {self.max_steps} steps without reaching END; a cycle does not "
                    "end: check its conditional edges, or raise max_steps",
                    limit="steps", used=steps - 1, allowed=self.max_steps,
                )
            updates = await asyncio.gather(*(self._call(name, state) for name in frontier))
            for update in updates:
                if update is None:
                    continue
                fields = (update.model_dump(exclude_unset=True)
                          if isinstance(update, BaseModel) else update)
                state = self.state.model_validate({**state.model_dump(), **fields})
            frontier = self._next(frontier, state)
        return state

    async def _call(self, name: str, state: S) -> dict[str, Any] | BaseModel | None:
        result = self.nodes[name](state.model_copy(deep=True))
        return await result if inspect.isawaitable(result) else result
