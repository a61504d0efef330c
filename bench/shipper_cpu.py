"""The span shipper's CPU per durable step: what `_shipper.Shipper` spends reading a store's
journal and run ends, building the spans, encoding, gzipping and POSTing them.

A store is filled once by `corral.Runtime` (--runs runs of a 3-step workflow, exporting the
default way, so the worker logs its run ends) and kept as a template (--template: kept, and
reused when it exists, so two versions of the code ship the very same rows). Then, --repeat
times (after one more, not counted, that warms up the exporter: its HTTP client, connection and
caches), a fresh copy of the template is shipped from its start by a `Shipper` in this process,
round after round until it has gone past every row, to a receiver in another process on
127.0.0.1 (it answers 200 and keeps the bodies; between repeats it decodes them with
opentelemetry-proto, counts the spans and hashes them, attributes sorted by key: the same
digest is the same spans). Timed: the shipping rounds alone, CPU (`time.process_time`, every
thread of this process; the receiver's not counted) and wall time.

    python bench/shipper_cpu.py [--runs 5000] [--repeat 7] [--template /tmp/shipper.db]

Each repeat prints a line on stderr; the result is one JSON line on stdout: the medians per
step (and per span), and each repeat's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _load import serve_sink
from runtime_throughput import three_steps

import corral
from corral.observability._otlp import OTLPExporter
from corral.observability._shipper import Shipper
from corral.observability._tracing import Tracing
from corral.stores.sqlite import SQLiteStore

STEPS_PER_RUN = 3


# -- the OTLP receiver (a child process) ---------------------------------------------------------

def _digest(bodies: list[tuple[str, bytes]]) -> dict[str, Any]:
    """Requests, bytes, spans, distinct span ids and a hash of the spans (each serialized
    deterministically with its attributes sorted by key; the spans sorted), and of the
    resources and scopes they came with."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    spans: list[bytes] = []
    ids: set[bytes] = set()
    heads: set[bytes] = set()
    for encoding, body in bodies:
        request = ExportTraceServiceRequest.FromString(
            gzip.decompress(body) if encoding == "gzip" else body)
        for resource_spans in request.resource_spans:
            heads.add(resource_spans.resource.SerializeToString(deterministic=True))
            for scope in resource_spans.scope_spans:
                heads.add(scope.scope.SerializeToString(deterministic=True))
                for span in scope.spans:
                    ids.add(span.span_id)
                    attributes = sorted(span.attributes, key=lambda a: a.key)
                    del span.attributes[:]
                    span.attributes.extend(attributes)
                    spans.append(span.SerializeToString(deterministic=True))
    digest = hashlib.sha256()
    for part in [*sorted(heads), b"--", *sorted(spans)]:
        digest.update(len(part).to_bytes(4, "big") + part)
    return {"requests": len(bodies), "bytes": sum(len(b) for _, b in bodies),
            "spans": len(spans), "unique_spans": len(ids), "sha256": digest.hexdigest()[:16]}




def receiver_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=120) as response:
        return dict(json.loads(response.read()))


# -- the store -----------------------------------------------------------------------------------

def fill(template: Path, runs: int, endpoint: str, fill_endpoint: str) -> None:
    """``runs`` runs into a new store, copied to ``template`` (one file, no WAL). The bench's
    endpoint gets its cursor first, at the empty store's start: it holds the run ends the
    worker logs (a store forgets those every endpoint has sent)."""
    folder = Path(tempfile.mkdtemp(prefix="corral-shipper-fill-"))
    try:
        db = folder / "fill.db"
        store = SQLiteStore(str(db))
        try:
            assert store.export_cursor(endpoint, time.time()) == (0, 0, 0)
        finally:
            store.close()

        async def work() -> None:
            tracing = Tracing(exporter=OTLPExporter(fill_endpoint), export="process")
            async with corral.Runtime(db, max_runs=2000, durability="process",
                                      tracing=tracing) as rt:
                todo = iter(range(runs))

                async def client() -> None:
                    for i in todo:
                        assert await rt.run(three_steps, i) == i + 3

                await asyncio.gather(*(client() for _ in range(500)))

        asyncio.run(work())
        source = sqlite3.connect(db)
        target = sqlite3.connect(template)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")
        finally:
            source.close()
            target.close()
    finally:
        shutil.rmtree(folder)


def rows(template: Path) -> dict[str, int]:
    db = sqlite3.connect(template)
    try:
        return {table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in ("runs", "journal", "spans", "run_ends")}
    finally:
        db.close()


# -- a repeat ------------------------------------------------------------------------------------

def ship_all(template: Path, exporter: OTLPExporter, steps: int) -> dict[str, Any]:
    """A fresh copy of the template, shipped from its start to its end."""
    folder = Path(tempfile.mkdtemp(prefix="corral-shipper-bench-"))
    try:
        db = folder / "ship.db"
        shutil.copyfile(template, db)
        store = SQLiteStore(str(db), durability="process")
        try:  # (the receiver's port, so the endpoint, changes from one bench to the next)
            store.export_cursor(exporter.endpoint, time.time())
            store.save_export_cursor(exporter.endpoint, (0, 0, 0), time.time())
            shipper = Shipper(store, exporter)
            assert shipper.cursor == (0, 0, 0), shipper.cursor
            rounds = went = 0
            sent = exporter.sent
            cpu, wall = time.process_time(), time.perf_counter()
            while shipped := shipper.ship():
                rounds += 1
                went += shipped
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if shipped is None:
                sys.exit("the receiver did not take a request")
        finally:
            store.close()
    finally:
        shutil.rmtree(folder)
    return {"cpu_us_per_step": round(cpu / steps * 1e6, 2),
            "wall_us_per_step": round(wall / steps * 1e6, 2),
            "cpu_s": round(cpu, 4), "wall_s": round(wall, 4), "rounds": rounds, "rows": went,
            "sent": exporter.sent - sent}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--template", type=Path,
                        help="the filled store: kept, and reused when it exists")
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        return serve_sink(_digest)

    receiver = subprocess.Popen([sys.executable, __file__, "--receiver"],
                                stdout=subprocess.PIPE, text=True)
    work = Path(tempfile.mkdtemp(prefix="corral-shipper-cpu-"))
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        endpoint = f"http://127.0.0.1:{port}/v1/traces"
        template = args.template or work / "template.db"
        if not template.exists():
            started = time.perf_counter()
            fill(template, args.runs, endpoint, f"http://127.0.0.1:{port}/fill/v1/traces")
            print(f"filled {template} in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr, flush=True)
        counts = rows(template)
        runs = counts["run_ends"]
        steps = runs * STEPS_PER_RUN
        # one exporter for every repeat, as a shipper has one for its life; a first repeat,
        # not counted, warms it up (its HTTP client, its connection, the encoder's caches)
        exporter = OTLPExporter(endpoint, attempts=1)
        trials = []
        try:
            for i in range(-1, args.repeat):
                receiver_stats(port)  # (forget what filling, or the warm-up, sent)
                load = round(os.getloadavg()[0], 2)
                out = ship_all(template, exporter, steps)
                out["received"] = receiver_stats(port)
                out["load_1min_before"] = load
                print(json.dumps({"repeat": i if i >= 0 else "warm-up", **out}),
                      file=sys.stderr, flush=True)
                if i >= 0:
                    trials.append(out)
        finally:
            exporter.close(1.0)
    finally:
        receiver.terminate()
        receiver.wait()
        shutil.rmtree(work)

    spans = trials[0]["received"]["spans"]
    cpu = statistics.median(t["cpu_us_per_step"] for t in trials)
    print(json.dumps({
        "bench": "shipper_cpu", "runs": runs, "steps": steps, "rows": counts,
        "repeat": args.repeat,
        "cpu_us_per_step_median": cpu,
        "wall_us_per_step_median": statistics.median(t["wall_us_per_step"] for t in trials),
        "cpu_us_per_span_median": round(cpu * steps / spans, 2) if spans else None,
        "trials_cpu_us_per_step": [t["cpu_us_per_step"] for t in trials],
        "trials_wall_us_per_step": [t["wall_us_per_step"] for t in trials],
        "spans_per_repeat": [t["received"]["spans"] for t in trials],
        "unique_spans_per_repeat": [t["received"]["unique_spans"] for t in trials],
        "requests_per_repeat": trials[0]["received"]["requests"],
        "bytes_per_repeat": trials[0]["received"]["bytes"],
        "spans_sha256": sorted({t["received"]["sha256"] for t in trials}),
        "load_1min_before": [t["load_1min_before"] for t in trials],
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "corral_file": corral.__file__,
    }))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
