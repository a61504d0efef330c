"""The corral demo: a durable checkout survives kill -9 and waits days for a human, on one
SQLite file. Run with `make demo`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DB = os.environ.get("CORRAL_DB", ".corral/corral.db")
LOG = Path(".corral/checkout-effects.log")
ORDER = {
    "id": "A-1001",
    "lines": [
        {"sku": "kettle", "cents": 3900},
        {"sku": "teapot", "cents": 2400},
        {"sku": "mugs", "cents": 1800},
        {"sku": "tea", "cents": 900},
    ],
}


def corral(*args: str, check: bool = True) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "corral", *args, "--db", DB],
        capture_output=True, text=True, env=_env(),
    )
    if check and done.returncode != 0:
        sys.exit(f"demo: `corral {' '.join(args)}` failed:\n{done.stderr}")
    return done.stdout


def _env() -> dict[str, str]:
    return {**os.environ, "CHECKOUT_LOG": str(LOG.resolve())}


def effects(run_id: str) -> list[str]:
    if not LOG.exists():
        return []
    return [line for line in LOG.read_text().splitlines() if run_id in line]


def waiting_on(run_id: str) -> dict[str, Any]:
    """The operation the run is waiting in."""
    show = json.loads(corral("runs", "show", run_id, "--json"))
    return next(step for step in show["steps"] if step["status"] == "pending")


def say(text: str) -> None:
    print(f"\n== {text}")


def main() -> None:
    Path(".corral").mkdir(exist_ok=True)
    run_id = f"checkout-{int(time.time())}"
    workflow = f"{HERE / 'checkout.py'}:checkout"

    say(f"start run {run_id} in a worker process, on {DB}")
    corral("run", workflow, "--input", json.dumps(ORDER), "--id", run_id, "--no-wait")
    worker = subprocess.Popen(
        [sys.executable, "-m", "corral", "worker", "--db", DB],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
    )
    deadline = time.time() + 30
    while sum(" charge " in f" {e} " for e in effects(run_id)) < 2:
        if time.time() > deadline:
            worker.kill()
            sys.exit("demo: the worker did not charge anything in 30 s")
        time.sleep(0.02)

    say("kill -9 the worker in the middle of charging")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    # finished = its result was committed to the journal before the kill; a step whose effect
    # happened but whose result was not is in flight, and runs again with the same key
    journal = json.loads(corral("runs", "show", run_id, "--json"))["steps"]
    finished = {f"{run_id}/{s['key']}" for s in journal
                if s["kind"] == "step" and s["status"] == "ok"}
    for line in effects(run_id):
        state = "finished" if line.split()[1] in finished else "in flight"
        print(f"   before the crash ({state}): {line}")

    say("`corral worker --drain` resumes the run: finished steps are not executed again")
    corral("worker", "--drain")
    while (pending := waiting_on(run_id))["kind"] == "sleep":
        fire_at = pending["value"]["fire_at"]
        print(f"   the run sleeps (a durable timer) for {max(0, fire_at - time.time()):.1f} s "
              "more; no process holds it; drain again when it is due")
        time.sleep(max(0.0, fire_at - time.time()))
        corral("worker", "--drain")
    print(f"   run {run_id} is waiting for the signal {pending['name']!r}")

    say("a manager approves: `corral runs signal RUN approval '{...}'`")
    corral("runs", "signal", run_id, "approval", json.dumps({"approved": True, "by": "maria"}))
    corral("worker", "--drain")

    say("`corral run` with the same --id returns the first run's result, runs nothing")
    result = json.loads(corral("run", workflow, "--input", json.dumps(ORDER), "--id", run_id))
    print("  ", json.dumps(result))

    say("side effects, each with the idempotency key the step passed to the outside world")
    after = effects(run_id)
    for line in after:
        print("  ", line)
    keys = [line.split()[1] for line in after]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    once = all(keys.count(key) == 1 for key in finished)
    print(f"   {len(after)} effects; every step that finished before the crash ran once: {once}")
    if not once:
        sys.exit("demo: a finished step ran again")
    if repeated:
        print(f"   in flight at the crash, so executed again (at-least-once): {repeated}")

    say(f"`corral runs show {run_id}`")
    print(corral("runs", "show", run_id))


if __name__ == "__main__":
    main()
