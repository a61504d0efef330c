"""In-process gateway overhead per model call: an agent's model call through the gateway
(routing, breaker, price, metrics, a cost-ledger row, a tenant rate limit (RPM and TPM) and a
tenant budget, counted in memory) against the same simulator called directly.
Target: at most 50 µs per call.

    python bench/gateway_inprocess.py [--calls 20000] [--repeat 5]

Prints one JSON line: medians of --repeat repeats of --calls calls each, both ways.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from corral.agents import Message, ModelRequest, SimulatorModel
from corral.gateway import Gateway, GatewayModel, parse_gateway
from corral.gateway._ledger import Ledger, report
from corral.stores._migrations import upgrade


async def timed(model: object, request: ModelRequest, calls: int) -> float:
    complete = model.complete  # type: ignore[attr-defined]
    started = time.perf_counter()
    for _ in range(calls):
        await complete(request)
    return (time.perf_counter() - started) / calls * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    request = ModelRequest(messages=[Message(role="system", content="Answer briefly."),
                                     Message(role="user", content="where is order A-1?")])
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "ledger.db")
        upgrade(url)
        ledger = Ledger(url)
        gateway = Gateway(parse_gateway({
            "allow_unauthenticated": True,
            "deployments": [{"name": "sim", "provider": "simulator", "model": "sim"}],
            "prices": {"sim": {"input": 0.15, "output": 0.6}},
            "rate_limits": {"tenant": {"rpm": 10**9, "tpm": 10**12}},
            "budgets": [{"scope": "tenant", "limit": 10**6, "period": "month"}],
        }), ledger)
        direct_model, through = SimulatorModel("sim"), GatewayModel("sim", gateway=gateway)
        direct, via = [], []
        for _ in range(args.repeat):
            direct.append(await timed(direct_model, request, args.calls))
            via.append(await timed(through, request, args.calls))
        await gateway.close()
        rows = report(url, by="model")[0]["calls"]
    d, v = statistics.median(direct), statistics.median(via)
    print(json.dumps({
        "bench": "gateway_inprocess", "calls": args.calls, "repeat": args.repeat,
        "direct_us_median": round(d, 1), "through_gateway_us_median": round(v, 1),
        "overhead_us_median": round(v - d, 1),
        "overhead_us_trials": [round(b - a, 1) for a, b in zip(direct, via, strict=True)],
        "ledger_rows": rows,
    }))


if __name__ == "__main__":
    asyncio.run(main())
