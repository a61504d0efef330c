"""Supervisor -> specialists, two levels deep: a support manager delegates to team leads, and
the billing lead delegates to a refunds specialist with a real tool. Runs on the simulator: no
network, no keys. Every agent's model calls and tool calls are journaled steps of one run.

    python examples/supervisor.py [--db PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from pydantic import BaseModel

import corral


@corral.tool
async def lookup_invoice(customer_email: str) -> dict[str, Any]:
    """Find a customer's latest invoice.

    Args:
        customer_email: the email the customer signed up with
    """
    return {"invoice": "INV-2041", "email": customer_email, "amount_cents": 4900,
            "status": "paid"}


@corral.tool
async def check_status_page(service: str) -> str:
    """Read the status page for a service."""
    return f"{service}: operational"


refunds = corral.Agent(
    "refunds", model="simulator:default", tools=[lookup_invoice],
    instructions="You decide refunds. Look up the invoice first.",
)
billing_lead = corral.Agent(
    "billing_lead", model="simulator:default", tools=[refunds.as_tool()],
    instructions="You lead billing. Delegate refund questions to the refunds specialist.",
)
tech_lead = corral.Agent(
    "tech_lead", model="simulator:default", tools=[check_status_page],
    instructions="You lead technical support. Check the status page before answering.",
)


class Resolution(BaseModel):
    summary: str
    refund_cents: int


manager = corral.Agent(
    "manager", model="simulator:default", output_type=Resolution,
    tools=[billing_lead.as_tool(), tech_lead.as_tool()],
    instructions="You run the support desk. Delegate to your team leads, then resolve.",
)


@corral.workflow
async def support_desk(ctx: corral.Context, ticket: str) -> dict[str, Any]:
    result = await manager.run(ticket)
    return {"resolution": result.output.model_dump(), "turns": result.turns,
            "tokens": result.usage.total_tokens, "cost_usd": result.cost}


async def main(db: str) -> None:
    async with corral.Runtime(db) as rt:
        handle = await rt.start(support_desk, "ann@example.com was charged twice for March")
        print(json.dumps(await handle.result(), indent=2))
        for entry in rt.store.journal(handle.id):
            print(f"  {entry.key:10} {entry.name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", default=".corral/corral.db")
    asyncio.run(main(parser.parse_args().db))
