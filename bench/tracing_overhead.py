"""What tracing and metrics cost per durable step: runtime_throughput's workload (many concurrent
runs of a 3-step workflow with trivial steps, durability "full") four ways, side by side.

- A, baseline: the code before tracing and metrics (commit 3bce7e7, checked out in a git
  worktree, /tmp/corral-baseline-3bce7e7, made if missing);
- B, the current code with its defaults: spans derived from the journal when read (nothing more
  is written for trivial steps), the step latency histogram observed for every step, no
  exporter;
- C, the current code exporting every span over OTLP/HTTP the default way: the worker stores
  each run's span as it ends, and its span shipper (a process of its own) tails the store,
  builds the spans (3 steps and 1 run per run), encodes, gzips and POSTs them to a receiver in
  another process (it answers 200 and keeps the bodies; it decodes them only between trials,
  with opentelemetry-proto, to count the spans that arrived);
- D, the same export from the worker's own thread (``export = "thread"``): each committed
  batch's spans queued in memory, sent in batches of 512.

    python bench/tracing_overhead.py [--runs 30000] [--concurrency 1000] [--repeat 5]

Trials go round-robin (A, B, C, D, A, B, ...) so that machine noise hits every variant alike;
each is a fresh process on a fresh SQLite file, running the current code from a copy of src/
taken at the start (others may edit src/ meanwhile) or the baseline's. The timed section is
the runs alone; closing the runtime is timed apart (in C it waits for the shipper to send what
is committed: the backlog at the end), and every span is checked: received, once. Each trial
also takes the CPU time its process spent in the timed section (every thread: the event
loop's, SQLite's, the exporter's; the receiver's is not counted), per step, and for C the
shipper's CPU (its whole life, start-up included; the timed section starts once the shipper
holds its lock: the overhead measured is the steady state's, and the start-up is reported
apart, as shipper_start_s and within the shipper's CPU). Then, in one more process, a
microbenchmark of the pieces each step pays for. Each trial prints a line on stderr; the
result is one JSON line on stdout: median steps/s per variant, B, C and D against A as
overhead percent ((1 - ratio) * 100), from the medians and from each round's own pair (the
median of the per-round ratios), and as added CPU per step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
from pathlib import Path
from typing import Any

from _load import serve_sink

import corral

REPO = Path(__file__).resolve().parent.parent
BASELINE = "3bce7e7"
BASELINE_TREE = Path(f"/tmp/corral-baseline-{BASELINE}")
VARIANTS = {"A": "baseline 3bce7e7", "B": "current, defaults (no exporter)",
            "C": "current, OTLP export of every span by the span shipper (the default)",
            "D": "current, OTLP export of every span from the worker's thread"}
EXPORTING = ("C", "D")


@corral.step
async def add(x: int, y: int) -> int:
    return x + y


@corral.workflow
async def three_steps(ctx: corral.Context, n: int) -> int:
    a = await add(n, 1)
    b = await add(a, 1)
    return await add(b, 1)


# -- a trial (a child process) ------------------------------------------------------------------

def cpu_seconds() -> float:
    """CPU time of this process, every thread (the loop's, SQLite's, the exporter's)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def trial(variant: str, runs: int, concurrency: int, endpoint: str | None,
                folder: Path) -> dict[str, Any]:
    options: dict[str, Any] = {}
    exporter = None
    if variant in EXPORTING:
        from corral.observability._otlp import OTLPExporter
        from corral.observability._tracing import Tracing

        exporter = OTLPExporter(endpoint or "")
        options["tracing"] = Tracing(exporter=exporter,
                                     export="process" if variant == "C" else "thread")
    out: dict[str, Any] = {"variant": variant}
    rt = corral.Runtime(folder / "bench.db", max_runs=2 * concurrency, durability="full",
                        **options)
    await rt.open()
    try:
        if variant == "C":  # the timed section is the steady state: the shipper has started
            out["shipper_start_s"] = await shipper_started(folder / "bench.db", endpoint or "")
        if variant == "B":
            assert rt.tracing.exporter is None, "variant B found an exporter configured"
        next_run = iter(range(runs))

        async def client() -> None:
            for i in next_run:
                assert await rt.run(three_steps, i) == i + 3

        cpu, loop_cpu = cpu_seconds(), time.thread_time()
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu, loop_cpu = cpu_seconds() - cpu, time.thread_time() - loop_cpu
        out.update(steps_per_s=round(runs * 3 / elapsed), seconds=round(elapsed, 3),
                   cpu_us_per_step=round(cpu / (runs * 3) * 1e6, 2),
                   loop_cpu_us_per_step=round(loop_cpu / (runs * 3) * 1e6, 2))
        if variant == "D":  # (after the timed section)
            out["queued_at_end"] = len(exporter._queue)
            started = time.perf_counter()
            out["flushed"] = exporter.flush(120)
            out["flush_s"] = round(time.perf_counter() - started, 3)
    finally:
        started = time.perf_counter()
        await rt.close()  # (C: the shipper sends what is committed, then leaves)
        out["close_s"] = round(time.perf_counter() - started, 3)
    if variant == "C":  # the shipper's CPU, start to end (its imports included)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        out["shipper_cpu_us_per_step"] = round(
            (children.ru_utime + children.ru_stime) / (runs * 3) * 1e6, 2)
    if exporter is not None:
        exporter.flush(120)  # (whatever closing the runtime added)
        exporter.close()
        out.update(sent=exporter.sent, dropped=exporter.dropped, failed=exporter.failed)
    if variant != "A":
        from corral.observability._runs import STEPS

        list(STEPS.collect())  # (observations are counted when scraped)
        counts = STEPS.series.get(("add", "ok"), [0.0])
        out["histogram_observations"] = int(sum(counts[:-1]))
    return out


async def shipper_started(db: Path, endpoint: str, timeout: float = 30.0) -> float:
    """Wait until the worker's shipper holds its lock (it has imported what it needs and
    opened the store); how long that took."""
    import fcntl

    from corral.observability._shipper import _lock_path

    lock = _lock_path(str(db), endpoint)
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if lock.exists():
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)  # (free: not taken yet)
            except BlockingIOError:
                return round(time.perf_counter() - started, 3)
            finally:
                os.close(fd)
        await asyncio.sleep(0.01)
    raise SystemExit(f"the span shipper did not start within {timeout:g} s")


def run_trial(args: argparse.Namespace) -> None:
    if not Path(corral.__file__).resolve().is_relative_to(Path(args.expect_root).resolve()):
        sys.exit(f"variant {args.trial}: corral is {corral.__file__}, not under "
                 f"{args.expect_root}")
    folder = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    try:
        out = asyncio.run(trial(args.trial, args.runs, args.concurrency, args.endpoint, folder))
    finally:
        shutil.rmtree(folder)
    out["corral_file"] = corral.__file__
    print(json.dumps(out), flush=True)


# -- the OTLP receiver (a child process) ---------------------------------------------------------

def _count(bodies: list[tuple[str, bytes]]) -> dict[str, Any]:
    stats: dict[str, Any] = {"requests": len(bodies), "bytes": sum(len(b) for _, b in bodies)}
    try:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )
    except ImportError:
        stats["spans"] = None  # (opentelemetry-proto is not installed)
        return stats
    spans, ids, undecodable = 0, set(), 0
    for encoding, body in bodies:
        try:
            request = ExportTraceServiceRequest.FromString(
                gzip.decompress(body) if encoding == "gzip" else body)
        except Exception:
            undecodable += 1
            continue
        for resource_spans in request.resource_spans:
            for scope in resource_spans.scope_spans:
                spans += len(scope.spans)
                ids.update((s.trace_id, s.span_id) for s in scope.spans)
    stats.update(spans=spans, unique_spans=len(ids), undecodable=undecodable)
    return stats




# -- the pieces a step pays for (a child process, current code) ---------------------------------

def run_micro(args: argparse.Namespace) -> None:
    """Microseconds per call of what tracing and metrics added to a step, and what export adds
    per step: on the loop, the spans made from each journal row and finished run (as
    Runtime._export makes them); in the exporter's thread, their encoding and gzip."""
    import contextvars
    import random

    from corral.observability._otlp import OTLPExporter, encode_traces
    from corral.observability._runs import Timings
    from corral.observability._spans import run_span_id, trace_id_for
    from corral.observability._traces import journal_span, run_span
    from corral.observability._tracing import current_span

    steps = Timings("bench_seconds", "bench", "step")
    var: contextvars.ContextVar[Any] = contextvars.ContextVar("bench_step", default=None)
    now = time.time()
    run_id, key, sink = f"{int(now * 1000):012x}{random.getrandbits(80):020x}", "1", object()
    trace_id, parent = trace_id_for(run_id), run_span_id(run_id)

    def us(stmt: Any, number: int = 200_000) -> float:
        return round(min(timeit.repeat(stmt, number=number, repeat=9)) / number * 1e6, 3)

    pieces = {
        "steps_observe": us(lambda: steps.observe("add", "ok", 1.2e-05)),
        "current_span_get": us(current_span.get),
        "current_step_set_reset_2_tuple": us(lambda: var.reset(var.set(
            (run_id, "three_steps")))),
        "current_step_set_reset_4_tuple": us(lambda: var.reset(var.set(
            (run_id, "three_steps", key, sink)))),
        # as _export makes it: the run's trace id and span id hashed again for each row
        "journal_span_with_ids": us(lambda: journal_span(
            run_id, trace_id_for(run_id), run_span_id(run_id), key, "step", "add", "ok", "3",
            now, now + 1e-5, 1), 50_000),
        "journal_span_ids_given": us(lambda: journal_span(
            run_id, trace_id, parent, key, "step", "add", "ok", "3", now, now + 1e-5, 1),
            50_000),
        "run_span": us(lambda: run_span(run_id, trace_id_for(run_id), "three_steps", None, None,
                                        now, now, now + 1e-3, "completed", None), 50_000),
    }
    spans = []
    for i in range(128):  # a batch of 512: 128 runs' 3 steps and run, as the runtime makes them
        rid = f"{int(now * 1000) + i:012x}{random.getrandbits(80):020x}"
        tid, start = trace_id_for(rid), now + i * 1e-3 + random.random() * 1e-4
        spans += [journal_span(rid, tid, run_span_id(rid), str(k), "step", "add", "ok",
                               str(i + k), start + k * 2e-4, start + k * 2e-4 + 1.7e-5, 1)
                  for k in (1, 2, 3)]
        spans.append(run_span(rid, tid, "three_steps", None, None, start, start, start + 8e-4,
                              "completed", None))
    resource = {"service.name": "corral"}
    encode_traces(spans, resource)  # (warm up: the attribute caches)
    seconds = min(timeit.repeat(lambda: encode_traces(spans, resource), number=20, repeat=9))
    pieces["encode_per_span"] = round(seconds / 20 / len(spans) * 1e6, 3)
    body = encode_traces(spans, resource)
    sizes = {"raw": round(len(body) / len(spans), 1)}
    for level in (6, 1):  # (the exporter gzips at 6)
        seconds = min(timeit.repeat(lambda level=level: gzip.compress(body, compresslevel=level),
                                    number=20, repeat=9))
        pieces[f"gzip{level}_per_span"] = round(seconds / 20 / len(spans) * 1e6, 3)
        sizes[f"gzip{level}"] = round(len(gzip.compress(body, compresslevel=level))
                                      / len(spans), 1)
    exporter = OTLPExporter("http://127.0.0.1:9/v1/traces", interval=3600)
    try:  # (queueing only: nothing is sent)
        pieces["exporter_export_per_span"] = round(min(timeit.repeat(
            lambda: (exporter.export(spans), exporter._queue.clear()), number=200, repeat=9))
            / 200 / len(spans) * 1e6, 3)
    finally:
        exporter.close(0.1)
    per_step_b = (pieces["steps_observe"] + pieces["current_span_get"]
                  + pieces["current_step_set_reset_4_tuple"]
                  - pieces["current_step_set_reset_2_tuple"])
    spans_per_step = 4 / 3  # (3 steps and a run)
    print(json.dumps({
        "us_per_call": pieces,
        "bytes_per_span": sizes,
        "us_per_step": {
            "B_added_on_the_loop": round(per_step_b, 3),
            "C_added_on_the_loop": round(
                pieces["journal_span_with_ids"] + pieces["run_span"] / 3
                + pieces["exporter_export_per_span"] * spans_per_step, 3),
            "C_added_in_the_exporter_thread_encode_gzip6": round(
                (pieces["encode_per_span"] + pieces["gzip6_per_span"]) * spans_per_step, 3),
        },
    }), flush=True)


# -- the parent ----------------------------------------------------------------------------------

def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def baseline_tree() -> Path:
    want = git("rev-parse", f"{BASELINE}^{{commit}}")
    if not BASELINE_TREE.exists():
        git("worktree", "add", "--detach", str(BASELINE_TREE), BASELINE)
    have = git("rev-parse", "HEAD", cwd=BASELINE_TREE)
    if have != want:
        sys.exit(f"{BASELINE_TREE} is at {have}, not {want} ({BASELINE}); remove it "
                 "(git worktree remove) and run again")
    return BASELINE_TREE / "src"


def child_env(src: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(src)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # (nothing written into the trees)
    return env


def spawn(argv: list[str], src: Path, cwd: Path, timeout: float = 900) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, *argv], cwd=cwd, env=child_env(src),
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        sys.exit(f"child {argv} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def receiver_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=120) as response:
        return dict(json.loads(response.read()))


def overhead(ratio: float) -> float:
    return round((1 - ratio) * 100, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-micro", action="store_true", help="skip the microbenchmark")
    parser.add_argument("--trial", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--expect-root", help=argparse.SUPPRESS)
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--micro", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        return serve_sink(_count)
    if args.trial:
        return run_trial(args)
    if args.micro:
        return run_micro(args)

    work = Path(tempfile.mkdtemp(prefix="corral-tracing-bench-"))
    # the current code, as it is now: others may edit src/ while this runs
    current = work / "src"
    shutil.copytree(REPO / "src", current, ignore=shutil.ignore_patterns("__pycache__"))
    sources = {"A": baseline_tree(), "B": current, "C": current, "D": current}
    receiver = subprocess.Popen([sys.executable, __file__, "--receiver"], cwd=work,
                                env=child_env(current), stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        endpoint = f"http://127.0.0.1:{port}/v1/traces"
        trials: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for round_ in range(args.repeat):
            for variant in VARIANTS:
                argv = ["--trial", variant, "--runs", str(args.runs), "--concurrency",
                        str(args.concurrency), "--expect-root", str(sources[variant])]
                if variant in EXPORTING:
                    receiver_stats(port)  # (forget anything earlier)
                    argv += ["--endpoint", endpoint]
                load = round(os.getloadavg()[0], 2)
                out = spawn(argv, sources[variant], work)
                out["load_1min_before"] = load
                if variant in EXPORTING:
                    out["received"] = receiver_stats(port)
                out.pop("corral_file")
                out["round"] = round_
                trials[variant].append(out)
                print(json.dumps(out), file=sys.stderr, flush=True)
        micro = None if args.no_micro else spawn(["--micro"], current, work)
    finally:
        receiver.terminate()
        receiver.wait()
        shutil.rmtree(work)

    medians = {v: statistics.median(t["steps_per_s"] for t in ts) for v, ts in trials.items()}
    cpu = {v: statistics.median(t["cpu_us_per_step"] for t in ts) for v, ts in trials.items()}
    loop_cpu = {v: statistics.median(t["loop_cpu_us_per_step"] for t in ts)
                for v, ts in trials.items()}
    paired = {v: statistics.median(t["steps_per_s"] / a["steps_per_s"]
                                   for t, a in zip(trials[v], trials["A"], strict=True))
              for v in ("B", "C", "D")}
    expected_spans = args.runs * 4  # per run: 3 steps and the run
    exported = {v: [{"received": t["received"].get("spans"),
                     "unique_received": t["received"].get("unique_spans"),
                     "requests": t["received"]["requests"], "bytes": t["received"]["bytes"],
                     "close_s": t["close_s"],
                     **({"sent": t["sent"], "dropped": t["dropped"], "failed": t["failed"],
                         "queued_at_end": t["queued_at_end"], "flush_s": t["flush_s"]}
                        if v == "D" else {})}
                    for t in trials[v]] for v in EXPORTING}
    complete = all(e["unique_received"] == expected_spans
                   for v in EXPORTING for e in exported[v])
    shipper = statistics.median(t["shipper_cpu_us_per_step"] for t in trials["C"])
    dirty = git("status", "--porcelain", "--", "src")
    print(json.dumps({
        "bench": "tracing_overhead", "runs": args.runs, "concurrency": args.concurrency,
        "durability": "full", "repeat": args.repeat, "order": "round-robin A,B,C,D",
        "variants": VARIANTS,
        "steps_per_s_median": {v: round(m) for v, m in medians.items()},
        "overhead_pct_of_medians": {v: overhead(medians[v] / medians["A"])
                                    for v in ("B", "C", "D")},
        "overhead_pct_paired": {v: overhead(r) for v, r in paired.items()},
        "us_per_step_added": {v: round(1e6 / medians[v] - 1e6 / medians["A"], 2)
                              for v in ("B", "C", "D")},
        "trials_steps_per_s": {v: [t["steps_per_s"] for t in ts] for v, ts in trials.items()},
        # CPU per step, every thread of the trial's process (the receiver's not counted): less
        # sensitive than steps/s to other processes on the machine
        "cpu_us_per_step_median": cpu,
        "cpu_overhead_pct": {v: round((cpu[v] / cpu["A"] - 1) * 100, 2)
                             for v in ("B", "C", "D")},
        # the shipper's own process, for C (its start-up included): the CPU export costs,
        # spent on another core
        "shipper_cpu_us_per_step_median": shipper,
        "cpu_us_per_step_C_with_shipper": round(cpu["C"] + shipper, 2),
        "loop_thread_cpu_us_per_step_median": loop_cpu,
        "loop_thread_cpu_overhead_pct": {v: round((loop_cpu[v] / loop_cpu["A"] - 1) * 100, 2)
                                         for v in ("B", "C", "D")},
        "trials_cpu_us_per_step": {v: [t["cpu_us_per_step"] for t in ts]
                                   for v, ts in trials.items()},
        "load_1min_before_trials": {v: [t["load_1min_before"] for t in ts]
                                    for v, ts in trials.items()},
        "histogram_observations_B": [t["histogram_observations"] for t in trials["B"]],
        "spans_expected_per_trial": expected_spans,
        "spans_exported_per_trial": exported,
        "all_spans_exported": complete,
        "micro": micro,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "git_head": git("rev-parse", "HEAD"),
        "src_differs_from_head": dirty.splitlines() if dirty else [],
        "baseline": git("rev-parse", f"{BASELINE}^{{commit}}"),
    }))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
