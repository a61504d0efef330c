"""The gateway over HTTP, driven by the official openai SDK, in front of a real upstream."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from _servers import KEY, GatewayProcess, Upstream


@pytest.fixture
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)


def ask(client: openai.OpenAI, model: str, text: str = "hi", **options: object) -> object:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **options)  # type: ignore


def test_the_sdk_lists_models_and_gets_a_completion(client: openai.OpenAI,
                                                    upstream: Upstream) -> None:
    assert {"fast", "ok", "sim"} <= {m.id for m in client.models.list()}
    answer = ask(client, "ok", "ping")
    assert answer.choices[0].message.content == "hello from ok: ping"  # type: ignore[attr-defined]
    assert answer.model == "ok" and answer.usage.total_tokens == 8  # type: ignore[attr-defined]
    assert upstream.keys[-1] == "Bearer sk-upstream"  # the deployment's key, not the client's


def test_an_alias_fails_over_to_the_next_deployment(client: openai.OpenAI,
                                                    upstream: Upstream) -> None:
    before = upstream.calls["ok"]
    answer = ask(client, "fast", "where is my order?")
    assert answer.model == "fast"  # type: ignore[attr-defined]
    assert answer.choices[0].message.content.startswith("hello from ok")  # type: ignore
    assert upstream.calls["ok"] == before + 1 and upstream.calls["down"] >= 1


def test_a_dead_deployment_is_skipped_once_its_breaker_opens(client: openai.OpenAI,
                                                             upstream: Upstream) -> None:
    for _ in range(4):
        ask(client, "fast")
    failed = upstream.calls["down"]
    assert failed >= 3
    for _ in range(5):
        ask(client, "fast")
    assert upstream.calls["down"] == failed  # open: not asked again within the cooldown


def test_an_answer_that_is_not_a_completion_moves_on(client: openai.OpenAI) -> None:
    answer = ask(client, "junk-first")
    assert answer.choices[0].message.content.startswith("hello from ok")  # type: ignore


def test_streaming_through_the_sdk(client: openai.OpenAI) -> None:
    stream = ask(client, "ok", "stream me", stream=True)
    chunks = list(stream)  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "hello from ok: stream me"
    assert chunks[-1].usage.total_tokens == 8


def test_tool_calls_pass_through_streamed_and_not(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {
        "name": "lookup", "description": "Look an order up.",
        "parameters": {"type": "object", "properties": {"order": {"type": "string"}},
                       "required": ["order"]}}}]
    answer = ask(client, "sim", "where is order A-1?", tools=tools)
    [call] = answer.choices[0].message.tool_calls  # type: ignore[attr-defined]
    assert call.function.name == "lookup" and "order" in json.loads(call.function.arguments)
    streamed = list(ask(client, "sim", "where is order A-1?", tools=tools,  # type: ignore
                        stream=True))
    calls = [t for c in streamed if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert [t.function.name for t in calls] == ["lookup"]


def test_a_stream_cut_midway_reaches_the_client_as_an_error(client: openai.OpenAI) -> None:
    stream = ask(client, "cut", stream=True)
    with pytest.raises(openai.APIError, match="cut off"):
        list(stream)  # type: ignore[call-overload]


def test_errors_come_back_in_openais_shapes(gateway: GatewayProcess) -> None:
    bad_key = openai.OpenAI(base_url=gateway.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        ask(bad_key, "ok")
    good = openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(good, "gpt-nope")
    with pytest.raises(openai.BadRequestError, match="messages"):
        good.chat.completions.create(model="ok", messages=[])
    with pytest.raises(openai.RateLimitError) as limited:
        ask(good, "busy")
    assert limited.value.response.headers["retry-after"] == "1"

    url = f"{gateway.base_url}/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    malformed = httpx.post(url, content=b"{not json", headers=auth)
    assert malformed.status_code == 400
    assert "not valid JSON" in malformed.json()["error"]["message"]
    huge = httpx.post(url, content=b"x" * (5 * 1024 * 1024), headers=auth)
    assert (huge.status_code, huge.json()["error"]["code"]) == (413, "request_too_large")
    missing = httpx.get(f"{gateway.base_url}/nowhere", headers=auth)
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(gateway.base_url.removesuffix("/v1") + "/health").json() == {
        "status": "ok"}


def test_a_request_a_provider_cannot_read_is_a_400_not_a_500(gateway: GatewayProcess) -> None:
    reply = httpx.post(f"{gateway.base_url}/chat/completions",
                       headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "sim", "messages": [{"role": "user", "content": 5}]})
    assert reply.status_code == 400 and "cannot read the request" in reply.text
    developer = openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
    answer = developer.chat.completions.create(
        model="sim", messages=[{"role": "developer", "content": "Be brief."},
                               {"role": "user", "content": "hello there"}])
    assert answer.choices[0].message.content


def test_embeddings_through_the_sdk(client: openai.OpenAI, upstream: Upstream) -> None:
    upstream_vectors = client.embeddings.create(model="ok", input=["one", "three"])
    assert [d.embedding for d in upstream_vectors.data] == [[3.0, 1.0, 0.5], [5.0, 1.0, 0.5]]
    assert upstream_vectors.model == "ok" and upstream_vectors.usage.prompt_tokens == 4
    simulated = client.embeddings.create(model="sim", input="the same text")
    again = client.embeddings.create(model="sim", input="the same text")
    assert simulated.data[0].embedding == again.data[0].embedding  # deterministic
    assert abs(sum(x * x for x in simulated.data[0].embedding) - 1.0) < 1e-4
    with pytest.raises(openai.BadRequestError, match="'input'"):
        client.embeddings.create(model="ok", input=[])


def test_metrics_in_prometheus_format(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    ask(client, "ok", "count me")
    for _ in range(3):  # enough to open the breaker of "down" (failures = 3)
        ask(client, "fast")
    text = httpx.get(gateway.base_url.removesuffix("/v1") + "/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("corral_gateway_requests_total",
                    (("model", "ok"), ("status", "ok")))] >= 1
    assert samples[("corral_gateway_tokens_total",
                    (("kind", "input"), ("model", "ok"), ("tenant", "default")))] >= 5
    assert samples[("corral_gateway_cost_usd_total",
                    (("model", "ok"), ("tenant", "default")))] > 0
    assert samples[("corral_gateway_breaker_open", (("deployment", "down"),))] == 1.0
    assert samples[("corral_gateway_breaker_open", (("deployment", "ok"),))] == 0.0
    assert ("corral_gateway_requests_in_flight", ()) in samples
    assert any(name == "corral_gateway_request_seconds_bucket" for name, _ in samples)


def test_cache_headers_are_checked(gateway: GatewayProcess) -> None:
    url = f"{gateway.base_url}/chat/completions"
    body = {"model": "ok", "messages": [{"role": "user", "content": "x"}]}
    for bad in ("high", "0", "1.5"):
        reply = httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}",
                                                    "X-Corral-Cache-Similarity": bad})
        assert reply.status_code == 400 and "X-Corral-Cache-Similarity" in reply.text
    ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}",
                                             "X-Corral-Cache": "off",
                                             "X-Corral-Cache-Similarity": "0.95"})
    assert ok.status_code == 200
