"""Workflows the cluster tests run, in worker processes too (they import this by path)."""

from __future__ import annotations

import os

import corral
from corral.agents import Message

LOG = os.environ.get("CORRAL_TEST_STEP_LOG", "")


def _log(line: str) -> None:
    if LOG:  # one write per line, O_APPEND: lines of several processes never interleave
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{line}\n".encode())
        finally:
            os.close(fd)


@corral.tool
async def lookup(order: str) -> str:
    """Look an order up."""
    return f"order {order} shipped"


support = corral.Agent("support", instructions="Answer about orders.", tools=[lookup],
                       model=corral.agents.SimulatorModel(latency=0.05))


@corral.step
async def record(run: str, what: str, idempotency_key: str) -> str:
    _log(f"start {os.getpid()} {idempotency_key}")
    _log(f"done {os.getpid()} {idempotency_key}")
    return f"{what} recorded"


@corral.workflow
async def agent_job(ctx: corral.Context, n: int) -> str:
    await record(ctx.run_id, "opened")
    answer = await support.run(f"where is order {n}?")
    await record(ctx.run_id, "answered")
    return answer.output


chatter = corral.Agent("chatter", instructions="Keep the conversation going.",
                       model=corral.agents.SimulatorModel())


@corral.workflow
async def long_chat(ctx: corral.Context, turns: int) -> dict[str, int]:
    history: list[Message] = []
    filler = "and here is some more context about the request, " * 6  # ~300 bytes a message
    sent = 0  # bytes of message text the model calls carried, all turns together
    for i in range(turns):
        asked = [*history, Message(role="user", content=f"turn {i}: {filler}")]
        sent += sum(len(m.content or "") for m in asked)
        result = await chatter.run(asked)
        history = result.messages[1:]  # the conversation so far, without the system prompt
    return {"turns": turns, "messages": len(history), "sent": sent}
