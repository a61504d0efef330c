"""Durable steps per second: many concurrent runs of a 3-step workflow with trivial steps.

Fully durable: every commit is fsync'd (durability="full"); a step's caller continues only after
its result is committed. Prints one JSON line.

    python bench/runtime_throughput.py [--runs 30000] [--concurrency 500 1000 2000 4000]

Each concurrency level runs --repeat times; the median is reported, per level and for the best
level. Then one long run (--long-runs) at the best level samples, at each quarter, the resident
memory and the number of Python objects the collector tracks: objects flat means nothing grows
per run; resident memory also holds SQLite's page cache, which fills up to its cap (64 MiB).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import corral


@corral.step
async def add(x: int, y: int) -> int:
    return x + y


@corral.workflow
async def three_steps(ctx: corral.Context, n: int) -> int:
    a = await add(n, 1)
    b = await add(a, 1)
    return await add(b, 1)


def rss_mb() -> float:
    """The resident memory of this process now (not its peak)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def live_objects() -> int:
    """Objects the collector tracks once garbage is gone (a full collection, ~0.1 s)."""
    gc.collect()
    return len(gc.get_objects())


async def measure(runs: int, concurrency: int, durability: str) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    samples: dict[str, float] = {}
    objects: dict[str, int] = {}
    try:
        async with corral.Runtime(folder / "bench.db", max_runs=2 * concurrency,
                                  durability=durability) as rt:
            next_run = iter(range(runs))
            marks = {runs * q // 4: f"{25 * q}%" for q in (1, 2, 3)}

            async def client() -> None:
                for i in next_run:
                    assert await rt.run(three_steps, i) == i + 3
                    if i in marks:
                        samples[marks[i]] = round(rss_mb(), 1)
                        objects[marks[i]] = live_objects()

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            samples["100%"] = round(rss_mb(), 1)
            objects["100%"] = live_objects()
    finally:
        shutil.rmtree(folder)
    return {
        "steps_per_s": round(runs * 3 / elapsed),
        "runs_per_s": round(runs / elapsed),
        "seconds": round(elapsed, 2),
        "rss_mb": samples,
        "python_objects": objects,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--long-runs", type=int, default=150000)
    parser.add_argument("--durability", default="full", choices=["full", "process"])
    args = parser.parse_args()
    sweep = {}
    for concurrency in args.concurrency:
        trials = [asyncio.run(measure(args.runs, concurrency, args.durability))
                  for _ in range(args.repeat)]
        trials.sort(key=lambda t: t["steps_per_s"])
        median = trials[len(trials) // 2]
        sweep[concurrency] = median
        print(json.dumps({"concurrency": concurrency, "trials": [t["steps_per_s"] for t in trials],
                          **median}), file=sys.stderr)
    best = max(sweep, key=lambda c: sweep[c]["steps_per_s"])
    # memory over one long run: resident size at each quarter should stay flat
    long = asyncio.run(measure(args.long_runs, best, args.durability))
    print(json.dumps({
        "bench": "runtime_throughput", "runs": args.runs, "durability": args.durability,
        "repeat": args.repeat, "best_concurrency": best,
        "steps_per_s_median_at_best": sweep[best]["steps_per_s"],
        "steps_per_s_median_by_concurrency": {c: r["steps_per_s"] for c, r in sweep.items()},
        "long_run": {"runs": args.long_runs, "steps_per_s": long["steps_per_s"],
                     "rss_mb": long["rss_mb"], "python_objects": long["python_objects"]},
    }))

if __name__ == "__main__":
    main()
