"""The gateway over HTTP, OpenAI-compatible: point any client's base URL at it.

Routes: POST /v1/chat/completions (streamed or not, tools passed through), POST
/v1/embeddings, GET /v1/models, GET /health, GET /metrics (Prometheus). Errors come back in
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with OpenAI's statuses (401
bad key, 403 model not allowed for the key, 404 unknown model, 400 invalid request, 413 too
large, 429 with Retry-After for rate limits and budgets, 502/503 when providers fail).

Callers authenticate with a virtual key (``corral keys create``), whose tenant, models, limits
and budget apply, or with the master key, which may name the tenant in ``X-Corral-Tenant``.
``X-Corral-Workflow``, ``X-Corral-Run``, ``X-Corral-Agent`` and ``X-Corral-Agent-Version``
label the call (and name the agent the registry checks, with enforcement on);
``X-Corral-Cache: off`` skips the caches and ``X-Corral-Cache-Similarity`` raises the semantic
cache's threshold for one request.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..observability._tracing import parse_traceparent
from ._keys import PREFIX, KeyCache
from ._router import Caller, Gateway, GatewayError

log = logging.getLogger("corral.gateway")

_ROLES = {"system", "developer", "user", "assistant", "tool"}


def _error(exc: GatewayError) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param)


def _validate(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _invalid("'model' is required: the name of a model from GET /v1/models", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty array of messages", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise _invalid(f"messages[{i}] must be an object whose role is one of "
                           f"{', '.join(sorted(_ROLES))}", f"messages[{i}].role")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise _invalid("'stream' must be true or false", "stream")
    return body


def _validate_embeddings(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _invalid("'model' is required: the name of a model from GET /v1/models", "model")
    value = body.get("input")
    if not (isinstance(value, str) and value) and not (isinstance(value, list) and value):
        raise _invalid("'input' must be a string or a non-empty array", "input")
    return body


def create_app(gateway: Gateway, *, master_key: str | None,
               keys: KeyCache | None = None) -> Starlette:
    """The ASGI app. With ``master_key`` or ``keys``, every /v1 request must send a key as its
    Bearer token."""

    async def metrics(request: Request) -> Response:
        return Response(gateway.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if status == 405:
            return _error(GatewayError(405, f"{request.method} is not allowed on "
                                       f"{request.url.path}", code="method_not_allowed"))
        return _error(GatewayError(404, f"no route {request.url.path}; the routes are "
                                   "/v1/chat/completions, /v1/embeddings, /v1/models, "
                                   "/health and /metrics",
                                   code="not_found"))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await gateway.close()

    return Starlette(
        routes=[*routes(gateway, master_key=master_key, keys=keys),
                Route("/health", health, methods=["GET"]),
                Route("/metrics", metrics, methods=["GET"])],
        exception_handlers={HTTPException: not_found},
        lifespan=lifespan,
    )


def routes(gateway: Gateway, *, master_key: str | None,
           keys: KeyCache | None = None) -> list[Route]:
    """The OpenAI-compatible routes, for this server or another (``corral serve``)."""
    max_body = gateway.config.max_body_bytes
    open_door = master_key is None  # (allow_unauthenticated: keys still count if sent)

    async def authorize(request: Request) -> Caller:
        """Who is calling: the tenant comes from the key, never from what the client says;
        workflow, run and agent are the caller's own labels for its costs."""
        headers = request.headers
        caller = Caller(workflow=headers.get("x-corral-workflow") or None,
                        run_id=headers.get("x-corral-run") or None,
                        agent=headers.get("x-corral-agent") or None,
                        agent_version=headers.get("x-corral-agent-version") or None,
                        trace=parse_traceparent(headers.get("traceparent")))
        header = headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if not header and open_door:
            return caller
        if scheme.lower() == "bearer":
            if master_key is not None and hmac.compare_digest(secret.encode(),
                                                              master_key.encode()):
                return replace(caller, key_id="master",
                               tenant=headers.get("x-corral-tenant") or "default")
            key = await keys.find(secret) if keys and secret.startswith(PREFIX) else None
            if key is not None:
                return replace(caller, key_id=key.id, tenant=key.tenant, key=key)
        raise GatewayError(401, "invalid API key: send a key from `corral keys create` (or the "
                           "gateway's master key) as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def allowed(caller: Caller, model: str) -> None:
        if caller.key is not None and not caller.key.allows(model):
            raise GatewayError(403, f"this key may not use the model {model!r}; it may use "
                               f"{', '.join(caller.key.models or ())}",
                               type="permission_error", code="model_not_allowed",
                               param="model")

    def cache_options(request: Request) -> tuple[bool, float | None]:
        use = request.headers.get("x-corral-cache", "on").lower() not in ("off", "no", "false")
        value = request.headers.get("x-corral-cache-similarity")
        if value is None:
            return use, None
        try:
            similarity = float(value)
        except ValueError:
            similarity = -1.0
        if not 0 < similarity <= 1:
            raise _invalid(f"X-Corral-Cache-Similarity must be a number in (0, 1], not "
                           f"{value!r}")
        return use, similarity

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise GatewayError(413, f"the request body is over {max_body} bytes; send less",
                               code="request_too_large")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > max_body:
                raise GatewayError(413, f"the request body is over {max_body} bytes; send "
                                   "less", code="request_too_large")
        try:
            return json.loads(data)
        except ValueError as exc:
            raise _invalid(f"the request body is not valid JSON ({exc})") from None

    def failed() -> JSONResponse:
        log.exception("gateway: a request failed")
        return _error(GatewayError(500, "the gateway failed on this request; its log has the "
                                   "details", type="api_error", code="internal_error"))

    async def chat(request: Request) -> Response:
        try:
            caller = await authorize(request)
            body = _validate(await read_json(request))
            allowed(caller, body["model"])
            cache, similarity = cache_options(request)
            if not body.get("stream"):
                return JSONResponse(await gateway.chat(body, caller, cache=cache,
                                                       similarity=similarity))
            chunks = gateway.stream(body, caller, cache=cache, similarity=similarity)
            head = await anext(chunks)  # errors before the first chunk keep their status
        except GatewayError as exc:
            return _error(exc)
        except Exception:
            return failed()
        return StreamingResponse(_sse(head, chunks), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def embeddings(request: Request) -> Response:
        try:
            caller = await authorize(request)
            body = _validate_embeddings(await read_json(request))
            allowed(caller, body["model"])
            return JSONResponse(await gateway.embed(body, caller))
        except GatewayError as exc:
            return _error(exc)
        except Exception:
            return failed()

    async def models(request: Request) -> Response:
        try:
            caller = await authorize(request)
        except GatewayError as exc:
            return _error(exc)
        names = [m for m in gateway.models if caller.key is None or caller.key.allows(m)]
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "corral"}
            for name in names]})

    return [Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"])]


async def _sse(head: dict[str, Any], chunks: AsyncIterator[dict[str, Any]]
               ) -> AsyncIterator[bytes]:
    yield b"data: " + json.dumps(head).encode() + b"\n\n"
    try:
        async for chunk in chunks:
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
    except GatewayError as exc:  # cut off: the client gets an error, never a short answer
        yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
        return
    yield b"data: [DONE]\n\n"
