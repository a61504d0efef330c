"""Scale-out: durable steps per second on the Temporal engine with 1, 2 and 3 worker processes,
and on the embedded engine, for the same workflow (a chain of trivial steps) in the same run.

Starts Temporal's dev server on a free port, then for each repeat measures each configuration in
turn: --runs concurrent runs of --steps steps each, started from one client; steps/s is
runs * steps over the wall time from the first start to the last result. Each Temporal
configuration gets a fresh task queue served by freshly started worker processes, warmed with
--warmup runs before the clock starts. The embedded engine runs in this process on a fresh
SQLite file (durability="full"). Prints one JSON line: medians of --repeat repeats, and ratios.

    python bench/scale_out.py [--runs 100] [--steps 5] [--workers 1 2 3] [--repeat 3] [--warmup 10]

Everything (dev server, client, workers) shares this machine's cores, so on a small machine
more workers compete for the same CPUs; read the ratios with the cpu count next to them.
A worker alone: python bench/scale_out.py --serve-worker ADDRESS QUEUE
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, Any

import corral

STEPS_RUN = 0  # steps this process ran (a worker reports it when it stops)


@corral.step
async def work(i: int) -> int:
    global STEPS_RUN
    STEPS_RUN += 1
    return i + 1


@corral.workflow
async def chain(ctx: corral.Context, steps: int) -> int:
    total = 0
    for _ in range(steps):
        total = await work(total)
    return total


# -- a worker process -------------------------------------------------------------------------


async def serve_worker(address: str, queue: str, max_runs: int, max_steps: int) -> None:
    """Serve `queue` until stdin closes (the bench is done or died) or SIGTERM/SIGINT."""
    from corral.runtime._temporal import TemporalRuntime

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    class _StdinClosed(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            stop.set()

    await loop.connect_read_pipe(_StdinClosed, sys.stdin)
    async with TemporalRuntime(address, task_queue=queue, worker=True, max_runs=max_runs,
                               max_steps=max_steps) as rt:
        print("ready", flush=True)
        stopping = asyncio.create_task(stop.wait())
        serving = asyncio.create_task(rt.wait_closed())
        await asyncio.wait({stopping, serving}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if serving.done() and serving.exception() is not None:
            print(f"worker stopped: {serving.exception()!r}", file=sys.stderr, flush=True)
    print(f"steps {STEPS_RUN}", flush=True)
    sys.stderr.flush()
    # skip interpreter teardown: the Temporal client's Rust threads can abort it ("Fatal Python
    # error: PyGILState_Release", temporalio/sdk-python#300); the worker has shut down already
    os._exit(0)


# -- worker processes, seen from the bench ----------------------------------------------------

PROCESSES: list[subprocess.Popen[str]] = []  # every worker started, for the final sweep


def kill_all() -> None:
    """Stop every worker still alive (the last resort, on Ctrl-C or an error)."""
    for proc in PROCESSES:
        if proc.poll() is None:
            proc.terminate()
    for proc in PROCESSES:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Workers:
    """`n` worker processes serving `queue`; their stderr goes to files in `logs`."""

    def __init__(self, n: int, address: str, queue: str, logs: Path, args: argparse.Namespace):
        self.n, self.address, self.queue, self.logs, self.args = n, address, queue, logs, args
        self.procs: list[subprocess.Popen[str]] = []
        self.log_files: list[IO[str]] = []
        self.steps_run: list[int | None] = []

    async def __aenter__(self) -> Workers:
        try:
            for k in range(self.n):
                log = open(self.logs / f"{self.queue}-w{k + 1}.log", "w")  # noqa: SIM115 (_stop)
                self.log_files.append(log)
                proc = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--serve-worker", self.address,
                     self.queue, "--max-runs", str(self.args.max_runs),
                     "--max-steps", str(self.args.max_steps)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                    start_new_session=True,  # Ctrl-C reaches the bench only; it stops them
                )
                PROCESSES.append(proc)
                self.procs.append(proc)
            lines = await asyncio.wait_for(
                asyncio.gather(*(asyncio.to_thread(p.stdout.readline)  # type: ignore[union-attr]
                                 for p in self.procs)),
                timeout=60,
            )
            if any(line.strip() != "ready" for line in lines):
                raise RuntimeError(f"a worker did not start; see its log in {self.logs}")
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        for proc in self.procs:  # stdin closed: each worker shuts down gracefully
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
                proc.stdin = None  # communicate() below only reads
        for proc in self.procs:
            try:
                out, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            counts = [int(line.split()[1]) for line in out.splitlines()
                      if line.startswith("steps ")]
            self.steps_run.append(counts[0] if counts else None)
        for log in self.log_files:
            log.close()


# -- measurements -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def timed(rt: Any, runs: int, steps: int, pids: dict[str, int] | None = None,
                **start: Any) -> tuple[float, dict[str, float]]:
    """Start `runs` runs at once, wait for all; seconds from the first start to the last result,
    and the CPU seconds each process in `pids` (and this one, the client) used meanwhile."""

    async def one() -> int:
        handle = await rt.start(chain, steps, **start)
        return await handle.result()  # type: ignore[no-any-return]

    pids = pids or {}
    cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_cpu = time.process_time()
    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(runs)))
    elapsed = time.perf_counter() - started
    used = {"client": round(time.process_time() - client_cpu, 1),
            **{name: round(cpu_seconds(pid) - cpu[name], 1) for name, pid in pids.items()}}
    assert results == [steps] * runs, "a run returned a wrong total"
    return elapsed, used


def figures(runs: int, steps: int, elapsed: float) -> dict[str, Any]:
    return {"steps_per_s": round(runs * steps / elapsed, 1), "runs_per_s": round(runs / elapsed, 2),
            "seconds": round(elapsed, 2)}


async def measure_embedded(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="corral-scale-out-"))
    try:
        async with corral.Runtime(folder / "bench.db", durability="full",
                                  max_runs=max(1000, args.runs)) as rt:
            await timed(rt, args.warmup, args.steps)
            elapsed, _ = await asyncio.wait_for(timed(rt, args.runs, args.steps), args.timeout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return figures(args.runs, args.steps, elapsed)


async def measure_temporal(client: Any, address: str, server_pid: int | None, n: int,
                           logs: Path, args: argparse.Namespace) -> dict[str, Any]:
    queue = f"scale-out-{n}w-{uuid.uuid4().hex[:8]}"
    async with Workers(n, address, queue, logs, args) as workers:
        await asyncio.wait_for(timed(client, args.warmup, args.steps, queue=queue), args.timeout)
        pids = {f"worker_{k + 1}": p.pid for k, p in enumerate(workers.procs)}
        if server_pid is not None:
            pids["server"] = server_pid
        elapsed, cpu = await asyncio.wait_for(
            timed(client, args.runs, args.steps, pids, queue=queue), args.timeout)
    result = figures(args.runs, args.steps, elapsed)
    result["cpu_s"] = cpu
    result["runs_per_s_per_worker"] = round(args.runs / elapsed / n, 2)
    result["steps_by_worker_incl_warmup"] = workers.steps_run
    return result


async def bench(address: str, server_pid: int | None, logs: Path,
                args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    from corral.runtime._temporal import TemporalRuntime

    trials: dict[str, list[dict[str, Any]]] = {"embedded": []}
    trials.update({f"temporal_{n}": [] for n in args.workers})
    async with TemporalRuntime(address, task_queue="scale-out-client", worker=False) as client:
        for r in range(args.repeat):  # configurations interleaved, so drift hits all alike
            trials["embedded"].append(await measure_embedded(args))
            for n in args.workers:
                trials[f"temporal_{n}"].append(await measure_temporal(
                    client, address, server_pid, n, logs, args))
            print(json.dumps({"repeat": r + 1, **{name: t[-1]["steps_per_s"]
                                                  for name, t in trials.items()}}),
                  file=sys.stderr, flush=True)
    return trials


def median_trial(trials: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(trials, key=lambda t: t["steps_per_s"])
    return ordered[len(ordered) // 2]


def worker_log_summary(logs: Path) -> dict[str, Any]:
    lines = [(path.name, line.rstrip()) for path in sorted(logs.glob("*.log"))
             for line in path.read_text().splitlines() if line.strip()]
    errors = [f"{name}: {line}" for name, line in lines
              if any(word in line for word in ("Error", "ERROR", "Traceback", "WARN", "Warn"))]
    return {"lines": len(lines), "error_or_warning_lines": len(errors), "first": errors[:5]}


def summary(trials: dict[str, list[dict[str, Any]]], args: argparse.Namespace,
            logs: dict[str, Any]) -> dict[str, Any]:
    med = {name: median_trial(t) for name, t in trials.items()}
    one = med[f"temporal_{args.workers[0]}"]["steps_per_s"]
    ratio_base = f"temporal_{args.workers[0]}"
    return {
        "bench": "scale_out",
        "runs": args.runs, "steps_per_run": args.steps, "warmup_runs": args.warmup,
        "repeat": args.repeat,
        "steps_per_s_median": {name: m["steps_per_s"] for name, m in med.items()},
        "steps_per_s_trials": {name: [t["steps_per_s"] for t in ts] for name, ts in trials.items()},
        f"ratio_to_{ratio_base}": {name: round(m["steps_per_s"] / one, 2)
                                   for name, m in med.items() if name != ratio_base},
        "seconds_median": {name: m["seconds"] for name, m in med.items()},
        "runs_per_s_median": {name: m["runs_per_s"] for name, m in med.items()},
        "runs_per_s_per_worker_median": {
            name: round(statistics.median(t["runs_per_s_per_worker"] for t in ts), 2)
            for name, ts in trials.items() if name != "embedded"},
        "cpu_s_of_median_trial": {name: m["cpu_s"] for name, m in med.items()
                                  if name != "embedded"},
        "steps_by_worker_incl_warmup": {name: [t["steps_by_worker_incl_warmup"] for t in ts]
                                        for name, ts in trials.items() if name != "embedded"},
        "worker_logs": logs,
        "python": platform.python_version(),
        "temporalio": importlib.metadata.version("temporalio"),
        "cpu_count": os.cpu_count(),
        "worker_limits": {"max_runs": args.max_runs, "max_steps": args.max_steps},
        "embedded_durability": "full",
        "note": (f"one machine with {os.cpu_count()} cores hosts the Temporal dev server (SQLite),"
                 " the client and every worker process, so more workers compete for the same "
                 "cores; the embedded engine runs in the client's process. runs/s per worker is "
                 f"for {args.steps}-step runs of trivial steps."),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10, help="runs before the clock starts")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per measurement")
    parser.add_argument("--max-runs", type=int, default=1000, help="runs cached per worker")
    parser.add_argument("--max-steps", type=int, default=200, help="concurrent steps per worker")
    parser.add_argument("--serve-worker", nargs=2, metavar=("ADDRESS", "QUEUE"),
                        help="run as a worker process (the bench starts these itself)")
    args = parser.parse_args()
    if args.serve_worker:
        address, queue = args.serve_worker
        asyncio.run(serve_worker(address, queue, args.max_runs, args.max_steps))
        return

    from corral.testing import TemporalDevServer

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # run the cleanup below on SIGTERM too

    signal.signal(signal.SIGTERM, terminated)
    logs = Path(tempfile.mkdtemp(prefix="corral-scale-out-logs-"))
    keep_logs = False
    try:
        with TemporalDevServer() as server:
            try:
                process = getattr(server, "_process", None)  # for its CPU time
                trials = asyncio.run(bench(server.address, process and process.pid, logs, args))
            finally:
                kill_all()  # workers go before the server does
        log_summary = worker_log_summary(logs)
        if log_summary["lines"]:
            keep_logs = True
            log_summary["dir"] = str(logs)
        print(json.dumps(summary(trials, args, log_summary)))
    except BaseException:
        if any(path.stat().st_size for path in logs.glob("*.log")):
            keep_logs = True
            print(f"worker logs kept in {logs}", file=sys.stderr)
        raise
    finally:
        kill_all()
        if not keep_logs:
            shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the same teardown abort as in serve_worker, after all cleanup has run
