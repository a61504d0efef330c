"""A real Anthropic Messages API on 127.0.0.1, as strict about requests as Anthropic is, whose
behaviour the model name picks."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from corral.testing import _free_port

KEY = "sk-ant-test-key"
USAGE = {"input_tokens": 10, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 100,
         "output_tokens": 5}
WEATHER = {"Paris": "18°C and sunny", "Oslo": "4°C and raining"}

_FIELDS = {"model", "messages", "max_tokens", "system", "stop_sequences", "stream",
           "temperature", "top_p", "top_k", "metadata", "tools", "tool_choice"}
_BLOCKS = {"user": {"text", "image", "tool_result"}, "assistant": {"text", "tool_use"}}
_MEDIA = {"image/jpeg", "image/png", "image/gif", "image/webp"}


class Invalid(Exception):
    """What Anthropic says of a request it rejects with 400 invalid_request_error."""


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}},
                        status_code=status, headers={"retry-after": "7"} if status == 529
                        else None)


def _check(ok: object, message: str) -> None:
    if not ok:
        raise Invalid(message)


def validate(body: Any) -> None:
    """The Messages API's rules that a translator can get wrong; `Invalid` when one is broken."""
    _check(isinstance(body, dict), "body: Input should be an object")
    extra = sorted(set(body) - _FIELDS)
    _check(not extra, f"{', '.join(extra)}: Extra inputs are not permitted")
    _check(isinstance(body.get("model"), str), "model: Field required")
    _check(isinstance(body.get("max_tokens"), int) and body["max_tokens"] >= 1,
           "max_tokens: Field required")
    _check(0 <= body.get("temperature", 0) <= 1,
           "temperature: Input should be less than or equal to 1")
    system = body.get("system", "")
    _check(isinstance(system, str) or all(b.get("type") == "text" for b in system),
           "system: Input should be a valid string or a list of text blocks")
    _check(all(isinstance(s, str) and s for s in body.get("stop_sequences", [])),
           "stop_sequences: each must be a non-empty string")
    _check(set(body.get("metadata", {})) <= {"user_id"}, "metadata: only user_id is allowed")
    for i, tool in enumerate(body.get("tools", [])):
        _check(set(tool) <= {"name", "description", "input_schema"},
               f"tools.{i}: Extra inputs are not permitted")
        _check(re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", tool.get("name", "")),
               f"tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
        _check(tool.get("input_schema", {}).get("type") == "object",
               f"tools.{i}.input_schema.type: Input should be 'object'")
    choice = body.get("tool_choice")
    if choice is not None:
        _check("tools" in body, "tool_choice: may only be specified while providing tools")
        _check(choice.get("type") in ("auto", "any", "none", "tool")
               and (choice["type"] != "tool" or isinstance(choice.get("name"), str)),
               "tool_choice: Input tag does not match any of the expected tags")
    messages = body.get("messages")
    _check(isinstance(messages, list) and messages, "messages: Field required")
    calls: set[str] = set()  # the tool_use ids of the previous assistant message
    for i, message in enumerate(messages):
        role = message.get("role")
        _check(role in _BLOCKS, f"messages.{i}.role: Input should be 'user' or 'assistant'"
               + (' (the Messages API takes a top-level "system", not a system message)'
                  if role == "system" else ""))
        _check(i == 0 or messages[i - 1]["role"] != role, "messages: roles must alternate "
               f'between "user" and "assistant", but found multiple "{role}" roles in a row')
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        _check(blocks and all(b.get("text") for b in blocks if b.get("type") == "text"),
               f"messages.{i}: all messages must have non-empty content")
        for j, block in enumerate(blocks):
            kind = block.get("type")
            _check(kind in _BLOCKS[role], f"messages.{i}.content.{j}: a {role} message "
                   f"cannot hold a {kind!r} block")
            if kind == "image":
                source = block["source"]
                _check(source.get("type") == "url" or (source.get("media_type") in _MEDIA
                                                       and source.get("data")),
                       f"messages.{i}.content.{j}.source: invalid image source")
            if kind == "tool_use":
                _check(isinstance(block.get("input"), dict),
                       f"messages.{i}.content.{j}.input: Input should be a valid dictionary")
        results = [b["tool_use_id"] for b in blocks if b["type"] == "tool_result"]
        _check(blocks[:len(results)] == [b for b in blocks if b["type"] == "tool_result"],
               f"messages.{i}: tool_result blocks must come first in a user message")
        if missing := calls - set(results):
            raise Invalid(f"messages.{i}: `tool_use` ids were found without `tool_result` "
                          f"blocks immediately after: {', '.join(sorted(missing))}. Each "
                          "`tool_use` block must have a corresponding `tool_result` block "
                          "in the next message.")
        if unexpected := set(results) - calls:
            raise Invalid(f"messages.{i}: unexpected `tool_use_id` found in `tool_result` "
                          f"blocks: {', '.join(sorted(unexpected))}. Each `tool_result` block "
                          "must have a corresponding `tool_use` block in the previous message.")
        calls = {b["id"] for b in blocks if b["type"] == "tool_use"}
    _check(not calls, f"messages: `tool_use` ids were found without `tool_result` blocks "
           f"immediately after: {', '.join(sorted(calls))}")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(b["text"] for b in content or [] if b["type"] == "text")


class AnthropicUpstream:
    """Models: ``claude-text`` says hello back; ``claude-tools`` calls get_weather for Paris and
    Oslo when given the tool, then answers from the tools' results; ``claude-overloaded`` 529
    with retry-after 7; ``claude-cut`` streams a piece of its answer and hangs up;
    ``claude-error-event`` streams an overloaded error event before any content;
    ``claude-garbage`` 200 with HTML. Any answer may be streamed: text and tool inputs come in
    several pieces."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.requests: list[dict[str, Any]] = []
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[Route("/v1/messages", self.messages, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="error", lifespan="off",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def messages(self, request: Request) -> Response:
        if request.headers.get("x-api-key") != KEY:
            return _error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return _error(400, "invalid_request_error", "anthropic-version: header is required")
        try:
            body = json.loads(await request.body())
            validate(body)
        except ValueError:
            return _error(400, "invalid_request_error", "There was an error parsing the body")
        except (Invalid, KeyError, TypeError, AttributeError) as exc:
            return _error(400, "invalid_request_error", str(exc) if isinstance(exc, Invalid)
                          else f"the request is malformed ({exc!r})")
        model = body["model"]
        self.calls[model] += 1
        self.requests.append(body)
        if model == "claude-overloaded":
            return _error(529, "overloaded_error", "Overloaded")
        if model == "claude-garbage":
            return PlainTextResponse("<html>oops</html>")
        message = self.answer(body)
        if body.get("stream"):
            return StreamingResponse(self.events(message), media_type="text/event-stream")
        return JSONResponse(message)

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        model = body["model"]
        last = body["messages"][-1]["content"]
        results = [b for b in last if b["type"] == "tool_result"] if isinstance(last, list) else []
        tools = {t["name"] for t in body.get("tools", [])}
        stop = "end_turn"
        if model == "claude-tools" and results:
            content = [{"type": "text", "text": "The weather: " + "; ".join(
                _text(r.get("content")) for r in results)}]
        elif (model == "claude-tools" and "get_weather" in tools
              and body.get("tool_choice", {}).get("type") != "none"):
            n = self.calls[model]
            content = [{"type": "text", "text": "Let me look that up."}] + [
                {"type": "tool_use", "id": f"toolu_{n}_{city.lower()}", "name": "get_weather",
                 "input": {"city": city, "unit": "celsius"}} for city in WEATHER]
            stop = "tool_use"
        else:
            content = [{"type": "text", "text": f"hello from {model}: {_text(last)}"}]
        return {"id": f"msg_{self.calls[model]}", "type": "message", "role": "assistant",
                "model": model, "content": content, "stop_reason": stop, "stop_sequence": None,
                "usage": dict(USAGE)}

    async def events(self, message: dict[str, Any]) -> AsyncIterator[bytes]:
        def event(kind: str, **data: Any) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

        model = message["model"]
        yield event("message_start", message={**message, "content": [], "stop_reason": None,
                                              "usage": {**USAGE, "output_tokens": 1}})
        if model == "claude-error-event":
            yield event("error", error={"type": "overloaded_error", "message": "Overloaded"})
            return
        yield event("ping")
        for i, block in enumerate(message["content"]):
            if block["type"] == "text":
                yield event("content_block_start", index=i,
                            content_block={"type": "text", "text": ""})
                for piece in re.findall(r"\S+\s*", block["text"]):
                    yield event("content_block_delta", index=i,
                                delta={"type": "text_delta", "text": piece})
                    if model == "claude-cut":
                        await asyncio.sleep(0.05)
                        raise ConnectionResetError("the upstream died mid-answer")
            else:
                yield event("content_block_start", index=i,
                            content_block={**block, "input": {}})
                raw = json.dumps(block["input"])
                for piece in ["", *(raw[k:k + 7] for k in range(0, len(raw), 7))]:
                    yield event("content_block_delta", index=i,
                                delta={"type": "input_json_delta", "partial_json": piece})
            yield event("content_block_stop", index=i)
        yield event("message_delta", delta={"stop_reason": message["stop_reason"],
                                            "stop_sequence": None},
                    usage={"output_tokens": USAGE["output_tokens"]})
        yield event("message_stop")

    def start(self) -> None:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
