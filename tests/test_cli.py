"""The `corral` command as a user runs it: a process, its output, its exit code, the store after.

Every failure must print exactly one line, "error: ...", saying what happened and what to do,
exit non-zero, and leave the store as it was.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from corral import cli

WORKFLOWS = '''
import os

import pydantic

import corral


class Order(pydantic.BaseModel):
    item: str
    qty: int = pydantic.Field(ge=1)


@corral.step
async def shout(name: str) -> str:
    with open(os.environ["CORRAL_SIDE_EFFECTS"], "a") as log:
        log.write(f"shout {name}\\n")
    return name.upper()


@corral.workflow
async def greet(ctx: corral.Context, name: str) -> dict:
    return {"greeting": f"HELLO, {await shout(name)}"}


@corral.workflow
async def order(ctx: corral.Context, order: Order) -> int:
    return order.qty


@corral.workflow
async def approval(ctx: corral.Context, request: str) -> dict:
    decision = await ctx.wait_for("approval")
    return {"request": request, "decision": decision}


@corral.workflow
async def explode(ctx: corral.Context) -> None:
    raise ValueError("the ledger is empty")


def helper() -> None:
    pass
'''


@dataclass
class Seed:
    """A database holding one completed and one failed run, made once for the module."""

    folder: Path
    db: Path
    greeting: str  # what `corral run` printed for the completed run


class Cli:
    """`corral` on one database, run as a separate process."""

    def __init__(self, tmp_path: Path, seed: Seed) -> None:
        self.tmp = tmp_path
        self.folder = seed.folder
        self.db = tmp_path / "corral.db"
        for suffix in ("", "-wal"):
            if Path(f"{seed.db}{suffix}").exists():
                shutil.copy(f"{seed.db}{suffix}", f"{self.db}{suffix}")
        self.log = tmp_path / "side-effects.log"
        self.log.touch()
        self.env = {**os.environ, "CORRAL_SIDE_EFFECTS": str(self.log)}
        self.env.pop("CORRAL_DB", None)

    def wf(self, name: str, file: str = "workflows.py") -> str:
        return f"{self.folder / file}:{name}"

    def __call__(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [sys.executable, "-m", "corral", *args, "--db", str(self.db)],
                env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"`corral {' '.join(args)}` did not exit within {timeout:g}s; "
                f"stderr: {exc.stderr!r}"
            ) from None

    def ok(self, *args: str) -> str:
        done = self(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def read(self, *args: str) -> Any:
        """`corral runs ... --json`, in this process: a read that changes nothing."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["runs", *args, "--json", "--db", str(self.db)])
        assert code == 0
        return json.loads(out.getvalue())

    def run(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.read("show", run_id)
        return result

    def snapshot(self) -> list[dict[str, Any]]:
        """Every run with its steps: what must survive a failed command unchanged."""
        return [self.run(run["id"]) for run in self.read("ls")]

    def side_effects(self) -> list[str]:
        return self.log.read_text().splitlines()


def assert_error(done: subprocess.CompletedProcess[str], code: int | None,
                 *phrases: str) -> str:
    """One line on stderr, "error: ...", containing each phrase; nothing on stdout."""
    if code is None:
        assert done.returncode != 0, done
    else:
        assert done.returncode == code, done
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), lines[0]
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Seed:
    folder = tmp_path_factory.mktemp("cli")
    (folder / "workflows.py").write_text(WORKFLOWS)
    (folder / "broken.py").write_text(
        "import corral\n\n@corral.workflow\nasync def greet(ctx):\n    return (\n"
    )
    (folder / "needs_missing.py").write_text("import corral_no_such_module\n")
    env = {**os.environ, "CORRAL_SIDE_EFFECTS": str(folder / "seed.log")}
    env.pop("CORRAL_DB", None)
    db = folder / "corral.db"

    def corral(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "corral", *args, "--db", str(db)],
                              env=env, capture_output=True, text=True, timeout=30, check=False)

    first = corral("run", f"{folder}/workflows.py:greet", "--input", '"ann"', "--id", "first")
    assert first.returncode == 0, first.stderr
    boom = corral("run", f"{folder}/workflows.py:explode", "--id", "boom")
    assert boom.returncode == 1, boom.stderr
    return Seed(folder=folder, db=db, greeting=first.stdout)


@pytest.fixture
def corral(tmp_path: Path, seed: Seed) -> Cli:
    return Cli(tmp_path, seed)


@pytest.fixture
def unchanged(corral: Cli) -> Iterator[None]:
    """The test's commands fail; the store must be exactly as it was before them."""
    before = corral.snapshot()
    yield
    assert corral.snapshot() == before
    assert corral.side_effects() == []


# -- running workflows ------------------------------------------------------------------------


def test_run_prints_the_result_as_json(corral: Cli) -> None:
    done = corral("run", corral.wf("greet"), "--input", '"bob"', "--id", "bob")

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"greeting": "HELLO, BOB"}
    assert done.stderr == ""
    assert corral.side_effects() == ["shout bob"]
    assert corral.run("bob")["status"] == "completed"


def test_run_with_a_used_id_returns_the_first_result_without_executing_again(
    corral: Cli, seed: Seed
) -> None:
    before = corral.snapshot()

    out = corral.ok("run", corral.wf("greet"), "--input", '"ann"', "--id", "first")

    assert out == seed.greeting
    assert json.loads(out) == {"greeting": "HELLO, ANN"}
    assert corral.side_effects() == []
    assert corral.snapshot() == before


@pytest.mark.parametrize(
    ("workflow", "value", "phrase"),
    [
        ("greet", '"zoe"', "submitted before with another input"),
        ("order", '{"item": "tea", "qty": 1}', "taken by a run of workflow 'greet'"),
    ],
)
@pytest.mark.usefixtures("unchanged")
def test_run_refuses_a_used_id_for_another_submission(
    corral: Cli, workflow: str, value: str, phrase: str
) -> None:
    done = corral("run", corral.wf(workflow), "--input", value, "--id", "first")

    assert_error(done, None, "'first'", phrase, "choose another id")


def test_run_no_wait_prints_the_id_and_only_submits(corral: Cli) -> None:
    for name in ("cy", "di"):
        out = corral.ok("run", corral.wf("greet"), "--input", f'"{name}"', "--id", name,
                        "--no-wait")
        assert out == f"{name}\n"

    # Nothing executes them until a worker does.
    for name in ("cy", "di"):
        run = corral.run(name)
        assert (run["status"], run["attempts"], run["steps"]) == ("queued", 0, []), run
    assert corral.side_effects() == []

    corral.ok("worker", "--drain")
    assert corral.run("cy")["result"] == {"greeting": "HELLO, CY"}
    assert corral.run("di")["result"] == {"greeting": "HELLO, DI"}
    assert sorted(corral.side_effects()) == ["shout cy", "shout di"]


def test_run_reports_a_failing_workflow_and_records_it(corral: Cli) -> None:
    done = corral("run", corral.wf("explode"), "--id", "boom-2")

    assert_error(done, 1, "run 'boom-2' failed", "ValueError: the ledger is empty")
    run = corral.run("boom-2")
    assert run["status"] == "failed"
    assert (run["error"]["type"], run["error"]["message"]) == ("ValueError",
                                                              "the ledger is empty")
    shown = corral.ok("runs", "show", "boom-2")
    assert "status    failed" in shown
    assert "error     ValueError: the ledger is empty" in shown


# -- looking at runs ----------------------------------------------------------------------------


def test_runs_ls_lists_runs_newest_first(corral: Cli) -> None:
    table = corral.ok("runs", "ls").splitlines()

    assert table[0].split() == ["RUN", "WORKFLOW", "STATUS", "CREATED", "TOOK"]
    assert [row.split()[:3] for row in table[1:]] == [
        ["boom", "explode", "failed"],
        ["first", "greet", "completed"],
    ]

    runs = json.loads(corral.ok("runs", "ls", "--json"))
    assert [(r["id"], r["workflow"], r["status"]) for r in runs] == [
        ("boom", "explode", "failed"),
        ("first", "greet", "completed"),
    ]
    first = runs[1]
    assert (first["input"], first["result"], first["error"]) == (
        "ann", {"greeting": "HELLO, ANN"}, None)
    assert first["parent_id"] is None and first["attempts"] == 1

    failed = json.loads(corral.ok("runs", "ls", "--json", "--status", "failed"))
    assert [r["id"] for r in failed] == ["boom"]
    greets = json.loads(corral.ok("runs", "ls", "--json", "--workflow", "greet"))
    assert [r["id"] for r in greets] == ["first"]


def test_runs_show_prints_a_run_and_its_steps(corral: Cli) -> None:
    text = corral.ok("runs", "show", "first").splitlines()

    assert "run       first" in text
    assert "workflow  greet" in text
    assert "status    completed" in text
    assert 'result    {"greeting": "HELLO, ANN"}' in text
    step = next(line for line in text if line.startswith("0 "))
    assert step.split()[:4] == ["0", "step", "shout", "ok"]
    assert step.split()[-1] == "ANN"

    shown = json.loads(corral.ok("runs", "show", "first", "--json"))
    assert (shown["id"], shown["status"], shown["input"], shown["result"]) == (
        "first", "completed", "ann", {"greeting": "HELLO, ANN"})
    [entry] = shown["steps"]
    assert {k: entry[k] for k in ("key", "kind", "name", "status", "value", "attempts")} == {
        "key": "0", "kind": "step", "name": "shout", "status": "ok", "value": "ANN",
        "attempts": 1,
    }
    assert entry["duration_ms"] >= 0


# -- steering runs ------------------------------------------------------------------------------


def test_signal_sent_before_a_worker_runs_reaches_the_workflow(corral: Cli) -> None:
    assert corral.ok("run", corral.wf("approval"), "--input", '"deploy"', "--id", "ask",
                     "--no-wait") == "ask\n"

    out = corral.ok("runs", "signal", "ask", "approval", '{"approved": true, "by": "eve"}')
    assert "approval" in out and "ask" in out
    corral.ok("worker", "--drain")

    run = corral.run("ask")
    assert run["status"] == "completed"
    assert run["result"] == {"request": "deploy", "decision": {"approved": True, "by": "eve"}}


def test_signal_wakes_a_waiting_run(corral: Cli) -> None:
    corral.ok("run", corral.wf("approval"), "--input", '"deploy"', "--id", "ask", "--no-wait")
    corral.ok("worker", "--drain")
    assert corral.run("ask")["status"] == "waiting"

    corral.ok("runs", "signal", "ask", "approval", '"yes"')
    corral.ok("worker", "--drain")

    assert corral.run("ask")["result"] == {"request": "deploy", "decision": "yes"}


def test_cancel_stops_a_waiting_run(corral: Cli) -> None:
    corral.ok("run", corral.wf("approval"), "--input", '"deploy"', "--id", "ask", "--no-wait")
    corral.ok("worker", "--drain")
    assert corral.run("ask")["status"] == "waiting"

    out = corral.ok("runs", "cancel", "ask")
    assert "cancel requested for run ask" in out
    assert corral.run("ask")["cancel_requested"] is True
    corral.ok("worker", "--drain")

    run = corral.run("ask")
    assert (run["status"], run["result"]) == ("cancelled", None)
    done = corral("run", corral.wf("approval"), "--input", '"deploy"', "--id", "ask")
    assert_error(done, 1, "run 'ask' was cancelled")


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "phrases"),
    [
        ("missing.py:greet", ["workflow file", "missing.py does not exist", "check the path"]),
        ("workflows.py:nope", ["has no workflow 'nope'",
                               "it defines approval, explode, greet, order"]),
        ("workflows.py:helper", ["is not a workflow", "decorate it with @corral.workflow"]),
        ("broken.py:greet", ["broken.py failed to load: SyntaxError", "fix the file"]),
        ("needs_missing.py:greet", ["failed to load: ModuleNotFoundError",
                                    "corral_no_such_module", "fix the file"]),
    ],
    ids=["no-such-file", "no-such-workflow", "not-a-workflow", "syntax-error", "import-error"],
)
@pytest.mark.usefixtures("unchanged")
def test_run_reports_a_bad_workflow_reference(corral: Cli, ref: str, phrases: list[str]) -> None:
    file, _, name = ref.partition(":")
    done = corral("run", corral.wf(name, file), "--input", '"x"')

    assert_error(done, 2, *phrases)


@pytest.mark.parametrize(
    ("args", "phrases"),
    [
        (["greet", "--input", "ann"], ["input for workflow 'greet' is invalid", "JSON",
                                       "--input"]),
        (["order", "--input", '{"item": "tea", "qty": 0}'],
         ["input for workflow 'order' is invalid", "qty", "greater than or equal to 1",
          "--input"]),
        (["order", "--input", '{"item": "tea"}'], ["qty", "Field required", "--input"]),
        (["greet"], ["workflow 'greet'", "--input"]),
        (["explode", "--input", "1"], ["workflow 'explode' takes no input", "omit it"]),
        (["greet", "--input", '"x"', "--concurrency-key", "k"],
         ["--concurrency-key and --concurrency-limit go together"]),
        (["greet", "--input", '"x"', "--run-at", "tomorrow"],
         ["--run-at 'tomorrow' is not an ISO 8601 time"]),
    ],
    ids=["not-json", "out-of-range", "missing-field", "no-input", "unexpected-input",
         "half-a-limit", "bad-time"],
)
@pytest.mark.usefixtures("unchanged")
def test_run_reports_bad_input(corral: Cli, args: list[str], phrases: list[str]) -> None:
    done = corral("run", corral.wf(args[0]), *args[1:])

    assert_error(done, 2, *phrases)


@pytest.mark.parametrize(
    "args",
    [["show", "ghost"], ["show", "ghost", "--json"], ["cancel", "ghost"],
     ["signal", "ghost", "approval", "true"]],
    ids=["show", "show-json", "cancel", "signal"],
)
@pytest.mark.usefixtures("unchanged")
def test_runs_commands_report_an_unknown_run(corral: Cli, args: list[str]) -> None:
    done = corral("runs", *args)

    assert_error(done, None, "no run 'ghost'", "list runs with `corral runs ls`")


@pytest.mark.usefixtures("unchanged")
def test_signal_to_a_finished_run_is_refused(corral: Cli) -> None:
    done = corral("runs", "signal", "first", "approval", "true")

    assert_error(done, None, "run 'first' is completed", "takes no more signals")


@pytest.mark.usefixtures("unchanged")
def test_cancel_of_a_finished_run_is_refused(corral: Cli) -> None:
    done = corral("runs", "cancel", "boom")

    assert_error(done, None, "run 'boom' is already failed", "nothing to cancel")


@pytest.mark.parametrize(
    ("name", "value", "phrases"),
    [
        ("approval", "yes", ["the signal value is not valid JSON", "quote strings"]),
        ("approval", "{'approved': True}", ["the signal value is not valid JSON"]),
        ("$child:x", "true", ["signal names starting with '$' are corral's own"]),
    ],
    ids=["bare-word", "python-dict", "reserved-name"],
)
def test_signal_reports_a_bad_signal(corral: Cli, name: str, value: str,
                                     phrases: list[str]) -> None:
    corral.ok("run", corral.wf("approval"), "--input", '"deploy"', "--id", "ask", "--no-wait")
    before = corral.snapshot()

    done = corral("runs", "signal", "ask", name, value)

    assert_error(done, 2, *phrases)
    assert corral.snapshot() == before
    # No signal was stored: the run still waits for one after it ran.
    corral.ok("worker", "--drain")
    assert corral.run("ask")["status"] == "waiting"


# -- a damaged or busy database ---------------------------------------------------------------


CORRUPTED_COMMANDS = [
    ["runs", "ls"],
    ["runs", "show", "first"],
    ["runs", "cancel", "first"],
    ["runs", "signal", "first", "approval", "true"],
    ["worker", "--drain"],
    ["run", "<greet>", "--input", '"x"'],
    ["run", "<greet>", "--input", '"x"', "--no-wait"],
]
CORRUPTED_IDS = ["ls", "show", "cancel", "signal", "worker", "run", "run-no-wait"]


def _files(corral: Cli) -> list[str]:
    """The files beside the database, not counting the workers' lock folder."""
    return sorted(name for name in os.listdir(corral.tmp) if not name.endswith("-workers"))


def _corrupted(corral: Cli, args: list[str], damage: bytes, keep: int) -> None:
    data = corral.db.read_bytes()
    if damage:
        corral.db.write_bytes(data[:keep] + damage * ((len(data) - keep) // len(damage) + 1))
    damaged = corral.db.read_bytes()
    files = _files(corral)
    args = [corral.wf("greet") if arg == "<greet>" else arg for arg in args]

    done = corral(*args, timeout=10)

    assert_error(done, 1, f"database {corral.db} is corrupted", "restore it from a backup")
    assert corral.db.read_bytes() == damaged
    assert _files(corral) == files
    assert corral.side_effects() == []


@pytest.mark.parametrize("args", CORRUPTED_COMMANDS, ids=CORRUPTED_IDS)
def test_a_file_of_garbage_is_reported_and_left_alone(corral: Cli, args: list[str]) -> None:
    _corrupted(corral, args, b"\x8f\x13garbage\x00", keep=0)


@pytest.mark.parametrize("args", CORRUPTED_COMMANDS, ids=CORRUPTED_IDS)
def test_a_database_with_damaged_pages_is_reported_and_left_alone(
    corral: Cli, args: list[str]
) -> None:
    # The header and the schema (page 1) are intact; the tables after them are not.
    page = int.from_bytes(corral.db.read_bytes()[16:18], "big")
    _corrupted(corral, args, b"\xff", keep=page)


@pytest.mark.parametrize(
    "args",
    # (`worker --drain` is left out: with nothing due it never reads the damaged page.)
    [args for args in CORRUPTED_COMMANDS if args[0] != "worker"],
    ids=[name for name in CORRUPTED_IDS if name != "worker"],
)
def test_a_database_with_one_damaged_table_is_reported_and_left_alone(
    corral: Cli, args: list[str]
) -> None:
    # Only the first page of the runs table is garbage; the schema and the rest are intact.
    with contextlib.closing(sqlite3.connect(corral.db)) as db:
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'runs'").fetchone()
    page = int.from_bytes(corral.db.read_bytes()[16:18], "big")
    data = bytearray(corral.db.read_bytes())
    data[(root - 1) * page : root * page] = b"\xff" * page
    corral.db.write_bytes(bytes(data))
    _corrupted(corral, args, b"", keep=len(data))


def test_a_locked_database_still_answers_reads(corral: Cli) -> None:
    # A writer holds the lock (here for the whole command); reads do not wait for it.
    holder = sqlite3.connect(corral.db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE runs SET status = status")
        assert "first" in corral.ok("runs", "ls")
        shown = json.loads(corral.ok("runs", "show", "first", "--json"))
        assert shown["result"] == {"greeting": "HELLO, ANN"}
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.parametrize(
    "command",
    [
        ["runs", "signal", "first", "approval", "true"],
        ["runs", "cancel", "first"],
        ["run", "greet", "--input", '"bo"', "--id", "second"],
    ],
    ids=["signal", "cancel", "run"],
)
def test_a_write_to_a_locked_database_fails_after_the_lock_timeout(
    corral: Cli, command: list[str]
) -> None:
    if command[0] == "run":
        command = ["run", corral.wf(command[1]), *command[2:]]
    before = corral.snapshot()
    holder = sqlite3.connect(corral.db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        done = corral(*command, "--lock-timeout", "0.2")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_error(done, 1, "is locked by another process", "retry")
    assert corral.snapshot() == before


def test_reading_runs_never_creates_a_database(tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "corral.db"
    done = subprocess.run([sys.executable, "-m", "corral", "runs", "ls", "--db", str(missing)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and "no database at" in done.stderr
    assert not missing.parent.exists()


def test_sigterm_stops_a_worker_cleanly(tmp_path: Path) -> None:
    db = tmp_path / "corral.db"
    worker = subprocess.Popen([sys.executable, "-m", "corral", "worker", "--db", str(db)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    locks = Path(f"{db}-workers")
    deadline = time.monotonic() + 20
    while not (locks.exists() and any(locks.iterdir())):  # the worker is up
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.01)
    try:
        worker.terminate()
        assert worker.wait(timeout=20) == 143
    finally:
        worker.kill()
        worker.wait()
    assert not any(locks.iterdir())  # it let go of its lock: nothing for others to recover
