"""`@step` and `@workflow`: what users write, and the registry that finds it again."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import importlib
import importlib.util
import inspect
import json
import os
import random
import sys
import types
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, get_type_hints

from .._errors import InvalidInput, NonRetryable, StepFailed, UsageError, WorkflowNotFound
from .._serde import adapter, dumps

if TYPE_CHECKING:
    from ..observability._tracing import SpanSink
    from ._context import Context, _Scope

P = ParamSpec("P")
R = TypeVar("R")
I = TypeVar("I")  # noqa: E741
O = TypeVar("O")  # noqa: E741

# The scope of the workflow task running now, None in a step body or outside any run.
current_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "corral_scope", default=None
)
# In a step body: (run id, workflow name, journal key, span sink) of the step: for cost
# attribution, and for the step's span (see observability._tracing.describe_step).
current_step: contextvars.ContextVar[tuple[str, str, str, SpanSink] | None] = (
    contextvars.ContextVar("corral_step", default=None))


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How a step retries: exponential backoff with jitter, capped, for a number of attempts.

    ``non_retryable`` exception types (and `corral.NonRetryable`) fail the step at once.
    """

    max_attempts: int = 4
    initial_interval: float = 1.0
    backoff: float = 2.0
    max_interval: float = 60.0
    jitter: float = 0.2
    non_retryable: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise UsageError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.initial_interval < 0 or self.backoff < 1 or self.max_interval < 0:
            raise UsageError(
                "retry intervals must be non-negative and backoff at least 1 "
                f"(got initial_interval={self.initial_interval}, backoff={self.backoff}, "
                f"max_interval={self.max_interval})"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.initial_interval * self.backoff ** (attempt - 1), self.max_interval)
        return base * (1 + random.uniform(-self.jitter, self.jitter))

    def retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, (NonRetryable, StepFailed, UsageError, *self.non_retryable)):
            return False  # (a retry does not fix a program's misuse either)
        return getattr(exc, "fields", {}).get("retryable") is not False


class Step(Generic[P, R]):
    """A journaled unit of work: its result is recorded once and replayed after a crash."""

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]] | Callable[P, R],
        *,
        name: str,
        retry: RetryPolicy,
        timeout: float | None,
        origin: str | None = None,
    ) -> None:
        self.fn = fn
        self.name = name
        self.retry = retry
        self.timeout = timeout
        self.is_async = inspect.iscoroutinefunction(fn)
        self.wants_key = "idempotency_key" in inspect.signature(fn).parameters
        self._returns: Any = _hints(fn).get("return", Any)
        functools.update_wrapper(self, fn)
        # The module that defines the step: an engine that runs steps in other processes
        # (Temporal's activities) finds it again by (origin, name).
        self.origin = origin or fn.__module__
        _STEPS[(self.origin, name)] = _STEPS[("", name)] = self

    @functools.cached_property
    def decode(self) -> Callable[[str | bytes], Any]:
        """JSON text to the step's return type (plain JSON data without an annotation)."""
        return json.loads if self._returns is Any else adapter(self._returns).validate_json

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        scope = current_scope.get()
        if scope is None:  # outside a workflow: a plain call, with retries and timeout
            value, _ = await self.attempt(args, kwargs, f"direct/{uuid.uuid4().hex}")
            return value
        result: R = await scope.run.step(self, scope, args, kwargs)
        return result

    def load_arguments(self, args: list[Any], kwargs: dict[str, Any]
                       ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Arguments that travelled as JSON, validated back into the parameters' types."""
        bound = inspect.signature(self.fn).bind_partial(*args, **kwargs)
        hints = _hints(self.fn)
        for name, value in bound.arguments.items():
            kind = bound.signature.parameters[name].kind
            if name in hints and kind not in (inspect.Parameter.VAR_POSITIONAL,
                                              inspect.Parameter.VAR_KEYWORD):
                bound.arguments[name] = adapter(hints[name]).validate_python(value)
        return bound.args, bound.kwargs

    async def once(self, args: tuple[Any, ...], kwargs: dict[str, Any], key: str | None) -> R:
        """One attempt of the body under the step's timeout (an engine retries it)."""
        if self.wants_key and key is not None and "idempotency_key" not in kwargs:
            kwargs = {**kwargs, "idempotency_key": key}
        if self.is_async:
            call = self.fn(*args, **kwargs)
        else:
            call = asyncio.to_thread(self.fn, *args, **kwargs)  # type: ignore[arg-type]
        if self.timeout is None:
            value: R = await call  # type: ignore[misc]
            return value
        async with asyncio.timeout(self.timeout):
            return await call  # type: ignore[misc,no-any-return]

    async def attempt(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], key: str | None
    ) -> tuple[R, int]:
        """Run the body under the retry policy and timeout; return (value, attempts)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.once(args, kwargs, key), attempt
            except Exception as exc:
                if not self.retry.retryable(exc) or attempt >= self.retry.max_attempts:
                    raise step_failed(self.name, exc, attempt, self.timeout) from exc
                await asyncio.sleep(self.retry.delay(attempt))


def step_failed(name: str, exc: BaseException, attempts: int, timeout: float | None) -> StepFailed:
    if isinstance(exc, StepFailed):
        return exc
    if isinstance(exc, TimeoutError) and timeout is not None and not str(exc):
        text = f"timed out after {timeout:g}s"
    else:
        text = str(exc) or type(exc).__name__
    return failed_step(name, type(exc).__name__, text, attempts)


def failed_step(name: str, error_type: str, error: str, attempts: int) -> StepFailed:
    """A step's failure, worded the same live and on replay, on either engine."""
    return StepFailed(
        f"step {name!r} failed after {attempts} attempt{'s' if attempts > 1 else ''}: "
        f"{error_type}: {error}",
        step=name, error_type=error_type, error=error, attempts=attempts,
    )


def step(
    fn: Callable[P, Awaitable[R]] | None = None,
    *,
    name: str | None = None,
    retries: int | None = None,
    timeout: float | None = None,
    retry: RetryPolicy | None = None,
    non_retryable: tuple[type[BaseException], ...] = (),
) -> Any:
    """Make a function a durable step.

    ``retries`` is the number of retries after the first attempt (default 3, so four attempts),
    with the default backoff; pass ``retry=RetryPolicy(...)`` for full control instead.
    ``non_retryable`` exception types fail the step at once (added to ``retry``'s own).
    ``timeout`` bounds each attempt, in seconds. A parameter named ``idempotency_key`` receives
    a key that is stable across retries and crashes, to pass to the outside world.
    """
    if retry is not None and retries is not None:
        raise UsageError("pass retries=N or retry=RetryPolicy(...), not both")
    if retries is not None and retries < 0:
        raise UsageError(f"retries must not be negative, not {retries}")
    if retry is None:
        policy = RetryPolicy(max_attempts=(3 if retries is None else retries) + 1,
                             non_retryable=non_retryable)
    else:
        policy = replace(retry, non_retryable=(*retry.non_retryable, *non_retryable))

    def wrap(f: Callable[P, Awaitable[R]]) -> Step[P, R]:
        return Step(f, name=name or f.__qualname__, retry=policy, timeout=timeout)

    return wrap(fn) if fn is not None else wrap


class Workflow(Generic[I, O]):
    """A durable workflow: plain async code whose steps, timers and signals are journaled."""

    def __init__(self, fn: Callable[..., Awaitable[O]], *, name: str) -> None:
        self.fn = fn
        self.name = name
        params = list(inspect.signature(fn).parameters.values())
        if not params or len(params) > 2:
            raise UsageError(
                f"workflow {name!r} must take (ctx) or (ctx, input), "
                f"not {len(params)} parameters"
            )
        hints = _hints(fn)
        self.takes_input = len(params) == 2
        self.input_type: Any = hints.get(params[1].name, Any) if self.takes_input else None
        self.output_type: Any = hints.get("return", Any)
        module = sys.modules.get(fn.__module__)
        path = getattr(module, "__file__", None)
        if path and (fn.__module__ == "__main__" or getattr(module, "__corral_file__", False)):
            self.ref = f"{os.path.abspath(path)}:{fn.__qualname__}"
        else:
            self.ref = f"{fn.__module__}:{fn.__qualname__}"
        functools.update_wrapper(self, fn)
        _REGISTRY[name] = self

    def __call__(self, ctx: Context, *args: Any) -> Awaitable[O]:
        return self.fn(ctx, *args)

    def validate_input(self, value: Any) -> Any:
        """Validate a Python value (or, from the CLI, a JSON text) against the input type."""
        if not self.takes_input:
            if value is not None:
                raise InvalidInput(
                    f"workflow {self.name!r} takes no input; omit it (got {value!r:.60})"
                )
            return None
        try:
            return adapter(self.input_type).validate_python(value)
        except ValueError as exc:
            raise InvalidInput(
                f"input for workflow {self.name!r} is invalid: {_first_error(exc)}; "
                f"pass a value matching {_type_name(self.input_type)}",
                workflow=self.name,
            ) from None

    def dump_output(self, value: Any) -> str:
        """The output as JSON, checked against the return annotation."""
        if self.output_type is not Any:
            try:
                value = adapter(self.output_type).validate_python(value)
            except ValueError as exc:
                raise UsageError(
                    f"workflow {self.name!r} returned {value!r:.80} where its return "
                    f"annotation says {_type_name(self.output_type)} ({_first_error(exc)}); "
                    "return a matching value or change the annotation",
                    workflow=self.name,
                ) from None
        return dumps(value).decode()

    def parse_input(self, text: str | None) -> Any:
        """Validate the JSON text of ``--input`` (None: the option was not given)."""
        if text is None and self.takes_input:
            raise InvalidInput(
                f"workflow {self.name!r} takes an input ({_type_name(self.input_type)}); "
                "pass it as --input JSON",
                workflow=self.name,
            )
        if text is None:
            return None
        if not self.takes_input:
            return self.validate_input(text)
        try:
            return adapter(self.input_type).validate_json(text)
        except ValueError as exc:
            raise InvalidInput(
                f"input for workflow {self.name!r} is invalid: {_first_error(exc)}; "
                f"pass --input JSON matching {_type_name(self.input_type)}",
                workflow=self.name,
            ) from None


def workflow(fn: Callable[..., Awaitable[O]] | None = None, *, name: str | None = None) -> Any:
    """Make an async function ``(ctx, input) -> output`` a durable workflow."""

    def wrap(f: Callable[..., Awaitable[O]]) -> Workflow[Any, O]:
        return Workflow(f, name=name or f.__qualname__)

    return wrap(fn) if fn is not None else wrap


_REGISTRY: dict[str, Workflow[Any, Any]] = {}
# Steps by (defining module, name), and by ("", name) for the latest of that name.
_STEPS: dict[tuple[str, str], Step[Any, Any]] = {}


def find_step(origin: str, name: str) -> Step[Any, Any] | None:
    """A step defined in this process, by where it was defined and its name."""
    found = _STEPS.get((origin, name))
    if found is None and origin and origin not in sys.modules:
        with contextlib.suppress(ImportError):
            importlib.import_module(origin)
            found = _STEPS.get((origin, name))
    return found or _STEPS.get(("", name))


def resolve(name: str, ref: str) -> Workflow[Any, Any]:
    """The workflow a run was started with: registered in this process, or imported by ref."""
    found = _REGISTRY.get(name)
    if found is not None and found.ref == ref:
        return found
    return load_workflow(ref)


def load_workflow(ref: str) -> Workflow[Any, Any]:
    """Find a workflow by ``path/to/file.py:name``, ``package.module:name`` or registered name."""
    if ":" not in ref:
        if ref in _REGISTRY:
            return _REGISTRY[ref]
        raise WorkflowNotFound(
            f"no workflow {ref!r}; name it as FILE.py:WORKFLOW or module:WORKFLOW", ref=ref
        )
    where, _, name = ref.rpartition(":")
    module = _load_module(where, ref)
    found = getattr(module, name, None)
    if isinstance(found, Workflow):
        return found
    if found is None:
        defined = sorted(k for k, v in vars(module).items() if isinstance(v, Workflow))
        hint = f"it defines {', '.join(defined)}" if defined else "it defines no workflow"
        raise WorkflowNotFound(f"{where} has no workflow {name!r}; {hint}", ref=ref)
    raise WorkflowNotFound(
        f"{where}:{name} is not a workflow; decorate it with @corral.workflow", ref=ref
    )

def _load_module(where: str, ref: str) -> types.ModuleType:
    """The module of ``where``: a file (``path/to/file.py``) or an importable module."""
    if where.endswith(".py"):
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise WorkflowNotFound(f"workflow file {where} does not exist; check the path", ref=ref)
        module_name = "corral_user." + path.strip("/").replace("/", ".").removesuffix(".py")
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            module.__corral_file__ = True  # type: ignore[attr-defined]
            sys.modules[module_name] = module
            folder = os.path.dirname(path)
            if folder not in sys.path:
                sys.path.insert(0, folder)
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[module_name]
                raise WorkflowNotFound(
                    f"workflow file {where} failed to load: {type(exc).__name__}: {exc}; "
                    "fix the file and retry",
                    ref=ref,
                ) from exc
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise WorkflowNotFound(
                f"cannot import module {where!r} ({exc}); "
                "check the name and sys.path",
                ref=ref,
            ) from None
    return module


def load_workflows(ref: str) -> list[Workflow[Any, Any]]:
    """Workflows by ``FILE.py`` or ``module`` (every workflow it defines), or one by
    ``FILE.py:NAME`` / ``module:NAME``."""
    if ":" in ref:
        return [load_workflow(ref)]
    module = _load_module(ref, ref)
    found = [v for v in vars(module).values() if isinstance(v, Workflow)]
    if not found:
        raise WorkflowNotFound(f"{ref} defines no workflow; decorate one with @corral.workflow",
                               ref=ref)
    return found



def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return get_type_hints(fn)
    except Exception:
        return {}


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "input"
        return f"{where}: {first.get('msg')}"
    return str(exc)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)
