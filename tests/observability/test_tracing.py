"""Tracing as a user sees it: a run's trace, assembled from its store, is one tree of
OpenTelemetry GenAI spans (workflow, steps, agent, model calls, tools); exported to a real
OTLP/HTTP receiver on 127.0.0.1, every span arrives once, even across a worker restart that
replays the run; `corral runs show` prints the tree with where the time and money went."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import sqlite3
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus

import corral
from corral import cli
from corral._errors import UsageError
from corral.agents import ModelRequest, ModelResponse, ToolCall, Usage
from corral.config import Config
from corral.gateway import Gateway, parse_gateway
from corral.gateway import install as install_gateway
from corral.gateway._ledger import Ledger
from corral.governance import DecisionLog
from corral.governance._chain import Governance
from corral.governance._chain import install as install_governance
from corral.observability import _tracing
from corral.observability._otlp import OTLPExporter
from corral.observability._spans import Span, run_span_id, trace_id_for
from corral.observability._traces import assemble, summarize
from corral.observability._tracing import Tracing, parse_traceparent
from corral.runtime._temporal import TemporalRuntime
from corral.stores._migrations import upgrade
from corral.stores.sqlite import _SCHEMA, SQLiteStore
from corral.testing import ScriptedModel, TemporalDevServer

if TYPE_CHECKING:
    from conftest import Receiver  # (the receiver fixture is in this folder's conftest.py)


# -- workflows --------------------------------------------------------------------------------

@corral.step
async def prepare(question: str) -> str:
    return question.strip()


@corral.step
async def finish(answer: str) -> str:
    return answer + "."


@corral.step(retries=0)
async def charge(card: str) -> str:
    raise ValueError(f"card {card} was declined")


@corral.tool
async def lookup(order: str) -> str:
    """Look an order up."""
    if order == "missing":
        raise corral.ToolError("there is no such order")
    return f"order {order} shipped yesterday"


PRICES = {"scripted": (1.0, 2.0)}  # USD per million tokens: 10 in + 5 out cost $0.00002
support = corral.Agent("support", instructions="Answer about orders.", tools=[lookup],
                       model=ScriptedModel([]), prices=PRICES)
helper = corral.Agent("helper", instructions="Answer about orders.", tools=[lookup],
                      model="gateway:smart")


@corral.workflow
async def flow(ctx: corral.Context, question: str) -> str:
    return (await support.run(await prepare(question))).output


@corral.workflow
async def flow_with_wait(ctx: corral.Context, question: str) -> str:
    answer = (await support.run(await prepare(question))).output
    await ctx.wait_for("go")
    return await finish(answer)


@corral.workflow
async def ask_helper(ctx: corral.Context, question: str) -> str:
    return (await helper.run(question)).output


@corral.workflow
async def pays(ctx: corral.Context, card: str) -> str:
    return await charge(card)


@corral.workflow
async def child(ctx: corral.Context, question: str) -> str:
    return await prepare(question)


@corral.workflow
async def parent(ctx: corral.Context, question: str) -> str:
    return await ctx.run_child(child, question)


@corral.workflow
async def simple(ctx: corral.Context, question: str) -> str:
    return await prepare(question)


LOOKUP_THEN_ANSWER = [{"tool": "lookup", "args": {"order": "A-1"}}, "order A-1 shipped"]


# -- helpers ----------------------------------------------------------------------------------

@pytest.fixture
def script() -> Iterator[Callable[..., ScriptedModel]]:
    """Give the support agent a fresh ScriptedModel (named "scripted") with these turns."""
    def give(*turns: Any) -> ScriptedModel:
        model = ScriptedModel(list(turns), name="scripted")
        support.model = model
        return model

    yield give
    support.model = ScriptedModel([])


@pytest.fixture
def exporter_to() -> Iterator[Callable[[str], OTLPExporter]]:
    """OTLP exporters, closed after the test whatever it asserted."""
    made: list[OTLPExporter] = []

    def make(url: str) -> OTLPExporter:
        exporter = OTLPExporter(url, interval=0.05)
        made.append(exporter)
        return exporter

    yield make
    for exporter in made:
        exporter.close(timeout=5)


def runtime(db: Path, **options: Any) -> corral.Runtime:
    settings: dict[str, Any] = {"poll_interval": 0.01, "idle_after": 0.05,
                                "durability": "process", **options}
    return corral.Runtime(db, **settings)


async def until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll ``check`` (sync or async) until it is truthy; fail saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def trace_of(db: Path, run_id: str) -> list[Span]:
    store = SQLiteStore(str(db))
    try:
        return assemble(*store.trace(run_id))
    finally:
        store.close()


def named(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


def one(spans: list[Span], name: str) -> Span:
    [span] = named(spans, name)
    return span


def value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [value(item) for item in v.array_value.values]
    return getattr(v, which) if which else None


def attributes(span: PbSpan) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in span.attributes}


def wire(span: PbSpan) -> tuple[str, str, str, str | None]:
    """(name, trace id, span id, parent id) of a received span, as corral spells them."""
    return (span.name, span.trace_id.hex(), span.span_id.hex(),
            span.parent_span_id.hex() or None)


def local(span: Span) -> tuple[str, str, str, str | None]:
    return span.name, span.trace_id, span.span_id, span.parent_id


def show(db: Path, run_id: str, *options: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["runs", "show", run_id, *options, "--db", str(db)])
    assert code == 0
    return out.getvalue()


async def corral_cli(*args: str) -> str:
    """The CLI in a process of its own; its output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


# -- a run's trace ----------------------------------------------------------------------------

async def test_a_runs_trace_is_one_tree_of_genai_spans(
        tmp_path: Path, script: Callable[..., ScriptedModel]) -> None:
    script(*LOOKUP_THEN_ANSWER)
    db = tmp_path / "corral.db"
    async with runtime(db) as rt:
        handle = await rt.start(flow, " where is A-1? ")
        assert await handle.result(timeout=30) == "order A-1 shipped"
    spans = trace_of(db, handle.id)

    assert sorted(s.name for s in spans) == [
        "chat scripted", "chat scripted", "execute_tool lookup", "invoke_agent support",
        "invoke_workflow flow", "step prepare"]
    root = one(spans, "invoke_workflow flow")
    agent = one(spans, "invoke_agent support")
    chats = named(spans, "chat scripted")
    tool = one(spans, "execute_tool lookup")
    assert root.parent_id is None
    assert root.span_id == run_span_id(handle.id)
    assert one(spans, "step prepare").parent_id == root.span_id
    assert agent.parent_id == root.span_id
    assert [s.parent_id for s in [*chats, tool]] == [agent.span_id] * 3
    assert {s.trace_id for s in spans} == {trace_id_for(handle.id)}
    assert len({s.span_id for s in spans}) == len(spans)
    assert {s.status for s in spans} == {"ok"}
    assert chats[0].start <= tool.start <= chats[1].start  # (ordered by start)
    assert agent.start <= chats[0].start and chats[1].end <= agent.end <= root.end

    assert root.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert root.attributes["corral.run.status"] == "completed"
    assert agent.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert agent.attributes["gen_ai.agent.name"] == "support"
    for chat in chats:
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        assert chat.attributes["gen_ai.agent.name"] == "support"
        assert chat.attributes["gen_ai.request.model"] == "scripted"
        assert chat.attributes["gen_ai.usage.input_tokens"] == 10
        assert chat.attributes["gen_ai.usage.output_tokens"] == 5
        assert chat.attributes["corral.cost_usd"] == pytest.approx(2e-5)
    assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
    assert tool.attributes["gen_ai.tool.name"] == "lookup"
    assert tool.attributes["gen_ai.tool.call.id"] == "call_0_0"  # (the model's call's id)
    summary = summarize(spans)
    assert summary["tokens"] == {"input": 20, "output": 10}
    assert summary["cost_usd"] == pytest.approx(4e-5)


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, str]]:
    """The gateway in process: a simulator deployment behind the alias "smart", priced."""
    url = str(tmp_path / "ledger.db")
    upgrade(url)
    gw = Gateway(parse_gateway({
        "allow_unauthenticated": True,
        "deployments": [{"name": "sim", "provider": "simulator", "model": "sim"}],
        "aliases": {"smart": ["sim"]},
        "prices": {"sim": {"input": 1.0, "output": 2.0}},
    }), Ledger(url))
    install_gateway(gw)
    try:
        yield gw, url
    finally:
        install_gateway(None)
        await gw.close()




async def _through_the_gateway(tmp_path: Path, gw: Gateway, url: str
                               ) -> tuple[str, list[Span], list[dict[str, Any]]]:
    db = tmp_path / "corral.db"
    async with runtime(db) as rt:
        handle = await rt.start(ask_helper, "where is order A-1?", tenant="acme")
        assert "shipped yesterday" in await handle.result(timeout=30)
    assert gw.ledger is not None
    await gw.ledger.flush()
    with sqlite3.connect(url) as conn:
        conn.row_factory = sqlite3.Row
        calls = [dict(row) for row in conn.execute("SELECT * FROM corral_costs ORDER BY id")]
    return handle.id, trace_of(db, handle.id), calls


async def test_a_model_call_through_the_gateway_carries_its_provider_cost_and_tenant(
        tmp_path: Path, gateway: tuple[Gateway, str]) -> None:
    run_id, spans, calls = await _through_the_gateway(tmp_path, *gateway)
    chats = named(spans, "chat smart")
    assert len(chats) == len(calls) == 2  # the tool call, then the answer
    agent = one(spans, "invoke_agent helper")
    assert one(spans, "execute_tool lookup").parent_id == agent.span_id
    for chat, call in zip(chats, calls, strict=True):
        assert chat.parent_id == agent.span_id
        a = chat.attributes
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.provider.name"] == "simulator"  # (the deployment's, not "gateway")
        assert a["gen_ai.request.model"] == "smart"
        assert a["gen_ai.response.model"]
        assert a["corral.deployment"] == "sim"
        assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (
            call["input_tokens"], call["output_tokens"])
        assert a["corral.cost_usd"] > 0
        assert a["corral.cost_usd"] == pytest.approx(call["cost"])
    assert summarize(spans)["cost_usd"] == pytest.approx(sum(c["cost"] for c in calls))
    assert {c["tenant"] for c in calls} == {"acme"}
    assert {chat.attributes["corral.tenant"] for chat in chats} == {"acme"}
    root = one(spans, "invoke_workflow ask_helper")
    assert root.attributes["corral.tenant"] == "acme"
    store = SQLiteStore(str(tmp_path / "corral.db"))
    try:
        assert store.get_run(run_id).tenant == "acme"
    finally:
        store.close()


async def test_a_gateway_chat_span_names_the_model_that_answered(
        tmp_path: Path, gateway: tuple[Gateway, str]) -> None:
    _, spans, _ = await _through_the_gateway(tmp_path, *gateway)
    assert {s.attributes["gen_ai.response.model"] for s in named(spans, "chat smart")} == {"sim"}


# -- export, and replay --------------------------------------------------------------------

@pytest.mark.parametrize("export", ["process", "thread"])
async def test_a_run_resumed_by_another_worker_exports_every_span_once(
        tmp_path: Path, receiver: Receiver, exporter_to: Callable[[str], OTLPExporter],
        script: Callable[..., ScriptedModel], export: str) -> None:
    """Through the span shipper (the default) and from the worker's thread."""
    script(*LOOKUP_THEN_ANSWER)
    db = tmp_path / "corral.db"
    first = exporter_to(receiver.url)
    async with runtime(db, tracing=Tracing(exporter=first, export=export)) as rt:
        handle = await rt.start(flow_with_wait, "where is A-1?")
        await until(lambda: _status(rt, handle.id, "waiting"), "the run to wait for 'go'")
    assert first.flush()
    before = sorted(span.name for span in receiver.accepted())
    assert before == ["chat scripted", "chat scripted", "execute_tool lookup",
                      "invoke_agent support", "step prepare"]  # (the wait has not ended)

    second = exporter_to(receiver.url)
    async with runtime(db, tracing=Tracing(exporter=second, export=export)) as rt:  # replays
        await rt.signal(handle.id, "go")
        assert await rt.handle(handle.id).result(timeout=30) == "order A-1 shipped."
    assert second.flush()

    received = receiver.accepted()
    ids = Counter(span.span_id.hex() for span in received)
    assert set(ids.values()) == {1}, f"spans received twice: {ids}"
    assert Counter(span.name for span in received) == {
        "invoke_workflow flow_with_wait": 1, "step prepare": 1, "invoke_agent support": 1,
        "chat scripted": 2, "execute_tool lookup": 1, "wait_for go": 1, "step finish": 1}
    if export == "thread":
        assert (first.sent, second.sent, first.failed + second.failed) == (5, 3, 0)
    stored = trace_of(db, handle.id)
    assert sorted(map(wire, received)) == sorted(map(local, stored))
    assert {span.trace_id.hex() for span in received} == {trace_id_for(handle.id)}
    agent = next(s for s in received if s.name == "invoke_agent support")
    assert attributes(agent)["gen_ai.agent.name"] == "support"
    assert agent.status.code == PbStatus.STATUS_CODE_OK


async def test_a_temporal_run_resumed_by_another_worker_exports_every_span_once(
        temporal_server: TemporalDevServer, receiver: Receiver,
        exporter_to: Callable[[str], OTLPExporter], script: Callable[..., ScriptedModel],
        gateway: tuple[Gateway, str]) -> None:
    """On Temporal the run's spans are exported from the workflow as it executes, never as
    a worker replays its history; they are the spans of its trace, in the caller's trace id,
    and its model calls are on its tenant's account."""
    script(*LOOKUP_THEN_ANSWER)
    exporter = exporter_to(receiver.url)
    _tracing.install(Tracing(exporter=exporter))
    trace_id = "cd" * 16
    queue = f"trace-{uuid.uuid4().hex[:8]}"

    def temporal() -> TemporalRuntime:
        return TemporalRuntime(temporal_server.address, task_queue=queue, shutdown_grace=0.0)

    try:
        async with temporal() as rt:
            handle = await rt.start(flow_with_wait, "where is A-1?", tenant="acme",
                                    trace_id=trace_id)
            await until(lambda: _status(rt, handle.id, "waiting"), "the run to wait for 'go'")
            helped = await rt.start(ask_helper, "where is order A-1?", tenant="acme")
            assert "shipped yesterday" in await helped.result(timeout=30)
        assert exporter.flush()
        assert sorted(s.name for s in receiver.accepted()
                      if s.trace_id.hex() == trace_id) == [
            "chat scripted", "chat scripted", "execute_tool lookup", "invoke_agent support",
            "step prepare"]  # (the wait has not ended)

        async with temporal() as rt:  # a new worker: it replays the run's history
            await rt.signal(handle.id, "go")
            assert await rt.handle(handle.id).result(timeout=30) == "order A-1 shipped."
            trace = assemble(*await rt.trace(handle.id))
            helper_trace = assemble(*await rt.trace(helped.id))
        assert exporter.flush()
    finally:
        _tracing.install(None)

    received = [s for s in receiver.accepted() if s.trace_id.hex() == trace_id]
    ids = Counter(span.span_id.hex() for span in received)
    assert set(ids.values()) == {1}, f"spans received twice: {ids}"
    assert Counter(span.name for span in received) == {
        "invoke_workflow flow_with_wait": 1, "step prepare": 1, "invoke_agent support": 1,
        "chat scripted": 2, "execute_tool lookup": 1, "wait_for go": 1, "step finish": 1}
    assert sorted(map(wire, received)) == sorted(map(local, trace))
    root = one(trace, "invoke_workflow flow_with_wait")
    assert root.attributes["corral.tenant"] == "acme"
    assert summarize(trace)["cost_usd"] == pytest.approx(4e-5)
    gw, url = gateway
    assert gw.ledger is not None
    await gw.ledger.flush()
    with sqlite3.connect(url) as conn:
        charged = conn.execute("SELECT tenant, sum(cost) FROM corral_costs GROUP BY 1").fetchall()
    assert [tenant for tenant, _ in charged] == ["acme"]  # (not "default")
    assert summarize(helper_trace)["cost_usd"] == pytest.approx(charged[0][1])


async def _status(rt: corral.Runtime, run_id: str, status: str) -> bool:
    return (await rt.get(run_id)).status == status


class HeldModel:
    """Calls lookup, then answers once ``release`` is set (the worker stops while it waits)."""

    name = "held"

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.calls += 1
        usage = Usage(input_tokens=10, output_tokens=5)
        if not any(m.role == "tool" for m in request.messages):
            return ModelResponse(model=self.name, usage=usage, tool_calls=[
                ToolCall(id="h1", name="lookup", arguments='{"order": "A-1"}')])
        await self.release.wait()
        return ModelResponse(model=self.name, content="shipped", usage=usage)


async def test_an_agent_interrupted_mid_loop_is_exported_once_from_its_first_start(
        tmp_path: Path, receiver: Receiver, exporter_to: Callable[[str], OTLPExporter],
        script: Callable[..., ScriptedModel]) -> None:
    model = HeldModel()
    support.model = model  # (the script fixture puts a fresh model back after)
    db = tmp_path / "corral.db"
    first = exporter_to(receiver.url)
    async with runtime(db, tracing=Tracing(exporter=first)) as rt:
        handle = await rt.start(flow, "where is A-1?")
        await until(lambda: model.calls == 2, "the second model call")
    assert first.flush()  # the worker stopped in the middle of the agent's loop
    assert sorted(s.name for s in receiver.accepted()) == [
        "chat held", "execute_tool lookup", "step prepare"]

    model.release.set()
    second = exporter_to(receiver.url)
    resumed = time.time()
    async with runtime(db, tracing=Tracing(exporter=second)) as rt:
        assert await rt.handle(handle.id).result(timeout=30) == "shipped"
    assert second.flush()

    received = receiver.accepted()
    assert Counter(s.name for s in received) == {
        "invoke_workflow flow": 1, "step prepare": 1, "invoke_agent support": 1,
        "chat held": 2, "execute_tool lookup": 1}
    assert len({s.span_id for s in received}) == len(received)
    agent = next(s for s in received if s.name == "invoke_agent support")
    first_chat, second_chat = sorted((s for s in received if s.name == "chat held"),
                                     key=lambda s: s.start_time_unix_nano)
    # the agent's span covers its whole loop: from the first worker's call to the second's
    assert agent.start_time_unix_nano <= first_chat.start_time_unix_nano < resumed * 1e9
    assert agent.end_time_unix_nano >= second_chat.end_time_unix_nano
    assert {s.parent_span_id for s in (first_chat, second_chat)} == {agent.span_id}
    assert sorted(map(wire, received)) == sorted(map(local, trace_of(db, handle.id)))


# -- child runs ---------------------------------------------------------------------------------

async def test_a_child_run_is_in_its_parents_trace(tmp_path: Path) -> None:
    db = tmp_path / "corral.db"
    async with runtime(db) as rt:
        handle = await rt.start(parent, "x")
        assert await handle.result(timeout=30) == "x"
    spans = trace_of(db, handle.id)
    assert sorted(s.name for s in spans) == [
        "invoke_workflow child", "invoke_workflow parent", "run_child child", "step prepare"]
    assert {s.trace_id for s in spans} == {trace_id_for(handle.id)}
    child_run = one(spans, "invoke_workflow child")
    assert child_run.attributes["corral.run.id"] != handle.id
    assert one(spans, "step prepare").parent_id == child_run.span_id
    assert one(spans, "run_child child").parent_id == run_span_id(handle.id)
    assert child_run.parent_id is not None  # (in the parent's tree, not a root of its own)


async def test_a_child_runs_span_is_under_its_parents_run_child_span(tmp_path: Path) -> None:
    db = tmp_path / "corral.db"
    async with runtime(db) as rt:
        handle = await rt.start(parent, "x")
        assert await handle.result(timeout=30) == "x"
    spans = trace_of(db, handle.id)
    child_run = one(spans, "invoke_workflow child")
    run_child = one(spans, "run_child child")
    assert run_child.attributes.get("corral.child_run.id") == child_run.attributes[
        "corral.run.id"]
    assert child_run.parent_id == run_child.span_id


async def test_a_child_runs_span_is_exported_under_its_parents_run_child_span(
        tmp_path: Path, receiver: Receiver,
        exporter_to: Callable[[str], OTLPExporter]) -> None:
    db = tmp_path / "corral.db"
    exporter = exporter_to(receiver.url)
    async with runtime(db, tracing=Tracing(exporter=exporter)) as rt:
        handle = await rt.start(parent, "x")
        assert await handle.result(timeout=30) == "x"
    assert exporter.flush()
    received = {span.name: span for span in receiver.accepted()}
    assert exporter.failed == 0
    assert received["invoke_workflow child"].parent_span_id == received[
        "run_child child"].span_id


# -- content ------------------------------------------------------------------------------------

CONTENT_KEYS = {"gen_ai.input.messages", "gen_ai.output.messages",
                "gen_ai.tool.call.arguments", "gen_ai.tool.call.result"}


async def test_prompts_and_answers_are_not_on_spans_by_default(
        tmp_path: Path, script: Callable[..., ScriptedModel]) -> None:
    script({"tool": "lookup", "args": {"order": "bob@example.com"}}, "done")
    db = tmp_path / "corral.db"
    async with runtime(db) as rt:
        handle = await rt.start(flow, "mail bob@example.com")
        assert await handle.result(timeout=30) == "done"
    spans = trace_of(db, handle.id)
    assert len(named(spans, "chat scripted")) == 2
    for span in spans:
        assert not CONTENT_KEYS & set(span.attributes), span.name
    assert "mail" not in json.dumps([s.as_dict() for s in spans])


@pytest.fixture
def content_tracing() -> Iterator[None]:
    _tracing.install(Tracing(content=True))
    yield
    _tracing.install(None)


async def test_with_content_on_chat_and_tool_spans_carry_it_redacted(
        tmp_path: Path, script: Callable[..., ScriptedModel], content_tracing: None) -> None:
    script({"tool": "lookup", "args": {"order": "bob@example.com"}}, "done")
    db = tmp_path / "corral.db"
    async with runtime(db) as rt:
        handle = await rt.start(flow, "mail bob@example.com")
        assert await handle.result(timeout=30) == "done"
    spans = trace_of(db, handle.id)
    first, second = named(spans, "chat scripted")
    tool = one(spans, "execute_tool lookup")

    prompt = json.loads(str(first.attributes["gen_ai.input.messages"]))
    assert [m["role"] for m in prompt] == ["system", "user"]
    assert prompt[1]["content"].startswith("mail ")  # the prompt is there, masked
    answer = json.loads(str(second.attributes["gen_ai.output.messages"]))
    assert answer[0]["role"] == "assistant" and answer[0]["content"] == "done"
    assert "lookup" in str(first.attributes["gen_ai.output.messages"])  # (the tool call)
    assert "gen_ai.tool.call.arguments" in tool.attributes
    assert "gen_ai.tool.call.result" in tool.attributes
    assert "bob@example.com" in prepared_input(db, handle.id)  # (the run itself has it)
    for span in spans:
        assert "bob@example.com" not in json.dumps(span.as_dict()), span.name


def prepared_input(db: Path, run_id: str) -> str:
    with sqlite3.connect(db) as conn:
        [(data,)] = conn.execute("SELECT input FROM runs WHERE id = ?", (run_id,)).fetchall()
    return str(data)


# -- errors -------------------------------------------------------------------------------------

async def test_a_failed_step_and_a_failed_tool_call_are_error_spans(
        tmp_path: Path, receiver: Receiver, exporter_to: Callable[[str], OTLPExporter],
        script: Callable[..., ScriptedModel]) -> None:
    db = tmp_path / "corral.db"
    exporter = exporter_to(receiver.url)
    script({"tool": "lookup", "args": {"order": "missing"}}, "there is no such order")
    async with runtime(db, tracing=Tracing(exporter=exporter)) as rt:
        failed = await rt.start(pays, "4242")
        with pytest.raises(corral.RunFailed):
            await failed.result(timeout=30)
        tool_failed = await rt.start(flow, "where is missing?")
        assert await tool_failed.result(timeout=30) == "there is no such order"
    assert exporter.flush()

    step = one(trace_of(db, failed.id), "step charge")
    assert step.status == "error"
    assert step.attributes["error.type"] == "ValueError"
    assert step.message == "card 4242 was declined"
    root = one(trace_of(db, failed.id), "invoke_workflow pays")
    assert root.status == "error" and root.attributes["corral.run.status"] == "failed"
    assert "card 4242 was declined" in root.message

    tool = one(trace_of(db, tool_failed.id), "execute_tool lookup")
    assert tool.status == "error"
    assert tool.attributes["error.type"] == "error"  # (the failure's kind)
    assert one(trace_of(db, tool_failed.id), "invoke_agent support").status == "ok"

    received = {span.name: span for span in receiver.accepted()}
    sent_step = received["step charge"]
    assert sent_step.status.code == PbStatus.STATUS_CODE_ERROR
    assert sent_step.status.message == "card 4242 was declined"
    assert attributes(sent_step)["error.type"] == "ValueError"
    assert received["execute_tool lookup"].status.code == PbStatus.STATUS_CODE_ERROR
    assert received["invoke_workflow pays"].status.code == PbStatus.STATUS_CODE_ERROR


# -- the CLI ------------------------------------------------------------------------------------

async def test_runs_show_prints_the_trace_tree_with_time_and_cost(
        engine: str, db: str, runtime: Callable[..., Any], request: pytest.FixtureRequest,
        script: Callable[..., ScriptedModel]) -> None:
    """On either engine: Temporal's trace is read from the run's journal, through a worker."""
    script(*LOOKUP_THEN_ANSWER)
    async with runtime() as rt:
        handle = await rt.start(flow, "where is A-1?")
        await handle.result(timeout=30)
        if engine == "temporal":  # (read while this worker serves the run's queue)
            where = ["--engine", f"temporal://{rt.address}?task_queue={rt.task_queue}"]
            text, as_json = [await corral_cli("runs", "show", handle.id, *where, *more)
                             for more in ((), ("--json",))]
    if engine == "embedded":
        text, as_json = show(Path(db), handle.id), show(Path(db), handle.id, "--json")

    lines = text.splitlines()
    trace_at = lines.index(f"trace {trace_id_for(handle.id)}")
    tree = lines[trace_at + 1:trace_at + 7]

    def depth(name: str) -> int:  # where the name starts on its line: how deep it is
        return next(line.index(name) for line in tree if name in line)

    assert tree[0].startswith("  invoke_workflow flow  ")
    assert depth("invoke_workflow flow") < depth("step prepare") == depth("invoke_agent support")
    assert depth("invoke_agent support") < depth("chat scripted") == depth("execute_tool lookup")
    assert sum("chat scripted" in line for line in tree) == 2
    assert any("$0.000020" in line and "10→5 tokens" in line for line in tree)
    [time_line] = [line for line in lines if line.startswith("time ")]
    for component in ("queue", "model", "tool", "steps"):
        assert f" {component} " in time_line
    [cost_line] = [line for line in lines if line.startswith("cost ")]
    assert "$0.000040" in cost_line and "tokens 20 in, 10 out" in cost_line

    trace = json.loads(as_json)["trace"]
    assert trace["trace_id"] == trace_id_for(handle.id)
    assert sorted(s["name"] for s in trace["spans"]) == [
        "chat scripted", "chat scripted", "execute_tool lookup", "invoke_agent support",
        "invoke_workflow flow", "step prepare"]
    assert trace["seconds"]["model"] > 0 and trace["seconds"]["tool"] > 0
    chats = [s for s in trace["spans"] if s["name"] == "chat scripted"]
    assert trace["seconds"]["model"] == pytest.approx(
        sum(s["end"] - s["start"] for s in chats), abs=1e-5)
    assert trace["cost_usd"] == pytest.approx(4e-5)
    assert trace["tokens"] == {"input": 20, "output": 10}


# -- the store's schema -------------------------------------------------------------------------

async def test_a_version_1_database_is_upgraded_and_its_runs_still_read_and_run(
        tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(_SCHEMA + "PRAGMA user_version=1;")
        columns = ("id, workflow, ref, input, input_hash, status, queue, priority, run_at, "
                   "result, created_at, started_at, ended_at, attempts")
        conn.execute(f"INSERT INTO runs ({columns}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                     ("old-done", simple.name, simple.ref, '"a"', "h1", "completed", "default",
                      0, 1_700_000_000.0, '"a"', 1_700_000_000.0, 1_700_000_000.5,
                      1_700_000_001.0, 1))
        conn.execute(f"INSERT INTO runs ({columns}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                     ("old-queued", simple.name, simple.ref, '"b"', "h2", "queued", "default",
                      0, 1_700_000_000.0, None, 1_700_000_000.0, None, None, 0))
        conn.execute("INSERT INTO journal (run_id, key, kind, name, status, value, "
                     "started_at, ended_at, attempts) VALUES (?,?,?,?,?,?,?,?,?)",
                     ("old-done", "0", "step", "prepare", "ok", '"a"', 1_700_000_000.6,
                      1_700_000_000.7, 1))
    conn.close()

    store = SQLiteStore(str(db))
    try:
        old = store.get_run("old-done")
        assert (old.status, old.result, old.tenant, old.trace_id) == (
            "completed", '"a"', None, None)
        spans = assemble(*store.trace("old-done"))
    finally:
        store.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (3,)
        assert conn.execute("SELECT count(*) FROM spans").fetchone() == (0,)
    conn.close()
    assert [(s.name, s.parent_id) for s in spans] == [
        ("invoke_workflow simple", None), ("step prepare", run_span_id("old-done"))]
    assert {s.trace_id for s in spans} == {trace_id_for("old-done")}

    async with runtime(db) as rt:
        assert await rt.handle("old-queued").result(timeout=30) == "b"
        assert await rt.run(simple, " c ") == "c"
    assert [s.name for s in trace_of(db, "old-queued")] == [
        "invoke_workflow simple", "step prepare"]
    assert "invoke_workflow simple" in show(db, "old-done")


# -- decision records ---------------------------------------------------------------------------

def decision_records(shared: str) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(shared)) as conn:
        rows = conn.execute("SELECT data FROM corral_decision_records ORDER BY idx").fetchall()
    return [json.loads(data)["record"] for (data,) in rows]


async def test_a_tool_calls_decision_record_names_its_steps_span(
        tmp_path: Path, script: Callable[..., ScriptedModel]) -> None:
    script(*LOOKUP_THEN_ANSWER)
    shared = str(tmp_path / "shared.db")
    upgrade(shared)
    log = DecisionLog(shared)
    install_governance(Governance(log=log))
    db = tmp_path / "corral.db"
    try:
        async with runtime(db) as rt:
            handle = await rt.start(flow, "where is A-1?")
            assert await handle.result(timeout=30) == "order A-1 shipped"
    finally:
        install_governance(None)
        await log.close()
    [record] = decision_records(shared)
    assert record["kind"] == "tool_call" and record["inputs"]["tool"] == "lookup"

    spans = trace_of(db, handle.id)
    gate = one(spans, "step corral.governance:tool")
    assert (record["trace_id"], record["span_id"]) == (gate.trace_id, gate.span_id)
    assert gate.parent_id == one(spans, "invoke_agent support").span_id
    assert gate.span_id != one(spans, "execute_tool lookup").span_id


@corral.workflow
async def waits_for_go(ctx: corral.Context, item: str) -> Any:
    return await ctx.wait_for("go")


async def test_a_humans_approval_and_cancel_are_in_the_runs_trace_and_tenant(
        tmp_path: Path) -> None:
    """A run submitted with the caller's trace id: the override records join that trace (not
    one derived from the run id) and carry the run's tenant (not governance's default)."""
    shared = str(tmp_path / "shared.db")
    upgrade(shared)
    log = DecisionLog(shared)
    install_governance(Governance(log=log))
    trace_id = "ab" * 16
    try:
        async with runtime(tmp_path / "corral.db") as rt:
            approved = await rt.start(waits_for_go, "x", tenant="acme", trace_id=trace_id)
            await until(lambda: _status(rt, approved.id, "waiting"), "the run to wait")
            await rt.signal(approved.id, "go", True)
            stopped = await rt.start(waits_for_go, "y", tenant="globex")
            await until(lambda: _status(rt, stopped.id, "waiting"), "the other run to wait")
            await rt.cancel(stopped.id)
    finally:
        install_governance(None)
        await log.close()
    overrides = [r for r in decision_records(shared) if r["kind"] == "human_override"]
    assert [(r["decision"], r["run_id"], r["tenant"], r["trace_id"]) for r in overrides] == [
        ("signal:go", approved.id, "acme", trace_id),
        ("cancel", stopped.id, "globex", trace_id_for(stopped.id))]
    assert overrides[0]["span_id"] == run_span_id(approved.id)


# -- traceparent --------------------------------------------------------------------------------

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize("header", [
    f"00-{TRACE}-{PARENT}-01", f"00-{TRACE}-{PARENT}-00", f"  00-{TRACE}-{PARENT}-01  "])
def test_a_w3c_traceparent_gives_the_callers_trace_and_span(header: str) -> None:
    assert parse_traceparent(header) == (TRACE, PARENT)


@pytest.mark.parametrize("header", [
    None, "", "garbage",
    f"01-{TRACE}-{PARENT}-01",  # a version this parser does not know
    f"ff-{TRACE}-{PARENT}-01",
    f"00-{TRACE}-{PARENT}",  # three parts
    f"00-{TRACE}-{PARENT}-01-extra",
    f"00-{TRACE[:-1]}-{PARENT}-01",  # short ids
    f"00-{TRACE}-{PARENT[:-1]}-01",
    f"00-{TRACE}0-{PARENT}-01",  # long ids
    f"00-{TRACE}-{PARENT}0-01",
    f"00-{'0' * 32}-{PARENT}-01",  # all-zero ids are invalid
    f"00-{TRACE}-{'0' * 16}-01",
    f"00-{TRACE[:-1]}g-{PARENT}-01",  # not hex
    f"00-{TRACE}-{PARENT[:-1]}z-01",
    f"00-{TRACE[:-2]}_6-{PARENT}-01",
    f"00-+{TRACE[1:]}-{PARENT}-01",
    f"00- {TRACE[1:]}-{PARENT}-01",
    f"00-{TRACE}-{PARENT}-zz",
])
def test_a_malformed_traceparent_is_ignored(header: str | None) -> None:
    assert parse_traceparent(header) is None


# -- configuration ------------------------------------------------------------------------------

def config(tracing: dict[str, Any] | None = None) -> Config:
    sections = {} if tracing is None else {"observability": {"tracing": tracing}}
    return Config(source="corral.toml", sections=sections)


@pytest.fixture
def built() -> Iterator[list[Tracing]]:
    """Tracing made from config, closed after the test (an exporter has a thread)."""
    made: list[Tracing] = []
    yield made
    for tracing in made:
        tracing.close()


def test_an_unknown_tracing_key_is_named(built: list[Tracing]) -> None:
    with pytest.raises(UsageError) as raised:
        built.append(Tracing.from_config(config({"endpoint": "http://collector:4318"}), env={}))
    message = str(raised.value)
    assert message.startswith("corral.toml: observability.tracing has no 'endpoint'")
    assert "otlp_endpoint" in message


def test_nothing_configured_means_no_exporter(built: list[Tracing]) -> None:
    tracing = Tracing.from_config(config(), env={})
    built.append(tracing)
    assert tracing.exporter is None and tracing.content is False
    assert tracing.service_name == "corral"


def test_the_otlp_endpoint_comes_from_the_environment(built: list[Tracing]) -> None:
    tracing = Tracing.from_config(config(), env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer abc, x-team = support",
        "OTEL_SERVICE_NAME": "support-bot"})
    built.append(tracing)
    assert isinstance(tracing.exporter, OTLPExporter)
    assert tracing.exporter.endpoint == "http://collector:4318/v1/traces"
    assert tracing.exporter.headers["authorization"] == "Bearer abc"
    assert tracing.exporter.headers["x-team"] == "support"
    assert tracing.exporter.resource["service.name"] == "support-bot"
    assert tracing.service_name == "support-bot"


def test_the_config_file_wins_over_the_environment(built: list[Tracing]) -> None:
    tracing = Tracing.from_config(config({
        "otlp_endpoint": "http://near:4318/", "headers_env": "MY_HEADERS", "content": True}),
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://far:4318", "MY_HEADERS": "k=v",
             "OTEL_EXPORTER_OTLP_HEADERS": "other=x"})
    built.append(tracing)
    assert isinstance(tracing.exporter, OTLPExporter)
    assert tracing.exporter.endpoint == "http://near:4318/v1/traces"
    assert tracing.exporter.headers["k"] == "v" and "other" not in tracing.exporter.headers
    assert tracing.content is True


def test_a_base_endpoint_with_a_path_gets_v1_traces_appended(built: list[Tracing]) -> None:
    tracing = Tracing.from_config(config(), env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://otlp.example.com/otlp"})
    built.append(tracing)
    assert isinstance(tracing.exporter, OTLPExporter)
    assert tracing.exporter.endpoint == "https://otlp.example.com/otlp/v1/traces"


@pytest.mark.parametrize("headers", ["authorization", "a=b,=c", "a=b,token"])
def test_malformed_otlp_headers_are_refused(headers: str, built: list[Tracing]) -> None:
    with pytest.raises(UsageError, match="OTLP headers must be name=value pairs"):
        built.append(Tracing.from_config(config(), env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            "OTEL_EXPORTER_OTLP_HEADERS": headers}))


def test_content_must_be_true_or_false(built: list[Tracing]) -> None:
    with pytest.raises(UsageError, match="content must be true or false"):
        built.append(Tracing.from_config(config({"content": "yes"}), env={}))



def test_sampling_keeps_or_leaves_out_whole_traces_by_their_id() -> None:
    half = Tracing(sample=0.5)
    ids = [f"{n:08x}" + "0" * 24 for n in range(0, 2**32, 2**26)]
    kept = [i for i in ids if half.sampled(i)]
    assert 0 < len(kept) < len(ids) and all(half.sampled(i) for i in kept)  # deterministic
    assert all(Tracing(sample=1.0).sampled(i) for i in ids)
    assert not any(Tracing(sample=0.0).sampled(i) for i in ids)
    assert Tracing.from_config(config({"sample": 0.25})).sample == 0.25
    env = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    assert Tracing.from_config(config(), env=env).sample == 0.1
    for bad in (1.5, "lots"):
        with pytest.raises(UsageError, match="sample"):
            Tracing.from_config(config({"sample": bad}))


async def test_a_trace_sampled_out_is_not_exported_and_still_kept_locally(
        tmp_path: Path, receiver: Receiver, exporter_to: Callable[[str], OTLPExporter]) -> None:
    db = tmp_path / "corral.db"
    keep = "0" * 31 + "1"  # under any threshold
    drop = "f" * 32        # over 0.5
    exporter = exporter_to(receiver.url)
    async with runtime(db, tracing=Tracing(exporter=exporter, sample=0.5)) as rt:
        kept = await rt.start(simple, "a", trace_id=keep)
        dropped = await rt.start(simple, "b", trace_id=drop)
        await kept.result(timeout=30)
        await dropped.result(timeout=30)
    assert exporter.flush(10)
    assert {s.trace_id.hex() for s in receiver.accepted()} == {keep}
    assert [s.name for s in trace_of(db, dropped.id)] == ["invoke_workflow simple",
                                                          "step prepare"]


async def test_a_mistake_in_the_tracing_config_stops_the_runtime_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.observability._tracing import install

    (tmp_path / "corral.toml").write_text("[observability.tracing]\nsampel = 0.5\n")
    monkeypatch.setenv("CORRAL_CONFIG", str(tmp_path / "corral.toml"))
    install(None)
    try:
        with pytest.raises(UsageError, match="tracing has no 'sampel'"):
            async with runtime(tmp_path / "corral.db"):
                pass
    finally:
        install(None)
