"""Alerts reach a webhook on 127.0.0.1, signed and deduplicated: from the gateway's breakers
and budgets, and fired directly."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import corral
from corral.gateway import Caller, Gateway, GatewayError, parse_gateway
from corral.observability._alerts import Alerts, install
from corral.testing import _free_port

SECRET = b"alert-secret-for-tests"


class Receiver:
    """A webhook that keeps what it gets and whether each signature verified."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, Any], bool]] = []
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="error", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        signed = hmac.compare_digest(request.headers.get("x-corral-signature", ""), expected)
        self.got.append((json.loads(body), signed))
        return Response(status_code=204)

    def kinds(self) -> list[str]:
        return [alert["kind"] for alert, _ in self.got]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    while not r.server.started:
        time.sleep(0.01)
    yield r
    r.server.should_exit = True
    r.thread.join(10)


async def test_alerts_are_signed_and_sent_once_per_window(receiver: Receiver) -> None:
    alerts = Alerts(receiver.url, SECRET, dedup=600)
    assert alerts.fire("loop_detected", "bot: repeats", "bot is looping", agent="bot")
    assert not alerts.fire("loop_detected", "bot: repeats", "bot is looping")  # deduplicated
    assert alerts.fire("loop_detected", "other: repeats", "other is looping")
    await alerts.drain()
    assert receiver.kinds() == ["loop_detected", "loop_detected"]
    assert all(signed for _, signed in receiver.got)
    bot = next(alert for alert, _ in receiver.got if alert["key"] == "bot: repeats")
    assert bot["details"] == {"agent": "bot"}  # (the two are sent concurrently: any order)


async def test_the_gateway_alerts_on_an_open_breaker_and_a_soft_budget(
        receiver: Receiver) -> None:
    alerts = Alerts(receiver.url, SECRET)
    install(alerts)
    gw = Gateway(parse_gateway({
        "allow_unauthenticated": True, "retry": {"attempts": 1},
        "breaker": {"failures": 2, "cooldown": 60},
        "deployments": [
            {"name": "gone", "provider": "openai", "model": "m",
             "base_url": f"http://127.0.0.1:{_free_port()}/v1"},
            {"name": "sim", "provider": "simulator", "model": "sim"}],
        "prices": {"sim": {"input": 1000.0, "output": 1000.0}},
        "budgets": [{"scope": "tenant", "soft": 0.001, "period": "day"}]}))
    try:
        for _ in range(3):
            with pytest.raises(GatewayError):
                await gw.chat({"model": "gone", "messages": [{"role": "user", "content": "x"}]})
        for _ in range(2):
            await gw.chat({"model": "sim", "messages": [{"role": "user", "content": "hi"}]},
                          Caller(tenant="acme"))
        await alerts.drain()
    finally:
        install(None)
        await gw.close()
    assert receiver.kinds() == ["breaker_open", "budget_soft_limit"]
    breaker, budget = (alert for alert, _ in receiver.got)
    assert breaker["key"] == "gone" and budget["details"]["name"] == "acme"


def test_a_webhook_needs_a_secret() -> None:
    with pytest.raises(corral.UsageError, match="needs a secret"):
        Alerts("http://127.0.0.1:1/hook", None)


async def test_a_receiver_that_is_down_is_logged_not_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    alerts = Alerts(f"http://127.0.0.1:{_free_port()}/hook", SECRET)
    alerts.fire("error_rate", "m", "half the calls failed")
    await alerts.drain()
    assert alerts.failed == 1 and "did not take an alert" in caplog.text
