"""Edge cases of the agent layer: budgets through specialists, validator text, timeouts,
graph merges, retries of provider errors, repeated answers, simulator bounds."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, Field, field_validator

import corral
from corral.agents import END, START, Graph, Limits, SimulatorModel, limit_run
from corral.testing import ScriptedModel


@corral.workflow
async def over_budget_through_a_specialist(ctx: corral.Context) -> str:
    limit_run(max_tokens=20)
    specialist = corral.Agent("specialist", instructions="i", model=ScriptedModel(["done"]))
    boss = corral.Agent("boss", instructions="i", tools=[specialist.as_tool()],
                        model=ScriptedModel([{"tool": "specialist", "args": {"task": "x"}},
                                             "ok"]))
    return (await boss.run("go")).output


async def test_a_run_budget_crossed_inside_a_specialist_stops_the_whole_run(
    runtime: Any,
) -> None:
    async with runtime() as rt:
        with pytest.raises(corral.RunFailed, match="the run's agents used 30 tokens"):
            await rt.run(over_budget_through_a_specialist)


class Card(BaseModel):
    number: str

    @field_validator("number")
    @classmethod
    def luhn(cls, value: str) -> str:
        raise ValueError(f"card {value} belongs to SECRET-CUSTOMER")


@corral.tool
async def charge(card: Card) -> str:
    """Charge a card."""
    return "charged"


async def test_a_validators_own_text_never_reaches_the_model() -> None:
    model = ScriptedModel([{"tool": "charge", "args": {"card": {"number": "4111"}}}, "sorry"])
    await corral.Agent("a", instructions="i", model=model, tools=[charge]).run("?")
    seen = model.requests[1].messages[-1].content or ""
    assert "card.number: failed a validation check" in seen
    assert "SECRET" not in seen


@corral.tool(timeout=None, retries=0)
async def socket_timeout() -> str:
    """A tool whose client library times out on its own."""
    raise TimeoutError("read timed out")


async def test_a_timeout_from_a_tool_without_its_own_timeout_is_still_a_timeout() -> None:
    model = ScriptedModel([{"tool": "socket_timeout", "args": {}}, "ok"])
    await corral.Agent("a", instructions="i", model=model, tools=[socket_timeout]).run("?")
    error = json.loads(model.requests[1].messages[-1].content or "")["error"]
    assert error == {"kind": "timeout", "retryable": True,
                     "message": "socket_timeout timed out; no data came back"}


class Two(BaseModel):
    a: int = 0
    b: int = 0


async def test_updates_of_parallel_nodes_merge_whatever_their_form() -> None:
    graph = Graph(Two)

    @graph.node
    async def left(state: Two) -> dict[str, Any]:
        return {"a": 1}

    @graph.node
    async def right(state: Two) -> Two:
        return Two(b=2)  # only the fields it sets count as its update

    graph.edge(START, ["left", "right"])
    graph.edge("left", END)
    graph.edge("right", END)
    assert await graph.run(Two()) == Two(a=1, b=2)


async def test_the_same_invalid_answer_again_and_again_is_a_loop_before_it_is_invalid() -> None:
    class Answer(BaseModel):
        n: int

    agent = corral.Agent("a", instructions="i", model=ScriptedModel(["x"] * 5),
                         output_type=Answer, limits=Limits(repeated_output=3))
    with pytest.raises(corral.LoopDetected):
        await agent.run("?")


async def test_a_usage_error_in_a_step_is_not_retried() -> None:
    calls = 0

    @corral.step(retries=3)
    async def misused() -> None:
        nonlocal calls
        calls += 1
        raise corral.UsageError("wrong")

    with pytest.raises(corral.StepFailed):
        await misused()
    assert calls == 1


async def test_the_simulator_respects_minimums() -> None:
    class Year(BaseModel):
        year: int = Field(ge=1900)
        share: float = Field(ge=5.0)

    result = await corral.Agent("a", instructions="i", model=SimulatorModel(),
                                output_type=Year).run("which year?")
    assert result.output.year >= 1900 and result.output.share >= 5.0
