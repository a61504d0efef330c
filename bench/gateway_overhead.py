"""Gateway overhead over HTTP: the latency corral's gateway adds in front of a fast upstream,
side by side with LiteLLM's proxy, in one run.

The upstream is nginx (Debian's) answering every POST /v1/chat/completions with one fixed
chat.completion (with usage), as fast as anything here can. wrk loads three targets in turn:

- direct: wrk -> nginx;
- corral: wrk -> `corral gateway` -> nginx, with a virtual key (made by `corral keys create`),
  rate limits per tenant, key and model and tenant and key budgets (all far above what is
  sent: see GOVERNANCE; --no-governance for the master key alone), a price for the model, the
  cost ledger on a SQLite file made by `corral db upgrade`, and /metrics;
- litellm: wrk -> `litellm --config` (1 worker, its master key, a price per token; no
  database, so no spend logs, virtual keys, per-key limits or budgets) -> nginx.

Each at 50, 100, 500 and 1,000 requests/s (LiteLLM's one worker holds about 100 here) and at
saturation (64 connections, no pacing), --rounds times, the targets interleaved (their order
rotates each round); each run --duration seconds after a --warmup run at the same load. Added
latency: the gateway's p50/p99 minus direct's at the same rate in the same round; the table
shows medians over the rounds. Pacing: wrk's Lua delay() holds the requests to one absolute
schedule of rate/s over --connections connections (open loop while a connection is free;
Debian has no wrk2). A run with a socket error or a non-2xx answer, or in which direct or
corral is more than 1% off its rate, fails the bench (exit 1, after the report); LiteLLM
missing a rate is a result: it saturates below it.

Pinning on this 2-core machine: wrk and nginx share --load-cpu, the gateway under test (corral
or LiteLLM, each one process) has --gateway-cpu to itself; run as root, all of them run at
nice -20 (--nice) so that other work on a shared machine disturbs them less, and nginx runs as
nobody. CPU per request is the gateway process's user+system time over the run's requests;
foreign_cpu_pct is what other processes used meanwhile (over 10% of a core flags the run
"noisy": read its tail latencies with care). --profile adds a run at --profile-rate (1,000/s)
with py-spy (GIL-holding samples) attached to corral, reported by area and function in µs per
request.

    python bench/gateway_overhead.py [--rounds 3] [--duration 12] [--warmup 3] [--profile]
    python bench/gateway_overhead.py --install-litellm   # makes --litellm-venv first

Needs `apt-get install nginx wrk`; LiteLLM in its own venv (`python3 -m venv
/work/venvs/litellm && /work/venvs/litellm/bin/pip install 'litellm[proxy]'`), else its column
is skipped; py-spy for --profile (`pip install py-spy`). Progress and the table go to stderr;
stdout gets one JSON line (--json PATH writes it to a file too). --corral-src runs the gateway
from a snapshot (`git archive HEAD src | tar -x -C DIR`, then --corral-src DIR/src).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _load import LUA_PACING, busy_seconds, free_port
from _load import tree_cpu_seconds as cpu_seconds

KEY = "sk-corral-bench-master"  # the gateways' master key, sent by wrk
UPSTREAM_KEY = "sk-bench-upstream"
MODEL = "fast"
PRICE = {"input": 0.15, "output": 0.6}  # US dollars per million tokens
REQUEST = {"model": MODEL, "max_tokens": 16,
           "messages": [{"role": "user", "content": "where is order A-1?"}]}
COMPLETION = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
              "model": "bench-model", "system_fingerprint": None,
              "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                           "message": {"role": "assistant",
                                       "content": "Order A-1 left the warehouse today."}}],
              "usage": {"prompt_tokens": 14, "completion_tokens": 9, "total_tokens": 23}}
RATE_TOLERANCE = 0.01  # paced runs that hold their rate land within 0.2%
TARGET_ADDED_P50_MS, TARGET_ADDED_P99_MS, TARGET_RATIO = 1.0, 5.0, 10.0

NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port};
        location = /v1/chat/completions {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""

# Governance, on unless --no-governance: rate limits (tenant, key, model) and budgets (tenant,
# key) set high enough never to reject at any rate this machine reaches, and the load sent with
# a virtual key (made by `corral keys create`, with its own limits and budget) rather than the
# master key. Edit here to measure other settings; the JSON summary carries the config used.
GOVERNANCE = """
[gateway.rate_limits]
tenant = { rpm = 100000000, tpm = 10000000000 }
key = { rpm = 100000000, tpm = 10000000000 }
model = { rpm = 100000000, tpm = 10000000000 }

[[gateway.budgets]]
scope = "tenant"
limit = 1000000.0
period = "month"

[[gateway.budgets]]
scope = "key"
limit = 1000000.0
period = "month"
"""
VIRTUAL_KEY = ["keys", "create", "--tenant", "bench", "--name", "wrk", "--models", MODEL,
               "--rpm", "100000000", "--tpm", "10000000000", "--budget", "1000000", "--json"]

CORRAL_TOML = """\
[gateway]
master_key_env = "CORRAL_BENCH_GATEWAY_KEY"

[[gateway.deployments]]
name = "{model}"
provider = "openai"
model = "bench-model"
base_url = "{upstream}/v1"
api_key_env = "CORRAL_BENCH_UPSTREAM_KEY"

[gateway.prices.{model}]
input = {input}
output = {output}
{governance}"""

LITELLM_YAML = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/bench-model
      api_base: {upstream}/v1
      api_key: {upstream_key}
      input_cost_per_token: {input}
      output_cost_per_token: {output}
litellm_settings:
  set_verbose: false
  json_logs: false
general_settings:
  master_key: {key}
"""
LITELLM_FEATURES = ("master key auth, its default proxy hooks (parallel-request limiter, cost "
                    "callback), a price per token (cost computed per call, returned in "
                    "x-litellm-response-cost); no database, so no spend logs, virtual keys, "
                    "per-key rate limits or budgets (they need its PostgreSQL)")

WRK_LUA = """\
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")

""" + LUA_PACING + """\

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""


SERVERS: list[int] = []  # the pids of the servers this script started (for foreign_cpu)
NOISY = 10.0  # a run where other processes used more than this % of a core is flagged


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def post(url: str, key: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(REQUEST).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, dict(response.headers), json.loads(response.read())


def own_seconds() -> float:
    """CPU time of this script, its finished children (wrk) and the servers it started."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                 resource.RUSAGE_CHILDREN)]
    return (sum(u.ru_utime + u.ru_stime for u in usage)
            + sum(cpu_seconds(pid) for pid in SERVERS))


@dataclass(kw_only=True)
class Target:
    """Something wrk loads: its URL, and the process whose CPU we count (None for direct)."""

    name: str
    url: str
    key: str
    process: subprocess.Popen[bytes] | None
    features: str
    info: dict[str, Any] = field(default_factory=dict)
    answered: int = 0  # requests answered in all its runs, warmups included


def wait_until(ready: Any, process: subprocess.Popen[bytes], what: str, logfile: Path,
               timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            tail = logfile.read_text(errors="replace")[-3000:] if logfile.exists() else ""
            raise SystemExit(f"{what} did not start (exit {process.poll()}); its log:\n{tail}")
        time.sleep(0.2)


NICE: list[str] = []  # ["nice", "-n", "-20"] for the measured processes, when root


def pinned(cpu: str | None, argv: list[str]) -> list[str]:
    return [*NICE, *(["taskset", "-c", cpu] if cpu is not None else []), *argv]


def start_nginx(tmp: Path, cpu: str | None, stack: contextlib.ExitStack) -> Target:
    root = tmp / "nginx"
    root.mkdir()
    port = free_port()
    (root / "nginx.conf").write_text(NGINX_CONF.format(
        dir=root, port=port, body=json.dumps(COMPLETION, separators=(",", ":"))))
    user: dict[str, Any] = {}
    if os.geteuid() == 0:  # nginx as an unprivileged process, in its own directory
        nobody = pwd.getpwnam("nobody")
        os.chmod(tmp, 0o755)
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    logfile = root / "stderr.log"
    with logfile.open("wb") as out:
        process = subprocess.Popen(
            pinned(cpu, ["nginx", "-p", str(root), "-e", str(root / "error.log"),
                         "-c", str(root / "nginx.conf"), "-g", "daemon off;"]),
            stdout=out, stderr=subprocess.STDOUT, **user)
    stack.callback(stop, process)
    SERVERS.append(process.pid)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: post(f"{url}/v1/chat/completions", KEY)[0] == 200, process, "nginx",
               logfile)
    return Target(name="direct", url=url, key=KEY, process=None,
                  features="nginx 1 worker, fixed chat.completion; the baseline",
                  info={"pid": process.pid})


def start_corral(tmp: Path, upstream: str, cpu: str | None, src: str | None,
                 governance: bool, stack: contextlib.ExitStack) -> tuple[Target, str]:
    root = tmp / "corral"
    root.mkdir()
    config = root / "corral.toml"
    config.write_text(CORRAL_TOML.format(model=MODEL, upstream=upstream, **PRICE,
                                         governance=GOVERNANCE if governance else ""))
    db = str(root / "shared.db")
    env = {**os.environ, "CORRAL_BENCH_GATEWAY_KEY": KEY,
           "CORRAL_BENCH_UPSTREAM_KEY": UPSTREAM_KEY, "CORRAL_DATABASE_URL": db}
    if src is not None:  # a snapshot of the source, not the work tree others are editing
        env["PYTHONPATH"] = src
    corral = [sys.executable, "-m", "corral"]
    subprocess.run([*corral, "db", "upgrade"], env=env, check=True, capture_output=True,
                   cwd=root)
    key = KEY
    if governance:
        made = subprocess.run([*corral, *VIRTUAL_KEY, "--config", str(config)], env=env,
                              cwd=root, capture_output=True, text=True)
        if made.returncode != 0:
            raise SystemExit(f"corral keys create failed: {made.stderr}")
        key = json.loads(made.stdout)["key"]
    port = free_port()
    logfile = root / "gateway.log"
    with logfile.open("wb") as out:
        process = subprocess.Popen(
            pinned(cpu, [sys.executable, "-m", "corral", "gateway", "--config", str(config),
                         "--host", "127.0.0.1", "--port", str(port)]),
            env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT)
    stack.callback(stop, process)
    SERVERS.append(process.pid)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200,
               process, "corral gateway", logfile)
    status, _, body = post(f"{url}/v1/chat/completions", key)
    if status != 200 or body.get("usage", {}).get("total_tokens") != 23:
        raise SystemExit(f"corral's gateway answered {status}: {body}")
    features = ("a price for the model, the cost ledger (SQLite, batched off the request "
                "path), /metrics, " + (
                    "a virtual key (with its own limits and budget), rate limits per tenant, "
                    "key and model, tenant and key budgets, counted in memory" if governance
                    else "the master key; no rate limits, virtual keys or budgets "
                    "(--no-governance)"))
    return Target(name="corral", url=url, key=key, process=process, features=features,
                  info={"config": config.read_text(), "governance": governance,
                        "source": src or "the installed corral",
                        "server": {**in_use(process.pid), **server_stack(sys.executable)}}), db


def start_litellm(tmp: Path, upstream: str, venv: Path, cpu: str | None,
                  stack: contextlib.ExitStack) -> Target:
    root = tmp / "litellm"
    root.mkdir()
    config = root / "config.yaml"
    config.write_text(LITELLM_YAML.format(model=MODEL, upstream=upstream, key=KEY,
                                          upstream_key=UPSTREAM_KEY,
                                          input=PRICE["input"] / 1e6,
                                          output=PRICE["output"] / 1e6))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_TELEMETRY": "False", "DISABLE_ADMIN_UI": "True"}
    env.pop("DATABASE_URL", None)
    port = free_port()
    logfile = root / "litellm.log"
    with logfile.open("wb") as out:
        process = subprocess.Popen(
            pinned(cpu, [str(venv / "bin" / "litellm"), "--config", str(config), "--host",
                         "127.0.0.1", "--port", str(port), "--num_workers", "1"]),
            env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT)
    stack.callback(stop, process)
    SERVERS.append(process.pid)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: post(f"{url}/v1/chat/completions", KEY)[0] == 200, process,
               "LiteLLM's proxy", logfile, timeout=180)
    status, headers, body = post(f"{url}/v1/chat/completions", KEY)
    cost = {k.lower(): v for k, v in headers.items()}.get("x-litellm-response-cost")
    if status != 200 or not cost:
        raise SystemExit(f"LiteLLM answered {status} with cost {cost!r}: {body}")
    python = str(venv / "bin" / "python")
    version = subprocess.run([python, "-c", "import importlib.metadata as m; "
                              "print(m.version('litellm'))"], capture_output=True,
                             text=True).stdout.strip()
    return Target(name="litellm", url=url, key=KEY, process=process, features=LITELLM_FEATURES,
                  info={"version": version, "response_cost_header": cost,
                        "server": {**in_use(process.pid), **server_stack(python)}})


def in_use(pid: int) -> dict[str, str]:
    """The event loop and HTTP parser a running server really uses, from the native libraries
    it has loaded: uvicorn imports uvloop and httptools only to use them (an app started with
    asyncio.run(server.serve()) gets asyncio's loop even with uvloop installed)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {"loop": "uvloop" if "/uvloop/" in maps else "asyncio",
            "http": "httptools" if "/httptools/" in maps else "h11"}


def server_stack(python: str) -> dict[str, Any]:
    """The versions of the server's parts installed in that interpreter."""
    code = ("import importlib.util as u, importlib.metadata as m, json; "
            "v = lambda n: m.version(n) if u.find_spec(n) else None; "
            "print(json.dumps({n: v(n) for n in ('uvicorn', 'uvloop', 'httptools', 'h11', "
            "'starlette', 'httpx', 'aiohttp')}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return {"installed": json.loads(out.stdout)}


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wrk(target: Target, rate: int | None, seconds: float, args: argparse.Namespace,
        lua: Path) -> dict[str, Any]:
    """One wrk run: paced at ``rate``/s over --connections, or unpaced over
    --sat-connections (rate None)."""
    connections = args.connections if rate else args.sat_connections
    env = {**os.environ, "BENCH_BODY": json.dumps(REQUEST), "BENCH_KEY": target.key,
           "BENCH_RATE": str(rate or 0)}
    cpu_before = cpu_seconds(target.process.pid) if target.process else 0.0
    busy_before, own_before, started = busy_seconds(), own_seconds(), time.monotonic()
    out = subprocess.run(
        pinned(args.load_cpu, ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s",
                               "--timeout", "10s", "-s", str(lua),
                               f"{target.url}/v1/chat/completions"]),
        env=env, capture_output=True, text=True, timeout=seconds + 60)
    cpu = cpu_seconds(target.process.pid) - cpu_before if target.process else None
    foreign = ((busy_seconds() - busy_before) - (own_seconds() - own_before)) / (
        time.monotonic() - started) * 100
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed on {target.name}: {out.stdout}\n{out.stderr}")
    r = json.loads(line[6:])
    target.answered += r["requests"]
    achieved = r["requests"] / (r["duration_us"] / 1e6)
    socket_errors = {k: r[k] for k in ("connect", "read", "write", "timeout") if r[k]}
    errors = []
    if socket_errors:
        errors.append(f"socket errors {socket_errors}")
    if r["status"]:
        errors.append(f"{r['status']} non-2xx answers")
    missed = (f"achieved {achieved:.0f} requests/s of {rate}"
              if rate and abs(achieved - rate) > RATE_TOLERANCE * rate else None)
    return {"rps": round(achieved, 1), "requests": r["requests"],
            "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "p999_ms": r["p999_us"] / 1000,
            "max_ms": r["max_us"] / 1000, "mean_ms": round(r["mean_us"] / 1000, 3),
            "cpu_us_per_request": (round(cpu / r["requests"] * 1e6, 1)
                                   if cpu is not None and r["requests"] else None),
            "connections": connections, "foreign_cpu_pct": round(max(0.0, foreign), 1),
            "errors": errors, "missed_rate": missed,
            "problems": errors + ([missed] if missed else [])}


def label(rate: int | None) -> str:
    return str(rate) if rate else "saturation"


def measure(targets: list[Target], args: argparse.Namespace, lua: Path
            ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """runs[mode][target] -> one result per round."""
    modes: list[int | None] = [*args.rates, None]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        label(m): {t.name: [] for t in targets} for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            shift = r % len(targets)
            for target in targets[shift:] + targets[:shift]:
                wrk(target, mode, args.warmup, args, lua)
                result = wrk(target, mode, args.duration, args, lua)
                runs[label(mode)][target.name].append(result)
                flag = f"  FAIL: {'; '.join(result['problems'])}" if result["problems"] else ""
                if result["foreign_cpu_pct"] > NOISY:
                    flag += (f"  NOISY: other processes used {result['foreign_cpu_pct']:.0f}% "
                             "of a core")
                log(f"round {r + 1} {label(mode):>10} {target.name:>7}: "
                    f"{result['rps']:8.0f} req/s  p50 {result['p50_ms']:7.3f} ms  "
                    f"p99 {result['p99_ms']:7.3f} ms  cpu/req {result['cpu_us_per_request']} "
                    f"us{flag}")
    return runs


def med(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for mode, by_target in runs.items():
        direct = by_target["direct"]
        row: dict[str, Any] = {}
        for name, results in by_target.items():
            cell: dict[str, Any] = {
                k: med([x[k] for x in results]) for k in ("rps", "p50_ms", "p99_ms",
                                                          "p999_ms", "max_ms")}
            cpu = [x["cpu_us_per_request"] for x in results if x["cpu_us_per_request"]]
            if cpu:
                cell["cpu_us_per_request"] = med(cpu)
            if name != "direct" and mode != "saturation":
                for p in ("p50", "p99"):
                    added = [g[f"{p}_ms"] - d[f"{p}_ms"] for g, d in zip(results, direct,
                                                                        strict=True)]
                    cell[f"added_{p}_ms"] = med(added)
                    cell[f"added_{p}_ms_rounds"] = [round(a, 3) for a in added]
            cell["error_rounds"] = sum(1 for x in results if x["errors"])
            cell["noisy_rounds"] = sum(1 for x in results if x["foreign_cpu_pct"] > NOISY)
            cell["sustained"] = not any(x["missed_rate"] for x in results)
            row[name] = cell
        if "litellm" in row and "added_p99_ms" in row["corral"]:
            valid = all(row[n]["sustained"] and not row[n]["error_rounds"]
                        for n in ("direct", "corral", "litellm"))
            corral_p99 = row["corral"]["added_p99_ms"]
            row["litellm_over_corral_added_p99"] = (
                round(row["litellm"]["added_p99_ms"] / corral_p99, 1)
                if valid and corral_p99 > 0 else None)
        table[mode] = row
    return table


def render(table: dict[str, Any]) -> str:
    lines = [f"{'rate':>10} {'target':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
             f"{'+p50 ms':>8} {'+p99 ms':>8} {'cpu us/req':>10}  note"]
    for mode, row in table.items():
        for name, c in row.items():
            if not isinstance(c, dict):
                continue
            add50, add99 = c.get("added_p50_ms"), c.get("added_p99_ms")
            notes = []
            if not c["sustained"]:
                notes.append("COULD NOT SUSTAIN the rate")
            if c["error_rounds"]:
                notes.append(f"ERRORS in {c['error_rounds']} round(s)")
            if c["noisy_rounds"]:
                notes.append(f"noisy: {c['noisy_rounds']} round(s) shared the CPUs")
            note = "; ".join(notes)
            lines.append(
                f"{mode:>10} {name:>8} {c['rps']:8.0f} {c['p50_ms']:8.3f} {c['p99_ms']:8.3f} "
                f"{'' if add50 is None else f'{add50:8.3f}':>8} "
                f"{'' if add99 is None else f'{add99:8.3f}':>8} "
                f"{c.get('cpu_us_per_request', ''):>10}  {note}")
        if "litellm_over_corral_added_p99" in row:
            ratio = row["litellm_over_corral_added_p99"]
            lines.append(f"{'':>10} LiteLLM/corral added p99: " + (
                f"{ratio}x" if ratio is not None else "n/a (a run missed its rate or had "
                "errors)"))
    return "\n".join(lines)


def verdict(table: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets: corral's added p50 <= 1 ms and p99 <= 5 ms at 1,000 requests/s;
    LiteLLM's added p99 >= 10x corral's (at every rate where both held the rate)."""
    out: dict[str, Any] = {"saturation_rps": {
        n: c["rps"] for n, c in table.get("saturation", {}).items() if isinstance(c, dict)}}
    at = table.get("1000")
    if at is not None:
        corral = at["corral"]
        held = corral["sustained"] and not corral["error_rounds"]
        out.update({
            "corral_sustained_1000": held,
            "corral_added_p50_ms_at_1000": corral["added_p50_ms"],
            "corral_added_p50_ok": held and corral["added_p50_ms"] <= TARGET_ADDED_P50_MS,
            "corral_added_p99_ms_at_1000": corral["added_p99_ms"],
            "corral_added_p99_ok": held and corral["added_p99_ms"] <= TARGET_ADDED_P99_MS,
        })
    ratios = {mode: row["litellm_over_corral_added_p99"] for mode, row in table.items()
              if row.get("litellm_over_corral_added_p99") is not None}
    if any("litellm_over_corral_added_p99" in row for row in table.values()):
        out["litellm_over_corral_added_p99"] = ratios
        out["ratio_ok"] = bool(ratios) and all(r >= TARGET_RATIO for r in ratios.values())
        out["litellm_unsustained_rates"] = [
            mode for mode, row in table.items()
            if "litellm" in row and not row["litellm"]["sustained"]]
    return out


def say_verdict(v: dict[str, Any]) -> str:
    def ok(flag: bool) -> str:
        return "ok" if flag else "MISSED"

    lines = []
    if "corral_sustained_1000" in v:
        lines.append(
            "corral at 1000 req/s: " + ("" if v["corral_sustained_1000"] else
                                         "did NOT hold the rate; ") +
            f"added p50 {v['corral_added_p50_ms_at_1000']} ms (target <= "
            f"{TARGET_ADDED_P50_MS:g}: {ok(v['corral_added_p50_ok'])}), added p99 "
            f"{v['corral_added_p99_ms_at_1000']} ms (target <= {TARGET_ADDED_P99_MS:g}: "
            f"{ok(v['corral_added_p99_ok'])})")
    if "litellm_over_corral_added_p99" in v:
        ratios = ", ".join(f"{r}x at {m}/s" for m, r in v["litellm_over_corral_added_p99"].items())
        lines.append(f"LiteLLM/corral added p99: {ratios or 'no rate both held'} (target >= "
                     f"{TARGET_RATIO:g}x: {ok(v['ratio_ok'])}); LiteLLM did not hold "
                     f"{', '.join(v['litellm_unsustained_rates']) or 'none'}")
    lines.append("saturation req/s: " + ", ".join(f"{n} {r:.0f}" for n, r in
                                                  v["saturation_rps"].items()))
    return "\n".join(lines)


def profile(corral: Target, args: argparse.Namespace, lua: Path, tmp: Path) -> dict[str, Any]:
    """py-spy on corral's gateway during a run at --profile-rate: where its CPU goes."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"skipped": "py-spy is not installed; pip install py-spy"}
    assert corral.process is not None
    out = tmp / "profile.txt"
    seconds, hz = int(args.duration), 200
    wrk(corral, args.profile_rate, args.warmup, args, lua)
    # --gil: samples that hold the GIL, i.e. Python at work (SQLite and socket calls that
    # release it are not counted); the run is a little slower for the sampling pauses
    recorder = subprocess.Popen(
        pinned(args.load_cpu, [spy, "record", "--pid", str(corral.process.pid), "--rate",
                               str(hz), "--duration", str(seconds), "--gil", "--format",
                               "raw", "--output", str(out)]),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    result = wrk(corral, args.profile_rate, seconds, args, lua)
    _, err = recorder.communicate(timeout=seconds + 60)
    if recorder.returncode != 0 or not out.exists():
        return {"skipped": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
    return {"run": result, **collapse(out.read_text(), hz, result["requests"])}


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")

_AREAS = [  # a sample goes to the area of its innermost frame that names one
    ("ledger (rows queued, written from a thread)", ("sqlite3", "_ledger.py",
                                                      "concurrent/futures/thread.py")),
    ("json encode/decode", ("json/",)),
    ("httpx/httpcore (or aiohttp): the upstream call", ("httpx/", "httpcore/", "anyio/",
                                                        "sniffio/", "aiohttp/", "yarl/",
                                                        "multidict/")),
    ("uvicorn/httptools: the HTTP server", ("uvicorn/", "httptools/")),
    ("starlette: routing, request, response", ("starlette/",)),
    ("corral gateway: server, router, providers", ("corral/",)),
    ("pydantic", ("pydantic",)),
    ("event loop (asyncio/uvloop), sockets", ("asyncio/", "uvloop/", "selectors.py",
                                             "socket.py")),
]


def collapse(raw: str, hz: int, requests: int) -> dict[str, Any]:
    """py-spy's raw stacks (GIL-holding samples) by area and by function: share of samples,
    and microseconds per request (samples / hz / requests)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [(m["func"], m["file"]) for f in stack.split(";")
                  if (m := _FRAME.match(f)) is not None]
        if not frames:
            continue
        names = [f"{func} ({'/'.join(Path(path).parts[-2:])})" for func, path in frames]
        own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
        area = next((a for _, path in reversed(frames) for a, keys in _AREAS
                     if any(k in path for k in keys)), "other")
        areas[area] += n
    if not total:
        return {"samples": 0}

    def share(n: int) -> dict[str, float]:
        return {"share": round(n / total, 3),
                "us_per_request": round(n / hz / max(requests, 1) * 1e6, 1)}

    return {"samples": total, "hz": hz,
            "gil_us_per_request": share(total)["us_per_request"],
            "areas": {a: share(n) for a, n in areas.most_common()},
            "top_own": {f: share(n) for f, n in own.most_common(25)},
            "top_inclusive": {f: share(n) for f, n in inclusive.most_common(40)}}


def version(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True)
    return (out.stdout + out.stderr).strip().splitlines()[0]


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "corral": importlib.metadata.version("corral"),
            "repo_head": subprocess.run(
                ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
                capture_output=True, text=True).stdout.strip(),
            "nginx": version(["nginx", "-v"]), "wrk": version(["wrk", "-v"]),
            "loadavg_at_start": os.getloadavg()}


def litellm_venv(args: argparse.Namespace) -> Path | None:
    venv: Path = args.litellm_venv
    if (venv / "bin" / "litellm").exists():
        return venv
    command = (f"python3 -m venv {venv} && {venv}/bin/pip install 'litellm[proxy]'")
    if not args.install_litellm:
        log(f"LiteLLM's proxy is not in {venv}: its column is skipped. Install it with\n"
            f"    {command}\nor run this script with --install-litellm.")
        return None
    log(f"installing LiteLLM's proxy: {command}")
    started = time.monotonic()
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    log(f"installed in {time.monotonic() - started:.0f} s")
    return venv


@contextlib.contextmanager
def targets(args: argparse.Namespace, tmp: Path) -> Iterator[tuple[list[Target], str]]:
    with contextlib.ExitStack() as stack:
        direct = start_nginx(tmp, args.load_cpu, stack)
        corral, db = start_corral(tmp, direct.url, args.gateway_cpu, args.corral_src,
                                  not args.no_governance, stack)
        found = [direct, corral]
        venv = None if args.no_litellm else litellm_venv(args)
        if venv is not None:
            found.append(start_litellm(tmp, direct.url, venv, args.gateway_cpu, stack))
        yield found, db


def ledger(db: str) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows, cost, priced = conn.execute(
            "SELECT count(*), sum(cost), sum(priced) FROM corral_costs").fetchone()
    return {"rows": rows, "cost_usd": cost, "priced_rows": priced}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[50, 100, 500, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each run")
    parser.add_argument("--connections", type=int, default=32, help="for the paced runs")
    parser.add_argument("--sat-connections", type=int, default=64)
    parser.add_argument("--load-cpu", default="0", help="CPU list for wrk and nginx")
    parser.add_argument("--gateway-cpu", default="1", help="CPU list for the gateway")
    parser.add_argument("--no-pin", action="store_true", help="let the scheduler place all")
    parser.add_argument("--nice", type=int, default=-20,
                        help="niceness of wrk, nginx and the gateways when run as root, so "
                        "that other work on a shared machine disturbs them less (0: off)")
    parser.add_argument("--litellm-venv", type=Path, default=Path("/work/venvs/litellm"))
    parser.add_argument("--install-litellm", action="store_true")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--no-governance", action="store_true",
                        help="corral without rate limits, budgets and a virtual key")
    parser.add_argument("--profile", action="store_true",
                        help="also profile corral at --profile-rate with py-spy")
    parser.add_argument("--profile-rate", type=int, default=1000)
    parser.add_argument("--corral-src",
                        help="run the gateway with this PYTHONPATH (dirs joined by :), e.g. a "
                        "`git archive HEAD src` snapshot, instead of the installed corral")
    parser.add_argument("--json", type=Path, help="also write the JSON summary here")
    args = parser.parse_args()
    # a TERM unwinds like ^C: the servers started so far are stopped, the temp dir removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.no_pin:
        args.load_cpu = args.gateway_cpu = None
    if args.nice and os.geteuid() == 0:
        NICE[:] = ["nice", "-n", str(args.nice)]
    missing = [tool for tool in ("nginx", "wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not found: apt-get install -y nginx wrk "
                         "util-linux")
    info = machine()
    with tempfile.TemporaryDirectory(prefix="corral-overhead-") as name, \
            targets(args, Path(name)) as (found, db):
        tmp = Path(name)
        names = [t.name for t in found]
        log(f"targets: {', '.join(names)}; {args.rounds} rounds of {args.duration:g} s runs "
            f"(+{args.warmup:g} s warmup) at {args.rates} requests/s and saturation")
        lua = tmp / "bench.lua"
        lua.write_text(WRK_LUA)
        runs = measure(found, args, lua)
        profiled = profile(found[1], args, lua, tmp) if args.profile else None
        corral = found[1]
        assert corral.process is not None
        stop(corral.process)  # writes what the ledger still queues
        rows = {**ledger(db), "requests_answered": corral.answered + 1}  # + the sanity check
        features = {t.name: t.features for t in found}
        infos = {t.name: t.info for t in found}
    table = summarize(runs) if args.rounds else {}
    log("")
    log(render(table))
    if table:
        log(say_verdict(verdict(table)))
    # a failure: any error, or direct or corral missing its rate (LiteLLM missing one is a
    # result, reported in the verdict: it saturates below that rate)
    failed = [f"{mode}/{name} round {i + 1}: {'; '.join(x['problems'])}"
              for mode, by_target in runs.items() for name, results in by_target.items()
              for i, x in enumerate(results)
              if x["errors"] or (x["missed_rate"] and name != "litellm")]
    if rows["rows"] < rows["requests_answered"]:  # (more is fine: wrk leaves some in flight)
        failed.append(f"the ledger has {rows['rows']} rows for {rows['requests_answered']} "
                      "answered requests")
    summary = {
        "bench": "gateway_overhead",
        "settings": {"rates": args.rates, "rounds": args.rounds, "duration_s": args.duration,
                     "warmup_s": args.warmup, "connections": args.connections,
                     "sat_connections": args.sat_connections,
                     "pinning": {"wrk_and_nginx": args.load_cpu,
                                 "gateway": args.gateway_cpu},
                     "niceness": int(NICE[2]) if NICE else 0,
                     "load": "wrk -t1, open-loop pacing by Lua delay() on one schedule"},
        "machine": info, "features": features, "targets": infos,
        "table_medians": table, "verdict": verdict(table) if table else None,
        "ledger": rows,
        "runs": runs, "profile": profiled, "failures": failed,
    }
    if profiled and "areas" in profiled:
        log(f"\nprofile of corral at {args.profile_rate} requests/s, achieved "
            f"{profiled['run']['rps']:.0f}, cpu {profiled['run']['cpu_us_per_request']} us per "
            f"request, {profiled['gil_us_per_request']} us holding the GIL; by area "
            "(share of GIL samples, us per request):")
        for area, s in profiled["areas"].items():
            log(f"  {s['share']:6.1%} {s['us_per_request']:7.1f}  {area}")
        log("  top functions by own time:")
        for func, s in list(profiled["top_own"].items())[:15]:
            log(f"  {s['share']:6.1%} {s['us_per_request']:7.1f}  {func}")
    line = json.dumps(summary)
    if args.json:
        args.json.write_text(line + "\n")
    print(line)
    if failed:
        log("FAILED runs:\n  " + "\n  ".join(failed))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
