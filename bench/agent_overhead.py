"""Agent loop overhead: microseconds per turn with a zero-latency scripted model, journaling
included (100 agents at a time, so the figure is the framework's work, not fsync latency; one
agent at a time is reported too); and 1,000 concurrent agents of 10 turns each with a simulated
500 ms model. A turn is a model call plus a tool call, both journaled steps. Last, the bytes
one agent's conversation leaves in the store after 100 and 500 turns.

    python bench/agent_overhead.py [--turns 10] [--agents 200] [--concurrent 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import corral
from corral.agents import ModelRequest, ModelResponse, ToolCall, Usage


@corral.tool
async def echo(text: str) -> str:
    """Repeat the text."""
    return text


class TurnsModel:
    """Calls `echo` for turns-1 turns, then answers; optional latency per call."""

    name = "bench"

    def __init__(self, turns: int, latency: float = 0.0) -> None:
        self.turns, self.latency = turns, latency

    async def complete(self, request: ModelRequest) -> ModelResponse:
        if self.latency:
            await asyncio.sleep(self.latency)
        done = sum(1 for m in request.messages if m.role == "tool")
        usage = Usage(input_tokens=50, output_tokens=10)
        if done + 1 >= self.turns:
            return ModelResponse(model=self.name, content="done", usage=usage)
        return ModelResponse(model=self.name, usage=usage, tool_calls=[
            ToolCall(id=f"c{done}", name="echo", arguments=json.dumps({"text": f"t{done}"}))])


def make_workflow(turns: int, latency: float) -> corral.Workflow[Any, int]:
    agent = corral.Agent("bench", instructions="bench", model=TurnsModel(turns, latency),
                         tools=[echo], limits=corral.Limits(max_turns=turns + 1,
                                                           turns_without_news=None))

    @corral.workflow(name=f"agent_bench_{turns}_{latency}")
    async def run_agent(ctx: corral.Context, n: int) -> int:
        return (await agent.run(f"go {n}")).turns

    return run_agent


async def per_turn(turns: int, agents: int, parallel: int) -> float:
    """Microseconds of wall time per turn, ``parallel`` agents at a time (1: one after another,
    which measures commit latency more than the framework's work)."""
    folder = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    workflow = make_workflow(turns, 0.0)
    try:
        async with corral.Runtime(folder / "bench.db", max_runs=2 * parallel) as rt:
            await rt.run(workflow, -1)  # warm up
            numbers = iter(range(agents))

            async def client() -> None:
                for n in numbers:
                    assert await rt.run(workflow, n) == turns

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(parallel)))
            elapsed = time.perf_counter() - started
    finally:
        shutil.rmtree(folder)
    return elapsed / (agents * turns) * 1e6


async def concurrent(count: int, turns: int, latency: float) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    workflow = make_workflow(turns, latency)
    try:
        async with corral.Runtime(folder / "bench.db", max_runs=count * 2) as rt:
            started = time.perf_counter()
            handles = await asyncio.gather(*(rt.start(workflow, n) for n in range(count)))
            results = await asyncio.gather(*(h.result() for h in handles))
            elapsed = time.perf_counter() - started
            assert results == [turns] * count
    finally:
        shutil.rmtree(folder)
    ideal = turns * latency
    return {"wall_s": round(elapsed, 2), "ideal_s": ideal,
            "ratio_to_ideal": round(elapsed / ideal, 3)}


async def journal_bytes(turns: int) -> int:
    """Bytes one agent's conversation of ``turns`` turns leaves in the store (journal values
    plus blobs): linear in the length of the conversation, since only replies are journaled."""
    folder = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    workflow = make_workflow(turns, 0.0)
    try:
        async with corral.Runtime(folder / "bench.db") as rt:
            await rt.run(workflow, 0)
        with closing(sqlite3.connect(folder / "bench.db")) as db, db:
            journal = db.execute("SELECT SUM(LENGTH(value)) FROM journal").fetchone()[0]
            blobs = db.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM blobs").fetchone()[0]
    finally:
        shutil.rmtree(folder)
    return int(journal + blobs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    micros = sorted(asyncio.run(per_turn(args.turns, args.agents * 10, 100))
                    for _ in range(args.repeat))
    serial = sorted(asyncio.run(per_turn(args.turns, args.agents // 4, 1))
                    for _ in range(args.repeat))
    trials = sorted((asyncio.run(concurrent(args.concurrent, args.turns, args.latency))
                     for _ in range(args.repeat)), key=lambda t: t["wall_s"])
    print(json.dumps({
        "bench": "agent_overhead", "turns": args.turns,
        "us_per_turn_median": round(micros[len(micros) // 2], 1),
        "us_per_turn_trials": [round(m, 1) for m in micros],
        "us_per_turn_one_agent_at_a_time_median": round(serial[len(serial) // 2], 1),
        "concurrent_agents": args.concurrent, "latency_s": args.latency,
        **trials[len(trials) // 2],
        "ratios_to_ideal": [t["ratio_to_ideal"] for t in trials],
        "journal_bytes_by_turns": {n: asyncio.run(journal_bytes(n)) for n in (100, 500)},
    }))


if __name__ == "__main__":
    main()
