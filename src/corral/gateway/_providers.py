"""Providers: where a deployment's requests go. Bodies are OpenAI chat completions both ways."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Union

import aiohttp
from pydantic import ValidationError

from ..agents._messages import Message, ModelRequest, ModelResponse, ToolSpec
from ..agents._models import SimulatorModel
from ._config import Deployment

if TYPE_CHECKING:
    from ._anthropic import AnthropicProvider


class UpstreamError(Exception):
    """A deployment failed to answer: ``retryable`` says whether another try may succeed."""

    def __init__(self, message: str, *, status: int = 502, retryable: bool = True,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class OpenAIProvider:
    """Any OpenAI-compatible server: OpenAI, vLLM, llama.cpp, Ollama. One pooled aiohttp
    session (about a third of httpx's CPU per request: bench/gateway_overhead.py), opened on
    first use inside the event loop. ``timeout`` bounds the wait for each read: a hung
    upstream fails, a long stream that keeps sending does not."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self._base = (deployment.base_url or "").rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            key = self.deployment.api_key()
            timeout = self.deployment.timeout
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.deployment.max_connections,
                                               keepalive_timeout=60),
                read_bufsize=1 << 20,  # (a stream may send a whole answer as one line)
                headers={"Authorization": f"Bearer {key}"} if key else {},
                timeout=aiohttp.ClientTimeout(total=None, connect=min(5.0, timeout),
                                              sock_read=timeout),
                json_serialize=json.dumps)
        return self._session

    def _failed(self, response: aiohttp.ClientResponse, text: str) -> UpstreamError:
        status = response.status
        return UpstreamError(
            f"{self.deployment.name} answered HTTP {status}: {text[:300]}",
            status=status, retryable=status in (408, 409, 429) or status >= 500,
            retry_after=_retry_after(response.headers),
        )

    async def _post(self, path: str, body: dict[str, Any]) -> tuple[Any, bytes]:
        """The JSON the deployment answered (None if it is not JSON), and its bytes."""
        try:
            async with self._client().post(self._base + path, json=body) as response:
                raw = await response.read()
                if response.status >= 400:
                    raise self._failed(response, raw.decode(errors="replace"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(f"{self.deployment.name}: {type(exc).__name__}: {exc}") from None
        try:
            return json.loads(raw), raw
        except ValueError:
            return None, raw

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        data, raw = await self._post("/chat/completions", body)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)
                and isinstance(choices[0].get("message"), dict)):
            raise UpstreamError(f"{self.deployment.name} answered what is not a chat "
                                f"completion: {raw[:200].decode(errors='replace')!r}")
        assert isinstance(data, dict)
        return data

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The chunks of a streamed completion; `UpstreamError` if the stream breaks."""
        body = {**body, "stream": True,
                "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
        try:
            async with self._client().post(self._base + "/chat/completions",
                                           json=body) as response:
                if response.status >= 400:
                    text = (await response.read()).decode(errors="replace")
                    raise self._failed(response, text)
                async for raw_line in response.content:
                    line = raw_line.decode(errors="replace")
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    try:
                        chunk = json.loads(payload)
                    except ValueError:
                        raise UpstreamError(f"{self.deployment.name} sent a stream chunk that "
                                            f"is not JSON: {payload[:200]!r}") from None
                    if not isinstance(chunk, dict) or chunk.get("error"):
                        raise UpstreamError(f"{self.deployment.name} reported an error "
                                            f"mid-stream: {payload[:300]}")
                    yield chunk
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # (a line too long)
            raise UpstreamError(f"{self.deployment.name}: the stream broke: "
                                f"{type(exc).__name__}: {exc}") from None
        raise UpstreamError(f"{self.deployment.name}: the stream ended before [DONE]")

    async def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        data, raw = await self._post("/embeddings", body)
        if not (isinstance(data, dict) and isinstance(data.get("data"), list)):
            raise UpstreamError(f"{self.deployment.name} answered what are not embeddings: "
                                f"{raw[:200].decode(errors='replace')!r}")
        return data

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class SimulatorProvider:
    """corral's simulator as an OpenAI-compatible deployment: no network, deterministic."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.model = SimulatorModel(deployment.model)

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            request = self._request(body)
        except (ValidationError, KeyError, TypeError, AttributeError) as exc:
            raise UpstreamError(f"{self.deployment.name} cannot read the request: {exc}",
                                status=400, retryable=False) from None
        answer = await self.model.complete(request)
        return self._completion(answer)

    def _request(self, body: dict[str, Any]) -> ModelRequest:
        messages = [_message(m) for m in body["messages"]]
        called = {c.id: c.name for m in messages for c in m.tool_calls}
        for m in messages:  # OpenAI's tool messages carry the call's id, not the tool's name
            if m.role == "tool" and m.name is None and m.tool_call_id in called:
                m.name = called[m.tool_call_id]
        return ModelRequest(
            messages=messages,
            tools=[ToolSpec(name=t["function"]["name"],
                            description=t["function"].get("description", ""),
                            parameters=t["function"].get("parameters") or {})
                   for t in body.get("tools") or [] if t.get("type") == "function"],
        )

    def _completion(self, answer: ModelResponse) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": answer.content}
        if answer.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for c in answer.tool_calls]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": self.deployment.model,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if answer.tool_calls else "stop"}],
            "usage": {"prompt_tokens": answer.usage.input_tokens,
                      "completion_tokens": answer.usage.output_tokens,
                      "total_tokens": answer.usage.total_tokens},
        }

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for chunk in chunks_of(await self.chat(body)):
            yield chunk

    async def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        """Deterministic embeddings of the input, from the dependency-free hashing embedder."""
        from ._embeddings import HashingEmbedder

        texts = _inputs(body)
        vectors = HashingEmbedder().embed(texts)
        tokens = sum(len(t.split()) for t in texts)
        return {"object": "list", "model": self.deployment.model,
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def close(self) -> None:
        pass


def _inputs(body: dict[str, Any]) -> list[str]:
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise UpstreamError("'input' must be a string or a non-empty array of strings (token "
                            "arrays are not supported by the simulator)", status=400,
                            retryable=False)
    return texts


def chunks_of(done: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole completion as the chunks of a stream: its message, its end, its usage."""
    message = done["choices"][0]["message"]
    base = {"id": done["id"], "object": "chat.completion.chunk", "created": done["created"],
            "model": done["model"]}
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
    return [{**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
            {**base, "choices": [{"index": 0, "delta": {},
                                  "finish_reason": done["choices"][0]["finish_reason"]}]},
            {**base, "choices": [], "usage": done.get("usage")}]


def _message(data: dict[str, Any]) -> Message:
    content = data.get("content")
    if isinstance(content, list):  # content parts: the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return Message.model_validate({
        "role": "system" if data["role"] == "developer" else data["role"],
        "content": content, "tool_call_id": data.get("tool_call_id"), "name": data.get("name"),
        "tool_calls": [{"id": c["id"], "name": c["function"]["name"],
                        "arguments": c["function"].get("arguments") or ""}
                       for c in data.get("tool_calls") or []],
    })


Provider = Union[OpenAIProvider, SimulatorProvider, "AnthropicProvider"]


def provider(deployment: Deployment) -> Provider:
    if deployment.provider == "simulator":
        return SimulatorProvider(deployment)
    if deployment.provider == "anthropic":
        from ._anthropic import AnthropicProvider

        return AnthropicProvider(deployment)
    return OpenAIProvider(deployment)
