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
import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .._errors import UsageError
from ..observability._tracing import describe_step, standalone
from ._cache import ExactCache, MemoryCache, RedisCache, request_key
from ._cascade import load_validator, rejection, wants_logprobs
from ._config import Cascade, Deployment, GatewayConfig, Price
from ._keys import Key
from ._ledger import Call, Ledger
from ._limits import Counters, Limiter, MemoryCounters, RedisCounters, Ticket
from ._metrics import Metrics
from ._providers import Provider, UpstreamError, chunks_of, provider

if TYPE_CHECKING:
    from ..governance._chain import Governance

T = TypeVar("T")
log = logging.getLogger("corral.gateway")


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
    """The label the ledger records: a virtual key's id, "master", "in-process"."""
    workflow: str | None = None
    run_id: str | None = None
    agent: str | None = None
    agent_version: str | None = None
    key: Key | None = None
    """The virtual key, whose own limits and budget apply."""
    trace: tuple[str, str] | None = None
    """(trace id, span id) of the caller's span (W3C traceparent), for the call's span."""


class Gateway:
    """The gateway in process: corral's agents call it directly; the HTTP server wraps it.
    With a `Ledger`, every call's tokens and cost are recorded; ``redis`` is where the
    counters and the exact cache live when the config says ``counters = "redis"``."""

    def __init__(self, config: GatewayConfig, ledger: Ledger | None = None, *,
                 redis: str | None = None, governance: Governance | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self.governance = governance
        self._deployments = {d.name: _Deployment(d) for d in config.deployments}
        self._models = {name: [self._deployments[d.name] for d in ds]
                        for name, ds in config.models().items()}
        if config.counters == "redis" and not redis:
            raise UsageError("gateway.counters = \"redis\" needs Redis: set redis in "
                             "corral.toml or $CORRAL_REDIS_URL")
        counters: Counters = RedisCounters(redis) if config.counters == "redis" and redis \
            else MemoryCounters()
        self.limiter = Limiter(config, counters,
                               ledger.spent_since if ledger is not None else None)
        self._exact: ExactCache | None = None
        if config.cache.exact:
            self._exact = (RedisCache(redis, config.cache.ttl) if config.counters == "redis"
                           and redis else MemoryCache(config.cache.ttl, config.cache.max_entries))
        self._semantic: Any = None
        if config.cache.semantic:
            from ._semantic import semantic_cache

            self._semantic = semantic_cache(config.cache)
        self._validators = {name: load_validator(c.validator)
                            for name, c in config.cascades.items() if c.validator}
        self._background: set[asyncio.Task[Any]] = set()
        self._recent: dict[str, deque[bool]] = {}
        self.metrics = Metrics(self._state)

    @property
    def models(self) -> list[str]:
        return [*self._models, *self.config.cascades]

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for d in self._deployments.values():
            await d.provider.close()
        await self.limiter.counters.close()
        if self._exact is not None:
            await self._exact.close()
        if self.ledger is not None:
            await self.ledger.close()
        if self.governance is not None:
            await self.governance.close()

    def _state(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"breakers": {name: d.breaker.open_until > now
                             for name, d in self._deployments.items()},
                "rejected": dict(self.limiter.rejected),
                "utilization": dict(self.limiter.utilization)}

    def _price(self, d: _Deployment) -> Price | None:
        return self.config.prices.get(d.config.name) or self.config.prices.get(d.config.model)

    def _account(self, caller: Caller, model: str, d: _Deployment | None,
                 usage: dict[str, Any] | None, started: float, status: str,
                 cache: str = "off", estimate: Ticket | None = None,
                 operation: str = "chat") -> tuple[int, float]:
        """Metrics and the ledger for one call; its tokens and cost (a stream cut before it
        reported its usage: the ``estimate`` reserved for it)."""
        usage = usage or {}
        input_tokens = int(usage.get("prompt_tokens") or 0)
        output_tokens = int(usage.get("completion_tokens") or 0)
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        price = self._price(d) if d is not None else None
        cost = price.cost(input_tokens, output_tokens, cached) if price else 0.0
        if estimate is not None:
            input_tokens, cost = estimate.tokens, estimate.reserved
        elapsed = time.monotonic() - started
        self.metrics.call(caller.tenant, model, status, elapsed, input_tokens, output_tokens,
                          cached, cost)
        self._error_rate(model, status == "error")
        if self.ledger is not None:
            self.ledger.record(Call(
                at=time.time(), tenant=caller.tenant, key_id=caller.key_id,
                workflow=caller.workflow, run_id=caller.run_id, agent=caller.agent,
                model=model, deployment=d.config.name if d is not None else None,
                input_tokens=input_tokens, output_tokens=output_tokens, cached_tokens=cached,
                cost=cost, priced=price is not None or (input_tokens + output_tokens == 0),
                latency_ms=round(elapsed * 1000, 3), cache=cache, status=status,
            ))
        _trace(caller, operation, model, d, input_tokens, output_tokens, cached, cost, cache,
               status, elapsed)
        return input_tokens + output_tokens, cost

    def _error_rate(self, model: str, failed: bool) -> None:
        """Alert when over half of a model's last 50 calls (20 at least) failed."""
        recent = self._recent.get(model)
        if recent is None:
            recent = self._recent[model] = deque(maxlen=50)
        recent.append(failed)
        if failed and len(recent) >= 20 and sum(recent) * 2 > len(recent):
            from ..observability._alerts import alerts

            alerts().fire("error_rate", model, f"{sum(recent)} of the last {len(recent)} "
                          f"calls to {model!r} failed", failed=sum(recent), calls=len(recent))

    def _candidates(self, model: str) -> list[_Deployment]:
        found = self._models.get(model)
        if found is None:
            raise GatewayError(404, f"the model {model!r} does not exist; the models are "
                               f"{', '.join(self.models)}", code="model_not_found",
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
            if b.open_until <= time.monotonic():  # closed (or half-open) until now
                from ..observability._alerts import alerts

                alerts().fire("breaker_open", d.config.name, f"the circuit breaker of "
                              f"deployment {d.config.name!r} opened after {b.failures} "
                              "failures in a row", cooldown=self.config.breaker.cooldown)
            b.open_until = time.monotonic() + self.config.breaker.cooldown
        b.probing = False

    async def _route(self, model: str, candidates: list[_Deployment],
                     call: Callable[[_Deployment], Awaitable[T]]) -> tuple[_Deployment, T]:
        """``call`` on each deployment in turn until one answers; the waits between passes;
        the last failure, for the caller, when none does."""
        retry = self.config.retry
        last: UpstreamError | None = None
        for attempt in range(retry.attempts):
            hint = 0.0
            for d in candidates:
                if not d.breaker.admits(time.monotonic()):
                    continue
                started = time.monotonic()
                try:
                    result = await call(d)
                except UpstreamError as exc:
                    if not exc.retryable:  # (the request's fault, not the deployment's)
                        d.breaker.probing = False
                        raise _for_caller(exc) from None
                    self._failed(d)
                    last = exc
                    hint = max(hint, exc.retry_after or 0.0)
                    continue
                except BaseException:  # the caller left, or a bug: a probe may be made again
                    d.breaker.probing = False
                    raise
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

    async def _admit(self, caller: Caller, model: str, candidates: list[_Deployment],
                     body: dict[str, Any]) -> Ticket | None:
        """Take the call's rate limits and reserve its estimated cost against its budgets."""
        if not self.limiter.applies(caller):
            return None
        tokens = _prompt_tokens(body)
        output = body.get("max_completion_tokens") or body.get("max_tokens")
        output = output if isinstance(output, int) and output > 0 else \
            self.config.output_estimate
        prices = [p for p in map(self._price, candidates) if p is not None]
        cost = max((p.cost(tokens, output, 0) for p in prices), default=0.0)
        try:
            return await self.limiter.admit(caller, model, tokens, cost)
        except GatewayError as exc:
            if exc.code == "budget_exceeded":
                self._record(caller, "budget_stop", model, decision="stop", rule=str(exc))
            raise

    def _govern(self, caller: Caller, body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The model chain's governance before the call: the agent must be registered (with
        enforcement on), and the request is redacted; the vault maps the answer back."""
        gov = self.governance
        if gov is None:
            return body, None
        from ..governance._registry import UnregisteredAgent

        try:
            gov.identify(caller.tenant, caller.agent, caller.agent_version)
        except UnregisteredAgent as exc:
            self._record(caller, "policy_decision", body.get("model"), decision="deny",
                         rule="registry")
            raise GatewayError(403, str(exc), type="permission_error",
                               code="agent_not_registered") from None
        return gov.redact_request(body)

    def _record(self, caller: Caller, kind: str, model: str | None, *,
                inputs: Any = None, outputs: Any = None, decision: str | None = None,
                rule: str | None = None) -> None:
        gov = self.governance
        if gov is None or gov.log is None:
            return
        from ..governance._records import DecisionRecord

        prompt = next((m.get("content") for m in inputs or () if isinstance(m, dict)
                       and m.get("role") in ("system", "developer")), None)
        version = None  # the prompt's version: its content's hash, so any edit is a new one
        if isinstance(prompt, str):
            version = hashlib.blake2b(prompt.encode(), digest_size=6).hexdigest()
        gov.record(DecisionRecord(
            kind=kind, tenant=caller.tenant, agent=caller.agent,  # type: ignore[arg-type]
            agent_version=caller.agent_version, model=model, inputs=inputs, outputs=outputs,
            prompt=prompt if isinstance(prompt, str) else None, prompt_version=version,
            decision=decision, rule=rule, run_id=caller.run_id))

    async def _cached(self, body: dict[str, Any], caller: Caller,
                      similarity: float | None) -> tuple[dict[str, Any] | None, str, Any]:
        """A cached answer, the cache it came from, and where to store the answer otherwise."""
        exact_key = semantic_key = None
        if self._exact is not None:
            exact_key = request_key(caller.tenant, body)
            try:
                hit = await self._exact.get(exact_key)
            except Exception as exc:  # the cache is best-effort: the model still answers
                log.warning("gateway: the exact cache failed (%s); asking the model", exc)
                hit = None
            self.metrics.cache.labels("exact", "hit" if hit else "miss").inc()
            if hit is not None:
                return hit, "hit", None
        if self._semantic is not None:
            semantic_key = _semantic_key(body)
            if semantic_key is not None:
                scope, text = semantic_key
                found = await asyncio.to_thread(self._semantic.lookup, caller.tenant, scope,
                                                text, threshold=similarity)
                self.metrics.cache.labels("semantic", "hit" if found else "miss").inc()
                if found is not None:
                    return found.answer, "semantic_hit", None
        return None, "miss", (exact_key, semantic_key)

    async def _keep(self, caller: Caller, where: Any, answer: dict[str, Any]) -> None:
        """Cache an answer: at once in the exact cache (so the next identical request hits),
        in the background in the semantic one (embedding takes a while)."""
        exact_key, semantic_key = where
        if self._exact is not None and exact_key is not None:
            try:
                await self._exact.put(exact_key, answer)
            except Exception as exc:
                log.warning("gateway: the exact cache failed to keep an answer (%s)", exc)
        if self._semantic is not None and semantic_key is not None:
            scope, text = semantic_key
            self._later(asyncio.to_thread(self._semantic.store, caller.tenant, scope, text,
                                          answer))

    def _later(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def chat(self, body: dict[str, Any], caller: Caller = Caller(), *,
                   cache: bool = True, similarity: float | None = None) -> dict[str, Any]:
        """A chat completion (OpenAI's request and response bodies). ``cache=False`` skips
        the caches; ``similarity`` raises the semantic cache's threshold for this call."""
        model = body["model"]
        cascade = self.config.cascades.get(model)
        if cascade is not None:
            return await self._cascade(model, cascade, body, caller, cache, similarity)
        candidates = self._candidates(model)
        started = time.monotonic()
        sent, vault = self._govern(caller, body)
        where = None
        if cache and (self._exact is not None or self._semantic is not None):
            hit, status, where = await self._cached(body, caller, similarity)
            if hit is not None:
                self._account(caller, model, None, None, started, "ok", status)
                return {**hit, "model": model}
        ticket = await self._admit(caller, model, candidates, body)
        self.metrics.in_flight.inc()
        d: _Deployment | None = None
        answer: dict[str, Any] | None = None
        try:
            d, answer = await self._route(
                model, candidates, lambda d: d.provider.chat({**sent, "model": d.config.model}))
        finally:
            self.metrics.in_flight.dec()
            tokens, cost = self._account(caller, model, d, answer and answer.get("usage"),
                                         started, "ok" if answer else "error",
                                         "miss" if where else "off")
            if ticket is not None:
                await self.limiter.settle(ticket, tokens, cost)
        assert answer is not None
        if self.governance is not None:
            self._record(caller, "model_call", model, inputs=sent.get("messages"),
                         outputs=[c.get("message") for c in answer.get("choices") or ()],
                         decision=(answer.get("choices") or [{}])[0].get("finish_reason"))
            answer = self.governance.restore_answer(answer, vault)
        if where is not None:
            await self._keep(caller, where, answer)
        return {**answer, "model": model}

    async def _cascade(self, name: str, cascade: Cascade, body: dict[str, Any],
                       caller: Caller, cache: bool, similarity: float | None
                       ) -> dict[str, Any]:
        self.metrics.cascade.labels(name).inc()
        validator = self._validators.get(name)
        logprobs = wants_logprobs(cascade) and not body.get("logprobs")
        for model in cascade.models[:-1]:
            ask = {**body, "model": model, **({"logprobs": True} if logprobs else {})}
            try:
                answer = await self.chat(ask, caller, cache=cache, similarity=similarity)
            except GatewayError as exc:
                if exc.status < 500:
                    raise
                reason = "error"
            else:
                reason = rejection(cascade, validator, body, answer) or ""
                if not reason:
                    break
            self.metrics.escalations.labels(name, model, reason.split(":")[0]).inc()
        else:
            answer = await self.chat({**body, "model": cascade.models[-1]}, caller,
                                     cache=cache, similarity=similarity)
        if logprobs:
            answer = {**answer, "choices": [{**c, "logprobs": None} for c in answer["choices"]]}
        return {**answer, "model": name}

    async def stream(self, body: dict[str, Any], caller: Caller = Caller(), *,
                     cache: bool = True, similarity: float | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        """The chunks of a streamed completion. Until the first chunk arrives a failure moves
        on to the next deployment; after it, the stream fails (`GatewayError`): a half answer
        is never passed off as a whole one. Cascades and cache hits stream their whole answer
        at once."""
        model = body["model"]
        if model in self.config.cascades:
            whole = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
            answer = await self.chat(whole, caller, cache=cache, similarity=similarity)
            for chunk in chunks_of({**answer, "model": model}):
                yield chunk
            return
        candidates = self._candidates(model)
        sent, vault = self._govern(caller, body)  # (cache hits too are for registered agents)
        if cache and (self._exact or self._semantic):
            started = time.monotonic()
            hit, status, _ = await self._cached(body, caller, similarity)
            if hit is not None:
                self._account(caller, model, None, None, started, "ok", status)
                for chunk in chunks_of({**hit, "model": model}):
                    yield chunk
                return

        async def first(d: _Deployment) -> tuple[AsyncIterator[dict[str, Any]], dict[str, Any]]:
            chunks = d.provider.stream({**sent, "model": d.config.model})
            try:
                return chunks, await anext(chunks)
            except StopAsyncIteration:
                raise UpstreamError(f"{d.config.name} sent an empty stream") from None

        started = time.monotonic()
        ticket = await self._admit(caller, model, candidates, body)
        self.metrics.in_flight.inc()
        d: _Deployment | None = None
        usage = None
        status = "error"
        try:
            d, (chunks, head) = await self._route(model, candidates, first)
            usage = head.get("usage")
            status = "cut"  # until the stream ends well (a client that leaves cuts it too)
            restore = _Restorer(vault) if vault is not None and len(vault) else None
            async for chunk in _chain_head(head, chunks):
                usage = chunk.get("usage") or usage
                for out in (restore.chunk(chunk) if restore else (chunk,)):
                    yield {**out, "model": model}
            status = "ok"
            if self.governance is not None:
                self._record(caller, "model_call", model, inputs=sent.get("messages"),
                             decision="stream")
        except UpstreamError as exc:
            assert d is not None
            self._failed(d)
            raise GatewayError(502, f"the answer was cut off: {exc}", type="api_error",
                               code="stream_interrupted") from None
        finally:  # priced like any other call, from the usage the stream reported
            self.metrics.in_flight.dec()
            estimate = None
            if usage is None and d is not None and ticket is not None:
                estimate = ticket  # cut before its usage came: charged what was reserved
            tokens, cost = self._account(caller, model, d, usage, started, status,
                                         estimate=estimate)
            if ticket is not None:
                await self.limiter.settle(ticket, tokens, cost)

    async def embed(self, body: dict[str, Any], caller: Caller = Caller()) -> dict[str, Any]:
        """Embeddings (OpenAI's request and response bodies)."""
        model = body["model"]
        candidates = self._candidates(model)
        started = time.monotonic()
        ticket = await self._admit(caller, model, candidates,
                                   {"messages": [], "input": body.get("input"),
                                    "max_tokens": 1})
        d: _Deployment | None = None
        answer: dict[str, Any] | None = None
        try:
            d, answer = await self._route(
                model, candidates, lambda d: d.provider.embed({**body, "model": d.config.model}))
        finally:
            tokens, cost = self._account(caller, model, d, answer and answer.get("usage"),
                                         started, "ok" if answer else "error",
                                         operation="embeddings")
            if ticket is not None:
                await self.limiter.settle(ticket, tokens, cost)
        assert answer is not None
        return {**answer, "model": model}


def _trace(caller: Caller, operation: str, model: str, d: _Deployment | None, input_tokens: int,
           output_tokens: int, cached: int, cost: float, cache: str, status: str,
           elapsed: float) -> None:
    """The call's span: the step's, when the call is made in a step (in process), else one of
    its own (over HTTP), under the caller's traceparent."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation, "gen_ai.request.model": model,
        "gen_ai.provider.name": d.config.provider if d is not None else "corral.cache",
        "gen_ai.usage.input_tokens": input_tokens, "gen_ai.usage.output_tokens": output_tokens,
        "gen_ai.usage.cache_read.input_tokens": cached, "corral.cost_usd": cost,
        "corral.cache": cache, "corral.tenant": caller.tenant,
    }
    if d is not None:
        attributes["gen_ai.response.model"] = d.config.model
        attributes["corral.deployment"] = d.config.name
    if caller.agent:
        attributes["gen_ai.agent.name"] = caller.agent
    if status != "ok":
        attributes["error.type"] = status
    name = f"{operation} {model}"
    if not describe_step(name, attributes):
        standalone(name, time.time() - elapsed, attributes, status="ok" if status == "ok"
                   else "error", message="" if status == "ok" else status, parent=caller.trace)


async def _chain_head(head: dict[str, Any], rest: AsyncIterator[dict[str, Any]]
                      ) -> AsyncIterator[dict[str, Any]]:
    yield head
    async for chunk in rest:
        yield chunk


class _Restorer:
    """Placeholders back to the caller's originals in a stream: each choice's text and each
    tool call's arguments, held back across chunks while a placeholder may be incomplete."""

    def __init__(self, vault: Any) -> None:
        self.vault = vault
        self.streams: dict[tuple[int, int | None], Any] = {}

    def _feed(self, key: tuple[int, int | None], text: str | None, last: bool) -> str | None:
        if text is None and not last:
            return None
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = self.vault.stream()
        out: str = stream.feed(text or "")
        if last:
            out += stream.flush()
        return out

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        choices = []
        for c in chunk.get("choices") or ():
            index = c.get("index", 0)
            last = c.get("finish_reason") is not None
            delta = dict(c.get("delta") or {})
            if "content" in delta or last:
                text = self._feed((index, None), delta.get("content"), last)
                if text is not None:
                    delta["content"] = text
            if delta.get("tool_calls"):
                delta["tool_calls"] = [
                    {**t, "function": {**t.get("function", {}), "arguments": self._feed(
                        (index, t.get("index", 0)), (t.get("function") or {}).get("arguments"),
                        False) or ""}} for t in delta["tool_calls"]]
            if last:  # what the tool calls' streams still hold
                for (i, t), _ in list(self.streams.items()):
                    if i == index and t is not None:
                        rest = self._feed((i, t), None, True)
                        if rest:
                            delta.setdefault("tool_calls", []).append(
                                {"index": t, "function": {"arguments": rest}})
            choices.append({**c, "delta": delta})
        return [{**chunk, "choices": choices}] if chunk.get("choices") else [chunk]


def _prompt_tokens(body: dict[str, Any]) -> int:
    """About how many tokens the request's prompt holds (4 characters a token)."""
    chars = 0
    for m in body.get("messages") or ():
        content = m.get("content") if isinstance(m, dict) else None
        chars += len(content) if isinstance(content, str) else len(str(content or ""))
        chars += 16
    extra = body.get("input")
    if extra is not None:
        chars += len(extra) if isinstance(extra, str) else len(str(extra))
    if body.get("tools"):
        chars += len(str(body["tools"]))
    return chars // 4 + 1


def _semantic_key(body: dict[str, Any]) -> tuple[str, str] | None:
    """(scope, question) for the semantic cache: the question is the last user message's text;
    the scope is everything else about the request, so only the same model, settings and
    conversation before it can share an answer."""
    messages = body.get("messages") or []
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "user" or \
            not isinstance(last.get("content"), str):
        return None
    rest = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "user")}
    rest["messages"] = messages[:-1]
    return request_key("", rest), last["content"]


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
