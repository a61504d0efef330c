"""Every call's tokens and cost in the ledger, streamed ones too; `corral costs` reports them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from _servers import CONFIG, KEY, GatewayProcess, Upstream

from corral.gateway._ledger import Call, Ledger, report
from corral.stores._migrations import upgrade

PER_CALL = (5 * 1.0 + 3 * 2.0) / 1e6  # the upstream's usage at the "ok" deployment's prices


def costs(gateway: GatewayProcess, by: str) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "corral", "costs", "--by", by, "--json"],
                          env=gateway.env, capture_output=True, text=True, timeout=60,
                          check=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def wait_for_agent(gateway: GatewayProcess, agent: str, calls: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:  # rows are written off the request path, within a flush interval
        row = next((r for r in costs(gateway, "agent") if r["agent"] == agent), None)
        if row is not None and row["calls"] >= calls:
            return row
        assert time.monotonic() < deadline, f"no {calls} rows for {agent}: {row}"
        time.sleep(0.1)


def test_streamed_and_plain_calls_are_priced_alike_and_reported(
    gateway: GatewayProcess,
) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0,
                           default_headers={"X-Corral-Agent": "pricer",
                                            "X-Corral-Workflow": "billing"})
    messages = [{"role": "user", "content": "price me"}]
    client.chat.completions.create(model="ok", messages=messages)  # type: ignore[arg-type]
    list(client.chat.completions.create(model="ok", messages=messages,  # type: ignore
                                        stream=True))
    row = wait_for_agent(gateway, "pricer", 2)
    assert (row["input_tokens"], row["output_tokens"]) == (10, 6)
    assert row["cost"] == pytest.approx(2 * PER_CALL) and row["unpriced_calls"] == 0
    by_model = {r["model"]: r for r in costs(gateway, "model")}
    assert by_model["ok"]["cost"] >= 2 * PER_CALL
    table = subprocess.run([sys.executable, "-m", "corral", "costs", "--by", "workflow"],
                           env=gateway.env, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "billing" in table.stdout and "total" in table.stdout


def test_a_call_with_no_price_is_reported_as_unpriced(gateway: GatewayProcess) -> None:
    httpx.post(f"{gateway.base_url}/chat/completions",
               headers={"Authorization": f"Bearer {KEY}", "X-Corral-Agent": "simmer"},
               json={"model": "sim", "messages": [{"role": "user", "content": "hello"}]})
    row = wait_for_agent(gateway, "simmer", 1)
    assert row["unpriced_calls"] == 1 and row["cost"] == 0


def test_the_gateway_will_not_start_without_its_ledger_schema(
    upstream: Upstream, tmp_path: Path
) -> None:
    config = tmp_path / "corral.toml"
    config.write_text(CONFIG.format(url=upstream.url))
    done = subprocess.run(
        [sys.executable, "-m", "corral", "gateway", "--config", str(config), "--port", "1"],
        env={"CORRAL_TEST_GATEWAY_KEY": KEY, "CORRAL_DATABASE_URL": str(tmp_path / "x.db"),
             "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "run `corral db upgrade`" in done.stderr


def _call(n: int) -> Call:
    return Call(at=time.time(), tenant="t", key_id=None, workflow="w", run_id=f"r{n}",
                agent="a", model="m", deployment="d", input_tokens=10, output_tokens=5,
                cached_tokens=0, cost=0.001, priced=True, latency_ms=1.0, cache="off",
                status="ok")


@pytest.mark.parametrize("where", ["sqlite", "postgres"])
async def test_the_ledger_loses_nothing_on_shutdown(where: str, tmp_path: Path,
                                                    request: pytest.FixtureRequest) -> None:
    url = str(tmp_path / "ledger.db") if where == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    ledger = Ledger(url, flush_every=3600)  # nothing would be written before close()
    for n in range(5000):
        ledger.record(_call(n))
    assert report(url, by="tenant") == []  # recording never waits for the database
    await ledger.close()
    [row] = report(url, by="tenant")
    assert (row["calls"], row["input_tokens"]) == (5000, 50_000)
    assert row["cost"] == pytest.approx(5.0)
