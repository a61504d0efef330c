"""Anthropic's Messages API as a deployment: OpenAI chat completions in, the same out.

``base_url`` is the API's root, as in Anthropic's own SDK (``https://api.anthropic.com``); a
root ending in ``/v1`` works too. Requests go to ``{root}/v1/messages`` with the deployment's
key as ``x-api-key``.

What translates: system and developer messages become the top-level ``system``; assistant tool
calls become ``tool_use`` blocks and tool messages ``tool_result`` blocks in a user message;
messages of the same role in a row are merged (Anthropic wants the roles to alternate); text
and image parts (``data:`` or http URLs); tools, ``tool_choice``, ``parallel_tool_calls``,
``max_tokens`` or ``max_completion_tokens`` (default `DEFAULT_MAX_TOKENS`, since Anthropic
requires one), ``temperature``, ``top_p``, ``stop``, ``user``. Other OpenAI options are
dropped. Prompt tokens count cache reads and writes; cache reads are the cached tokens.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from ._config import Deployment
from ._providers import UpstreamError, _retry_after

DEFAULT_MAX_TOKENS = 4096
API_VERSION = "2023-06-01"

_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
           "max_tokens": "length", "tool_use": "tool_calls", "refusal": "content_filter"}
_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
           "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429,
           "api_error": 500, "overloaded_error": 529}


def _retryable(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


class AnthropicProvider:
    """Anthropic's Messages API (or a server that speaks it). One pooled client."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        root = (deployment.base_url or "").rstrip("/").removesuffix("/v1")
        key = deployment.api_key()
        self._client = httpx.AsyncClient(
            base_url=root,
            headers={"anthropic-version": API_VERSION, **({"x-api-key": key} if key else {})},
            timeout=httpx.Timeout(deployment.timeout, connect=min(5.0, deployment.timeout)),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
        )

    def _request(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return to_messages(body)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise UpstreamError(f"{self.deployment.name} cannot translate the request for "
                                f"Anthropic: {type(exc).__name__}: {exc}", status=400,
                                retryable=False) from None

    def _failed(self, response: httpx.Response, text: str) -> UpstreamError:
        status = response.status_code
        with contextlib.suppress(ValueError, KeyError, TypeError):  # Anthropic's shape
            error = json.loads(text)["error"]
            text = f"{error['type']}: {error['message']}"
        return UpstreamError(f"{self.deployment.name} answered HTTP {status}: {text[:300]}",
                             status=status, retryable=_retryable(status),
                             retry_after=_retry_after(response.headers))

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        request = self._request(body)
        try:
            response = await self._client.post("/v1/messages", json=request)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{self.deployment.name}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise self._failed(response, response.text)
        try:
            return from_message(response.json())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UpstreamError(f"{self.deployment.name} answered what is not a Messages API "
                                f"response: {response.text[:200]!r}") from None

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The chunks of a streamed completion; `UpstreamError` if the stream breaks. The
        first chunk waits for the first content, so an error before it can still fail over."""
        request = {**self._request(body), "stream": True}
        name = self.deployment.name
        try:
            async with self._client.stream("POST", "/v1/messages", json=request) as response:
                if response.status_code >= 400:
                    raise self._failed(response, (await response.aread()).decode(errors="replace"))
                state = _Stream(name)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # (the "event:" lines repeat the data's type)
                    try:
                        event = json.loads(line[5:])
                        chunks = state.feed(event)
                    except (ValueError, KeyError, TypeError, AttributeError):
                        raise UpstreamError(f"{name} sent a stream event that is not in the "
                                            f"Messages API's shape: {line[:200]!r}") from None
                    for chunk in chunks:
                        yield chunk
                    if state.done:
                        return
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{name}: the stream broke: {type(exc).__name__}: {exc}"
                                ) from None
        raise UpstreamError(f"{name}: the stream ended before message_stop")

    async def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        raise UpstreamError(f"{self.deployment.name} is an Anthropic deployment, and Anthropic "
                            "has no embeddings API; serve embeddings from an OpenAI-compatible "
                            "deployment", status=400, retryable=False)

    async def close(self) -> None:
        await self._client.aclose()


# Requests -------------------------------------------------------------------------------------

def to_messages(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completions request as a Messages API request."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for m in body["messages"]:
        role = m["role"]
        if role in ("system", "developer"):
            system.append(_text(m.get("content")))
            continue
        if role == "tool":
            role, blocks = "user", [_tool_result(m)]
        elif role == "assistant":
            blocks = _blocks(m.get("content")) + [
                {"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                 "input": _arguments(c["function"].get("arguments"))}
                for c in m.get("tool_calls") or []]
        elif role == "user":
            blocks = _blocks(m.get("content"))
        else:
            raise ValueError(f"unknown role {role!r}")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:  # a user turn's tool results come before anything else in it
        turn["content"].sort(key=lambda b: b["type"] != "tool_result")

    request: dict[str, Any] = {
        "model": body["model"], "messages": turns,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens")
        or DEFAULT_MAX_TOKENS,
    }
    if system:
        request["system"] = "\n\n".join(system)
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p")):
        if body.get(ours) is not None:
            request[theirs] = body[ours]
    if stop := body.get("stop"):
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("user"):
        request["metadata"] = {"user_id": body["user"]}
    tools = [t["function"] for t in body.get("tools") or [] if t.get("type") == "function"]
    if tools:
        request["tools"] = [
            {"name": f["name"], **({"description": f["description"]} if f.get("description")
                                   else {}),
             "input_schema": f.get("parameters") or {"type": "object", "properties": {}}}
            for f in tools]
        choice = _tool_choice(body.get("tool_choice"))
        if body.get("parallel_tool_calls") is False and choice.get("type") != "none":
            choice = {**choice, "disable_parallel_tool_use": True}
        if choice != {"type": "auto"}:
            request["tool_choice"] = choice
    return request


def _text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p["text"] for p in content if p.get("type") == "text")


def _blocks(content: Any) -> list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type")
        if kind == "text" and part["text"]:
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append({"type": "image", "source": _image(part["image_url"]["url"])})
        elif kind not in ("text", "refusal"):
            raise ValueError(f"Anthropic takes no {kind!r} content parts")
    return blocks


def _image(url: str) -> dict[str, Any]:
    if not url.startswith("data:"):
        return {"type": "url", "url": url}
    header, _, data = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if encoding != "base64":
        raise ValueError("an image data: URL must be base64")
    return {"type": "base64", "media_type": media_type, "data": data}


def _tool_result(message: dict[str, Any]) -> dict[str, Any]:
    block = {"type": "tool_result", "tool_use_id": message["tool_call_id"]}
    text = _text(message.get("content"))
    return {**block, "content": text} if text else block


def _arguments(arguments: str | None) -> dict[str, Any]:
    parsed = json.loads(arguments or "{}")
    if not isinstance(parsed, dict):
        raise ValueError(f"a tool call's arguments must be a JSON object, not {arguments!r}")
    return parsed


def _tool_choice(choice: Any) -> dict[str, Any]:
    if choice is None or choice == "auto":
        return {"type": "auto"}
    if choice in ("none", "required"):
        return {"type": "none" if choice == "none" else "any"}
    return {"type": "tool", "name": choice["function"]["name"]}


# Responses ------------------------------------------------------------------------------------

def usage(anthropic: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's usage in OpenAI's terms: cache reads and writes are prompt tokens too."""
    cached = int(anthropic.get("cache_read_input_tokens") or 0)
    prompt = (int(anthropic.get("input_tokens") or 0) + cached
              + int(anthropic.get("cache_creation_input_tokens") or 0))
    completion = int(anthropic.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def from_message(data: Any) -> dict[str, Any]:
    """A Messages API response as a chat completion; KeyError/TypeError if it is not one."""
    if data["type"] != "message" or not isinstance(data["content"], list):
        raise TypeError("not a message")
    text = "".join(b["text"] for b in data["content"] if b["type"] == "text")
    calls = [{"id": b["id"], "type": "function",
              "function": {"name": b["name"], "arguments": json.dumps(b["input"])}}
             for b in data["content"] if b["type"] == "tool_use"]
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls
                               else None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": data["id"], "object": "chat.completion", "created": int(time.time()),
        "model": data.get("model"),
        "choices": [{"index": 0, "message": message,
                     "finish_reason": _FINISH.get(data.get("stop_reason") or "", "stop")}],
        "usage": usage(data["usage"]),
    }


class _Stream:
    """Messages API stream events in, chat completion chunks out."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.base: dict[str, Any] = {}
        self.usage: dict[str, Any] = {}
        self.tools: dict[int, int] = {}  # content block index -> tool call index
        self.finish = "stop"
        self.started = False
        self.done = False

    def _chunk(self, delta: dict[str, Any]) -> dict[str, Any]:
        if not self.started:
            delta, self.started = {"role": "assistant", **delta}, True
        return {**self.base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event["type"]
        if kind == "message_start":
            message = event["message"]
            self.base = {"id": message["id"], "object": "chat.completion.chunk",
                         "created": int(time.time()), "model": message.get("model")}
            self.usage = dict(message.get("usage") or {})
        elif kind == "content_block_start":
            block = event["content_block"]
            if block["type"] == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            if block["type"] == "tool_use":
                index = self.tools[event["index"]] = len(self.tools)
                return [self._chunk({"tool_calls": [{
                    "index": index, "id": block["id"], "type": "function",
                    "function": {"name": block["name"], "arguments": ""}}]})]
        elif kind == "content_block_delta":
            delta = event["delta"]
            if delta["type"] == "text_delta" and delta["text"]:
                return [self._chunk({"content": delta["text"]})]
            if delta["type"] == "input_json_delta" and delta["partial_json"]:
                return [self._chunk({"tool_calls": [{
                    "index": self.tools[event["index"]],
                    "function": {"arguments": delta["partial_json"]}}]})]
        elif kind == "message_delta":
            self.finish = _FINISH.get(event["delta"].get("stop_reason") or "", "stop")
            self.usage.update({k: v for k, v in (event.get("usage") or {}).items()
                               if v is not None})
        elif kind == "message_stop":
            self.done = True
            finish = self._chunk({})
            finish["choices"][0]["finish_reason"] = self.finish
            return [finish, {**self.base, "choices": [], "usage": usage(self.usage)}]
        elif kind == "error":
            error = event["error"]
            status = _STATUS.get(error.get("type"), 500)
            raise UpstreamError(f"{self.name} reported an error mid-stream: "
                                f"{error.get('type')}: {error.get('message')}",
                                status=status, retryable=_retryable(status))
        return []  # ping, content_block_stop, thinking and other blocks: nothing to pass on
