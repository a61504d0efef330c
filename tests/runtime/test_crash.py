"""Crash safety with real processes: a worker killed with SIGKILL at any instant loses nothing.

Each step appends "<run_id> <step> <idempotency_key> start" and "... done" to a side-effect log.
A worker is killed once its log reaches a given length; another worker then finishes the runs.
A step whose result reached the journal before the kill must never start again; a step whose
result did not is executed exactly once more, by the worker that finishes the run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from corral import cli

WORKFLOWS = '''
import asyncio
import os

import corral


async def _effect(step: str, run_id: str, value: int, key: str) -> int:
    with open(os.environ["CORRAL_SIDE_EFFECTS"], "a") as log:
        log.write(f"{run_id} {step} {key} start\\n")
    await asyncio.sleep(0.003 * (1 + value % 5))  # runs drift apart, kills land anywhere
    with open(os.environ["CORRAL_SIDE_EFFECTS"], "a") as log:
        log.write(f"{run_id} {step} {key} done\\n")
    await asyncio.sleep(0.005)  # done, not yet journaled: a kill now repeats the step
    return value * 2 + 1


@corral.step
async def advance(run_id: str, value: int, idempotency_key: str) -> int:
    return await _effect("advance", run_id, value, idempotency_key)


@corral.step
async def branch(run_id: str, value: int, idempotency_key: str) -> int:
    return await _effect("branch", run_id, value, idempotency_key)


@corral.step
async def settle(run_id: str, value: int, idempotency_key: str) -> int:
    return await _effect("settle", run_id, value, idempotency_key)


@corral.workflow
async def child(ctx: corral.Context, value: int) -> int:
    value = await settle(ctx.run_id, value)
    return await settle(ctx.run_id, value)


@corral.workflow
async def pipeline(ctx: corral.Context, value: int) -> dict:
    chain = []
    for _ in range(5):
        value = await advance(ctx.run_id, value)
        chain.append(value)
    fan = list(await asyncio.gather(*(branch(ctx.run_id, value + i) for i in range(3))))
    settled = await ctx.run_child(child, sum(fan))
    return {"chain": chain, "fan": fan, "child": settled}
'''

RUNS = {"run-1": 1, "run-2": 2, "run-3": 3}
STEPS_PER_RUN = 10  # 5 in a chain, 3 in parallel, 2 in the child run


def expected_result(value: int) -> dict[str, Any]:
    chain = []
    for _ in range(5):
        value = value * 2 + 1
        chain.append(value)
    fan = [(value + i) * 2 + 1 for i in range(3)]
    return {"chain": chain, "fan": fan, "child": (sum(fan) * 2 + 1) * 2 + 1}


@dataclass
class Line:
    run_id: str
    step: str
    key: str
    event: str


@dataclass
class Kill:
    """What was true the moment a worker died."""

    offset: int  # log lines written before the kill
    ok_keys: set[str]  # idempotency keys of steps journaled as ok
    runs: dict[str, str]  # run id -> status


class Cluster:
    """One SQLite file, its side-effect log, and the `corral` command run as real processes."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.db = str(tmp_path / "corral.db")
        self.log = tmp_path / "side-effects.log"
        self.log.touch()
        self.workflows = tmp_path / "pipeline.py"
        self.workflows.write_text(WORKFLOWS)
        self.env = {**os.environ, "CORRAL_SIDE_EFFECTS": str(self.log)}
        self.env.pop("CORRAL_DB", None)
        self.workers = 0

    def corral(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "corral", *args, "--db", self.db],
            env=self.env, capture_output=True, text=True, timeout=60, check=False,
        )

    def read(self, *args: str) -> Any:
        """A read-only `corral runs ... --json`, in this process: it only reads the file."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["runs", *args, "--json", "--db", self.db])
        assert code == 0, out.getvalue()
        return json.loads(out.getvalue())

    def submit(self) -> None:
        for run_id, value in RUNS.items():
            done = self.corral("run", f"{self.workflows}:pipeline", "--input", str(value),
                               "--id", run_id, "--no-wait")
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == run_id

    def lines(self) -> list[Line]:
        return [Line(*text.split(" ")) for text in self.log.read_text().splitlines()]

    def kill_worker(self, when: Callable[[list[Line]], bool], deadline: float = 30.0) -> Kill:
        """Start `corral worker`; SIGKILL it once ``when(its lines)``; return the state then."""
        self.workers += 1
        start = len(self.lines())
        stderr_path = self.tmp / f"worker-{self.workers}.stderr"
        with (
            open(stderr_path, "w") as stderr,
            subprocess.Popen(
                [sys.executable, "-m", "corral", "worker", "--db", self.db],
                env=self.env, stdout=subprocess.DEVNULL, stderr=stderr,
            ) as worker,
        ):
            limit = time.monotonic() + deadline
            while not when(self.lines()[start:]):
                assert worker.poll() is None, stderr_path.read_text()
                assert time.monotonic() < limit, "the worker made no progress"
                time.sleep(0.001)  # poll the log; the kill lands wherever the worker is
            os.kill(worker.pid, signal.SIGKILL)
            assert worker.wait() == -signal.SIGKILL
        return self.snapshot()

    def snapshot(self) -> Kill:
        offset = len(self.lines())
        ok_keys: set[str] = set()
        runs = {}
        for run in self.read("ls"):
            runs[run["id"]] = run["status"]
            for step in self.read("show", run["id"])["steps"]:
                if step["kind"] == "step" and step["status"] == "ok":
                    ok_keys.add(f"{run['id']}/{step['key']}")
        return Kill(offset=offset, ok_keys=ok_keys, runs=runs)

    def drain(self) -> None:
        done = self.corral("worker", "--drain")
        assert done.returncode == 0, done.stderr

    def check(self, kills: list[Kill]) -> None:
        """Every run completed correctly, and no journaled step ever ran again."""
        runs = {run["id"]: run for run in self.read("ls")}
        assert {run_id for run_id, run in runs.items() if run["parent_id"] is None} == set(RUNS)
        assert len(runs) == 2 * len(RUNS), sorted(runs)  # each run started one child
        journaled: dict[str, str] = {}  # idempotency key -> step name
        for run_id, run in runs.items():
            assert run["status"] == "completed", run
            if run["parent_id"] is None:
                assert run["result"] == expected_result(RUNS[run_id])
            steps = self.read("show", run_id)["steps"]
            for step in steps:
                assert step["status"] == "ok", step
                if step["kind"] == "step":
                    journaled[f"{run_id}/{step['key']}"] = step["name"]
        assert len(journaled) == STEPS_PER_RUN * len(RUNS)

        lines = self.lines()
        # Replay found every step under the key it first ran with: no stray keys in the log.
        assert {line.key for line in lines} == set(journaled)
        for line in lines:
            assert journaled[line.key] == line.step, line
            assert line.key.startswith(line.run_id + "/"), line
        done = {line.key for line in lines if line.event == "done"}
        assert done == set(journaled), set(journaled) - done

        for kill in kills:
            before, after = lines[: kill.offset], lines[kill.offset :]
            done_before = {line.key for line in before if line.event == "done"}
            # The journal never runs ahead of the side effect it records.
            assert kill.ok_keys <= done_before, kill.ok_keys - done_before
            restarted = {line.key for line in after if line.event == "start"} & kill.ok_keys
            assert not restarted, f"journaled steps executed again after the kill: {restarted}"

        # The last worker was not killed: each step it found unjournaled ran exactly once.
        last = kills[-1]
        after = lines[last.offset :]
        for key in set(journaled) - last.ok_keys:
            events = [line.event for line in after if line.key == key]
            assert events == ["start", "done"], (key, events)


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    return Cluster(tmp_path)


@pytest.mark.parametrize("kill_at", [1, 7, 13, 20, 27, 34, 41, 48, 54, 58])
def test_a_worker_killed_at_any_point_loses_nothing_and_repeats_no_journaled_step(
    cluster: Cluster, kill_at: int
) -> None:
    cluster.submit()

    kill = cluster.kill_worker(lambda lines: len(lines) >= kill_at)

    assert any(kill.runs.get(run_id) != "completed" for run_id in RUNS), kill.runs
    cluster.drain()
    cluster.check([kill])


def test_runs_survive_a_worker_killed_again_and_again(cluster: Cluster) -> None:
    cluster.submit()
    kills: list[Kill] = []
    all_keys = STEPS_PER_RUN * len(RUNS)

    def done_keys() -> int:
        return len({line.key for line in cluster.lines() if line.event == "done"})

    def progressed(lines: list[Line]) -> bool:
        return sum(line.event == "done" for line in lines) >= 4 or done_keys() == all_keys

    while done_keys() < all_keys and len(kills) < 12:
        kills.append(cluster.kill_worker(progressed))

    assert len(kills) >= 3
    cluster.drain()
    cluster.check(kills)
