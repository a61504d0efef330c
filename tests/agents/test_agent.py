"""The agent loop: tools, output validation, durability, runaway protection."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from pydantic import BaseModel

import corral
from corral.agents import Limits, ModelRequest, ModelResponse, SimulatorModel, Usage
from corral.testing import ScriptedModel

calls: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()


@corral.tool
async def lookup_order(order_id: str) -> dict[str, Any]:
    """Find an order.

    Args:
        order_id: the order's id, like A-1001
    """
    calls[f"lookup {order_id}"] += 1
    return {"order_id": order_id, "status": "shipped"}


class Answer(BaseModel):
    status: str
    eta_days: int


async def test_the_loop_calls_tools_and_returns_a_typed_output() -> None:
    model = ScriptedModel([
        {"tool": "lookup_order", "args": {"order_id": "A-1"}},
        '{"status": "shipped", "eta_days": 2}',
    ])
    agent = corral.Agent("support", instructions="Answer about orders.", model=model,
                         tools=[lookup_order], output_type=Answer)
    result = await agent.run("Where is A-1?")

    assert result.output == Answer(status="shipped", eta_days=2)
    assert (result.turns, calls["lookup A-1"]) == (2, 1)
    assert result.usage == Usage(input_tokens=20, output_tokens=10)
    second = model.requests[1]  # the model saw the tool's result and the schema
    assert json.loads(second.messages[-1].content or "") == {"order_id": "A-1",
                                                             "status": "shipped"}
    assert second.output_schema is not None
    assert model.requests[0].tools[0].parameters["properties"]["order_id"]["description"] == (
        "the order's id, like A-1001")


async def test_an_invalid_output_goes_back_to_the_model_with_the_error_a_bounded_number_of_times(
) -> None:
    model = ScriptedModel(['{"status": "late"}', '{"status": "late", "eta_days": 3}'])
    agent = corral.Agent("a", instructions="i", model=model, output_type=Answer)
    result = await agent.run("?")
    assert result.output.eta_days == 3
    assert "eta_days" in (model.requests[1].messages[-1].content or "")

    stubborn = ScriptedModel(["nope", "still no", "no!"])
    agent = corral.Agent("b", instructions="i", model=stubborn, output_type=Answer,
                         output_retries=2, limits=Limits(repeated_output=None))
    with pytest.raises(corral.OutputInvalid, match="no valid output in 3 tries"):
        await agent.run("?")


@corral.tool(timeout=0.05, retries=1)
async def slow_crm(email: str) -> str:
    """Look up a customer in the CRM."""
    calls["crm"] += 1
    import asyncio

    await asyncio.sleep(1)
    return "never"


@corral.tool(retries=0)
async def broken(email: str) -> str:
    """A tool whose upstream returns an error page."""
    raise RuntimeError("<html>502 Bad Gateway: customer data for bob@example.com</html>")


@corral.tool(retries=0)
async def picky(email: str) -> str:
    """A tool that says what went wrong, in its own words."""
    raise corral.ToolError("no customer with that email")


async def test_tool_failures_reach_the_model_as_typed_errors_never_as_data() -> None:
    model = ScriptedModel([
        [{"tool": "slow_crm", "args": {"email": "a@b.c"}},
         {"tool": "broken", "args": {"email": "a@b.c"}},
         {"tool": "picky", "args": {"email": "a@b.c"}},
         {"tool": "slow_crm", "args": {"email": 42, "extra": 1}},
         {"tool": "nonexistent", "args": {}}],
        "sorry",
    ])
    agent = corral.Agent("a", instructions="i", model=model,
                         tools=[slow_crm, broken, picky])
    await agent.run("?")

    seen = [json.loads(m.content or "")["error"] for m in model.requests[1].messages
            if m.role == "tool"]
    assert [e["kind"] for e in seen] == [
        "timeout", "error", "error", "invalid_arguments", "unknown_tool"]
    assert seen[0] == {"kind": "timeout", "retryable": True,
                       "message": "slow_crm timed out after 0.05s; no data came back"}
    assert calls["crm"] == 2  # retryable: tried again once
    assert "502" not in json.dumps(seen) and "bob@example.com" not in json.dumps(seen)
    assert seen[2]["message"] == "no customer with that email"
    assert "email" in seen[3]["message"]
    assert "lookup_order" not in seen[4]["message"] and "slow_crm" in seen[4]["message"]


class HttpError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}: <html>upstream page</html>")
        self.status_code = status


@corral.tool(retry=corral.RetryPolicy(max_attempts=3, initial_interval=0))
async def flaky_api(n: int) -> str:
    """An API that fails with 503 twice, then works."""
    calls["flaky"] += 1
    if calls["flaky"] < 3:
        raise HttpError(503)
    return "ok"


async def test_retryable_tool_failures_are_retried_before_the_model_hears_of_them() -> None:
    model = ScriptedModel([{"tool": "flaky_api", "args": {"n": 1}}, "done"])
    await corral.Agent("a", instructions="i", model=model, tools=[flaky_api]).run("?")
    assert calls["flaky"] == 3
    assert model.requests[1].messages[-1].content == "ok"


async def test_limits_on_turns_tokens_and_cost_stop_the_run_with_a_typed_error() -> None:
    def forever(request: ModelRequest) -> ModelResponse:
        n = len(request.messages)
        return ModelResponse(model="scripted", usage=Usage(input_tokens=400, output_tokens=100),
                             tool_calls=[{"id": f"c{n}", "name": "lookup_order",  # type: ignore[list-item]
                                          "arguments": json.dumps({"order_id": f"A-{n}"})}])

    no_loops = {"repeated_tool_call": None, "turns_without_news": None}
    agent = corral.Agent("a", instructions="i", model=ScriptedModel([forever] * 9),
                         tools=[lookup_order], limits=Limits(max_turns=3, **no_loops))
    with pytest.raises(corral.UsageLimitExceeded, match="used 3 turns, over its limit of 3") as e:
        await agent.run("?")
    assert (e.value.limit, e.value.used) == ("turns", 3)

    agent = corral.Agent("a", instructions="i", model=ScriptedModel([forever] * 9),
                         tools=[lookup_order], limits=Limits(max_tokens=1200, **no_loops))
    with pytest.raises(corral.UsageLimitExceeded, match="tokens"):
        await agent.run("?")

    agent = corral.Agent("a", instructions="i", model=ScriptedModel([forever] * 9),
                         tools=[lookup_order], prices={"scripted": (1000.0, 1000.0)},
                         limits=Limits(max_cost=1.0, **no_loops))
    with pytest.raises(corral.UsageLimitExceeded, match="cost") as e:
        await agent.run("?")
    assert e.value.used == 1.0 or e.value.used > 1.0


async def test_the_same_tool_call_again_and_again_is_a_loop() -> None:
    same = {"tool": "lookup_order", "args": {"order_id": "A-1"}}
    agent = corral.Agent("a", instructions="i", model=ScriptedModel([same] * 5),
                         tools=[lookup_order], limits=Limits(repeated_tool_call=3))
    with pytest.raises(corral.LoopDetected, match=r"called lookup_order\(.*\) 3 times"):
        await agent.run("?")
    assert calls["lookup A-1"] == 2  # the third identical call was not made


async def test_the_same_answer_again_and_again_is_a_loop() -> None:
    agent = corral.Agent("a", instructions="i", model=ScriptedModel(["x"] * 5),
                         output_type=Answer, output_retries=10,
                         limits=Limits(repeated_output=3))
    with pytest.raises(corral.LoopDetected, match="same answer 3 times"):
        await agent.run("?")


async def test_turns_that_bring_nothing_new_are_a_loop() -> None:
    def alternating(request: ModelRequest) -> ModelResponse:
        n = len(request.messages)
        return ModelResponse(model="m", tool_calls=[{  # type: ignore[list-item]
            "id": f"c{n}", "name": "lookup_order",
            "arguments": json.dumps({"order_id": "A-1" if n % 2 else "A-2"})}])

    agent = corral.Agent("a", instructions="i", model=ScriptedModel([alternating] * 9),
                         tools=[lookup_order],
                         limits=Limits(repeated_tool_call=None, turns_without_news=2))
    with pytest.raises(corral.LoopDetected, match="no new tool results"):
        await agent.run("?")


async def test_the_simulator_calls_its_tools_and_answers_deterministically() -> None:
    agent = corral.Agent("a", instructions="i", model="simulator:default",
                         tools=[lookup_order], output_type=Answer)
    first = await agent.run("Where is order A-1001?")
    second = await corral.Agent("a", instructions="i", model=SimulatorModel("default"),
                                tools=[lookup_order], output_type=Answer).run(
        "Where is order A-1001?")
    assert first.output == second.output
    assert first.turns == 2 and sum(calls.values()) == 2
    assert first.cost > 0


def test_a_model_name_that_is_not_known_says_what_is() -> None:
    with pytest.raises(corral.UsageError,
                       match=r"'simulator:NAME', 'gateway:MODEL' .* or 'openai:MODEL'"):
        corral.Agent("a", instructions="i", model="nope:x")


async def test_malformed_tool_call_json_and_empty_replies_go_back_to_the_model() -> None:
    model = ScriptedModel([
        {"tool": "lookup_order", "args": '{"order_id": "A-1"'},  # cut off: not JSON
        "",  # an empty reply
        "fine",
    ])
    agent = corral.Agent("a", instructions="i", model=model, tools=[lookup_order])
    result = await agent.run("?")
    assert result.output == "fine"
    error = json.loads(model.requests[1].messages[-1].content or "")["error"]
    assert error["kind"] == "invalid_arguments" and "lookup_order" in error["message"]
    assert calls["lookup A-1"] == 0  # never called with arguments that did not validate
    assert "does not match the required output" in (model.requests[2].messages[-1].content or "")


async def test_the_simulator_takes_its_latency_and_token_counts_from_its_settings() -> None:
    import time

    model = SimulatorModel(latency=0.05, input_tokens=1000, output_tokens=200)
    agent = corral.Agent("a", instructions="i", model=model, tools=[lookup_order])
    started = time.perf_counter()
    result = await agent.run("Where is A-7?")
    assert time.perf_counter() - started >= 0.1  # two calls of 50 ms
    assert (result.usage.input_tokens, result.usage.output_tokens) == (2000, 400)
    assert result.cost == pytest.approx((2000 * 0.15 + 400 * 0.60) / 1e6)
