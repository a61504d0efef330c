"""An agent inside a workflow is durable: a crash mid-loop repeats no completed call."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import corral
from corral.agents import ModelRequest, ModelResponse, ToolCall, Usage

calls: Counter[str] = Counter()
park: set[str] = set()  # what blocks forever now (the crash happens while it is in flight)


async def _maybe_park(what: str) -> None:
    if what in park:
        await asyncio.Event().wait()


class CountingModel:
    """Calls `fetch` once, then answers; counts every call it really makes."""

    name = "counting"

    async def complete(self, request: ModelRequest) -> ModelResponse:
        answered = any(m.role == "tool" for m in request.messages)
        calls[f"model {int(answered)}"] += 1
        await _maybe_park(f"model {int(answered)}")
        if answered:
            return ModelResponse(model=self.name, content="all done",
                                 usage=Usage(input_tokens=7, output_tokens=3))
        return ModelResponse(model=self.name, usage=Usage(input_tokens=5, output_tokens=2),
                             tool_calls=[ToolCall(id="c1", name="fetch", arguments="{}")])


@corral.tool
async def fetch() -> str:
    """Fetch the data."""
    calls["fetch started"] += 1
    await _maybe_park("fetch")
    calls["fetch done"] += 1
    return "data"


agent = corral.Agent("worker", instructions="do it", model=CountingModel(), tools=[fetch])


@corral.workflow
async def agent_job(ctx: corral.Context, prompt: str) -> dict[str, Any]:
    result = await agent.run(prompt)
    return {"output": result.output, "tokens": result.usage.total_tokens}


async def _crash_while(what: str, runtime: Any) -> list[str]:
    """Crash while ``what`` is in flight, finish the run; return its journal's names."""
    calls.clear()
    park.clear()
    park.add(what)
    async with runtime() as rt:
        handle = await rt.start(agent_job, "go")
        started = "fetch started" if what == "fetch" else what
        while calls[started] == 0:  # wait until the call is in flight
            await asyncio.sleep(0.005)
    park.clear()  # the "crash": the runtime is gone with the call in flight
    async with runtime() as rt:
        result = await rt.handle(handle.id).result(timeout=10)
        assert result == {"output": "all done", "tokens": 17}
        return [entry.name for entry in await rt.journal(handle.id)]


async def test_a_crash_during_a_tool_call_repeats_no_model_call(runtime: Any) -> None:
    await _crash_while("fetch", runtime)
    # the first model call completed before the crash: it is not made again
    assert calls["model 0"] == 1
    # the tool was in flight: executed again (at-least-once), and completed once
    assert (calls["fetch started"], calls["fetch done"]) == (2, 1)
    assert calls["model 1"] == 1


async def test_a_crash_during_the_second_model_call_repeats_no_tool_call(runtime: Any) -> None:
    names = await _crash_while("model 1", runtime)
    assert calls["model 0"] == 1
    assert (calls["fetch started"], calls["fetch done"]) == (1, 1)
    assert calls["model 1"] == 2  # in flight at the crash, so asked again
    assert names.count("worker:model") == 2 and names.count("tool:fetch") == 1


@corral.workflow
async def two_agents_on_a_budget(ctx: corral.Context, max_tokens: int) -> int:
    from corral.agents import limit_run
    from corral.testing import ScriptedModel

    limit_run(max_tokens=max_tokens)
    total = 0
    for name in ("first", "second"):  # 15 tokens each, well under any per-agent limit
        helper = corral.Agent(name, instructions="i", model=ScriptedModel(["ok"]))
        total += (await helper.run("?")).usage.total_tokens
    return total


async def test_a_run_limit_counts_every_agent_of_the_run_together(runtime: Any) -> None:
    async with runtime() as rt:
        assert await rt.run(two_agents_on_a_budget, 40) == 30
        handle = await rt.start(two_agents_on_a_budget, 20)
        try:
            await handle.result(timeout=5)
            raise AssertionError("the run should have stopped")
        except corral.RunFailed as failed:
            assert failed.error_type == "UsageLimitExceeded"
            assert "the run's agents used 30 tokens together" in str(failed)
            assert "agent 'second'" in str(failed)


@corral.tool
async def poll_status() -> str:
    """Check the job's status."""
    return "pending"


@corral.workflow
async def stuck_agent(ctx: corral.Context) -> str:
    from corral.testing import ScriptedModel

    again = {"tool": "poll_status", "args": {}}
    agent = corral.Agent(
        "poller", instructions="i", tools=[poll_status],
        model=ScriptedModel([again, again, again, "gave up polling"]),
        limits=corral.Limits(repeated_tool_call=2, turns_without_news=None,
                             on_loop="escalate"),
    )
    return (await agent.run("is it done?")).output


async def test_a_loop_can_escalate_to_a_human_who_lets_it_carry_on(runtime: Any) -> None:
    async with runtime() as rt:
        handle = await rt.start(stuck_agent)
        while not any(e.name == "escalation:poller" and e.status == "pending"
                      for e in await rt.journal(handle.id)):
            await asyncio.sleep(0.01)
        await rt.signal(handle.id, "escalation:poller", {"continue": True})
        assert await handle.result(timeout=5) == "gave up polling"

        stopped = await rt.start(stuck_agent)
        while not any(e.name == "escalation:poller" for e in await rt.journal(stopped.id)):
            await asyncio.sleep(0.01)
        await rt.signal(stopped.id, "escalation:poller", {"continue": False})
        try:
            await stopped.result(timeout=5)
            raise AssertionError("a human said stop")
        except corral.RunFailed as failed:
            assert failed.error_type == "LoopDetected"
