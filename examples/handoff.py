"""Handoff: a triage agent hands the conversation to the right specialist, who answers it.

    python examples/handoff.py [--db PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import corral


@corral.tool
async def refund(invoice: str) -> str:
    """Refund an invoice."""
    return f"refund issued for {invoice}"


billing = corral.Agent("billing", model="simulator:default", tools=[refund],
                       instructions="You handle billing: refunds and invoices.")
tech = corral.Agent("tech", model="simulator:default",
                    instructions="You handle technical problems.")
triage = corral.Agent("triage", model="simulator:default", handoffs=[billing, tech],
                      instructions="You route each customer to billing or tech.")


@corral.workflow
async def helpdesk(ctx: corral.Context, message: str) -> dict[str, Any]:
    result = await triage.run(message)
    return {"answered_by": result.agent, "answer": result.output, "turns": result.turns}


async def main(db: str) -> None:
    async with corral.Runtime(db) as rt:
        print(json.dumps(await rt.run(helpdesk, "Please refund invoice INV-7"), indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", default=".corral/corral.db")
    asyncio.run(main(parser.parse_args().db))
