"""Tools: typed functions an agent may call. Failures are values, written for the model.

A tool's type hints and docstring become the JSON schema its model sees; arguments are
validated before the call. Whatever goes wrong (bad arguments, a timeout, an HTTP error, an
exception) comes back as a `ToolFailure` with a kind, a message corral wrote and whether a retry
may help. The raw exception text never reaches the model as if it were data; it is kept in
`detail`, in the journal, for operators.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, create_model

from .._errors import CorralError, UsageError
from ..observability._tracing import describe_step
from ..observability._tracing import installed as installed_tracing
from ..runtime import RetryPolicy, Step
from ._messages import ToolSpec, Usage

FailureKind = Literal[
    "invalid_arguments", "timeout", "http_error", "unavailable", "error", "unknown_tool",
    "denied",
]


class ToolError(CorralError):
    """Raise from a tool to tell the model something went wrong, in your words.

    ``ToolError("no customer with that email", retryable=False)``: the message reaches the
    model as is (unlike other exceptions, whose text stays out of the conversation).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message, retryable=retryable)


class ToolFailure(BaseModel):
    kind: FailureKind
    message: str
    retryable: bool
    detail: str | None = None
    """The raw error, for operators; never shown to the model."""

    def for_model(self) -> dict[str, Any]:
        return {"error": {"kind": self.kind, "message": self.message,
                          "retryable": self.retryable}}


class ToolResult(BaseModel):
    call_id: str
    name: str
    value: Any = None
    failure: ToolFailure | None = None
    attempts: int = 1
    usage: Usage = Field(default_factory=Usage)
    """Model usage inside the tool (a specialist agent's)."""
    cost: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failure is None

    def for_model(self) -> str:
        """What the model reads: the value, or a structured error (never raw error text)."""
        if self.failure is not None:
            return json.dumps(self.failure.for_model())
        return self.value if isinstance(self.value, str) else json.dumps(self.value)


def _describe(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """The summary of a docstring and its per-parameter descriptions (Google or reST style)."""
    doc = inspect.getdoc(fn) or ""
    params: dict[str, str] = {}
    for match in re.finditer(r"^\s*:param\s+(\w+):\s*(.+)$", doc, re.M):
        params[match[1]] = match[2].strip()
    section = re.search(r"^(Args|Arguments|Parameters):\s*$(.*?)(?=^\S|\Z)", doc, re.M | re.S)
    if section:
        for match in re.finditer(r"^\s+(\w+)(?:\s*\(.*?\))?:\s*(.+)$", section[2], re.M):
            params.setdefault(match[1], match[2].strip())
    summary = re.split(r"\n\s*\n|^(?:Args|Arguments|Parameters):|^:param", doc, maxsplit=1,
                       flags=re.M)[0]
    return " ".join(summary.split()), params


class Tool:
    """A function an agent may call, with the schema, validation and failure handling around it."""

    def __init__(self, fn: Callable[..., Any], *, name: str | None = None,
                 timeout: float | None = 30.0, retries: int = 2,
                 retry: RetryPolicy | None = None, resource: str | None = None) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        self.resource = resource
        """What a call acts on, for capability tokens: a template over the arguments
        (``accounts/{account}``); without one, the tool's name."""
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.name):
            raise UsageError(f"tool name {self.name!r} must be 1-64 letters, digits, _ or -")
        self.timeout = timeout
        self.retry = retry or RetryPolicy(max_attempts=retries + 1, initial_interval=0.5)
        self.description, described = _describe(fn)
        hints = inspect.get_annotations(fn, eval_str=True)
        fields: dict[str, Any] = {}
        for param in inspect.signature(fn).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise UsageError(f"tool {self.name!r}: *args and **kwargs have no schema")
            default = ... if param.default is param.empty else param.default
            fields[param.name] = (hints.get(param.name, Any),
                                  Field(default, description=described.get(param.name)))
        self.arguments = create_model(f"{self.name}_arguments", **fields)
        self.step: Step[Any, ToolResult] = Step(
            self._invoke_with_id, name=f"tool:{self.name}",
            retry=RetryPolicy(max_attempts=1), timeout=None, origin=fn.__module__,
        )

    @functools.cached_property
    def _spec(self) -> ToolSpec:
        schema = self.arguments.model_json_schema()
        schema.pop("title", None)
        return ToolSpec(name=self.name, description=self.description, parameters=schema)

    def spec(self) -> ToolSpec:
        return self._spec

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function directly (not as a model's tool call)."""
        result = self.fn(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    async def _invoke_with_id(self, call_id: str, arguments: str) -> ToolResult:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": self.name,
            "gen_ai.tool.call.id": call_id, "gen_ai.tool.type": "function"}
        tracing = installed_tracing()
        if tracing.content:
            try:
                given: Any = json.loads(arguments or "{}")
            except ValueError:
                given = arguments
            attributes["gen_ai.tool.call.arguments"] = tracing.content_attribute(given)
        if not describe_step(f"execute_tool {self.name}", attributes):
            return await self.invoke(call_id, arguments)
        result = await self.invoke(call_id, arguments)
        outcome: dict[str, Any] = {}
        if result.failure is not None:
            outcome["error.type"] = result.failure.kind
            outcome["corral.error.message"] = result.failure.message
        if tracing.content:
            outcome["gen_ai.tool.call.result"] = tracing.content_attribute(result.for_model())
        if outcome:
            describe_step(None, outcome)
        return result

    async def invoke(self, call_id: str, arguments: str) -> ToolResult:
        """Validate the model's arguments and call the tool; every failure is a value."""
        try:
            parsed = self.arguments.model_validate_json(arguments or "{}")
        except ValidationError as exc:
            problems = "; ".join(safe_error(e, "arguments") for e in exc.errors()[:5])
            return ToolResult(call_id=call_id, name=self.name, failure=ToolFailure(
                kind="invalid_arguments", retryable=False,
                message=f"the arguments for {self.name} do not match its schema: {problems}",
            ))
        values = {field: getattr(parsed, field) for field in type(parsed).model_fields}
        attempt = 0
        while True:
            attempt += 1
            try:
                call: Awaitable[Any]
                if inspect.iscoroutinefunction(self.fn):
                    call = self.fn(**values)
                else:
                    call = asyncio.to_thread(self.fn, **values)
                async with asyncio.timeout(self.timeout):
                    value = await call
                json.dumps(value, default=_jsonable)  # fails here, not in the journal
                return ToolResult(call_id=call_id, name=self.name,
                                  value=json.loads(json.dumps(value, default=_jsonable)),
                                  attempts=attempt)
            except Exception as exc:
                failure = self.classify(exc)
                if not failure.retryable or attempt >= self.retry.max_attempts:
                    return ToolResult(call_id=call_id, name=self.name, failure=failure,
                                      attempts=attempt)
                await asyncio.sleep(self.retry.delay(attempt))

    def classify(self, exc: Exception) -> ToolFailure:
        name, kind = self.name, type(exc).__name__
        detail = f"{kind}: {exc}"[:2000]
        if isinstance(exc, ToolError):
            return ToolFailure(kind="error", message=exc.message,
                               retryable=bool(exc.fields.get("retryable")), detail=detail)
        kinds = {k.__name__ for k in type(exc).__mro__}  # httpx's, without importing httpx
        if isinstance(exc, TimeoutError) or "TimeoutException" in kinds:
            after = f" after {self.timeout:g}s" if self.timeout is not None else ""
            return ToolFailure(kind="timeout", retryable=True, detail=detail,
                               message=f"{name} timed out{after}; no data came back")
        status = _http_status(exc)
        if status is not None:
            return ToolFailure(kind="http_error", retryable=status >= 500 or status == 429,
                               detail=detail,
                               message=f"{name} got HTTP {status} from its service; no data "
                                       "came back")
        if isinstance(exc, ConnectionError) or kinds & {"TransportError", "NetworkError"}:
            return ToolFailure(kind="unavailable", retryable=True, detail=detail,
                               message=f"{name} could not reach its service ({kind})")
        return ToolFailure(kind="error", retryable=False, detail=detail,
                           message=f"{name} failed ({kind}); the error is recorded for operators")


def safe_error(error: Any, where: str) -> str:
    """A validation error as a model may read it: the field and the rule, not the text of a
    custom validator's exception (which may hold anything)."""
    location = ".".join(str(p) for p in error.get("loc", ())) or where
    if error.get("type") in ("value_error", "assertion_error"):
        return f"{location}: failed a validation check"
    return f"{location}: {error.get('msg')}"


def _http_status(exc: Exception) -> int | None:
    """The HTTP status of an error from httpx, requests, aiohttp or urllib, if it has one."""
    response = getattr(exc, "response", None)
    for holder in (response, exc):
        for attribute in ("status_code", "status", "code"):
            value = getattr(holder, attribute, None)
            if isinstance(value, int) and 100 <= value <= 599:
                return value
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON data")


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None,
         timeout: float | None = 30.0, retries: int = 2, retry: RetryPolicy | None = None,
         resource: str | None = None) -> Any:
    """Make a function a tool. Its type hints and docstring are the schema a model sees.

    ``timeout`` bounds each attempt; failures a retry may fix (timeouts, HTTP 5xx and 429,
    connection errors, ``ToolError(retryable=True)``) are retried ``retries`` times with backoff
    (or per ``retry``) before the model hears of them. ``resource`` names what a call acts
    on, from its arguments (``"accounts/{account}"``), for capability tokens.
    """

    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool(f, name=name, timeout=timeout, retries=retries, retry=retry,
                    resource=resource)

    return wrap(fn) if fn is not None else wrap
