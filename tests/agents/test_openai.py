"""The OpenAI-compatible client against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import corral
from corral.agents import Message, ModelRequest, resolve_model
from corral.agents._openai import OpenAIChat


class Upstream:
    """A chat-completions server that answers from a script and keeps every request."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, Any]] = []  # (status, JSON body or list of SSE chunks)
        self.requests: list[dict[str, Any]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                upstream.requests.append({"path": self.path, "body": body,
                                          "auth": self.headers.get("Authorization")})
                status, reply = upstream.replies.pop(0)
                self.send_response(status)
                if isinstance(reply, list):  # server-sent events
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    for chunk in reply:
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
                data = json.dumps(reply).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


def _reply(content: str | None = None, calls: list[dict[str, Any]] | None = None,
           tokens: tuple[int, int] = (11, 7)) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["args"])}}
            for i, c in enumerate(calls)
        ]
    return {"choices": [{"index": 0, "message": message}],
            "usage": {"prompt_tokens": tokens[0], "completion_tokens": tokens[1]}}


@corral.tool
async def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


async def test_an_agent_calls_tools_through_an_openai_compatible_server(
    upstream: Upstream,
) -> None:
    upstream.replies = [(200, _reply(calls=[{"name": "weather", "args": {"city": "Oslo"}}])),
                        (200, _reply("It is sunny in Oslo."))]
    model = OpenAIChat("local-model", base_url=upstream.url, api_key="sk-test")
    agent = corral.Agent("a", instructions="Be brief.", model=model, tools=[weather])
    result = await agent.run("Weather in Oslo?")

    assert result.output == "It is sunny in Oslo."
    assert result.usage.total_tokens == 36
    first, second = upstream.requests
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["tools"][0]["function"]["name"] == "weather"
    tool_message = second["body"]["messages"][-1]
    assert tool_message == {"role": "tool", "content": "sunny in Oslo",
                            "tool_call_id": "call_0"}


async def test_a_streamed_answer_is_assembled_from_its_deltas(upstream: Upstream) -> None:
    upstream.replies = [(200, [
        {"choices": [{"delta": {"role": "assistant", "content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}}]},
        {"choices": [{"delta": {"tool_calls": [
            {"index": 0, "id": "call_9", "function": {"name": "weather", "arguments": "{\"ci"}}
        ]}}]},
        {"choices": [{"delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": "ty\": \"Rome\"}"}}]}}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}},
    ])]
    model = OpenAIChat("m", base_url=upstream.url, api_key="k", stream=True)
    response = await model.complete(ModelRequest(messages=[Message(role="user", content="hi")]))
    assert response.content == "Hello"
    assert [(c.id, c.name, json.loads(c.arguments)) for c in response.tool_calls] == [
        ("call_9", "weather", {"city": "Rome"})]
    assert (response.usage.input_tokens, response.usage.output_tokens) == (5, 3)
    assert upstream.requests[0]["body"]["stream"] is True


async def test_an_error_from_the_provider_is_a_typed_error_with_its_status(
    upstream: Upstream,
) -> None:
    upstream.replies = [(401, {"error": {"message": "bad key"}})]
    model = OpenAIChat("m", base_url=upstream.url, api_key="wrong")
    with pytest.raises(corral.ProviderError, match="HTTP 401") as error:
        await model.complete(ModelRequest(messages=[Message(role="user", content="hi")]))
    assert error.value.status == 401 and "bad key" in error.value.body


async def test_the_agent_retries_a_failing_provider_before_giving_up(upstream: Upstream) -> None:
    upstream.replies = [(503, {"error": "overloaded"}), (200, _reply("fine"))]
    model = OpenAIChat("m", base_url=upstream.url, api_key="k")
    result = await corral.Agent("a", instructions="i", model=model).run("?")
    assert result.output == "fine" and len(upstream.requests) == 2


def test_an_openai_model_without_a_key_or_a_base_url_says_what_to_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(corral.UsageError, match="set OPENAI_API_KEY, or OPENAI_BASE_URL"):
        resolve_model("openai:gpt-4o-mini")


def test_a_local_server_is_named_like_openai(monkeypatch: pytest.MonkeyPatch,
                                             upstream: Upstream) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", upstream.url)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    model = resolve_model("openai:llama-3.1-8b")
    assert model.name == "openai:llama-3.1-8b"


async def test_a_client_error_from_the_provider_is_not_retried(upstream: Upstream) -> None:
    upstream.replies = [(401, {"error": {"message": "bad key"}})]
    model = OpenAIChat("m", base_url=upstream.url, api_key="wrong")
    with pytest.raises(corral.StepFailed, match="HTTP 401"):
        await corral.Agent("a", instructions="i", model=model).run("?")
    assert len(upstream.requests) == 1


async def test_an_error_inside_a_stream_is_a_provider_error(upstream: Upstream) -> None:
    upstream.replies = [(200, [{"error": {"message": "model overloaded"}}])]
    model = OpenAIChat("m", base_url=upstream.url, api_key="k", stream=True)
    with pytest.raises(corral.ProviderError, match="mid-stream"):
        await model.complete(ModelRequest(messages=[Message(role="user", content="hi")]))
