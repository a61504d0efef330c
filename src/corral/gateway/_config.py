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
    provider: Literal["openai", "simulator"]
    model: str = Field(min_length=1)
    base_url: str | None = None
    api_key_env: str | None = None
    weight: float = Field(default=1.0, gt=0)
    timeout: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _needs_url(self) -> Deployment:
        if self.provider == "openai" and not self.base_url:
            raise ValueError(f"deployment {self.name!r} (provider openai) needs base_url")
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
