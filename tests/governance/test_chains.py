"""Governance wired into the two chains: the gateway (registry, redaction and its restore,
decision records of model calls and budget stops) and the agent loop's tool calls (registry,
policy, one decision record per call even after a crash and a replay)."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "gateway"))
from _servers import Upstream

import corral
from corral.agents import ModelRequest, ModelResponse, ToolCall, Usage
from corral.gateway import Caller, Gateway, GatewayError, parse_gateway
from corral.governance import DecisionLog, Redactor, parse_policy
from corral.governance._chain import Governance, acting_for, install
from corral.governance._registry import AgentRegistry
from corral.stores._migrations import upgrade


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def shared(tmp_path: Path) -> str:
    """The shared database (records, registry), apart from the runtime's own."""
    url = str(tmp_path / "shared.db")
    upgrade(url)
    return url


def records(db: str) -> list[dict[str, Any]]:
    import json
    import sqlite3

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT data FROM corral_decision_records ORDER BY idx").fetchall()
    return [json.loads(r[0])["record"] for r in rows]


def gateway(upstream: Upstream, governance: Governance, **extra: Any) -> Gateway:
    return Gateway(parse_gateway({
        "allow_unauthenticated": True,
        "deployments": [{"name": "ok", "provider": "openai", "model": "ok",
                         "base_url": upstream.url}],
        "prices": {"ok": {"input": 1000.0, "output": 1000.0}}, **extra}),
        governance=governance)


def ask(text: str, **options: Any) -> dict[str, Any]:
    return {"model": "ok", "messages": [{"role": "user", "content": text}], **options}


SECRET = "Email jane.doe@example.com or call +44 20 7946 0958 about card 4111 1111 1111 1111"


async def test_nothing_personal_leaves_and_the_caller_gets_it_back(upstream: Upstream,
                                                                   shared: str) -> None:
    log = DecisionLog(shared)
    gw = gateway(upstream, Governance(redactor=Redactor(mode="pseudonymize"), log=log))
    try:
        answer = await gw.chat({"model": "ok", "messages": [
            {"role": "system", "content": "You help with refunds."},
            {"role": "user", "content": SECRET}]}, Caller(tenant="acme", agent="support"))
        sent = upstream.bodies[-1]["messages"][-1]["content"]
        for original in ("jane.doe@example.com", "7946 0958", "4111 1111 1111 1111"):
            assert original not in sent
        assert "<EMAIL_1>" in sent
        # the upstream echoes what it got; the caller reads the originals again
        assert answer["choices"][0]["message"]["content"] == f"hello from ok: {SECRET}"
        chunks = [c async for c in gw.stream(ask(SECRET, stream=True))]
        text = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in chunks if c["choices"])
        assert text == f"hello from ok: {SECRET}"
        assert "jane.doe" not in str(upstream.bodies[-1])
    finally:
        await gw.close()
    kept = records(shared)
    assert [r["kind"] for r in kept] == ["model_call", "model_call"]
    assert kept[0]["tenant"] == "acme" and kept[0]["agent"] == "support"
    assert kept[0]["prompt"] == "You help with refunds." and len(kept[0]["prompt_version"]) == 12
    assert kept[1]["prompt"] is None  # (no system message)
    assert "jane.doe" not in str(kept)  # records hold what the provider saw: redacted
    assert DecisionLog(shared).verify().ok


async def test_only_registered_agents_call_the_gateway(upstream: Upstream, shared: str) -> None:
    registry = AgentRegistry(shared)
    registry.register(tenant="acme", name="support", version="2", owner="cx-team")
    log = DecisionLog(shared)
    gw = gateway(upstream, Governance(registry=registry, enforce_registry=True, log=log),
                 budgets=[{"scope": "tenant", "limit": 0.02, "period": "day"}],
                 cache={"exact": True})
    try:
        ok = await gw.chat(ask("hi", max_tokens=3),
                           Caller(tenant="acme", agent="support", agent_version="2"))
        assert ok["choices"][0]["message"]["content"] == "hello from ok: hi"
        for shadow in (Caller(tenant="acme", agent="shadow", agent_version="1"),
                       Caller(tenant="acme", agent="support", agent_version="3"),
                       Caller(tenant="globex", agent="support", agent_version="2"),
                       Caller(tenant="acme")):
            with pytest.raises(GatewayError) as refused:
                await gw.chat(ask("hi"), shadow)
            assert (refused.value.status, refused.value.code) == (403, "agent_not_registered")
        registered = Caller(tenant="acme", agent="support", agent_version="2")
        with pytest.raises(GatewayError, match="registered"):  # streamed: checked too
            [c async for c in gw.stream(ask("hi", stream=True), Caller(tenant="acme"))]
        await gw.chat(ask("hi 2", max_tokens=3), registered)  # $0.016 of $0.02
        with pytest.raises(GatewayError, match="budget exhausted"):
            await gw.chat(ask("hi 3", max_tokens=3), registered)
    finally:
        await gw.close()
    kinds = Counter((r["kind"], r["decision"]) for r in records(shared))
    assert kinds == {("model_call", "stop"): 2, ("policy_decision", "deny"): 5,
                     ("budget_stop", "stop"): 1}


POLICY = """
rules:
  - id: support-tools
    allow: [call]
    on: tool
    roles: [support]
  - id: small-refunds-only
    deny: [call]
    on: tool
    when:
      resource.id: {eq: refund}
      context.args.amount: {gt: 100}
"""

tool_runs: Counter[str] = Counter()
hold = asyncio.Event()


@corral.tool
async def lookup(order: str) -> str:
    """Look an order up."""
    tool_runs["lookup"] += 1
    return f"order {order}: shipped"


@corral.tool
async def refund(order: str, amount: float) -> str:
    """Refund an order."""
    tool_runs["refund"] += 1
    return "refunded"


class RefundModel:
    """Looks the order up and asks for a refund; then, once `hold` is set, answers."""

    name = "refunder"

    async def complete(self, request: ModelRequest) -> ModelResponse:
        results = [m for m in request.messages if m.role == "tool"]
        if not results:
            return ModelResponse(model=self.name, usage=Usage(input_tokens=5, output_tokens=2),
                                 tool_calls=[
                                     ToolCall(id="c1", name="lookup",
                                              arguments='{"order": "A-1"}'),
                                     ToolCall(id="c2", name="refund",
                                              arguments='{"order": "A-1", "amount": 500}')])
        await hold.wait()
        return ModelResponse(model=self.name, content=" | ".join(str(m.content)
                                                                for m in results),
                             usage=Usage(input_tokens=7, output_tokens=3))


support = corral.Agent("support", instructions="help", model=RefundModel(),
                       tools=[lookup, refund], roles=["support"], version="2")


@corral.workflow
async def support_case(ctx: corral.Context, prompt: str) -> str:
    with acting_for("alice"):
        return (await support.run(prompt)).output


async def test_tool_calls_are_decided_by_policy_and_recorded_once(runtime: Any,
                                                                  shared: str) -> None:
    tool_runs.clear()
    hold.clear()
    install(Governance(policy=parse_policy(POLICY), log=DecisionLog(shared)))
    try:
        async with runtime() as rt:
            handle = await rt.start(support_case, "refund A-1")
            while len(records(shared)) < 2:  # both decided; the model's last call is held
                await asyncio.sleep(0.01)
        hold.set()  # the "crash" happened with the run mid-way: a new runtime replays it
        async with runtime() as rt:
            output = await rt.handle(handle.id).result(timeout=30)
    finally:
        install(None)
    assert "order A-1: shipped" in output and "not allowed by policy" in output
    assert "small-refunds-only" in output
    assert tool_runs == {"lookup": 1}  # the refund never ran
    decided = records(shared)
    assert [(r["inputs"]["tool"], r["decision"], r["rule"]) for r in decided] == [
        ("lookup", "allow", "support-tools"), ("refund", "deny", "small-refunds-only")]
    assert {(r["agent"], r["agent_version"], r["acting_for"]) for r in decided} == {
        ("support", "2", "user:alice")}


async def test_an_unregistered_agent_calls_no_tool(runtime: Any, shared: str) -> None:
    tool_runs.clear()
    hold.set()
    install(Governance(registry=AgentRegistry(shared), enforce_registry=True))
    try:
        async with runtime() as rt:
            output = await rt.run(support_case, "refund A-1")
    finally:
        install(None)
    assert tool_runs == {} and "is not registered" in output


@corral.tool(resource="accounts/{account}")
async def read_account(account: str) -> str:
    """Read an account."""
    tool_runs[f"read {account}"] += 1
    return f"account {account}"


class ReaderModel:
    """Reads accounts 42 and 43, then reports what came back."""

    name = "reader"

    async def complete(self, request: ModelRequest) -> ModelResponse:
        results = [m for m in request.messages if m.role == "tool"]
        if results:
            return ModelResponse(model=self.name, content=" | ".join(str(m.content)
                                                                    for m in results))
        return ModelResponse(model=self.name, tool_calls=[
            ToolCall(id=f"r{n}", name="read_account", arguments=f'{{"account": "{n}"}}')
            for n in (42, 43)])


reader = corral.Agent("reader", instructions="read", model=ReaderModel(), tools=[read_account])


class SupervisorModel:
    name = "boss"

    async def complete(self, request: ModelRequest) -> ModelResponse:
        results = [m for m in request.messages if m.role == "tool"]
        if results:
            return ModelResponse(model=self.name, content=str(results[0].content))
        return ModelResponse(model=self.name, tool_calls=[
            ToolCall(id="d1", name="reader", arguments='{"task": "read them"}')])


def supervisor(scopes: tuple[str, ...]) -> corral.Agent[str]:
    return corral.Agent("boss", instructions="delegate", model=SupervisorModel(),
                        tools=[reader.as_tool(scopes=scopes)])


async def test_tool_calls_need_a_capability_token_that_allows_them(shared: str) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from corral.governance._chain import capability
    from corral.governance._tokens import Scope, TokenIssuer

    key = Ed25519PrivateKey.generate()
    issuer = TokenIssuer(key)
    log = DecisionLog(shared)
    install(Governance(capability_keys=[key.public_key()], log=log))
    tool_runs.clear()
    try:
        no_token = (await reader.run("go")).output
        assert no_token.count("needs a capability token") == 2 and not tool_runs
        only_42 = issuer.issue("reader@1", "acme", [Scope.parse("read_account:accounts/42:call")])
        with capability(only_42):
            output = (await reader.run("go")).output
        assert "account 42" in output and "out of scope" in output
        assert tool_runs == {"read 42": 1}
        # a supervisor holding accounts/* hands its specialist accounts/43 only
        wide = issuer.issue("boss@1", "acme", [Scope.parse("*:accounts/*:call"),
                                               Scope.parse("reader:*:call")])
        tool_runs.clear()
        with capability(wide):
            output = (await supervisor(("read_account:accounts/43:call",)).run("go")).output
        assert "account 43" in output and "out of scope" in output
        assert tool_runs == {"read 43": 1}
        narrow_boss = issuer.issue("boss@1", "acme", [
            Scope.parse("reader:*:call"), Scope.parse("read_account:accounts/42:call")])
        with capability(narrow_boss):  # handing on more than it holds: refused
            output = (await supervisor(("read_account:accounts/*:call",)).run("go")).output
        assert "widened" in output
    finally:
        install(None)
        await log.close()
    rules = Counter((r["decision"], r["rule"]) for r in records(shared))
    assert rules == {("deny", "capability"): 4, ("allow", "capability"): 4}


async def test_a_humans_signal_is_recorded(runtime: Any, shared: str) -> None:
    install(Governance(log=DecisionLog(shared)))
    try:
        async with runtime() as rt:
            handle = await rt.start(waits_for_approval, "x")
            await rt.signal(handle.id, "approval", {"approved": True, "by": "bob@example.com"})
            assert await handle.result(timeout=30) == {"approved": True,
                                                       "by": "bob@example.com"}
    finally:
        install(None)
    [record] = records(shared)
    assert record["kind"] == "human_override" and record["decision"] == "signal:approval"
    assert record["run_id"] == handle.id and record["acting_for"].startswith("user:")


@corral.workflow
async def waits_for_approval(ctx: corral.Context, item: str) -> Any:
    return await ctx.wait_for("approval")


def test_corral_logs_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from corral.governance._chain import redact_logs

    redact_logs(Redactor(mode="pseudonymize"))
    try:
        with caplog.at_level(logging.INFO):
            logging.getLogger("corral.gateway").info("refund for %s", "jane.doe@example.com")
            logging.getLogger("elsewhere").info("not ours: %s", "jane.doe@example.com")
    finally:
        redact_logs(None)
    ours, theirs = caplog.records[-2:]
    assert ours.getMessage() == "refund for <EMAIL>"
    assert theirs.getMessage() == "not ours: jane.doe@example.com"
