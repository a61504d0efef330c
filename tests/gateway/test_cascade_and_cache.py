"""Model cascades (a cheap model first, a stronger one when a check rejects the answer) and the
exact cache, in process against the real upstream."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from _servers import Upstream

import corral
from corral.gateway import Caller, Gateway, GatewayError, parse_gateway

MODELS = ("ok", "json", "sure", "unsure", "down")


def gateway(upstream: Upstream, **extra: Any) -> Gateway:
    return Gateway(parse_gateway({
        "allow_unauthenticated": True, "retry": {"attempts": 1}, "breaker": {"failures": 100},
        "deployments": [{"name": n, "provider": "openai", "model": n, "base_url": upstream.url}
                        for n in MODELS],
        **extra}))


def ask(model: str, text: str = "hi", **options: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **options}


def escalations(gw: Gateway, cascade: str, model: str, reason: str) -> float:
    value = gw.metrics.registry.get_sample_value(
        "corral_gateway_cascade_escalations_total",
        {"cascade": cascade, "model": model, "reason": reason})
    return value or 0.0


def reject_short(request: dict[str, Any], text: str) -> bool | str:
    return "too short" if len(text) < 20 else True


async def test_an_answer_that_breaks_the_requested_schema_escalates(upstream: Upstream) -> None:
    gw = gateway(upstream, cascades={"smart": {"models": ["ok", "json"]}})
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"answer": {"type": "integer"}},
        "required": ["answer"]}}}
    try:
        plain = await gw.chat(ask("smart"))  # no format asked: the cheap answer is kept
        assert plain["model"] == "smart" and plain["choices"][0]["message"]["content"] == \
            "hello from ok: hi"
        structured = await gw.chat(ask("smart", response_format=schema))
        assert structured["choices"][0]["message"]["content"] == '{"answer": 42}'
        assert escalations(gw, "smart", "ok", "not JSON") == 1
        assert gw.metrics.registry.get_sample_value(
            "corral_gateway_cascade_requests_total", {"cascade": "smart"}) == 2
    finally:
        await gw.close()


async def test_low_confidence_and_a_validator_escalate(upstream: Upstream) -> None:
    gw = gateway(upstream, cascades={
        "by-confidence": {"models": ["unsure", "sure", "ok"], "min_confidence": 0.5},
        "by-validator": {"models": ["sure", "ok"],
                         "validator": f"{__name__}:reject_short"}})
    try:
        answer = await gw.chat(ask("by-confidence"))
        assert answer["choices"][0]["message"]["content"] == "sure answer"
        assert answer["choices"][0]["logprobs"] is None  # asked for the check, not shown
        assert escalations(gw, "by-confidence", "unsure", "low confidence") == 1
        answer = await gw.chat(ask("by-validator"))
        assert answer["choices"][0]["message"]["content"] == "hello from ok: hi"
        assert escalations(gw, "by-validator", "sure", "validator") == 1
    finally:
        await gw.close()


async def test_a_failing_cheap_model_escalates_and_streams_get_the_whole_answer(
        upstream: Upstream) -> None:
    gw = gateway(upstream, cascades={"safe": {"models": ["down", "ok"]}})
    try:
        chunks = [c async for c in gw.stream(ask("safe", stream=True))]
        assert chunks[0]["choices"][0]["delta"]["content"] == "hello from ok: hi"
        assert chunks[-1]["usage"]["total_tokens"] == 8
        assert escalations(gw, "safe", "down", "error") == 1
    finally:
        await gw.close()


def test_a_bad_cascade_is_a_config_error() -> None:
    base = {"allow_unauthenticated": True,
            "deployments": [{"name": "a", "provider": "simulator", "model": "a"}]}
    with pytest.raises(corral.UsageError, match="unknown model 'b'"):
        parse_gateway({**base, "cascades": {"c": {"models": ["a", "b"]}}})
    with pytest.raises(corral.UsageError, match="cannot be loaded"):
        Gateway(parse_gateway({**base, "cascades": {"c": {"models": ["a", "a"],
                                                           "validator": "nowhere:fn"}}}))


async def test_the_exact_cache_is_per_tenant_with_a_ttl_and_an_opt_out(
        upstream: Upstream) -> None:
    gw = gateway(upstream, cache={"exact": True, "ttl": 0.3})
    acme, other = Caller(tenant="acme"), Caller(tenant="other")
    text = f"cache me {time.monotonic()}"
    try:
        before = upstream.calls["ok"]
        first = await gw.chat(ask("ok", text), acme)
        again = await gw.chat(ask("ok", text, stream=False, user="u1"), acme)
        assert again["choices"] == first["choices"] and upstream.calls["ok"] == before + 1
        await gw.chat(ask("ok", text), other)  # another tenant never sees acme's answers
        await gw.chat(ask("ok", text), acme, cache=False)  # opted out
        await gw.chat(ask("ok", text, temperature=0.5), acme)  # another request
        assert upstream.calls["ok"] == before + 4
        streamed = [c async for c in gw.stream(ask("ok", text, stream=True), acme)]
        assert streamed[0]["choices"][0]["delta"]["content"] == "hello from ok: " + text
        assert upstream.calls["ok"] == before + 4  # a stream is served from the cache too
        deadline = time.monotonic() + 10
        while upstream.calls["ok"] == before + 4:  # the entry expires after its ttl
            assert time.monotonic() < deadline
            await gw.chat(ask("ok", text), acme)
        hits = gw.metrics.registry.get_sample_value("corral_gateway_cache_lookups_total",
                                                    {"cache": "exact", "result": "hit"})
        assert hits is not None and hits >= 2
    finally:
        await gw.close()


async def test_errors_are_not_cached(upstream: Upstream) -> None:
    gw = gateway(upstream, cache={"exact": True})
    try:
        for _ in range(2):
            with pytest.raises(GatewayError):
                await gw.chat(ask("down"))
        assert upstream.calls["down"] >= 2
    finally:
        await gw.close()


async def test_the_semantic_cache_in_the_gateway(upstream: Upstream) -> None:
    """A paraphrase from the same tenant is served from the cache; another tenant, another
    number, a raised threshold or an opt-out goes to the model."""
    gw = gateway(upstream, cache={"semantic": True, "embedder": "minilm"})
    acme = Caller(tenant="acme")
    try:
        before = upstream.calls["ok"]
        first = await gw.chat(ask("ok", "How do I reset my password?"), acme)
        while not len(gw._semantic):  # stored in the background
            await asyncio.sleep(0.01)
        hit = await gw.chat(ask("ok", "How can I reset my password?"), acme)
        assert hit["choices"] == first["choices"] and upstream.calls["ok"] == before + 1
        await gw.chat(ask("ok", "How can I reset my password?"), Caller(tenant="globex"))
        await gw.chat(ask("ok", "How can I reset my password?"), acme, similarity=0.999)
        await gw.chat(ask("ok", "How can I reset my password?"), acme, cache=False)
        await gw.chat(ask("ok", "How do I reset my password?", temperature=1), acme)
        assert upstream.calls["ok"] == before + 5
        hits = gw.metrics.registry.get_sample_value("corral_gateway_cache_lookups_total",
                                                    {"cache": "semantic", "result": "hit"})
        assert hits == 1
    finally:
        await gw.close()


async def test_the_semantic_cache_refuses_another_number(upstream: Upstream) -> None:
    gw = gateway(upstream, cache={"semantic": True, "embedder": "minilm"})
    try:
        before = upstream.calls["ok"]
        await gw.chat(ask("ok", "What is the status of order 1234?"))
        while not len(gw._semantic):
            await asyncio.sleep(0.01)
        answer = await gw.chat(ask("ok", "What is the status of order 1243?"))
        assert answer["choices"][0]["message"]["content"].endswith("order 1243?")
        assert upstream.calls["ok"] == before + 2
    finally:
        await gw.close()
