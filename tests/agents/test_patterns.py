"""Crew and graph semantics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import BaseModel

import corral
from corral.agents import END, START, Graph, Task, crew, interrupt
from corral.testing import ScriptedModel


class Counts(BaseModel):
    visits: list[str] = []
    n: int = 0


def _graph() -> Graph[Counts]:
    graph = Graph(Counts, max_steps=10)

    for name in ("a", "b", "join"):
        async def visit(state: Counts, name: str = name) -> dict[str, list[str]]:
            return {"visits": [*state.visits, name]}

        graph.node(visit, name=name)
    graph.edge(START, ["a", "b"])
    graph.edge("a", "join")
    graph.edge("b", "join")
    graph.edge("join", END)
    return graph


async def test_parallel_branches_join_and_the_join_runs_once() -> None:
    final = await _graph().run(Counts())
    # a and b ran in one step on the same state; their updates apply in node order
    assert final.visits.count("join") == 1
    assert final.visits[-1] == "join"


async def test_a_cycle_that_never_ends_stops_at_max_steps() -> None:
    graph = Graph(Counts, max_steps=5)

    @graph.node
    async def spin(state: Counts) -> dict[str, int]:
        return {"n": state.n + 1}

    graph.edge(START, "spin")
    graph.edge("spin", lambda s: "spin" if s.n < 100 else END)
    with pytest.raises(corral.UsageLimitExceeded, match="5 steps without reaching END"):
        await graph.run(Counts())


async def test_an_edge_to_an_unknown_node_says_which_nodes_exist() -> None:
    graph = Graph(Counts)

    @graph.node
    async def only(state: Counts) -> None:
        return None

    graph.edge(START, "only")
    graph.edge("only", lambda s: "typo")
    with pytest.raises(corral.UsageError, match=r"leads to .typo.*the nodes are only"):
        await graph.run(Counts())


async def test_a_sequential_crew_passes_earlier_outputs_to_later_tasks() -> None:
    first = corral.Agent("first", instructions="i", model=ScriptedModel(["facts: 42"]))
    second_model = ScriptedModel(["plan"])
    second = corral.Agent("second", instructions="i", model=second_model)
    result = await crew([Task("find facts", first), Task("make a plan", second)])
    assert result.outputs == ["facts: 42", "plan"]
    assert "first: facts: 42" in (second_model.requests[0].messages[-1].content or "")
    assert result.usage.total_tokens == 30


async def test_interrupt_outside_a_workflow_is_a_usage_error() -> None:
    with pytest.raises(corral.UsageError, match="inside a workflow"):
        await interrupt("approve")


@corral.workflow
async def needs_approval(ctx: corral.Context) -> str:
    graph = Graph(Counts)

    @graph.node
    async def ask(state: Counts) -> dict[str, list[str]]:
        decision = await interrupt("approve")
        return {"visits": [decision]}

    graph.edge(START, "ask")
    graph.edge("ask", END)
    return (await graph.run(Counts())).visits[0]


@pytest.mark.embedded_only  # out of memory: the embedded engine's eviction
async def test_an_interrupt_waits_out_of_memory_and_resumes_on_the_signal(
    tmp_path: Path,
) -> None:
    async with corral.Runtime(tmp_path / "g.db", poll_interval=0.01, idle_after=0.05,
                              durability="process") as rt:
        handle = await rt.start(needs_approval)
        for _ in range(400):  # until it waits in the store, evicted from memory
            if (await rt.get(handle.id)).status == "waiting":
                break
            await asyncio.sleep(0.01)
        assert (await rt.get(handle.id)).status == "waiting"
        await rt.signal(handle.id, "approve", "yes")
        assert await handle.result(timeout=5) == "yes"
