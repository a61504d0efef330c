"""LangGraph's durable node executions per second, the peer of bench/runtime_throughput.py.

The same job: many concurrent runs of a 3-node graph whose nodes each add 1 to a counter in the
state, one thread_id per run, all checkpointed by one ``AsyncSqliteSaver`` (langgraph-checkpoint-
sqlite) on one SQLite file in a temp dir. A node execution counts as a step. Prints one JSON
line.

    python bench/peers/langgraph_throughput.py [--runs 1000] [--concurrency 10 100 1000]

Durability, made comparable:

- The saver opens its file with ``PRAGMA journal_mode=WAL`` and leaves ``synchronous`` at the
  build's default, which is FULL here (the script reads and reports it): in WAL mode that
  fsyncs the log on every commit, the same setting as corral's ``durability="full"``. So the
  default run compares like with like. ``--synchronous normal`` sets NORMAL on the saver's
  connection (no fsync per commit; survives a crash of the process, not of the machine), to
  compare with ``bench/runtime_throughput.py --durability process``.
- The graph runs with ``durability="sync"`` (``--graph-durability``): each step's checkpoint is
  committed before the next node starts, as in corral, where a step body starts only after the
  previous result is committed. LangGraph's default, ``"async"``, lets the next node run while
  the previous checkpoint is still being written.

LangGraph's saver writes through one connection under a lock and commits each write on its own
(a checkpoint per superstep plus each node's pending writes), so runs do not share commits;
corral group-commits the writes of all runs. Each concurrency level runs --repeat times; the
median is reported, per level and for the best level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any, TypedDict

try:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    from langgraph.graph import END, START, StateGraph
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"{exc.name} is missing: the peer benchmarks need the bench extra; "
        "run `pip install -e '.[bench]'` (or `make bench`)"
    ) from exc


class Counter(TypedDict):
    n: int


def add_one(state: Counter) -> dict[str, int]:
    return {"n": state["n"] + 1}


def build() -> StateGraph[Counter]:
    graph = StateGraph(Counter)
    graph.add_node("a", add_one)
    graph.add_node("b", add_one)
    graph.add_node("c", add_one)
    graph.add_edge(START, "a")
    graph.add_edge("a", "b")
    graph.add_edge("b", "c")
    graph.add_edge("c", END)
    return graph


async def measure(runs: int, concurrency: int, synchronous: str,
                  graph_durability: Any) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="langgraph-bench-"))
    try:
        async with AsyncSqliteSaver.from_conn_string(str(folder / "bench.db")) as saver:
            await saver.setup()
            if synchronous != "default":
                await saver.conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            async with saver.conn.execute("PRAGMA synchronous") as cursor:
                row = await cursor.fetchone()
            in_force = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[row[0]] if row else "?"
            app = build().compile(checkpointer=saver)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            next_run = iter(range(runs))
            rss_mid = 0

            async def client() -> None:
                nonlocal rss_mid
                for i in next_run:
                    config = {"configurable": {"thread_id": f"run-{i}"}}
                    out = await app.ainvoke({"n": i}, config, durability=graph_durability)
                    assert out["n"] == i + 3
                    if i == runs // 2:
                        rss_mid = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # every run left its checkpoints
        with closing(sqlite3.connect(folder / "bench.db")) as db, db:
            threads = db.execute("SELECT COUNT(DISTINCT thread_id) FROM checkpoints").fetchone()
        assert threads[0] == runs, threads
    finally:
        shutil.rmtree(folder)
    return {
        "steps_per_s": round(runs * 3 / elapsed),
        "runs_per_s": round(runs / elapsed),
        "seconds": round(elapsed, 2),
        "synchronous_in_force": in_force,
        "peak_rss_mb_at_half": round(rss_mid / 1024, 1),
        "peak_rss_mb_at_end": round(rss_after / 1024, 1),
        "rss_before_mb": round(rss_before / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--synchronous", default="default", choices=["default", "full", "normal"],
                        help="PRAGMA synchronous on the saver's connection (default: leave the "
                        "saver's own setting, FULL on this build)")
    parser.add_argument("--graph-durability", default="sync", choices=["sync", "async", "exit"])
    args = parser.parse_args()
    sweep = {}
    for concurrency in args.concurrency:
        trials = [asyncio.run(measure(args.runs, concurrency, args.synchronous,
                                      args.graph_durability))
                  for _ in range(args.repeat)]
        trials.sort(key=lambda t: t["steps_per_s"])
        median = trials[len(trials) // 2]
        sweep[concurrency] = median
        print(json.dumps({"concurrency": concurrency, "trials": [t["steps_per_s"] for t in trials],
                          **median}), file=sys.stderr)
    best = max(sweep, key=lambda c: sweep[c]["steps_per_s"])
    print(json.dumps({
        "bench": "langgraph_throughput", "runs": args.runs,
        "synchronous": sweep[best]["synchronous_in_force"],
        "graph_durability": args.graph_durability, "repeat": args.repeat,
        "best_concurrency": best,
        "steps_per_s_median_at_best": sweep[best]["steps_per_s"],
        "steps_per_s_median_by_concurrency": {c: r["steps_per_s"] for c, r in sweep.items()},
        "peak_rss_mb_at_half": sweep[best]["peak_rss_mb_at_half"],
        "peak_rss_mb_at_end": sweep[best]["peak_rss_mb_at_end"],
    }))


if __name__ == "__main__":
    main()
