"""The gateway in process: configuration errors, routing, the breaker's probe, Retry-After."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from _servers import Upstream

import corral
from corral.gateway import Gateway, GatewayError, parse_gateway


def config(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "allow_unauthenticated": True,
        "deployments": [
            {"name": n, "provider": "openai", "model": n, "base_url": url}
            for n in ("ok", "down", "busy", "flaky", "hang")
        ],
        **extra,
    }


def body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("section", "error"), [
    (None, "has no \\[gateway\\] section"),
    ({"allow_unauthenticated": True, "deployments": []}, "deployments: List should have at "
     "least 1 item"),
    ({"deployments": [{"name": "a", "provider": "simulator", "model": "m"}]},
     "set master_key_env"),
    ({"allow_unauthenticated": True,
      "deployments": [{"name": "a", "provider": "openai", "model": "m"}]}, "needs base_url"),
    ({"allow_unauthenticated": True, "aliases": {"fast": ["nope"]},
      "deployments": [{"name": "a", "provider": "simulator", "model": "m"}]},
     "unknown deployment 'nope'"),
    ({"allow_unauthenticated": True, "deployments": [
        {"name": "a", "provider": "simulator", "model": "m", "wieght": 2}]},
     "deployments.0.wieght: Extra inputs are not permitted"),
])
def test_a_bad_gateway_section_says_what_and_where(section: Any, error: str) -> None:
    with pytest.raises(corral.UsageError, match=error):
        parse_gateway(section, "corral.toml")


async def test_a_breaker_lets_one_probe_through_after_its_cooldown(upstream: Upstream) -> None:
    gateway = Gateway(parse_gateway(config(
        upstream.url, aliases={"pair": ["down", "ok"]},
        breaker={"failures": 1, "cooldown": 0.2}, retry={"attempts": 1})))
    before = upstream.calls["down"]
    await gateway.chat(body("pair"))  # down fails once: open
    await gateway.chat(body("pair"))
    assert upstream.calls["down"] == before + 1  # skipped while open
    time.sleep(0.25)
    await gateway.chat(body("pair"))  # the probe: it fails, open again
    await gateway.chat(body("pair"))
    assert upstream.calls["down"] == before + 2
    await gateway.close()


async def test_a_deployment_that_recovers_closes_its_breaker(upstream: Upstream) -> None:
    upstream.calls["flaky"] = 0
    gateway = Gateway(parse_gateway(config(upstream.url, retry={"attempts": 2,
                                                                "initial": 0.01})))
    answer = await gateway.chat(body("flaky"))  # 503, then ok on the second pass
    assert answer["choices"][0]["message"]["content"].startswith("hello from flaky")
    assert upstream.calls["flaky"] == 2
    await gateway.close()


async def test_a_retry_after_longer_than_max_wait_is_returned_at_once(
    upstream: Upstream
) -> None:
    gateway = Gateway(parse_gateway(config(upstream.url, retry={"attempts": 3,
                                                                "max_wait": 0.5})))
    started = time.monotonic()
    with pytest.raises(GatewayError) as info:
        await gateway.chat(body("busy"))  # asks for 1 s: longer than a caller should wait
    assert time.monotonic() - started < 0.5
    assert (info.value.status, info.value.retry_after) == (429, 1.0)
    await gateway.close()


async def test_all_breakers_open_is_a_503_with_retry_after(upstream: Upstream) -> None:
    gateway = Gateway(parse_gateway(config(upstream.url, breaker={"failures": 1,
                                                                  "cooldown": 30},
                                           retry={"attempts": 1})))
    with pytest.raises(GatewayError):
        await gateway.chat(body("down"))
    with pytest.raises(GatewayError) as info:
        await gateway.chat(body("down"))
    assert info.value.status == 503 and 0 < (info.value.retry_after or 0) <= 30
    await gateway.close()


async def test_weighted_routing_sends_more_to_the_heavier_deployment() -> None:
    section = {"allow_unauthenticated": True, "routing": "weighted",
               "aliases": {"both": ["heavy", "light"]},
               "deployments": [
                   {"name": "heavy", "provider": "simulator", "model": "h", "weight": 9},
                   {"name": "light", "provider": "simulator", "model": "l", "weight": 1}]}
    gateway = Gateway(parse_gateway(section))
    firsts = [gateway._candidates("both")[0].config.name for _ in range(2000)]
    assert 0.85 < firsts.count("heavy") / 2000 < 0.95
    await gateway.close()


async def test_a_probe_whose_caller_leaves_does_not_shut_the_deployment_out(
    upstream: Upstream,
) -> None:
    gateway = Gateway(parse_gateway(config(upstream.url, breaker={"failures": 1,
                                                                  "cooldown": 0.01})))
    gateway._deployments["hang"].breaker.open_until = time.monotonic()  # open, cooled down
    for _ in range(2):  # each request is let through as the probe, then abandoned
        before = upstream.calls["hang"]
        call = asyncio.create_task(gateway.chat(body("hang")))
        while upstream.calls["hang"] == before:
            assert not call.done(), "the deployment was not tried: its breaker stayed shut"
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await gateway.close()


async def test_a_request_the_provider_refuses_does_not_open_the_breaker() -> None:
    gw = Gateway(parse_gateway({
        "allow_unauthenticated": True, "breaker": {"failures": 1, "cooldown": 60},
        "deployments": [{"name": "sim", "provider": "simulator", "model": "sim"}]}))
    try:
        for _ in range(3):  # the caller's fault (400), not the deployment's
            with pytest.raises(GatewayError) as refused:
                await gw.chat({"model": "sim", "messages": [{"role": "user", "content": 5}]})
            assert refused.value.status == 400
        answer = await gw.chat(body("sim"))
        assert answer["choices"][0]["message"]["content"]
    finally:
        await gw.close()
