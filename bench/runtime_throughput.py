"""Durable steps per second: many concurrent runs of a 3-step workflow with trivial steps.

Fully durable: every commit is fsync'd (durability="full"); a step's caller continues only after
its result is committed. Prints one JSON line.

    python bench/runtime_throughput.py [--runs 30000] [--concurrency 500 1000 2000 4000]

Each concurrency level runs --repeat times; the median is reported, per level and for the best
level. Memory: peak RSS half-way and at the end of the run (flat means no growth per run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import corral


@corral.step
async def add(x: int, y: int) -> int:
    return x + y


@corral.workflow
async def three_steps(ctx: corral.Context, n: int) -> int:
    a = await add(n, 1)
    b = await add(a, 1)
    return await add(b, 1)


async def measure(runs: int, concurrency: int, durability: str) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    try:
        async with corral.Runtime(folder / "bench.db", max_runs=2 * concurrency,
                                  durability=durability) as rt:
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            next_run = iter(range(runs))
            rss_mid = 0

            async def client() -> None:
                nonlocal rss_mid
                for i in next_run:
                    assert await rt.run(three_steps, i) == i + 3
                    if i == runs // 2:
                        rss_mid = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finally:
        shutil.rmtree(folder)
    return {
        "steps_per_s": round(runs * 3 / elapsed),
        "runs_per_s": round(runs / elapsed),
        "seconds": round(elapsed, 2),
        "peak_rss_mb_at_half": round(rss_mid / 1024, 1),
        "peak_rss_mb_at_end": round(rss_after / 1024, 1),
        "rss_before_mb": round(rss_before / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--repeat", type=int, default=3)
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
    print(json.dumps({
        "bench": "runtime_throughput", "runs": args.runs, "durability": args.durability,
        "repeat": args.repeat, "best_concurrency": best,
        "steps_per_s_median_at_best": sweep[best]["steps_per_s"],
        "steps_per_s_median_by_concurrency": {c: r["steps_per_s"] for c, r in sweep.items()},
        "peak_rss_mb_at_half": sweep[best]["peak_rss_mb_at_half"],
        "peak_rss_mb_at_end": sweep[best]["peak_rss_mb_at_end"],
    }))


if __name__ == "__main__":
    main()
