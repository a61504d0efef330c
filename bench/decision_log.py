"""Decision records through the Merkle log: appends per second on SQLite and PostgreSQL, and the
time to verify 1,000,000 records. Target: at least 20,000 appends/s on 2 cores (Tessera, a
transparency log, reports about 2,900 writes/s on local disk).

An append is what a caller pays and what the log then does: build a `DecisionRecord` (about
500 bytes of canonical JSON), `append` it (queued), and the sequencer thread writes the queue in
batches of up to --batch, each one transaction with the leaf hashes, tree nodes and a signed
tree head. The clock stops when `flush()` returns: every record is committed.

The verify run fills a SQLite log with --verify-records records through the sequencer's
batch write directly (the queue is measured above), then times `DecisionLog.verify()`: every
leaf hash, node, signed head and the state recomputed, streaming the rows.

    python bench/decision_log.py [--appends 100000] [--batch 2000] [--verify-records 1000000]
                                 [--postgres URL | --no-postgres]

Prints a table on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from corral.governance._records import DecisionLog, DecisionRecord, generate_key_file
from corral.stores._migrations import upgrade

TARGET = 20_000


def make(i: int) -> DecisionRecord:
    return DecisionRecord(
        kind="model_call", tenant="acme", agent="support", agent_version="3.1.0",
        acting_for="user-1042", inputs={"question": f"where is order A-{i}?"},
        prompt="You are a support agent. Answer briefly.", prompt_version="support/v7",
        model="gpt-4o-mini", tools=[{"name": "lookup_order", "arguments": {"order": f"A-{i}"},
                                     "status": "ok"}],
        outputs={"answer": f"order A-{i} shipped yesterday", "finish": "stop"},
        decision="answered", rule="default", run_id="run_7f3a", span_id="b7ad6b7169203331",
        trace_id="0af7651916cd43dd8448eb211c80319c")


async def appends(url: str, key: Path, count: int, batch: int) -> dict[str, Any]:
    upgrade(url)
    async with DecisionLog(url, signing_key=key, batch=batch) as decisions:
        decisions.signing_key()
        for i in range(1000):  # (warm up: connection, key, first batch)
            decisions.append(make(i))
        await decisions.flush()
        heads_before = len(decisions.heads())
        started = time.perf_counter()
        for i in range(count):
            decisions.append(make(i))
        await decisions.flush()
        seconds = time.perf_counter() - started
        heads = len(decisions.heads()) - heads_before
        size = len(make(0).canonical())
    return {"appends": count, "seconds": round(seconds, 3),
            "appends_per_s": round(count / seconds), "batches": heads,
            "mean_batch": round(count / heads), "max_batch": batch, "record_bytes": size}


def fill(url: str, key: Path, count: int) -> float:
    """``count`` records through the sequencer's batch write (10,000 a transaction)."""
    upgrade(url)
    decisions = DecisionLog(url, signing_key=key)
    template = make(0)
    body = template.canonical()
    started = time.perf_counter()
    for start in range(0, count, 10_000):
        rows = []
        for i in range(start, min(count, start + 10_000)):
            record_id = f"dr_{i:028x}"
            rows.append((record_id, body.replace(template.id.encode(), record_id.encode())))
        decisions._write(rows)
    return time.perf_counter() - started


def verify(url: str, key: Path) -> dict[str, Any]:
    result = DecisionLog(url, signing_key=key).verify()
    if not result.ok:
        raise SystemExit(f"verify failed: {result.problem}")
    return {"records": result.records, "heads": result.heads,
            "seconds": round(result.seconds, 2),
            "records_per_s": round(result.records / result.seconds)}


def postgres(base: str) -> tuple[str, Any]:
    import psycopg

    admin = psycopg.connect(f"{base}/postgres", autocommit=True, connect_timeout=5)
    name = f"corral_bench_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE DATABASE {name}")
    return f"{base}/{name}", (admin, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--appends", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000, help="most records a transaction")
    parser.add_argument("--verify-records", type=int, default=1_000_000)
    parser.add_argument("--postgres", default=os.environ.get(
        "CORRAL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432"),
        help="a server to create a scratch database on")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    out: dict[str, Any] = {
        "bench": "decision_log", "target_appends_per_s": TARGET, "cpus": os.cpu_count(),
        "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
    }
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "signing.pem"
        generate_key_file(key)
        out["sqlite_appends"] = asyncio.run(appends(str(Path(tmp) / "appends.db"), key,
                                                    args.appends, args.batch))
        if not args.no_postgres:
            url, (admin, name) = postgres(args.postgres)
            try:
                out["postgres_appends"] = asyncio.run(appends(url, key, args.appends,
                                                              args.batch))
            finally:
                admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
                admin.close()
        if args.verify_records:
            db = Path(tmp) / "verify.db"
            filled = fill(str(db), key, args.verify_records)
            out["verify"] = {**verify(str(db), key), "fill_seconds": round(filled, 1),
                             "database_mb": round(db.stat().st_size / 2**20)}
    rows = [(name, out[f"{name}_appends"]) for name in ("sqlite", "postgres")
            if f"{name}_appends" in out]
    print(f"{'':22} {'APPENDS/S':>10} {'RECORDS':>9} {'SECONDS':>8} {'BATCHES':>8} "
          f"{'MEAN BATCH':>10}", file=sys.stderr)
    for name, r in rows:
        print(f"{name + ' appends':22} {r['appends_per_s']:>10,} {r['appends']:>9,} "
              f"{r['seconds']:>8.2f} {r['batches']:>8} {r['mean_batch']:>10}", file=sys.stderr)
    if "verify" in out:
        v = out["verify"]
        print(f"{'sqlite verify':22} {v['records_per_s']:>10,} {v['records']:>9,} "
              f"{v['seconds']:>8.2f} {v['heads']:>8}   (records/s; {v['database_mb']} MB)",
              file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
