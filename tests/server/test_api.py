"""The control plane over HTTP, against `corral serve` in its own process."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from _serve import HOOK_SECRET, MASTER, SCRAPE_TOKEN, Server, start_server, stop_server
from prometheus_client.parser import text_string_to_metric_families


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def submit(client: httpx.Client, workflow: str, value: Any, **headers: str) -> httpx.Response:
    return client.post("/v1/runs", json={"workflow": workflow, "input": value}, headers=headers)


def status(client: httpx.Client, run_id: str) -> str:
    return str(client.get(f"/v1/runs/{run_id}").json()["status"])


def test_a_run_is_submitted_once_per_idempotency_key(server: Server) -> None:
    with server.client() as api:
        first = submit(api, "echo", {"n": 1}, **{"Idempotency-Key": "order-1"})
        assert first.status_code == 201 and first.headers["location"].endswith(first.json()["id"])
        again = submit(api, "echo", {"n": 1}, **{"Idempotency-Key": "order-1"})
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        other = submit(api, "echo", {"n": 2}, **{"Idempotency-Key": "order-1"})
        assert other.status_code == 409 and other.json()["error"]["code"] == "conflict"
        run_id = first.json()["id"]
        wait_for(lambda: status(api, run_id) == "completed", "the run to complete")
        assert api.get(f"/v1/runs/{run_id}").json()["result"] == {"n": 1}
    with server.client(server.key("acme")) as acme:  # a tenant's keys are its own
        mine = submit(acme, "echo", {"n": 1}, **{"Idempotency-Key": "order-1"})
        assert mine.status_code == 201 and mine.json()["id"] != run_id


def test_a_tenant_never_sees_another_tenants_runs(server: Server) -> None:
    acme, globex = server.client(server.key("acme")), server.client(server.key("globex"))
    theirs = submit(globex, "deploy", {"service": "billing"}).json()["id"]
    ours = submit(acme, "echo", "hello").json()["id"]
    assert submit(acme, "echo", "x").json()["tenant"] == "acme"
    for method, path in [("GET", f"/v1/runs/{theirs}"), ("GET", f"/v1/runs/{theirs}/trace"),
                         ("GET", f"/v1/runs/{theirs}/events"),
                         ("POST", f"/v1/runs/{theirs}/cancel"),
                         ("POST", f"/v1/runs/{theirs}/signals/approval")]:
        answer = acme.request(method, path)
        assert answer.status_code == 404, (method, path)
        assert answer.json()["error"]["code"] == "run_not_found"
    listed = {r["id"] for r in acme.get("/v1/runs", params={"limit": 500}).json()["runs"]}
    assert ours in listed and theirs not in listed
    assert all(r["tenant"] == "acme"
               for r in acme.get("/v1/runs", params={"tenant": "globex"}).json()["runs"])
    approvals = wait_for(lambda: globex.get("/v1/approvals").json()["approvals"], "approval")
    assert [a["run"]["id"] for a in approvals] == [theirs]
    assert acme.get("/v1/approvals").json()["approvals"] == []
    with server.client() as master:  # the master key sees every tenant
        assert {ours, theirs} <= {r["id"] for r in master.get(
            "/v1/runs", params={"limit": 500}).json()["runs"]}
        assert master.post(f"/v1/runs/{theirs}/cancel").status_code == 202


def test_approval_by_signal_and_the_events_stream(server: Server) -> None:
    with server.client() as api:
        run_id = submit(api, "deploy", {"service": "api"}).json()["id"]
        pending = wait_for(lambda: [a for a in api.get("/v1/approvals").json()["approvals"]
                                    if a["run"]["id"] == run_id], "the approval")
        assert pending[0]["signal"] == "approval" and pending[0]["run"]["status"] == "waiting"
        assert api.post(f"/v1/runs/{run_id}/signals/$child:x").status_code == 400
        sent = api.post(f"/v1/runs/{run_id}/signals/approval", json={"value": {"approved": True}})
        assert sent.status_code == 202
        events: list[tuple[str, Any]] = []
        with api.stream("GET", f"/v1/runs/{run_id}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            kind = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line.removeprefix("data: "))))
        kinds = [k for k, _ in events]
        assert kinds[-1] == "end" and events[-1][1]["status"] == "completed"
        steps = [e["name"] for k, e in events if k == "step"]
        assert steps == ["prepare", "approval"]
        assert api.get(f"/v1/runs/{run_id}").json()["result"] == {"what": "deploy api",
                                                                   "approved": True}
        late = api.post(f"/v1/runs/{run_id}/signals/approval", json={"value": 1})
        assert late.status_code == 409 and late.json()["error"]["code"] == "run_finished"
        assert api.post(f"/v1/runs/{run_id}/cancel").status_code == 409
        trace = api.get(f"/v1/runs/{run_id}/trace").json()
        names = [s["name"] for s in trace["spans"]]
        assert names[0] == "invoke_workflow deploy" and "wait_for approval" in names
        assert trace["seconds"]["waiting"] > 0


def test_cancel_stops_a_waiting_run(server: Server) -> None:
    with server.client() as api:
        run_id = submit(api, "deploy", {}).json()["id"]
        wait_for(lambda: status(api, run_id) == "waiting", "the run to wait")
        assert api.post(f"/v1/runs/{run_id}/cancel").status_code == 202
        wait_for(lambda: status(api, run_id) == "cancelled", "the run to be cancelled")


def test_listing_filters_and_pages(server: Server) -> None:
    with server.client(server.key("pager")) as api:
        ids = [submit(api, "echo", i).json()["id"] for i in range(7)]
        wait_for(lambda: all(status(api, i) == "completed" for i in ids), "the runs")
        seen: list[str] = []
        cursor = None
        while True:
            page = api.get("/v1/runs", params={"limit": 3, "workflow": "echo",
                                               **({"cursor": cursor} if cursor else {})}).json()
            seen += [r["id"] for r in page["runs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        if server.engine == "embedded":
            assert seen == ids[::-1]  # newest first, each once
        else:  # (Temporal's visibility lists finished runs by when they ended)
            assert sorted(seen) == sorted(ids)
        assert api.get("/v1/runs", params={"status": "failed"}).json()["runs"] == []
        for params, phrase in [({"status": "bogus"}, "status must be one of"),
                               ({"limit": "0"}, "limit must be an integer from 1 to 500"),
                               ({"cursor": "not-one"}, "cursor is not one this server gave"),
                               ({"workflow": "a\0b"}, "workflow cannot hold a NUL character")]:
            answer = api.get("/v1/runs", params=params)
            assert answer.status_code == 400 and phrase in answer.json()["error"]["message"]
        forged = base64.urlsafe_b64encode(json.dumps(  # (well formed: a page token, a date)
            ["bm90LWEtcGFnZS10b2tlbg==", ""] if server.engine == "temporal"
            else [1e9, "run"]).encode()).decode()
        for cursor in ("not-one", forged[:-4]):
            answer = api.get("/v1/runs", params={"cursor": cursor})
            assert (answer.status_code, answer.json()["error"]["code"]) == (400, "invalid_cursor")
        if server.engine == "temporal":  # (a page token Temporal would not have given)
            answer = api.get("/v1/runs", params={"cursor": forged})
            assert (answer.status_code, answer.json()["error"]["code"]) == (400, "invalid_cursor")


@pytest.mark.parametrize(("body", "status_code", "phrase"), [
    ({"workflow": "nope"}, 404,
     "no workflow 'nope' on this server; the workflows are deploy, echo"),
    ({"workflow": "echo", "extra": 1}, 400, "unknown field 'extra'"),
    ({"workflow": "echo", "priority": "high"}, 400, "priority must be an integer"),
    ({"workflow": "echo", "delay": -1}, 400, "delay must be a number of seconds"),
    ({"workflow": "echo", "run_at": "tomorrow"}, 400, "run_at must be an ISO 8601 time"),
    ([1, 2], 400, "the body must be a JSON object"),
])
def test_bad_submissions_say_what_is_wrong(server: Server, body: Any, status_code: int,
                                           phrase: str) -> None:
    with server.client() as api:
        answer = api.post("/v1/runs", json=body)
        assert answer.status_code == status_code
        assert phrase in answer.json()["error"]["message"]
        garbage = api.post("/v1/runs", content=b"{not json")
        assert garbage.status_code == 400 and "not valid JSON" in garbage.json()["error"]["message"]


def test_keys_are_required(server: Server) -> None:
    for key in (None, "sk-corral-made-up", MASTER + "x"):
        with server.client(key) as api:
            answer = api.get("/v1/runs")
            assert answer.status_code == 401
            assert "corral keys create" in answer.json()["error"]["message"]


def signed(body: bytes, at: float | None = None, stamp: str | None = None) -> dict[str, str]:
    """A webhook delivery's headers: the timestamp (now, or ``at``) and the signature over
    ``"<timestamp>.<body>"``."""
    stamp = stamp if stamp is not None else str(int(time.time() if at is None else at))
    mac = hmac.new(HOOK_SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256)
    return {"X-Corral-Timestamp": stamp, "X-Corral-Signature": f"sha256={mac.hexdigest()}",
            "Content-Type": "application/json"}


def body_only(body: bytes) -> str:
    """The signature before timestamps: the body alone."""
    return "sha256=" + hmac.new(HOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()


def test_a_signed_webhook_starts_a_run_once_per_delivery(server: Server) -> None:
    body = json.dumps({"ref": "main", "sha": "abc"}).encode()
    with server.client(None) as anyone:
        headers = {**signed(body), "X-Corral-Delivery": "d-1"}
        first = anyone.post("/v1/hooks/deploys", content=body, headers=headers)
        assert first.status_code == 201 and first.json()["tenant"] == "acme"
        assert first.json()["workflow"] == "echo" and first.json()["input"] == {"ref": "main",
                                                                               "sha": "abc"}
        again = anyone.post("/v1/hooks/deploys", content=body, headers=headers)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        retried = anyone.post("/v1/hooks/deploys", content=body,  # re-signed by the sender
                              headers={**signed(body, time.time() - 1), "X-Corral-Delivery": "d-1"})
        assert retried.status_code == 200 and retried.json()["id"] == first.json()["id"]
        assert anyone.post("/v1/hooks/other", content=body, headers=headers).status_code == 404


REFUSED = json.dumps({"ref": "refused"}).encode()
Delivery = Callable[[float], tuple[bytes, dict[str, str]]]


def _without_stamp(now: float) -> tuple[bytes, dict[str, str]]:
    headers = signed(REFUSED, now)
    del headers["X-Corral-Timestamp"]
    return REFUSED, headers


@pytest.mark.parametrize(("delivery", "code", "pattern"), [
    pytest.param(lambda now: (REFUSED, signed(REFUSED, now - 600)),
                 "timestamp_out_of_tolerance",
                 r"X-Corral-Timestamp is \d+ s old, past this webhook's tolerance of 300 s",
                 id="stale"),
    pytest.param(lambda now: (REFUSED, signed(REFUSED, now + 600)),
                 "timestamp_out_of_tolerance",
                 r"X-Corral-Timestamp is \d+ s in the future, past this webhook's tolerance "
                 r"of 300 s", id="future"),
    pytest.param(_without_stamp, "invalid_timestamp",
                 r"^missing X-Corral-Timestamp: send X-Corral-Timestamp: <Unix seconds>",
                 id="no-timestamp"),
    pytest.param(lambda now: (REFUSED, signed(REFUSED, stamp="yesterday")),
                 "invalid_timestamp",
                 r"X-Corral-Timestamp must be the Unix time in whole seconds, not 'yesterday'",
                 id="not-a-number"),
    pytest.param(lambda now: (REFUSED, {"X-Corral-Signature": body_only(REFUSED)}),
                 "outdated_signature",
                 r"signs the body alone.*HMAC-SHA256 of '<timestamp>\.<raw body>'",
                 id="body-only"),
    pytest.param(lambda now: (REFUSED, {**signed(REFUSED, now),
                                        "X-Corral-Signature": body_only(REFUSED)}),
                 "outdated_signature", r"signs the body alone", id="body-only-with-timestamp"),
    pytest.param(lambda now: (REFUSED.replace(b"refused", b"evil"), signed(REFUSED, now)),
                 "invalid_signature", r"^bad X-Corral-Signature: send X-Corral-Timestamp",
                 id="tampered-body"),
    pytest.param(lambda now: (REFUSED, {**signed(REFUSED, now - 600),
                                        "X-Corral-Timestamp": str(int(now))}),
                 "invalid_signature", r"^bad X-Corral-Signature", id="timestamp-changed"),
    pytest.param(lambda now: (REFUSED, {}), "invalid_signature",
                 r"^missing X-Corral-Signature and X-Corral-Timestamp", id="unsigned"),
])
def test_a_webhook_refuses_stale_future_unsigned_and_body_only_deliveries(
        server: Server, delivery: Delivery, code: str, pattern: str) -> None:
    body, headers = delivery(time.time())
    with server.client(None) as anyone:
        answer = anyone.post("/v1/hooks/deploys", content=body,
                             headers={**headers, "X-Corral-Delivery": f"refused-{code}"})
    assert answer.status_code == 401, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["type"] == "authentication_error"
    assert re.search(pattern, error["message"]), error["message"]
    with server.client() as master:  # (refused before anything starts)
        runs = master.get("/v1/runs", params={"tenant": "acme", "limit": 500}).json()["runs"]
    assert not [r for r in runs if r["input"] in ({"ref": "refused"}, {"ref": "evil"})]


HOOK = '[server.webhooks.quick]\nworkflow = "echo"\nsecret_env = "CORRAL_TEST_HOOK"\n'


def test_a_webhooks_tolerance_is_its_own(tmp_path: Path) -> None:
    server = start_server(tmp_path, config=HOOK + "tolerance_s = 30\n")
    try:
        body = json.dumps({"ref": "late"}).encode()
        with server.client(None) as anyone:
            late = anyone.post("/v1/hooks/quick", content=body,
                               headers=signed(body, time.time() - 60))
            assert late.status_code == 401
            assert "past this webhook's tolerance of 30 s" in late.json()["error"]["message"]
            assert anyone.post("/v1/hooks/deploys", content=body,  # 300 s: in time
                               headers=signed(body, time.time() - 60)).status_code == 201
    finally:
        stop_server(server)


def test_metrics_take_the_master_key_or_the_scrape_token_never_a_tenants(
        server: Server) -> None:
    acme = server.key("acme")
    for key in (MASTER, SCRAPE_TOKEN):
        with server.client(key) as scraper:
            answer = scraper.get("/metrics")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(
            "text/plain")
        assert "corral_runs" in {f.name for f in text_string_to_metric_families(answer.text)}
    for key in (None, SCRAPE_TOKEN + "x", "sk-corral-made-up"):
        with server.client(key) as stranger:
            answer = stranger.get("/metrics")
        assert answer.status_code == 401, key
        error = answer.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert "[server] metrics_key_env" in error["message"]
        assert "authorization: {credentials_file: FILE}" in error["message"]
        assert "metrics_public = true" in error["message"]
    with server.client(acme) as tenant:
        answer = tenant.get("/metrics")
        assert answer.status_code == 403
        assert answer.json()["error"] == {
            "message": "a tenant's key cannot read /metrics: the metrics span every tenant; "
                       "scrape with the token in [server] metrics_key_env (or the master key)",
            "type": "permission_error", "code": "forbidden"}
        assert tenant.get("/v1/runs").status_code == 200  # (the key is good for /v1)
    with server.client(SCRAPE_TOKEN) as scraper:  # the scrape token reads /metrics only
        assert scraper.get("/v1/runs").status_code == 401
    assert httpx.get(server.url + "/healthz").status_code == 200
    document = httpx.get(server.url + "/openapi.json").json()["paths"]["/metrics"]["get"]
    assert document["security"] == [{"bearer": []}]
    assert {"200", "401", "403"} <= set(document["responses"])


def test_metrics_public_serves_metrics_without_a_token(tmp_path: Path) -> None:
    server = start_server(tmp_path, server="metrics_public = true\n")
    try:
        for key in (None, "anything"):
            with server.client(key) as anyone:
                answer = anyone.get("/metrics")
            assert answer.status_code == 200
            assert "corral_runs" in {f.name for f in text_string_to_metric_families(
                answer.text)}
        assert httpx.get(server.url + "/v1/runs").status_code == 401  # (only /metrics opens)
        document = httpx.get(server.url + "/openapi.json").json()["paths"]["/metrics"]["get"]
        assert document["security"] == [] and "401" not in document["responses"]
    finally:
        stop_server(server)


@pytest.mark.parametrize(("server_table", "config", "phrase"), [
    ('metrics_public = "yes"\n', "", "[server] metrics_public must be true or false, not 'yes'"),
    ("metrics_public = 1\n", "", "[server] metrics_public must be true or false, not 1"),
    ('metrics_public = true\nmetrics_key_env = "CORRAL_TEST_METRICS"\n', "",
     "so metrics_key_env would protect nothing; keep one"),
    ('metrics_key_env = "CORRAL_TEST_UNSET"\n', "",
     "[server] metrics_key_env names 'CORRAL_TEST_UNSET', which must hold a scrape token of at "
     "least 16 characters"),
    ("", HOOK + "tolerance_s = 0\n",
     "[server.webhooks.quick] tolerance_s must be a number of seconds from 1 to 86400, not 0"),
    ("", HOOK + 'tolerance_s = "300"\n', "tolerance_s must be a number of seconds from 1 to "
     "86400, not '300'"),
    ("", HOOK + "tolerance_s = true\n", "tolerance_s must be a number of seconds from 1 to "
     "86400, not True"),
])
def test_bad_metrics_and_tolerance_settings_stop_the_server(
        tmp_path: Path, server_table: str, config: str, phrase: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(phrase)):
        start_server(tmp_path, config=config, server=server_table)


def test_metrics_and_openapi(server: Server) -> None:
    with server.client() as api:
        run_id = submit(api, "echo", 1).json()["id"]
        wait_for(lambda: status(api, run_id) == "completed", "the run")
        text = api.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert any(s.labels["status"] == "completed" and s.value >= 1
               for s in families["corral_runs"].samples)
    steps = families["corral_step_duration_seconds"].samples
    assert any(s.name.endswith("_count") and s.labels["step"] == "prepare" and s.value >= 1
               for s in steps)
    spec = httpx.get(server.url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    assert {"/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/events", "/v1/approvals",
            "/v1/hooks/{name}"} <= set(spec["paths"])
    assert spec["paths"]["/v1/runs"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]["workflow"]["enum"] == ["deploy", "echo"]


GATEWAY = """
[gateway]
master_key_env = "CORRAL_TEST_MASTER"

[[gateway.deployments]]
name = "sim"
provider = "simulator"
model = "sim"

[gateway.prices.sim]
input = 1000.0
output = 1000.0
"""


def test_the_gateway_answers_in_the_same_server_and_its_costs_show(
        tmp_path: pytest.TempPathFactory) -> None:
    from _serve import start_server, stop_server

    server = start_server(tmp_path, config=GATEWAY)  # type: ignore[arg-type]
    try:
        with server.client(server.key("acme")) as acme:
            answer = acme.post("/v1/chat/completions", json={
                "model": "sim", "messages": [{"role": "user", "content": "hello"}]})
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["role"] == "assistant"
            assert [m["id"] for m in acme.get("/v1/models").json()["data"]] == ["sim"]
            series = wait_for(lambda: acme.get("/v1/costs").json()["series"], "the cost")
            assert [s["key"] for s in series] == ["acme"] and series[0]["points"][0][1] > 0
        with server.client(server.key("globex")) as globex:  # a tenant sees its own costs
            assert globex.get("/v1/costs").json()["series"] == []
        text = httpx.get(server.url + "/metrics",
                         headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"}).text
        families = {f.name for f in text_string_to_metric_families(text)}
        assert {"corral_gateway_requests", "corral_runs"} <= families
    finally:
        stop_server(server)


def test_sigterm_hands_the_runs_in_memory_back_and_releases_the_worker(
        tmp_path: pytest.TempPathFactory) -> None:
    from _serve import start_server

    from corral.stores import SQLiteStore

    server = start_server(tmp_path)  # type: ignore[arg-type]
    with server.client() as api:
        run_id = submit(api, "deploy", {"service": "api"}).json()["id"]
        wait_for(lambda: status(api, run_id) == "waiting", "the run to wait")
    server.process.terminate()
    server.process.wait(30)
    assert not list((server.db.parent / "corral.db-workers").glob("*.lock"))
    store = SQLiteStore(str(server.db))
    try:
        run = store.get_run(run_id)
    finally:
        store.close()
    assert run.status in ("waiting", "queued") and run.owner is None  # any worker takes it
