"""Virtual keys: created and revoked with the CLI, stored hashed, with allowed models, their own
limits and budget; the tenant comes from the key."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from _servers import GatewayProcess, Upstream

CONFIG = """
[gateway]
master_key_env = "CORRAL_TEST_GATEWAY_KEY"
keys_refresh = 0.2

[[gateway.deployments]]
name = "ok"
provider = "openai"
model = "ok"
base_url = "{url}"

[[gateway.deployments]]
name = "sim"
provider = "simulator"
model = "sim"

[gateway.prices.ok]
input = 1000.0
output = 1000.0
"""


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GatewayProcess]:
    process = GatewayProcess(upstream.url, tmp_path_factory.mktemp("keys"), CONFIG)
    yield process
    process.stop()


def create(gateway: GatewayProcess, *args: str) -> dict[str, object]:
    done = gateway.corral("keys", "create", "--json", *args)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def client(gateway: GatewayProcess, key: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=str(key), max_retries=0)


def hi(c: openai.OpenAI, model: str = "ok") -> str:
    answer = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    return answer.choices[0].message.content or ""


def test_a_key_works_only_for_its_models_and_bills_its_tenant(gateway: GatewayProcess) -> None:
    key = create(gateway, "--tenant", "acme", "--name", "support-bot", "--models", "ok")
    assert str(key["key"]).startswith("sk-corral-") and key["tenant"] == "acme"
    acme = client(gateway, key["key"])
    assert hi(acme) == "hello from ok: hi"
    with pytest.raises(openai.PermissionDeniedError, match="may not use the model 'sim'"):
        hi(acme, "sim")
    assert [m.id for m in acme.models.list()] == ["ok"]
    deadline = time.monotonic() + 10
    while True:  # the ledger is written in batches: wait for the row
        with sqlite3.connect(gateway.db) as conn:
            rows = conn.execute("SELECT tenant, key_id FROM corral_costs WHERE key_id = ?",
                                (key["id"],)).fetchall()
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert rows == [("acme", key["id"])]


def test_only_the_hash_is_stored_and_ls_never_shows_a_secret(gateway: GatewayProcess) -> None:
    key = create(gateway, "--tenant", "hashco")
    with sqlite3.connect(gateway.db) as conn:
        dump = "\n".join(conn.iterdump())
    assert str(key["key"]) not in dump and str(key["key"])[10:] not in dump
    listed = gateway.corral("keys", "ls")
    assert key["id"] in listed.stdout and "sk-corral-" not in listed.stdout
    assert "hashco" in listed.stdout


def test_a_revoked_key_stops_working(gateway: GatewayProcess) -> None:
    key = create(gateway, "--tenant", "leaver")
    leaver = client(gateway, key["key"])
    assert hi(leaver)
    revoked = gateway.corral("keys", "revoke", str(key["id"]))
    assert revoked.returncode == 0, revoked.stderr
    deadline = time.monotonic() + 10
    while True:  # every gateway reloads its keys within keys_refresh
        try:
            hi(leaver)
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.05)
    listed = json.loads(gateway.corral("keys", "ls", "--json").stdout)
    assert [k["revoked_at"] is not None for k in listed if k["id"] == key["id"]] == [True]


def test_a_keys_own_rate_limit_and_budget(gateway: GatewayProcess) -> None:
    limited = client(gateway, create(gateway, "--tenant", "r", "--rpm", "2")["key"])
    hi(limited)
    hi(limited)
    with pytest.raises(openai.RateLimitError, match="may send 2 requests a minute") as refused:
        hi(limited)
    assert int(refused.value.response.headers["retry-after"]) >= 1
    # each call costs $0.008; the estimate (no max_tokens) is 1,024 output tokens, over $1
    poor = create(gateway, "--tenant", "b", "--budget", "0.5", "--budget-period", "day")
    with pytest.raises(openai.RateLimitError, match="budget exhausted") as broke:
        hi(client(gateway, poor["key"]))
    assert broke.value.code == "budget_exceeded"
    assert int(broke.value.response.headers["retry-after"]) <= 86400


def test_bad_keys_and_bad_commands(gateway: GatewayProcess, tmp_path: Path) -> None:
    for secret in ("sk-corral-made-up", "not-even-close"):
        reply = httpx.post(f"{gateway.base_url}/chat/completions",
                           headers={"Authorization": f"Bearer {secret}"},
                           json={"model": "ok", "messages": [{"role": "user", "content": "x"}]})
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    bad = gateway.corral("keys", "create", "--tenant", "x", "--rpm", "0")
    assert bad.returncode == 2 and "--rpm must be above 0" in bad.stderr
    missing = gateway.corral("keys", "revoke", "key_nope")
    assert missing.returncode == 2 and "no key 'key_nope'" in missing.stderr
    never_upgraded = subprocess.run(
        [sys.executable, "-m", "corral", "keys", "ls"], capture_output=True, text=True,
        env={**gateway.env, "CORRAL_DATABASE_URL": str(tmp_path / "new.db")}, cwd=tmp_path)
    assert never_upgraded.returncode == 1 and "corral db upgrade" in never_upgraded.stderr
