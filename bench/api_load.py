"""The control plane under load: runs submitted per second through HTTP (POST /v1/runs), and
the latency of GET /v1/runs/{id} with 100,000 runs stored.

One `corral serve` process (its worker included, durability "full": every commit fsync'd)
on 127.0.0.1, on a fresh SQLite file filled first with --runs (100,000) real, completed runs
of a trivial workflow (`echo`, no steps), made in a child process by corral's Runtime
(durability "process", rt.start() in chunks of --fill-chunk under asyncio.gather); 90% of
them are tenant "acme"'s, 10% "globex"'s. wrk sends a tenant key of acme's (from `corral keys
create --tenant acme`): every request pays the key lookup and the tenant check.

- get: GET /v1/runs/{id}, the id drawn at random (per request, in wrk's Lua) among acme's
  runs; paced at --get-rate requests/s over --connections connections, and at saturation
  (--sat-connections, no pacing), each trial after a --warmup run. Every answer must be 200.
- post: POST /v1/runs {"workflow": "echo", "input": N} for --duration seconds: paced at
  --post-rate, at saturation, and at saturation with a unique Idempotency-Key on each request.
  Accepted/s is 2xx answers over wrk's duration; created/s counts the runs the database
  gained (rows after minus rows before, after the worker drained), which must be at least
  the accepted ones (a few more: wrk leaves requests in flight when it stops) and all
  completed; drain_s is how long after wrk stopped the last of them finished.
- mixed: GETs paced at --get-rate while a second wrk POSTs at saturation: the read latency
  while the server ingests runs (the same event loop and the same SQLite connection).

The GET trials all run before any POST (so they see exactly --runs runs); each mode runs
--trials times, interleaved; the summary reports medians. Pacing: wrk's Lua delay() holds
the requests to one absolute schedule (open loop while a connection is free; Debian has no
wrk2). Saturation is plain wrk: closed loop, each connection sends its next request when the
answer to its last arrives, so its latencies are those of a full queue of --sat-connections.
wrk times each request from when it is written, so a paced run that falls behind its
schedule understates latency: such a run is flagged (missed_rate) and fails the bench, as
do socket errors, non-2xx answers and lost or unfinished runs (exit 1, after the report).

Pinning on this 2-core machine: wrk on --load-cpu (0), the server on --server-cpu (1; its
SQLite threads share that core); as root all of them at nice -20. CPU per request is the
server process's user+system time over the requests answered (also split into user and
system, with its threads' voluntary and involuntary context switches per request). On a
shared machine, each trial first waits (up to --quiet-wait seconds) for a second in which
other processes use under --quiet-pct of a core; foreign_cpu_pct is what they used during
the trial (over --noisy-pct flags the trial "noisy": read its tail latencies with care).

    python bench/api_load.py [--trials 3] [--duration 10] [--runs 100000]
    python bench/api_load.py --corral-src /tmp/snap/src  # a snapshot: git archive HEAD src
                                                         # | tar -x -C /tmp/snap

Needs wrk (`apt-get install -y wrk`) and the gateway extra (uvicorn, starlette). Progress
goes to stderr; stdout gets one JSON line (--json PATH writes it to a file too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from _load import LUA_PACING, busy_seconds, free_port, tree_cpu_seconds

MASTER = "corral-bench-master-key-0123456789"
WORKFLOWS = '''\
"""The workflow corral serve offers in bench/api_load.py."""

import corral


@corral.workflow
async def echo(ctx: corral.Context, value: object = None) -> object:
    return value
'''
RATE_TOLERANCE = 0.01
NOISY = [10.0]  # --noisy-pct
FINISHED = ("completed", "failed", "cancelled")

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

local mode = os.getenv("BENCH_MODE")  -- "get", "post" or "post-idem"
local auth = "Bearer " .. os.getenv("BENCH_KEY")
local nonce = os.getenv("BENCH_NONCE")
local ids = {}
if mode == "get" then
  for line in io.lines(os.getenv("BENCH_IDS")) do ids[#ids + 1] = line end
end
math.randomseed(tonumber(os.getenv("BENCH_SEED") or "1"))

local threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  threads[#threads + 1] = thread
end

local n = 0
function request()
  n = n + 1
  if mode == "get" then
    return wrk.format("GET", "/v1/runs/" .. ids[math.random(#ids)],
                      {["Authorization"] = auth})
  end
  local headers = {["Authorization"] = auth, ["Content-Type"] = "application/json"}
  if mode == "post-idem" then
    headers["Idempotency-Key"] = nonce .. "-" .. tid .. "-" .. n
  end
  return wrk.format("POST", "/v1/runs", headers,
                    '{"workflow": "echo", "input": ' .. n .. '}')
end

statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

""" + LUA_PACING + """\

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      counts[#counts + 1] = string.format('"%d":%d', status, count)
    end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f,"statuses":{%s}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean, table.concat(counts, ",")))
end
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def http(url: str, key: str | None = None, body: Any = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(), headers=headers,
        method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def switches(pid: int) -> tuple[int, int]:
    """Voluntary and involuntary context switches of a process's threads (those alive)."""
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    involuntary += int(line.split()[1])
    return voluntary, involuntary


def own_seconds() -> float:
    """CPU time of this script and its children: the finished ones (reaped: in
    RUSAGE_CHILDREN) and the live ones (the server, a running wrk: from /proc)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                 resource.RUSAGE_CHILDREN)]
    return (sum(u.ru_utime + u.ru_stime for u in usage)
            + tree_cpu_seconds(os.getpid(), root=False))


class Foreign:
    """What other processes use of the CPUs while this is open, in % of one core."""

    def __init__(self) -> None:
        self.busy, self.own, self.at = busy_seconds(), own_seconds(), time.monotonic()

    def pct(self) -> float:
        foreign = (busy_seconds() - self.busy) - (own_seconds() - self.own)
        return round(max(0.0, foreign / (time.monotonic() - self.at) * 100), 1)


def wait_quiet(args: argparse.Namespace) -> dict[str, float]:
    """Wait for a second in which other processes use under --quiet-pct of a core."""
    started = time.monotonic()
    while True:
        sample = Foreign()
        time.sleep(1.0)
        level = sample.pct()
        waited = time.monotonic() - started
        if level < args.quiet_pct or waited >= args.quiet_wait:
            return {"waited_s": round(waited, 1), "foreign_cpu_pct_before": level}


def rss_mb(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


NICE: list[str] = []  # ["nice", "-n", "-20"] for the measured processes, when root


def pinned(cpu: str | None, argv: list[str]) -> list[str]:
    return [*NICE, *(["taskset", "-c", cpu] if cpu is not None else []), *argv]


# -- the fill: real runs, made by corral ---------------------------------------------------------

async def _fill(db: str, workflows: str, runs: int, chunk: int) -> dict[str, Any]:
    import corral

    echo = corral.load_workflow(f"{workflows}:echo")
    started = time.perf_counter()
    async with corral.Runtime(db, max_runs=2 * chunk, durability="process") as rt:
        for first in range(0, runs, chunk):
            handles = await asyncio.gather(*(
                rt.start(echo, i, tenant="globex" if i % 10 == 9 else "acme")
                for i in range(first, min(runs, first + chunk))))
            await asyncio.gather(*(h.result() for h in handles))
    return {"seconds": round(time.perf_counter() - started, 2)}


def fill(db: Path, workflows: Path, runs: int, chunk: int, env: dict[str, str]
         ) -> dict[str, Any]:
    """Fill in a child process (with the server's PYTHONPATH): the runs are made by the
    corral under test."""
    argv = [sys.executable, __file__, "--fill-only", str(db), str(workflows), str(runs),
            str(chunk)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the fill failed: {out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT status, tenant, count(*) FROM runs GROUP BY 1, 2").fetchall()
    result.update({
        "runs": runs, "chunk": chunk, "durability": "process",
        "runs_per_s": round(runs / result["seconds"]),
        "stored": {f"{status}/{tenant}": n for status, tenant, n in rows},
        "db_mb": round(sum(p.stat().st_size for p in db.parent.glob(db.name + "*")) / 2**20, 1),
    })
    if sum(n for (status, _, n) in rows if status == "completed") != runs:
        raise SystemExit(f"the fill left {rows}; expected {runs} completed runs")
    return result


# -- the server ----------------------------------------------------------------------------------

class Server:
    def __init__(self, root: Path, db: Path, workflows: Path, cpu: str | None,
                 env: dict[str, str]) -> None:
        self.root, self.db, self.port = root, db, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.toml = root / "corral.toml"
        self.toml.write_text('[server]\nmaster_key_env = "CORRAL_BENCH_MASTER"\n'
                             f'workflows = ["{workflows}"]\n')
        self.env = {**env, "CORRAL_BENCH_MASTER": MASTER, "CORRAL_CONFIG": str(self.toml),
                    "CORRAL_DB": str(db)}
        self.argv = [sys.executable, "-m", "corral", "serve", "--host", "127.0.0.1", "--port",
                     str(self.port), "--db", str(db)]
        self.logfile = root / "serve.log"
        with self.logfile.open("wb") as out:
            self.process = subprocess.Popen(pinned(cpu, self.argv), env=self.env, cwd=root,
                                            stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"corral serve did not start: {self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                if http(self.url + "/healthz")[0] == 200:
                    break
            time.sleep(0.1)

    def log_tail(self, chars: int = 3000) -> str:
        return self.logfile.read_text(errors="replace")[-chars:]

    def tenant_key(self, tenant: str) -> str:
        made = subprocess.run([sys.executable, "-m", "corral", "keys", "create", "--tenant",
                               tenant, "--name", "bench", "--json"], env=self.env,
                              cwd=self.root, capture_output=True, text=True)
        if made.returncode != 0:
            raise SystemExit(f"corral keys create failed: {made.stderr}")
        key: str = json.loads(made.stdout)["key"]
        deadline = time.monotonic() + 30
        while http(self.url + "/v1/runs?limit=1", key)[0] == 401:  # keys reload every 2 s
            if time.monotonic() > deadline:
                raise SystemExit("the server never accepted the new key")
            time.sleep(0.1)
        return key

    def in_use(self) -> dict[str, str]:
        """The event loop and HTTP parser the server really uses (its loaded libraries)."""
        maps = Path(f"/proc/{self.process.pid}/maps").read_text()
        return {"loop": "uvloop" if "/uvloop/" in maps else "asyncio",
                "http": "httptools" if "/httptools/" in maps else "h11"}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- wrk -----------------------------------------------------------------------------------------

def wrk(server: Server, mode: str, rate: int | None, seconds: float, connections: int,
        args: argparse.Namespace, files: dict[str, Path], seed: int, *,
        quiet: bool = True) -> dict[str, Any]:
    env = {**os.environ, "BENCH_MODE": mode, "BENCH_KEY": files["key"].read_text(),
           "BENCH_IDS": str(files["ids"]), "BENCH_RATE": str(rate or 0),
           "BENCH_SEED": str(seed), "BENCH_NONCE": uuid.uuid4().hex[:12]}
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s",
            str(files["lua"]), server.url]
    waited = wait_quiet(args) if quiet else {}
    pid = server.process.pid
    (user0, sys0), (vol0, invol0) = cpu_split(pid), switches(pid)
    foreign = Foreign()
    out = subprocess.run(pinned(args.load_cpu, argv), env=env, capture_output=True, text=True,
                         timeout=seconds + 60)
    (user1, sys1), (vol1, invol1) = cpu_split(pid), switches(pid)
    cpu = (user1 - user0) + (sys1 - sys0)
    foreign_pct = foreign.pct()
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({mode}): {out.stdout}\n{out.stderr}")
    r = json.loads(line[6:])
    achieved = r["requests"] / (r["duration_us"] / 1e6)
    statuses = {k: v for k, v in sorted(r["statuses"].items())}
    ok = sum(v for k, v in statuses.items() if k.startswith("2"))
    errors = []
    socket_errors = {k: r[k] for k in ("connect", "read", "write", "timeout") if r[k]}
    if socket_errors:
        errors.append(f"socket errors {socket_errors}")
    if ok != r["requests"]:
        errors.append(f"{r['requests'] - ok} non-2xx answers {statuses}")
    missed = (f"achieved {achieved:.0f} requests/s of {rate}"
              if rate and abs(achieved - rate) > RATE_TOLERANCE * rate else None)
    return {"mode": mode, "rate": rate, "connections": connections,
            "rps": round(achieved, 1), "requests": r["requests"],
            "duration_s": round(r["duration_us"] / 1e6, 3), "ok_2xx": ok,
            "non_2xx": r["requests"] - ok, "statuses": statuses,
            "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "p999_ms": r["p999_us"] / 1000,
            "max_ms": r["max_us"] / 1000, "mean_ms": round(r["mean_us"] / 1000, 3),
            "server_cpu_us_per_request": round(cpu / max(r["requests"], 1) * 1e6, 1),
            "server_cpu_pct": round(cpu / (r["duration_us"] / 1e6) * 100, 1),
            "server_user_sys_us_per_request": [
                round((user1 - user0) / max(r["requests"], 1) * 1e6, 1),
                round((sys1 - sys0) / max(r["requests"], 1) * 1e6, 1)],
            "server_switches_per_request": [
                round((vol1 - vol0) / max(r["requests"], 1), 2),
                round((invol1 - invol0) / max(r["requests"], 1), 2)],
            "foreign_cpu_pct": foreign_pct, **waited,
            "command": " ".join(argv), "errors": errors, "missed_rate": missed,
            "problems": errors + ([missed] if missed else [])}


def rows(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        return int(conn.execute("SELECT max(rowid) FROM runs").fetchone()[0] or 0)


def drained(db: Path, after: int, timeout: float) -> tuple[dict[str, int], float | None]:
    """Wait until every run past rowid ``after`` has finished: their statuses, and the
    seconds it took (None: some were still unfinished at ``timeout``)."""
    started = time.monotonic()
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        while True:
            counts = dict(conn.execute("SELECT status, count(*) FROM runs WHERE rowid > ? "
                                       "GROUP BY 1", (after,)).fetchall())
            if all(s in FINISHED for s in counts):
                return counts, round(time.monotonic() - started, 2)
            if time.monotonic() - started > timeout:
                return counts, None
            time.sleep(0.05)


def post_trial(server: Server, mode: str, rate: int | None, args: argparse.Namespace,
               files: dict[str, Path], seed: int) -> dict[str, Any]:
    before = rows(server.db)
    connections = args.connections if rate else args.sat_connections
    result = wrk(server, mode, rate, args.duration, connections, args, files, seed)
    counts, drain = drained(server.db, before, args.drain_timeout)
    created = sum(counts.values())
    completed = counts.get("completed", 0)
    result.update({
        "accepted_per_s": round(result["ok_2xx"] / result["duration_s"], 1),
        "created": created, "created_per_s": round(created / result["duration_s"], 1),
        "completed": completed, "run_statuses": counts, "drain_s": drain,
    })
    if created < result["statuses"].get("201", 0):
        result["errors"].append(f"lost runs: {result['statuses'].get('201', 0)} answered 201, "
                                f"{created} created")
    if result["statuses"].get("200"):
        result["errors"].append(f"{result['statuses']['200']} answers 200 (an existing run) "
                                "to unique submissions")
    if drain is None or completed != created:
        result["errors"].append(f"not all runs completed: {counts} (drain timeout "
                                f"{args.drain_timeout:g} s)")
    result["problems"] = result["errors"] + ([result["missed_rate"]]
                                             if result["missed_rate"] else [])
    return result


def mixed_trial(server: Server, args: argparse.Namespace, files: dict[str, Path],
                seed: int) -> dict[str, Any]:
    """GETs paced at --get-rate while POSTs run at saturation (a second wrk, started just
    before and stopped just after): the read latency while the server ingests runs. The
    server's CPU and switches in the result are those of both loads."""
    before = rows(server.db)
    posted: dict[str, Any] = {}

    def post() -> None:
        posted.update(wrk(server, "post", None, args.duration + 1, args.sat_connections, args,
                          files, seed + 1, quiet=False))

    thread = threading.Thread(target=post)
    thread.start()
    time.sleep(0.5)
    result = wrk(server, "get", args.get_rate, args.duration, args.connections, args, files,
                 seed, quiet=False)
    thread.join()
    counts, drain = drained(server.db, before, args.drain_timeout)
    created, completed = sum(counts.values()), counts.get("completed", 0)
    result["concurrent_post"] = {k: posted.get(k) for k in (
        "rps", "requests", "ok_2xx", "non_2xx", "statuses", "p50_ms", "p99_ms", "errors",
        "command")}
    result.update({"created": created, "completed": completed, "run_statuses": counts,
                   "drain_s": drain})
    result["errors"] += [f"concurrent post: {e}" for e in posted.get("errors", ["no result"])]
    if created < posted.get("statuses", {}).get("201", 0):
        result["errors"].append(f"lost runs: {posted['statuses']['201']} answered 201, "
                                f"{created} created")
    if drain is None or completed != created:
        result["errors"].append(f"not all runs completed: {counts}")
    result["problems"] = result["errors"] + ([result["missed_rate"]]
                                             if result["missed_rate"] else [])
    return result


def med(values: list[float]) -> float:
    return round(statistics.median(values), 3)


KEYS = ("rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "server_cpu_us_per_request",
        "accepted_per_s", "created_per_s", "drain_s")


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    cell: dict[str, Any] = {}
    for k in KEYS:
        values = [t[k] for t in trials if t.get(k) is not None]
        if values:
            cell[k] = med(values)
    cell["non_2xx_total"] = sum(t["non_2xx"] for t in trials)
    cell["error_trials"] = sum(1 for t in trials if t["errors"])
    cell["noisy_trials"] = sum(1 for t in trials if t["foreign_cpu_pct"] > NOISY[0])
    cell["foreign_cpu_pct"] = [t["foreign_cpu_pct"] for t in trials]
    cell["sustained"] = not any(t["missed_rate"] for t in trials)
    posts = [t["concurrent_post"]["rps"] for t in trials if "concurrent_post" in t]
    if posts:
        cell["concurrent_post_rps"] = med(posts)
    cell["trials"] = len(trials)
    return cell


def describe(name: str, t: dict[str, Any]) -> str:
    text = (f"{name:>22}: {t['rps']:8.1f} req/s  p50 {t['p50_ms']:8.3f} ms  p99 "
            f"{t['p99_ms']:8.3f} ms  cpu/req {t['server_cpu_us_per_request']} us")
    if "concurrent_post" in t:
        c = t["concurrent_post"]
        text += f"  (with POSTs at {c['rps']}/s, p99 {c['p99_ms']} ms)"
    if "created_per_s" in t:
        text += (f"  accepted {t['accepted_per_s']}/s created {t['created_per_s']}/s "
                 f"drain {t['drain_s']} s")
    text += f"  foreign {t['foreign_cpu_pct']}%"
    if t["foreign_cpu_pct"] > NOISY[0]:
        text += " NOISY"
    if t["problems"]:
        text += "  FAIL: " + "; ".join(t["problems"])
    return text


def machine(env: dict[str, str]) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    repo = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *argv], capture_output=True,
                              text=True).stdout.strip()

    code = ("import importlib.metadata as m, json, corral; print(json.dumps({'file': "
            "corral.__file__, **{n: m.version(n) for n in ('uvicorn', 'starlette', "
            "'httptools', 'uvloop')}}))")
    stack = json.loads(subprocess.run([sys.executable, "-c", code], env=env,
                                      capture_output=True, text=True, check=True).stdout)
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "corral": importlib.metadata.version("corral"),
            "repo_head": git("rev-parse", "--short", "HEAD"),
            "src_dirty": bool(git("status", "--porcelain", "--", "src")),
            "server_stack": stack,
            "wrk": (subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
                    .strip().splitlines() or [""])[0],
            "sqlite": sqlite3.sqlite_version, "loadavg_at_start": os.getloadavg()}


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--fill-only":
        db, workflows, runs, chunk = sys.argv[2:]
        print(json.dumps(asyncio.run(_fill(db, workflows, int(runs), int(chunk)))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100_000, help="runs stored before the load")
    parser.add_argument("--fill-chunk", type=int, default=2000)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of GETs before each GET trial (and of POSTs once)")
    parser.add_argument("--get-rate", type=int, default=500, help="paced GETs per second")
    parser.add_argument("--post-rate", type=int, default=200, help="paced POSTs per second")
    parser.add_argument("--connections", type=int, default=32, help="for the paced runs")
    parser.add_argument("--sat-connections", type=int, default=32)
    parser.add_argument("--no-idempotency", action="store_true",
                        help="skip the POST variant with an Idempotency-Key per request")
    parser.add_argument("--no-mixed", action="store_true",
                        help="skip GETs at --get-rate during POSTs at saturation")
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--quiet-pct", type=float, default=10.0,
                        help="before each trial, wait for other processes to use less than "
                        "this %% of a core over a second")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="at most this many seconds (then the trial runs anyway)")
    parser.add_argument("--noisy-pct", type=float, default=10.0,
                        help="flag trials in which other processes used more (%% of a core)")
    parser.add_argument("--load-cpu", default="0", help="CPU list for wrk")
    parser.add_argument("--server-cpu", default="1", help="CPU list for corral serve")
    parser.add_argument("--no-pin", action="store_true", help="let the scheduler place all")
    parser.add_argument("--nice", type=int, default=-20,
                        help="niceness of wrk and the server when run as root (0: off)")
    parser.add_argument("--corral-src",
                        help="run the fill and the server with this PYTHONPATH, e.g. a `git "
                        "archive HEAD src` snapshot, instead of the installed corral")
    parser.add_argument("--keep", type=Path, help="keep the database and logs in this folder")
    parser.add_argument("--json", type=Path, help="also write the JSON summary here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    NOISY[0] = args.noisy_pct
    if args.no_pin:
        args.load_cpu = args.server_cpu = None
    if args.nice and os.geteuid() == 0:
        NICE[:] = ["nice", "-n", str(args.nice)]
    missing = [t for t in ("wrk", "taskset") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not found: apt-get install -y wrk util-linux")
    env = dict(os.environ)
    if args.corral_src:
        env["PYTHONPATH"] = args.corral_src
    info = machine(env)
    command = " ".join(["python", "bench/api_load.py", *sys.argv[1:]])
    with contextlib.ExitStack() as stack:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            root = args.keep
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="corral-api-")))
        db, workflows = root / "corral.db", root / "bench_workflows.py"
        workflows.write_text(WORKFLOWS)
        log(f"filling {db} with {args.runs} runs")
        filled = fill(db, workflows, args.runs, args.fill_chunk, env)
        log(f"filled in {filled['seconds']} s ({filled['runs_per_s']} runs/s): "
            f"{filled['stored']}, {filled['db_mb']} MB")
        with contextlib.closing(sqlite3.connect(db)) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM runs WHERE tenant = 'acme'")]
            other = conn.execute("SELECT id FROM runs WHERE tenant = 'globex'").fetchone()[0]
        files = {"ids": root / "ids.txt", "lua": root / "bench.lua", "key": root / "key.txt"}
        files["ids"].write_text("\n".join(ids) + "\n")
        files["lua"].write_text(WRK_LUA)
        server = Server(root, db, workflows, args.server_cpu, env)
        stack.callback(server.stop)
        key = server.tenant_key("acme")
        files["key"].write_text(key)
        status, body = http(f"{server.url}/v1/runs/{ids[0]}", key)
        hidden = http(f"{server.url}/v1/runs/{other}", key)[0]
        if status != 200 or body.get("status") != "completed" or hidden != 404:
            raise SystemExit(f"sanity check failed: GET acme's run {status} {body}; "
                             f"globex's run {hidden} (want 404)")
        served = {"pid": server.process.pid, **server.in_use(),
                  "command": " ".join(server.argv[1:]), "config": server.toml.read_text(),
                  "rss_mb_start": rss_mb(server.process.pid)}
        log(f"corral serve on {server.url} ({served['loop']}, {served['http']}); "
            f"{args.trials} trials of {args.duration:g} s")

        get_modes = [("get paced", args.get_rate), ("get saturation", None)]
        post_modes = [("post paced", "post", args.post_rate),
                      ("post saturation", "post", None)]
        if not args.no_idempotency:
            post_modes.append(("post saturation idem", "post-idem", None))
        if not args.no_mixed:
            post_modes.append(("get paced during post saturation", "mixed", None))
        trials: dict[str, list[dict[str, Any]]] = {
            name: [] for name in [*(m[0] for m in get_modes), *(m[0] for m in post_modes)]}
        seed = 1
        for t in range(args.trials):
            for name, rate in get_modes:
                connections = args.connections if rate else args.sat_connections
                wrk(server, "get", rate, args.warmup, connections, args, files, seed)
                seed += 1
                result = wrk(server, "get", rate, args.duration, connections, args, files,
                             seed)
                seed += 1
                trials[name].append(result)
                log(f"trial {t + 1} " + describe(name, result))
        served["rss_mb_after_get"] = rss_mb(server.process.pid)
        before = rows(db)
        wrk(server, "post", args.post_rate, args.warmup, args.connections, args, files, 0)
        warm_counts, warm_drain = drained(db, before, args.drain_timeout)
        log(f"post warmup: {warm_counts}, drained in {warm_drain} s")
        for t in range(args.trials):
            for name, mode, rate in post_modes:
                if mode == "mixed":
                    wait_quiet(args)
                    result = mixed_trial(server, args, files, seed)
                else:
                    result = post_trial(server, mode, rate, args, files, seed)
                seed += 2
                trials[name].append(result)
                log(f"trial {t + 1} " + describe(name, result))
        served["rss_mb_end"] = rss_mb(server.process.pid)
        served["runs_stored_end"] = rows(db)
        server.stop()
        served["exit_code"] = server.process.returncode
        server_log = server.logfile.read_text(errors="replace")
        served["log_errors"] = sum(1 for line in server_log.splitlines()
                                   if "ERROR" in line or "Traceback" in line)
        served["log_tail"] = server_log[-1500:]
    table = {name: summarize(results) for name, results in trials.items()}
    failed = [f"{name} trial {i + 1}: {'; '.join(x['problems'])}"
              for name, results in trials.items() for i, x in enumerate(results)
              if x["problems"]]
    if served["log_errors"]:
        failed.append(f"the server logged {served['log_errors']} errors")
    log("")
    for name, cell in table.items():
        log(f"{name:>22} (median of {cell['trials']}): " + ", ".join(
            f"{k} {cell[k]}" for k in KEYS if k in cell))
    summary = {
        "bench": "api_load",
        "command": command,
        "settings": {"runs": args.runs, "trials": args.trials, "duration_s": args.duration,
                     "warmup_s": args.warmup, "get_rate": args.get_rate,
                     "post_rate": args.post_rate, "connections": args.connections,
                     "sat_connections": args.sat_connections,
                     "pinning": {"wrk": args.load_cpu, "server": args.server_cpu},
                     "niceness": int(NICE[2]) if NICE else 0,
                     "quiet": {"pct": args.quiet_pct, "wait_s": args.quiet_wait,
                               "noisy_pct": args.noisy_pct},
                     "key": "tenant key of acme (corral keys create --tenant acme)",
                     "load": "wrk -t1; paced: open-loop Lua delay() on one schedule over "
                             "--connections; saturation: closed loop over --sat-connections",
                     "server_durability": "full (the corral serve default)",
                     "corral_src": args.corral_src or "the installed corral"},
        "machine": info, "fill": filled, "server": served,
        "medians": table,
        "headline": {
            "get_p50_ms_paced": table["get paced"]["p50_ms"],
            "get_p99_ms_paced": table["get paced"]["p99_ms"],
            "get_rps_saturation": table["get saturation"]["rps"],
            "get_p99_ms_saturation": table["get saturation"]["p99_ms"],
            "post_accepted_per_s_saturation": table["post saturation"]["accepted_per_s"],
            "post_created_per_s_saturation": table["post saturation"]["created_per_s"],
            "post_p50_ms_paced": table["post paced"]["p50_ms"],
            "post_p99_ms_paced": table["post paced"]["p99_ms"],
            "post_p99_ms_saturation": table["post saturation"]["p99_ms"],
            **({"post_idem_accepted_per_s_saturation":
                table["post saturation idem"]["accepted_per_s"]}
               if "post saturation idem" in table else {}),
            **({"get_p50_ms_paced_during_post_saturation":
                table["get paced during post saturation"]["p50_ms"],
                "get_p99_ms_paced_during_post_saturation":
                table["get paced during post saturation"]["p99_ms"]}
               if "get paced during post saturation" in table else {}),
        },
        "trials": trials, "failures": failed,
    }
    line = json.dumps(summary)
    if args.json:
        args.json.write_text(line + "\n")
    print(line)
    if failed:
        log("FAILED:\n  " + "\n  ".join(failed))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
