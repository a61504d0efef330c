"""One door for every model call: pick a deployment, fail over, retry, skip the dead ones.

A request names a model: an alias or a deployment. Its deployments are tried in the routing
order (as configured, weighted at random, or fastest first); a retryable failure (5xx, 408,
409, 429, a connection error, a timeout, an answer that is not a completion) moves on to the
next. After a pass over all of them, the gateway waits (with jitter, or as long as the largest
Retry-After asked, within ``retry.max_wait``) and tries another pass, up to ``retry.attempts``.
Each deployment has a circuit breaker: after ``breaker.failures`` failures in a row it is
skipped at once for ``breaker.cooldown`` seconds, then one probe request may try it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ._config import Deployment, GatewayConfig
from ._ledger import Call, Ledger
from ._providers import Provider, UpstreamError, provider

T = TypeVar("T")


class GatewayError(Exception):
    """An error for the caller, in OpenAI's terms: HTTP status, type, code, message."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param,
                          "code": self.code}}


class _Breaker:
    __slots__ = ("failures", "open_until", "probing")

    def __init__(self) -> None:
        self.failures = 0
        self.open_until = 0.0
        self.probing = False

    def admits(self, now: float) -> bool:
        if self.open_until == 0.0:
            return True
        if now < self.open_until or self.probing:
            return False
        self.probing = True  # half-open: this request is the probe
        return True


class _Deployment:
    __slots__ = ("breaker", "config", "latency", "provider")

    def __init__(self, config: Deployment) -> None:
        self.config = config
        self.provider: Provider = provider(config)
        self.breaker = _Breaker()
        self.latency = 0.0  # moving average of successful calls, seconds


@dataclass(frozen=True, slots=True)
class Caller:
    """On whose account a call is made: the tenant and key (from authentication), and what
    the caller says it is (workflow, run, agent)."""

    tenant: str = "default"
    key_id: str | None = None
    workflow: str | None = None
    run_id: str | None = None
    agent: str | None = None


class Gateway:
    """The gateway in process: corral's agents call it directly; the HTTP server wraps it.
    With a `Ledger`, every call's tokens and cost are recorded."""

    def __init__(self, config: GatewayConfig, ledger: Ledger | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self._deployments = {d.name: _Deployment(d) for d in config.deployments}
        self._models = {name: [self._deployments[d.name] for d in ds]
                        for name, ds in config.models().items()}

    @property
    def models(self) -> list[str]:
        return list(self._models)

    async def close(self) -> None:
        for d in self._deployments.values():
            await d.provider.close()
        if self.ledger is not None:
            await self.ledger.close()

    def _record(self, caller: Caller, model: str, d: _Deployment | None,
                usage: dict[str, Any] | None, started: float, status: str) -> None:
        if self.ledger is None:
            return
        usage = usage or {}
        input_tokens = int(usage.get("prompt_tokens") or 0)
        output_tokens = int(usage.get("completion_tokens") or 0)
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        price = None
        if d is not None:
            price = (self.config.prices.get(d.config.name)
                     or self.config.prices.get(d.config.model))
        self.ledger.record(Call(
            at=time.time(), tenant=caller.tenant, key_id=caller.key_id,
            workflow=caller.workflow, run_id=caller.run_id, agent=caller.agent, model=model,
            deployment=d.config.name if d is not None else None, input_tokens=input_tokens,
            output_tokens=output_tokens, cached_tokens=cached,
            cost=price.cost(input_tokens, output_tokens, cached) if price else 0.0,
            priced=price is not None or (input_tokens + output_tokens == 0),
            latency_ms=round((time.monotonic() - started) * 1000, 3), cache="off",
            status=status,
        ))

    def _candidates(self, model: str) -> list[_Deployment]:
        found = self._models.get(model)
        if found is None:
            raise GatewayError(404, f"the model {model!r} does not exist; the models are "
                               f"{', '.join(self._models)}", code="model_not_found",
                               param="model")
        if self.config.routing == "weighted" and len(found) > 1:
            rest, order = list(found), []
            while rest:  # a weighted permutation: heavier deployments come first more often
                pick = random.choices(rest, [d.config.weight for d in rest])[0]
                rest.remove(pick)
                order.append(pick)
            return order
        if self.config.routing == "least-latency":
            return sorted(found, key=lambda d: d.latency)
        return list(found)

    def _succeeded(self, d: _Deployment, started: float) -> None:
        elapsed = time.monotonic() - started
        d.latency = elapsed if d.latency == 0.0 else 0.8 * d.latency + 0.2 * elapsed
        d.breaker.failures, d.breaker.open_until, d.breaker.probing = 0, 0.0, False

    def _failed(self, d: _Deployment) -> None:
        b = d.breaker
        b.failures += 1
        if b.probing or b.failures >= self.config.breaker.failures:
            b.open_until = time.monotonic() + self.config.breaker.cooldown
        b.probing = False

    async def _route(self, model: str, call: Callable[[_Deployment], Awaitable[T]]
                     ) -> tuple[_Deployment, T]:
        """``call`` on each deployment in turn until one answers; the waits between passes;
        the last failure, for the caller, when none does."""
        retry = self.config.retry
        candidates = self._candidates(model)
        last: UpstreamError | None = None
        for attempt in range(retry.attempts):
            hint = 0.0
            for d in candidates:
                if not d.breaker.admits(time.monotonic()):
                    continue
                started = time.monotonic()
                try:
                    result = await call(d)
                except asyncio.CancelledError:  # the caller left: a probe may be made again
                    d.breaker.probing = False
                    raise
                except UpstreamError as exc:
                    self._failed(d)
                    if not exc.retryable:
                        raise _for_caller(exc) from None
                    last = exc
                    hint = max(hint, exc.retry_after or 0.0)
                    continue
                self._succeeded(d, started)
                return d, result
            if attempt + 1 == retry.attempts:
                break
            wait = hint or retry.initial * 2 ** attempt * random.uniform(0.8, 1.2)
            if wait > retry.max_wait:
                break  # (it asked for longer than a caller should wait: say so now)
            await asyncio.sleep(wait)
        if last is None:
            cooldown = min(max(0.0, d.breaker.open_until - time.monotonic())
                           for d in candidates)
            raise GatewayError(503, f"every deployment of {model!r} is failing (circuit "
                               "open); retry later", type="service_unavailable",
                               code="deployments_unavailable", retry_after=cooldown)
        raise _for_caller(last)

    async def chat(self, body: dict[str, Any], caller: Caller = Caller()) -> dict[str, Any]:
        """A chat completion (OpenAI's request and response bodies)."""
        model = body["model"]
        started = time.monotonic()
        try:
            d, answer = await self._route(
                model, lambda d: d.provider.chat({**body, "model": d.config.model}))
        except GatewayError:
            self._record(caller, model, None, None, started, "error")
            raise
        self._record(caller, model, d, answer.get("usage"), started, "ok")
        return {**answer, "model": model}

    async def stream(self, body: dict[str, Any], caller: Caller = Caller()
                     ) -> AsyncIterator[dict[str, Any]]:
        """The chunks of a streamed completion. Until the first chunk arrives a failure moves
        on to the next deployment; after it, the stream fails (`GatewayError`): a half answer
        is never passed off as a whole one."""
        model = body["model"]

        async def first(d: _Deployment) -> tuple[AsyncIterator[dict[str, Any]], dict[str, Any]]:
            chunks = d.provider.stream({**body, "model": d.config.model})
            try:
                return chunks, await anext(chunks)
            except StopAsyncIteration:
                raise UpstreamError(f"{d.config.name} sent an empty stream") from None

        started = time.monotonic()
        try:
            d, (chunks, head) = await self._route(model, first)
        except GatewayError:
            self._record(caller, model, None, None, started, "error")
            raise
        usage = head.get("usage")
        status = "cut"  # until the stream ends well (a client that leaves cuts it too)
        try:
            yield {**head, "model": model}
            async for chunk in chunks:
                usage = chunk.get("usage") or usage
                yield {**chunk, "model": model}
            status = "ok"
        except UpstreamError as exc:
            self._failed(d)
            raise GatewayError(502, f"the answer was cut off: {exc}", type="api_error",
                               code="stream_interrupted") from None
        finally:  # priced like any other call, from the usage the stream reported
            self._record(caller, model, d, usage, started, status)


def _for_caller(exc: UpstreamError) -> GatewayError:
    if exc.status == 429:
        return GatewayError(429, f"the provider is rate limiting: {exc}", type="rate_limit_error",
                            code="upstream_rate_limited", retry_after=exc.retry_after)
    if exc.retryable:
        return GatewayError(502, f"no deployment answered: {exc}", type="api_error",
                            code="upstream_error")
    if exc.status == 400:
        return GatewayError(400, f"the provider rejected the request: {exc}")
    return GatewayError(502, f"the provider refused the gateway ({exc}); check the "
                        "deployment's key and settings", type="api_error", code="upstream_error")
