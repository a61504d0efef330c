"""An OpenAI-compatible chat client: OpenAI, vLLM, llama.cpp's server, Ollama, any base URL.

Tool calls and streaming included. This is the seam the gateway (issue 5) completes with
routing, fallback, caching and budgets.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx

from .._errors import ProviderError, UsageError
from ._messages import Message, ModelRequest, ModelResponse, ToolCall, Usage

DEFAULT_BASE_URL = "https://api.openai.com/v1"


def _message(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def chat_body(model: str, request: ModelRequest) -> dict[str, Any]:
    """A `ModelRequest` as the body of an OpenAI chat completion request."""
    body: dict[str, Any] = {"model": model, "messages": [_message(m) for m in request.messages]}
    if request.tools:
        body["tools"] = [{"type": "function", "function": spec.model_dump()}
                         for spec in request.tools]
    if request.output_schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": request.output_schema}}
    return body


def parse_completion(name: str, data: dict[str, Any]) -> ModelResponse:
    """An OpenAI chat completion as a `ModelResponse` from the model called ``name``."""
    try:
        message = data["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise ProviderError(
            f"{name} answered without a message: {json.dumps(data)[:300]}",
            status=200, body=json.dumps(data)[:2000], headers={},
        ) from None
    calls = [ToolCall(id=c["id"], name=c["function"]["name"],
                      arguments=c["function"].get("arguments") or "")
             for c in message.get("tool_calls") or []]
    return ModelResponse(model=name, content=message.get("content"), tool_calls=calls,
                         usage=_usage(data.get("usage")))


class OpenAIChat:
    """Chat completions over HTTP. ``base_url`` and ``api_key`` default to $OPENAI_BASE_URL and
    $OPENAI_API_KEY; ``stream=True`` reads the answer as server-sent events."""

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0, stream: bool = False, provider: str = "openai") -> None:
        self.model = model
        self.name = f"{provider}:{model}"
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL")
                         or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not self.api_key and self.base_url == DEFAULT_BASE_URL:
            raise UsageError(
                f"model {self.name!r} needs an API key: set OPENAI_API_KEY, or OPENAI_BASE_URL "
                "for a local server (vLLM, Ollama, llama.cpp)"
            )
        self.timeout = timeout
        self.stream = stream

    def _body(self, request: ModelRequest) -> dict[str, Any]:
        body = chat_body(self.model, request)
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(self, request: ModelRequest) -> ModelResponse:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout,
                                     headers=headers) as client:
            if not self.stream:
                response = await client.post("/chat/completions", json=self._body(request))
                self._check(response, response.text)
                return self._parse(response.json())
            async with client.stream("POST", "/chat/completions",
                                     json=self._body(request)) as response:
                if response.status_code >= 400:
                    self._check(response, (await response.aread()).decode(errors="replace"))
                return await self._read_stream(response)

    def _check(self, response: httpx.Response, text: str) -> None:
        if response.status_code < 400:
            return
        status = response.status_code
        raise ProviderError(
            f"{self.name} at {self.base_url} answered HTTP {status}: {text[:300]}",
            status=status, body=text[:2000], headers=dict(response.headers),
            retryable=status in (408, 409, 429) or status >= 500,
        )

    def _parse(self, data: dict[str, Any]) -> ModelResponse:
        return parse_completion(self.name, data)

    async def _read_stream(self, response: httpx.Response) -> ModelResponse:
        content: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        usage = Usage()
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if chunk.get("error"):  # some servers report errors inside a 200 stream
                raise ProviderError(
                    f"{self.name} at {self.base_url} reported an error mid-stream: "
                    f"{json.dumps(chunk['error'])[:300]}",
                    status=200, body=payload[:2000], headers=dict(response.headers),
                    retryable=True,
                )
            if chunk.get("usage"):
                usage = _usage(chunk["usage"])
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    content.append(delta["content"])
                for call in delta.get("tool_calls") or []:
                    slot = calls.setdefault(call.get("index", 0),
                                            {"id": "", "name": "", "arguments": ""})
                    slot["id"] = call.get("id") or slot["id"]
                    function = call.get("function") or {}
                    slot["name"] += function.get("name") or ""
                    slot["arguments"] += function.get("arguments") or ""
        return ModelResponse(
            model=self.name, content="".join(content) or None, usage=usage,
            tool_calls=[ToolCall(**calls[i]) for i in sorted(calls)],
        )


def _usage(data: dict[str, Any] | None) -> Usage:
    data = data or {}
    return Usage(input_tokens=data.get("prompt_tokens", 0),
                 output_tokens=data.get("completion_tokens", 0))
