"""10,000 concurrent runs of 5 steps, each step awaiting a simulated 1 s model call.

Ideal wall time is 5 s (the steps of one run are sequential; runs are concurrent). Reports the
ratio to ideal and the memory each suspended run costs. Prints one JSON line.

    python bench/runtime_concurrency.py [--runs 10000] [--steps 5] [--latency 1.0] [--repeat 3]

The median of --repeat trials is reported, with every trial's ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import corral

LATENCY = 1.0


@corral.step
async def model_call(turn: int) -> str:
    await asyncio.sleep(LATENCY)  # a model call in flight: the run is suspended on I/O
    return f"reply {turn}"


@corral.workflow
async def agent(ctx: corral.Context, steps: int) -> int:
    replies = [await model_call(turn) for turn in range(steps)]
    return len(replies)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def wall_time(runs: int, steps: int, tune_gc: bool = True) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    try:
        async with corral.Runtime(folder / "bench.db", max_runs=runs, tune_gc=tune_gc) as rt:
            started = time.perf_counter()
            handles = await asyncio.gather(*(rt.start(agent, steps) for _ in range(runs)))
            submitted = time.perf_counter() - started
            results = await asyncio.gather(*(h.result() for h in handles))
            elapsed = time.perf_counter() - started
            assert results == [steps] * runs
    finally:
        shutil.rmtree(folder)
    ideal = steps * LATENCY
    return {
        "wall_s": round(elapsed, 2),
        "ideal_s": ideal,
        "ratio_to_ideal": round(elapsed / ideal, 3),
        "submit_s": round(submitted, 2),
        "peak_rss_mb": round(rss_mb(), 1),
    }


async def memory_per_run(runs: int) -> float:
    """Python heap held per run while it is suspended in a step (tracemalloc, separate pass:
    tracing slows everything down, so it is not on while the wall time is measured)."""
    folder = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    try:
        async with corral.Runtime(folder / "bench.db", max_runs=runs) as rt:
            gc.collect()
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            handles = await asyncio.gather(*(rt.start(agent, 1) for _ in range(runs)))
            await asyncio.sleep(LATENCY / 2)  # every run is inside its model call now
            held = tracemalloc.get_traced_memory()[0] - base
            tracemalloc.stop()
            await asyncio.gather(*(h.result() for h in handles))
    finally:
        shutil.rmtree(folder)
    return held / runs / 1024


def main() -> None:
    global LATENCY
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--python-gc", action="store_true",
                        help="keep Python's default GC thresholds (Runtime(tune_gc=False))")
    args = parser.parse_args()
    LATENCY = args.latency
    trials = sorted(
        (asyncio.run(wall_time(args.runs, args.steps, not args.python_gc))
         for _ in range(args.repeat)),
        key=lambda t: t["wall_s"],
    )
    result = dict(trials[len(trials) // 2])  # the median trial
    result["ratios_to_ideal"] = [t["ratio_to_ideal"] for t in trials]
    result["kb_per_suspended_run"] = round(asyncio.run(memory_per_run(1000)), 2)
    print(json.dumps({"bench": "runtime_concurrency", "runs": args.runs, "steps": args.steps,
                      "latency_s": args.latency, "tune_gc": not args.python_gc, **result}))


if __name__ == "__main__":
    main()
