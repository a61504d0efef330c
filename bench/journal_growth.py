"""What a long conversation costs the store: N turns of 1 KB messages in one run.

Two workflows, one step per turn, each step given the whole conversation so far:

- ``next``: the step returns only the next message (1 KB), the workflow appends it;
- ``whole``: the step returns the whole conversation with the next message appended (the
  naive agent loop: state in, state out).

For each variant and each --turns mark, a fresh store runs one run of that many turns; the
report gives, after the run completes:

- ``payload_bytes``: SUM(LENGTH(value)) over the run's ``journal`` rows plus SUM(LENGTH(data))
  over ``blobs`` (values of 2 KB or more are split there, each message stored once by content
  hash), i.e. the bytes of recorded step results, without SQLite's page and index overhead;
- ``file_bytes``: the size of the SQLite file after ``PRAGMA wal_checkpoint(TRUNCATE)`` (the
  WAL is then empty), i.e. everything, runs table and free pages included.

The message text is ``conversation_bytes`` per mark for scale (turns x 1024). Peer:
bench/peers/langgraph_journal_growth.py. Prints one JSON line.

    python bench/journal_growth.py [--turns 100 500] [--message-bytes 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import corral

MESSAGE_BYTES = 1024


def message(turn: int) -> str:
    """A distinct, incompressible-looking message of MESSAGE_BYTES ASCII characters."""
    digest = hashlib.sha256(str(turn).encode()).hexdigest()
    return (f"turn {turn} " + digest * (MESSAGE_BYTES // 64 + 1))[:MESSAGE_BYTES]


@corral.step
async def next_message(conversation: list[str]) -> str:
    return message(len(conversation))


@corral.step
async def extended(conversation: list[str]) -> list[str]:
    return [*conversation, message(len(conversation))]


@corral.workflow
async def chat_next(ctx: corral.Context, turns: int) -> int:
    conversation: list[str] = []
    for _ in range(turns):
        conversation.append(await next_message(conversation))
    return len(conversation)


@corral.workflow
async def chat_whole(ctx: corral.Context, turns: int) -> int:
    conversation: list[str] = []
    for _ in range(turns):
        conversation = await extended(conversation)
    return len(conversation)


VARIANTS: dict[str, corral.Workflow[Any, Any]] = {"next": chat_next, "whole": chat_whole}


def store_bytes(path: Path) -> dict[str, int]:
    with closing(sqlite3.connect(path)) as db, db:
        journal = db.execute("SELECT COALESCE(SUM(LENGTH(value)), 0) FROM journal").fetchone()[0]
        blobs = db.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM blobs").fetchone()[0]
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0, "the WAL could not be checkpointed"
    wal = path.with_name(path.name + "-wal")
    return {
        "payload_bytes": journal + blobs,
        "journal_value_bytes": journal,
        "blobs_data_bytes": blobs,
        "file_bytes": path.stat().st_size,
        "wal_bytes": wal.stat().st_size if wal.exists() else 0,
    }


async def measure(variant: str, turns: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    try:
        path = folder / "bench.db"
        started = time.perf_counter()
        async with corral.Runtime(path) as rt:
            assert await rt.run(VARIANTS[variant], turns) == turns
        elapsed = time.perf_counter() - started
        return {"turns": turns, "conversation_bytes": turns * MESSAGE_BYTES, **store_bytes(path),
                "seconds": round(elapsed, 2)}
    finally:
        shutil.rmtree(folder)


def main() -> None:
    global MESSAGE_BYTES
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--message-bytes", type=int, default=1024)
    args = parser.parse_args()
    MESSAGE_BYTES = args.message_bytes
    report: dict[str, dict[int, dict[str, Any]]] = {}
    for variant in VARIANTS:
        for turns in args.turns:
            result = asyncio.run(measure(variant, turns))
            print(json.dumps({"variant": variant, **result}), file=sys.stderr)
            report.setdefault(variant, {})[turns] = result
    print(json.dumps({
        "bench": "journal_growth", "message_bytes": MESSAGE_BYTES, "durability": "full",
        "conversation_bytes": {t: t * MESSAGE_BYTES for t in sorted(args.turns)},
        "payload_bytes": {v: {t: r["payload_bytes"] for t, r in by.items()}
                          for v, by in report.items()},
        "file_bytes_after_checkpoint": {v: {t: r["file_bytes"] for t, r in by.items()}
                                        for v, by in report.items()},
        "seconds": {v: {t: r["seconds"] for t, r in by.items()} for v, by in report.items()},
    }))


if __name__ == "__main__":
    main()
