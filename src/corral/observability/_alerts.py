"""Alerts: a budget's soft limit reached, a circuit breaker opened, a model's error rate
spiking, an agent caught looping. Each is logged and, when a webhook is configured, POSTed to
it as JSON signed with HMAC-SHA256 (``X-Corral-Signature: sha256=<hex>`` over the body), in the
background, so nothing waits for the receiver. The same alert (kind and key) is sent once per
``dedup`` seconds.

```toml
[observability.alerts]
webhook = "https://hooks.example.com/corral"
secret_env = "CORRAL_ALERT_SECRET"   # the HMAC key, from the environment
dedup = 600
```
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import httpx

from .._errors import UsageError

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("corral.alerts")


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class Alerts:
    def __init__(self, webhook: str | None = None, secret: bytes | None = None, *,
                 dedup: float = 600.0, timeout: float = 5.0) -> None:
        if webhook and not secret:
            raise UsageError("an alert webhook needs a secret to sign with "
                             "([observability.alerts] secret_env)")
        self.webhook = webhook
        self.secret = secret or b""
        self.dedup = dedup
        self.timeout = timeout
        self.sent: dict[tuple[str, str], float] = {}
        self.failed = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(cls, config: Config) -> Alerts:
        section = ((config.sections or {}).get("observability") or {}).get("alerts") or {}
        unknown = set(section) - {"webhook", "secret_env", "dedup"}
        if unknown:
            raise UsageError(f"{config.source}: observability.alerts has no {sorted(unknown)[0]!r}"
                             "; it takes webhook, secret_env, dedup")
        secret = os.environ.get(section["secret_env"], "") if section.get("secret_env") else ""
        return cls(section.get("webhook"), secret.encode() or None,
                   dedup=float(section.get("dedup", 600.0)))

    def fire(self, kind: str, key: str, message: str, **details: Any) -> bool:
        """Raise an alert (False: the same one was raised within ``dedup`` seconds)."""
        now = time.monotonic()
        last = self.sent.get((kind, key))
        if last is not None and now - last < self.dedup:
            return False
        self.sent[(kind, key)] = now
        log.warning("alert %s (%s): %s", kind, key, message)
        if self.webhook:
            body = json.dumps({"kind": kind, "key": key, "message": message, "at": time.time(),
                               "details": details}, default=str).encode()
            try:
                task = asyncio.get_running_loop().create_task(self._post(body))
            except RuntimeError:  # (no event loop: logged only)
                return True
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    async def _post(self, body: bytes) -> None:
        assert self.webhook is not None
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                reply = await client.post(self.webhook, content=body, headers={
                    "Content-Type": "application/json",
                    "X-Corral-Signature": signature(self.secret, body)})
            if reply.status_code >= 300:
                raise httpx.HTTPStatusError(f"HTTP {reply.status_code}", request=reply.request,
                                            response=reply)
        except httpx.HTTPError as exc:
            self.failed += 1
            log.error("alerts: the webhook did not take an alert (%s)", exc)

    async def drain(self) -> None:
        """Wait for the alerts being sent."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


_installed: Alerts | None = None


def install(alerts: Alerts | None) -> None:
    global _installed
    _installed = alerts


def alerts() -> Alerts:
    """The process's alerts (built from corral.toml on first use; log-only without one)."""
    global _installed
    if _installed is None:
        from ..config import load_config

        _installed = Alerts.from_config(load_config())
    return _installed
