"""corral's agents call the gateway in process: same routing, same ledger, no network hop."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import corral
from corral.gateway import Gateway, install, parse_gateway
from corral.gateway._ledger import Ledger, report
from corral.stores._migrations import upgrade


@corral.tool
async def lookup(order: str) -> str:
    """Look an order up."""
    return f"order {order} shipped yesterday"


helper = corral.Agent("helper", instructions="Answer about orders.", tools=[lookup],
                      model="gateway:smart")


@corral.workflow
async def ask_helper(ctx: corral.Context, question: str) -> str:
    return (await helper.run(question)).output


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Gateway, str]]:
    url = str(tmp_path / "ledger.db")
    upgrade(url)
    gw = Gateway(parse_gateway({
        "allow_unauthenticated": True,
        "deployments": [{"name": "sim", "provider": "simulator", "model": "sim"}],
        "aliases": {"smart": ["sim"]},
        "prices": {"sim": {"input": 1.0, "output": 2.0}},
    }), Ledger(url))
    install(gw)
    yield gw, url
    install(None)


async def test_an_agent_in_a_workflow_is_routed_and_costed_by_the_gateway(
    rt: Any, gateway: tuple[Gateway, str]
) -> None:
    gw, url = gateway
    handle = await rt.start(ask_helper, "where is order A-1?")
    assert "shipped yesterday" in await handle.result(timeout=30)
    await gw.ledger.flush()  # type: ignore[union-attr]
    [row] = report(url, by="agent")
    assert (row["agent"], row["calls"]) == ("helper", 2)  # the tool call, then the answer
    assert row["cost"] > 0 and row["unpriced_calls"] == 0
    with sqlite3.connect(url) as conn:
        labels = conn.execute("SELECT DISTINCT tenant, key_id, workflow, run_id, model, "
                              "deployment FROM corral_costs").fetchall()
    assert labels == [("default", "in-process", "ask_helper", handle.id, "smart", "sim")]


async def test_an_unknown_gateway_model_fails_the_step_with_what_exists(
    gateway: tuple[Gateway, str]
) -> None:
    agent = corral.Agent("lost", instructions="i", model="gateway:nope")
    with pytest.raises(corral.StepFailed, match="does not exist; the models are smart, sim"):
        await agent.run("hello")
