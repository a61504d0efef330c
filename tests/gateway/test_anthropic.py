"""Anthropic deployments: the gateway in process and over HTTP (the official openai SDK), in
front of a real server that speaks Anthropic's Messages API and is as strict as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from _anthropic_upstream import KEY, WEATHER, AnthropicUpstream

from corral.gateway import Gateway, GatewayError, parse_gateway
from corral.gateway._anthropic import AnthropicProvider
from corral.gateway._config import Deployment
from corral.gateway._ledger import Ledger, report
from corral.gateway._providers import UpstreamError
from corral.stores._migrations import upgrade
from corral.testing import _free_port

NAMES = ("text", "tools", "overloaded", "cut", "error-event", "garbage")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string"}},
                   "required": ["city"]}}}]
QUESTION = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the weather in Paris and Oslo?"}]


def config(url: str, auth: str = "allow_unauthenticated = true") -> str:
    """corral.toml: a deployment per fake model (``tools`` has a base_url ending in /v1, the
    others the bare root: both work), one without a key, aliases, and prices."""
    deployments = "".join(f"""
[[gateway.deployments]]
name = "{name}"
provider = "anthropic"
model = "claude-{name}"
base_url = "{url}{"/v1" if name == "tools" else ""}"
api_key_env = "CORRAL_TEST_ANTHROPIC_KEY"
""" for name in NAMES)
    return f"""
[gateway]
{auth}
retry = {{ attempts = 1 }}
{deployments}
[[gateway.deployments]]
name = "keyless"
provider = "anthropic"
model = "claude-text"
base_url = "{url}"

[gateway.aliases]
claude = ["overloaded", "text"]
junk-first = ["garbage", "text"]
hiccup = ["error-event", "text"]

[gateway.prices.text]
input = 3.0
output = 15.0
cached_input = 0.3
"""


@pytest.fixture(scope="module")
def anthropic() -> Iterator[AnthropicUpstream]:
    server = AnthropicUpstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def gateway(anthropic: AnthropicUpstream, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[Gateway]:
    monkeypatch.setenv("CORRAL_TEST_ANTHROPIC_KEY", KEY)
    gateway = Gateway(parse_gateway(tomllib.loads(config(anthropic.url))["gateway"]))
    yield gateway
    await gateway.close()


def direct(anthropic: AnthropicUpstream) -> AnthropicProvider:
    return AnthropicProvider(Deployment(name="direct", provider="anthropic", model="claude-text",
                                        base_url=anthropic.url,
                                        api_key_env="CORRAL_TEST_ANTHROPIC_KEY"))


def ask(model: str, messages: list[dict[str, Any]] | None = None, **options: Any
        ) -> dict[str, Any]:
    return {"model": model, "messages": messages or [{"role": "user", "content": "hi"}],
            **options}


async def test_a_plain_answer_and_the_request_anthropic_got(
        gateway: Gateway, anthropic: AnthropicUpstream) -> None:
    answer = await gateway.chat(ask("text", [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": "hello"},
        {"role": "user", "content": [
            {"type": "text", "text": "and this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
    ], stop="END", user="u-42", temperature=0.2, stream_options={"include_usage": True}))
    assert answer["model"] == "text" and answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant",
                                               "content": "hello from claude-text: hello and this?"}
    assert answer["choices"][0]["finish_reason"] == "stop"
    sent = anthropic.requests[-1]
    assert sent["system"] == "Be brief.\n\nAnswer in English."
    assert [m["role"] for m in sent["messages"]] == ["user"]  # two user messages merged
    assert sent["messages"][0]["content"][2] == {"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    assert (sent["max_tokens"], sent["stop_sequences"], sent["metadata"]) == (
        4096, ["END"], {"user_id": "u-42"})
    await gateway.chat(ask("text", max_completion_tokens=50))
    assert anthropic.requests[-1]["max_tokens"] == 50


async def test_a_tool_call_round_trip(gateway: Gateway, anthropic: AnthropicUpstream) -> None:
    first = await gateway.chat(ask("tools", QUESTION, tools=TOOLS, tool_choice="required"))
    assert anthropic.requests[-1]["tool_choice"] == {"type": "any"}
    choice = first["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me look that up."
    calls = choice["message"]["tool_calls"]
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in calls] == [("function", "get_weather", {"city": city, "unit": "celsius"})
                                for city in WEATHER]
    results = [{"role": "tool", "tool_call_id": c["id"],
                "content": WEATHER[json.loads(c["function"]["arguments"])["city"]]}
               for c in calls]  # two tool messages: Anthropic wants them in one user message
    final = await gateway.chat(ask("tools", [*QUESTION, choice["message"], *results],
                                   tools=TOOLS))
    assert final["choices"][0]["message"]["content"] == (
        "The weather: 18°C and sunny; 4°C and raining")
    assert final["choices"][0]["finish_reason"] == "stop"
    sent = anthropic.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert [b["type"] for b in sent[1]["content"]] == ["text", "tool_use", "tool_use"]


async def test_usage_counts_cache_reads_and_writes_and_is_priced(
        anthropic: AnthropicUpstream, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CORRAL_TEST_ANTHROPIC_KEY", KEY)
    db = str(tmp_path / "ledger.db")
    upgrade(db)
    gateway = Gateway(parse_gateway(tomllib.loads(config(anthropic.url))["gateway"]),
                      Ledger(db))
    usage = {"prompt_tokens": 130, "completion_tokens": 5, "total_tokens": 135,
             "prompt_tokens_details": {"cached_tokens": 100}}  # 10 new, 20 written, 100 read
    try:
        assert (await gateway.chat(ask("text")))["usage"] == usage
        chunks = [c async for c in gateway.stream(ask("text", stream=True))]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    finally:
        await gateway.close()  # writes the ledger's rows
    [row] = report(db, by="model")
    assert (row["calls"], row["input_tokens"], row["output_tokens"]) == (2, 260, 10)
    assert row["cost"] == pytest.approx(2 * (30 * 3.0 + 100 * 0.3 + 5 * 15.0) / 1e6)


async def test_overloaded_fails_over_to_the_next_deployment(
        gateway: Gateway, anthropic: AnthropicUpstream) -> None:
    before = anthropic.calls["claude-overloaded"]
    answer = await gateway.chat(ask("claude"))
    assert answer["choices"][0]["message"]["content"] == "hello from claude-text: hi"
    chunks = [c async for c in gateway.stream(ask("claude", stream=True))]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"]) == "hello from claude-text: hi"
    assert anthropic.calls["claude-overloaded"] == before + 2
    provider = direct(anthropic)
    with pytest.raises(UpstreamError, match="HTTP 529: overloaded_error") as failed:
        await provider.chat(ask("claude-overloaded"))
    await provider.close()
    assert (failed.value.status, failed.value.retryable, failed.value.retry_after) == (
        529, True, 7.0)


async def test_an_error_event_before_any_content_still_fails_over(gateway: Gateway) -> None:
    chunks = [c async for c in gateway.stream(ask("hiccup", stream=True))]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"]) == "hello from claude-text: hi"
    with pytest.raises(GatewayError, match="mid-stream: overloaded_error") as failed:
        [c async for c in gateway.stream(ask("error-event", stream=True))]
    assert failed.value.status == 502


async def test_a_cut_stream_is_an_error_never_a_short_answer(gateway: Gateway) -> None:
    received: list[dict[str, Any]] = []
    with pytest.raises(GatewayError, match="cut off") as failed:
        async for chunk in gateway.stream(ask("cut", stream=True)):
            received.append(chunk)
    assert failed.value.code == "stream_interrupted"
    assert received and all(c["choices"][0]["finish_reason"] is None for c in received)


async def test_garbage_moves_on_or_fails_as_a_502(gateway: Gateway) -> None:
    answer = await gateway.chat(ask("junk-first"))
    assert answer["choices"][0]["message"]["content"] == "hello from claude-text: hi"
    with pytest.raises(GatewayError, match="not a Messages API response") as failed:
        await gateway.chat(ask("garbage"))
    assert failed.value.status == 502
    with pytest.raises(GatewayError, match="ended before message_stop"):
        [c async for c in gateway.stream(ask("garbage", stream=True))]


async def test_rejected_requests_come_back_as_400s_and_a_bad_key_as_a_502(
        gateway: Gateway, anthropic: AnthropicUpstream) -> None:
    with pytest.raises(GatewayError, match="HTTP 400: invalid_request_error: temperature"
                       ) as rejected:
        await gateway.chat(ask("text", temperature=1.5))  # fine for OpenAI, not Anthropic
    assert rejected.value.status == 400
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    with pytest.raises(GatewayError, match=r"cannot translate.*'input_audio'") as untranslatable:
        await gateway.chat(ask("text", audio))
    assert untranslatable.value.status == 400
    with pytest.raises(GatewayError, match=r"authentication_error.*check the deployment's key"):
        await gateway.chat(ask("keyless"))
    provider = direct(anthropic)
    with pytest.raises(UpstreamError, match="no embeddings API") as embedding:
        await provider.embed({"model": "claude-text", "input": "hi"})
    await provider.close()
    assert (embedding.value.status, embedding.value.retryable) == (400, False)


# Over HTTP, with the official openai SDK ----------------------------------------------------

@pytest.fixture(scope="module")
def client(anthropic: AnthropicUpstream, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[openai.OpenAI]:
    """`corral gateway` as a subprocess in front of the fake Anthropic API."""
    tmp = tmp_path_factory.mktemp("anthropic-gateway")
    (tmp / "corral.toml").write_text(config(anthropic.url, 'master_key_env = "GATEWAY_KEY"'))
    env = {**os.environ, "CORRAL_TEST_ANTHROPIC_KEY": KEY, "GATEWAY_KEY": "sk-gateway",
           "CORRAL_DATABASE_URL": str(tmp / "shared.db")}
    subprocess.run([sys.executable, "-m", "corral", "db", "upgrade"], env=env, check=True,
                   capture_output=True, cwd=tmp)
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "corral", "gateway", "--config", str(tmp / "corral.toml"),
         "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"the gateway did not start: {process.communicate()[1]}"
                                     ) from None
            time.sleep(0.05)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-gateway",
                        max_retries=0)
    process.terminate()
    process.communicate(timeout=30)


def test_the_sdk_streams_a_tool_round_trip(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model="tools", messages=QUESTION,  # type: ignore
                                        tools=TOOLS) as stream:
        fragments = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
        first = stream.get_final_completion()
    assert len(fragments) > 2 * len(WEATHER)  # the arguments came in pieces, put together
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me look that up."
    calls = message.tool_calls or []
    assert [json.loads(c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        {"city": city, "unit": "celsius"} for city in WEATHER]
    results = [{"role": "tool", "tool_call_id": c.id,
                "content": WEATHER[json.loads(c.function.arguments)["city"]]}  # type: ignore
               for c in calls]
    history = [*QUESTION, message.model_dump(exclude_none=True), *results]
    with client.chat.completions.stream(model="tools", messages=history,  # type: ignore
                                        tools=TOOLS) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "The weather: 18°C and sunny; 4°C and raining"
    assert final.usage is not None and final.usage.total_tokens == 135
    plain = client.chat.completions.create(model="claude", messages=QUESTION)  # type: ignore
    assert plain.choices[0].message.content == (
        "hello from claude-text: What is the weather in Paris and Oslo?")


def test_over_http_a_cut_stream_is_an_error_and_a_rejection_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIError, match="cut off"):
        list(client.chat.completions.create(model="cut", messages=QUESTION,  # type: ignore
                                            stream=True))
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="text", messages=QUESTION,  # type: ignore
                                       temperature=1.5)
    with pytest.raises(openai.APIStatusError, match="not a Messages API response") as failed:
        client.chat.completions.create(model="garbage", messages=QUESTION)  # type: ignore
    assert failed.value.status_code == 502
