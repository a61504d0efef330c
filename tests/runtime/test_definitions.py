"""Typed workflows and steps: inputs validated on submission, outputs returned as their types."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from pydantic import BaseModel, Field

import corral

calls: Counter[str] = Counter()
holding: set[str] = set()
seen_types: list[str] = []


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    calls.clear()
    holding.clear()
    seen_types.clear()


class Order(BaseModel):
    sku: str
    quantity: int = Field(gt=0)
    unit_price: float = 2.5


class Receipt(BaseModel):
    sku: str
    total: float
    lines: list[str] = []


@corral.step
async def price(order: Order) -> Receipt:
    calls["price"] += 1
    return Receipt(sku=order.sku, total=order.quantity * order.unit_price)


@corral.step
async def add_line(receipt: Receipt, line: str) -> Receipt:
    calls["add_line"] += 1
    if "add_line" in holding:
        await asyncio.get_running_loop().create_future()  # until cancelled by close()
    return receipt.model_copy(update={"lines": [*receipt.lines, line]})


@corral.workflow
async def checkout(ctx: corral.Context, order: Order) -> Receipt:
    seen_types.append(type(order).__name__)
    receipt = await price(order)
    seen_types.append(type(receipt).__name__)
    return await add_line(receipt, f"{order.quantity} x {order.sku}")


async def test_a_typed_workflow_takes_and_returns_models(rt: corral.Runtime) -> None:
    handle = await rt.start(checkout, Order(sku="tea", quantity=2))

    receipt = await handle.result(timeout=5)

    assert receipt == Receipt(sku="tea", total=5.0, lines=["2 x tea"])
    assert seen_types == ["Order", "Receipt"]


async def test_input_given_as_plain_data_is_validated_into_the_model(
    rt: corral.Runtime,
) -> None:
    handle = await rt.start(checkout, {"sku": "tea", "quantity": "3", "unit_price": 1})

    assert await handle.result(timeout=5) == Receipt(sku="tea", total=3.0, lines=["3 x tea"])
    assert seen_types == ["Order", "Receipt"]


async def test_invalid_input_raises_invalid_input_and_creates_no_run(
    rt: corral.Runtime,
) -> None:
    with pytest.raises(corral.InvalidInput) as info:
        await rt.start(checkout, {"sku": "tea", "quantity": 0})

    assert info.value.workflow == "checkout"
    assert "quantity" in str(info.value)
    assert isinstance(info.value, corral.UsageError)
    assert await rt.list_runs() == []
    assert calls == Counter()


async def test_a_model_returned_by_a_step_is_a_model_again_on_replay(
    runtime: Any, wait_until: Any
) -> None:
    holding.add("add_line")
    async with runtime() as rt:
        handle = await rt.start(checkout, Order(sku="jam", quantity=4), id="order-9")
        await wait_until(lambda: calls["add_line"] == 1, what="the second step to start")
    holding.clear()

    async with runtime() as rt:
        again = await rt.start(checkout, Order(sku="jam", quantity=4), id="order-9")
        assert again.id == handle.id
        receipt = await again.result(timeout=5)

    assert receipt == Receipt(sku="jam", total=10.0, lines=["4 x jam"])
    assert seen_types == ["Order", "Receipt", "Order", "Receipt"]  # typed on replay too
    assert calls == Counter(price=1, add_line=2)


async def test_a_handle_made_from_an_id_returns_plain_data(rt: corral.Runtime) -> None:
    handle = await rt.start(checkout, Order(sku="tea", quantity=1))
    await handle.result(timeout=5)

    assert await rt.handle(handle.id).result(timeout=5) == {
        "sku": "tea", "total": 2.5, "lines": ["1 x tea"]}


@corral.workflow
async def takes_nothing(ctx: corral.Context) -> str:
    return ctx.workflow


async def test_a_workflow_without_input_rejects_one(rt: corral.Runtime) -> None:
    assert await rt.run(takes_nothing) == "takes_nothing"

    with pytest.raises(corral.InvalidInput):
        await rt.start(takes_nothing, {"unexpected": True})


@corral.workflow
async def returns_wrong_type(ctx: corral.Context, n: int) -> int:
    return "not a number" if n < 0 else n  # type: ignore[return-value]


async def test_an_output_that_does_not_match_the_annotation_fails_the_run(
    rt: corral.Runtime,
) -> None:
    handle = await rt.start(returns_wrong_type, -1)

    with pytest.raises(corral.RunFailed) as info:  # a corral error, not a pydantic one
        await handle.result(timeout=5)
    assert "not a number" in str(info.value)
    assert (await rt.get(handle.id)).status == "failed"


def test_a_workflow_takes_a_context_and_at_most_one_input() -> None:
    with pytest.raises(corral.UsageError, match="must take"):
        @corral.workflow
        async def too_many(ctx: corral.Context, a: int, b: int) -> None:
            return None
