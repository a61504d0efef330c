"""What a long conversation costs LangGraph's SQLite checkpointer: the peer of
bench/journal_growth.py.

One thread_id, one graph of one node; each turn is one ``ainvoke`` whose node reads the whole
conversation from the state and adds the next 1 KB message (the same text as corral's bench).
The ``messages`` channel in three variants:

- ``add``: ``Annotated[list[str], operator.add]``, the node returns only the new message (the
  documented way; corral's ``next``);
- ``whole``: a plain list channel, the node returns the whole conversation with the new message
  appended (corral's ``whole``);
- ``delta``: ``Annotated[list[str], DeltaChannel(...)]``, LangGraph's beta channel that keeps
  only the writes in most checkpoints and a full snapshot every 100 updates (its default).

Reported after each --turns mark of the same thread, on an ``AsyncSqliteSaver`` file as the
saver sets it up (WAL; synchronous FULL on this build):

- ``payload_bytes``: SUM(LENGTH(checkpoint)) + SUM(LENGTH(metadata)) over ``checkpoints`` plus
  SUM(LENGTH(value)) over ``writes`` (msgpack, as the saver's serializer writes them), without
  SQLite's page and index overhead;
- ``file_bytes``: the size of the SQLite file after ``PRAGMA wal_checkpoint(TRUNCATE)``.

Each turn saves three checkpoints, each with every channel's value unless it is a delta channel
(the input's, the step that schedules the node, the node's result) plus the node's writes;
``--graph-durability exit`` would save only the last. Prints one JSON line.

    python bench/peers/langgraph_journal_growth.py [--turns 100 500]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import operator
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypedDict

try:
    from langgraph.channels import DeltaChannel
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    from langgraph.graph import END, START, StateGraph
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"{exc.name} is missing: the peer benchmarks need the bench extra; "
        "run `pip install -e '.[bench]'` (or `make bench`)"
    ) from exc

MESSAGE_BYTES = 1024


def message(turn: int) -> str:
    """A distinct, incompressible-looking message of MESSAGE_BYTES ASCII characters."""
    digest = hashlib.sha256(str(turn).encode()).hexdigest()
    return (f"turn {turn} " + digest * (MESSAGE_BYTES // 64 + 1))[:MESSAGE_BYTES]


def concat(state: list[str], writes: Sequence[list[str]]) -> list[str]:
    return [*state, *(m for write in writes for m in write)]


class AddState(TypedDict):
    turn: int
    messages: Annotated[list[str], operator.add]


class WholeState(TypedDict):
    turn: int
    messages: list[str]


class DeltaState(TypedDict):
    turn: int
    messages: Annotated[list[str], DeltaChannel(concat)]


def append_next(state: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [message(len(state.get("messages", [])))]}


def append_whole(state: dict[str, Any]) -> dict[str, Any]:
    conversation = state.get("messages", [])
    return {"messages": [*conversation, message(len(conversation))]}


VARIANTS: dict[str, tuple[Any, Any]] = {
    "add": (AddState, append_next),
    "whole": (WholeState, append_whole),
    "delta": (DeltaState, append_next),
}


def build(variant: str) -> StateGraph[Any]:
    state, node = VARIANTS[variant]
    graph = StateGraph(state)
    graph.add_node("reply", node)
    graph.add_edge(START, "reply")
    graph.add_edge("reply", END)
    return graph


async def one(saver: AsyncSqliteSaver, sql: str) -> Any:
    async with saver.conn.execute(sql) as cursor:
        row = await cursor.fetchone()
    return row[0] if row else None


async def store_bytes(saver: AsyncSqliteSaver, path: Path) -> dict[str, int]:
    checkpoint = await one(saver, "SELECT COALESCE(SUM(LENGTH(checkpoint)), 0) FROM checkpoints")
    metadata = await one(saver, "SELECT COALESCE(SUM(LENGTH(metadata)), 0) FROM checkpoints")
    writes = await one(saver, "SELECT COALESCE(SUM(LENGTH(value)), 0) FROM writes")
    checkpoints = await one(saver, "SELECT COUNT(*) FROM checkpoints")
    busy = await one(saver, "PRAGMA wal_checkpoint(TRUNCATE)")
    assert busy == 0, "the WAL could not be checkpointed"
    wal = path.with_name(path.name + "-wal")
    return {
        "payload_bytes": checkpoint + metadata + writes,
        "checkpoint_bytes": checkpoint,
        "metadata_bytes": metadata,
        "writes_value_bytes": writes,
        "checkpoints": checkpoints,
        "file_bytes": path.stat().st_size,
        "wal_bytes": wal.stat().st_size if wal.exists() else 0,
    }


async def measure(variant: str, marks: list[int], graph_durability: Any) -> list[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(prefix="langgraph-bench-"))
    path = folder / "bench.db"
    results = []
    try:
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            app = build(variant).compile(checkpointer=saver)
            config = {"configurable": {"thread_id": "conversation"}}
            started = time.perf_counter()
            for turn in range(max(marks)):
                out = await app.ainvoke({"turn": turn}, config, durability=graph_durability)
                assert len(out["messages"]) == turn + 1
                if turn + 1 in marks:
                    elapsed = time.perf_counter() - started
                    results.append({"turns": turn + 1,
                                    "conversation_bytes": (turn + 1) * MESSAGE_BYTES,
                                    **await store_bytes(saver, path),
                                    "seconds": round(elapsed, 2)})
    finally:
        shutil.rmtree(folder)
    return results


def main() -> None:
    global MESSAGE_BYTES
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--message-bytes", type=int, default=1024)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--graph-durability", default="sync", choices=["sync", "async", "exit"])
    args = parser.parse_args()
    MESSAGE_BYTES = args.message_bytes
    report: dict[str, dict[int, dict[str, Any]]] = {}
    for variant in args.variants:
        for result in asyncio.run(measure(variant, sorted(args.turns), args.graph_durability)):
            print(json.dumps({"variant": variant, **result}), file=sys.stderr)
            report.setdefault(variant, {})[result["turns"]] = result
    print(json.dumps({
        "bench": "langgraph_journal_growth", "message_bytes": MESSAGE_BYTES,
        "graph_durability": args.graph_durability,
        "conversation_bytes": {t: t * MESSAGE_BYTES for t in sorted(args.turns)},
        "payload_bytes": {v: {t: r["payload_bytes"] for t, r in by.items()}
                          for v, by in report.items()},
        "file_bytes_after_checkpoint": {v: {t: r["file_bytes"] for t, r in by.items()}
                                        for v, by in report.items()},
        "seconds": {v: {t: r["seconds"] for t, r in by.items()} for v, by in report.items()},
    }))


if __name__ == "__main__":
    main()
