"""A crew: role-based agents working through tasks, in sequence (each sees what the others did)
and in parallel.

    python examples/crew.py [--db PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import corral
from corral.agents import Task, crew

analyst = corral.Agent("analyst", model="simulator:default",
                       instructions="You are a market analyst. Be precise.")
strategist = corral.Agent("strategist", model="simulator:default",
                          instructions="You turn analysis into a plan.")
critic = corral.Agent("critic", model="simulator:default",
                      instructions="You find the weak points of a plan.")


@corral.workflow
async def plan_launch(ctx: corral.Context, product: str) -> dict[str, Any]:
    sequential = await crew([
        Task(f"Analyse the market for {product}", analyst),
        Task(f"Plan the launch of {product}", strategist),
        Task(f"Criticise the launch plan for {product}", critic),
    ], process="sequential")
    parallel = await crew([
        Task(f"Risks of launching {product} in Europe", analyst),
        Task(f"Risks of launching {product} in Asia", analyst),
    ], process="parallel")
    return {"sequential": sequential.outputs, "parallel": parallel.outputs,
            "cost_usd": round(sequential.cost + parallel.cost, 8)}


async def main(db: str) -> None:
    async with corral.Runtime(db) as rt:
        print(json.dumps(await rt.run(plan_launch, "a durable agent platform"), indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", default=".corral/corral.db")
    asyncio.run(main(parser.parse_args().db))
