"""An order checkout: reserve stock, charge every line in parallel, wait out a fraud-check
timer, wait for a manager's approval, then ship in a child run.

Every step writes what it did to a side-effect log (CHECKOUT_LOG), so you can see that a step
that completed is never executed again, whatever happens to the process running it.
"""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta

from pydantic import BaseModel

import corral


class Line(BaseModel):
    sku: str
    cents: int


class Order(BaseModel):
    id: str
    lines: list[Line]


class Receipt(BaseModel):
    order_id: str
    charges: list[str]
    approved_by: str
    shipment: str


def effect(what: str) -> None:
    """Record a side effect on the outside world (a payment, a shipment...)."""
    path = os.environ.get("CHECKOUT_LOG", ".corral/checkout-effects.log")
    with open(path, "a") as log:
        log.write(what + "\n")


@corral.step(timeout=10)
async def reserve_stock(order: Order, *, idempotency_key: str) -> int:
    await asyncio.sleep(0.2)
    effect(f"reserve {idempotency_key}")
    return sum(1 for _ in order.lines)


@corral.step(retries=3, timeout=10)
async def charge(order_id: str, line: Line, delay: float, *, idempotency_key: str) -> str:
    await asyncio.sleep(delay)  # the payment provider; it dedupes on the idempotency key
    effect(f"charge {idempotency_key} {line.sku} {line.cents}")
    return f"ch_{order_id}_{line.sku}"


@corral.step
async def book_courier(order_id: str, *, idempotency_key: str) -> str:
    effect(f"ship {idempotency_key}")
    return f"parcel-{order_id}"


@corral.workflow
async def ship(ctx: corral.Context, order_id: str) -> str:
    return await book_courier(order_id)


@corral.workflow
async def checkout(ctx: corral.Context, order: Order) -> Receipt:
    await reserve_stock(order)
    charges = await asyncio.gather(
        *(charge(order.id, line, 0.3 * (i + 1)) for i, line in enumerate(order.lines))
    )
    await ctx.sleep(timedelta(seconds=1))  # fraud-check cool-off: a durable timer
    decision = await ctx.wait_for("approval", timeout=timedelta(days=2))
    if not decision.get("approved"):
        raise corral.NonRetryable(f"order {order.id} was not approved")
    shipment = await ctx.run_child(ship, order.id)
    return Receipt(
        order_id=order.id, charges=charges, approved_by=decision["by"], shipment=shipment
    )
