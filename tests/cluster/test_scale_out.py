"""A cluster on one machine: the Temporal dev server, PostgreSQL, Redis, worker processes.

The services are the real ones on 127.0.0.1; a missing one fails the test with what to start.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.common.v1 import Payload

import corral
from corral.config import Config, connect, load_config
from corral.runtime._offload import OffloadCodec, chunks
from corral.runtime._temporal import TemporalRuntime
from corral.stores._migrations import MIGRATIONS, upgrade
from corral.stores.blobs import BlobStore
from corral.testing import TemporalDevServer

HERE = Path(__file__).parent

sys.path.insert(0, str(HERE))
import workflows  # noqa: E402

# -- configuration and migrations ---------------------------------------------------------


def test_one_config_file_points_every_store_and_the_environment_overrides_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "corral.toml"
    path.write_text('engine = "temporal://temporal:7233?task_queue=agents"\n'
                    'database = "postgresql://corral@db/corral"\n'
                    'redis = "redis://redis:6379/0"\n'
                    '[gateway]\nport = 8000\n')
    config = load_config(str(path), env={})
    assert (config.engine, config.database, config.redis) == (
        "temporal://temporal:7233?task_queue=agents", "postgresql://corral@db/corral",
        "redis://redis:6379/0")
    assert config.temporal and config.sections == {"gateway": {"port": 8000}}
    env = {"CORRAL_DATABASE_URL": "postgresql://other@db/x"}
    assert load_config(str(path), env=env).database == "postgresql://other@db/x"
    runtime = connect(load_config(str(path), env={}), worker=False)
    assert isinstance(runtime, TemporalRuntime)
    assert (runtime.address, runtime.task_queue) == ("temporal:7233", "agents")
    assert isinstance(connect(Config(), worker=False), corral.Runtime)


@pytest.mark.parametrize(("text", "error"), [
    ('databse = "x"\n', "unknown key 'databse'"),
    ("engine = 5\n", "engine must be a string"),
    ("engine = \n", "not valid TOML"),
    ('engine = "nats://x"\n', "neither temporal://host:port nor a SQLite path"),
])
def test_a_bad_config_file_says_what_is_wrong(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "corral.toml"
    path.write_text(text)
    with pytest.raises(corral.UsageError, match=error):
        load_config(str(path), env={})


def test_db_upgrade_applies_each_migration_once_even_when_run_concurrently(
    pg_url: str, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "corral", "db", "upgrade"]
    env = {**os.environ, "CORRAL_DATABASE_URL": pg_url}
    procs = [subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    applied = sum(out.count("applied ") for out, _ in outputs)
    assert applied == len(MIGRATIONS)  # once in all, not once per process
    assert upgrade(pg_url) == []  # up to date
    BlobStore(pg_url).close()  # and the stores open on it


def test_a_store_on_a_database_without_its_migrations_says_to_run_db_upgrade(
    pg_url: str, tmp_path: Path
) -> None:
    for url in (pg_url, str(tmp_path / "shared.db")):
        with pytest.raises(corral.StoreError, match="run `corral db upgrade`"):
            BlobStore(url)


def test_db_upgrade_reports_an_unreachable_database_and_redis(tmp_path: Path) -> None:
    env = {**os.environ, "CORRAL_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    done = subprocess.run([sys.executable, "-m", "corral", "db", "upgrade"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "cannot connect to PostgreSQL" in done.stderr
    env = {**os.environ, "CORRAL_DATABASE_URL": str(tmp_path / "s.db"),
           "CORRAL_REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run([sys.executable, "-m", "corral", "db", "upgrade"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Redis at redis://127.0.0.1:1/0 does not answer" in done.stderr
    env["CORRAL_REDIS_URL"] = "redis://127.0.0.1:6379/0"
    done = subprocess.run([sys.executable, "-m", "corral", "db", "upgrade"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "redis redis://127.0.0.1:6379/0 answers" in done.stdout


# -- payload offload ----------------------------------------------------------------------


async def test_a_growing_conversation_is_stored_once_by_content_hash(pg_url: str) -> None:
    upgrade(pg_url)
    blobs = BlobStore(pg_url)
    codec = OffloadCodec(blobs)
    messages: list[str] = []
    sent = stored = 0
    for turn in range(200):
        messages.append(f'{{"role":"user","content":"turn {turn} ' + "x" * 200 + '"}')
        data = ("[" + ",".join(messages) + "]").encode()
        [encoded] = await codec.encode([Payload(metadata={"encoding": b"json/plain"},
                                                data=data)])
        sent += len(data)
        stored += len(encoded.data)
        [decoded] = await OffloadCodec(blobs).decode([encoded])  # a fresh cache: from the DB
        assert decoded.data == data
    conn = blobs._conn
    total = conn.execute("SELECT sum(length(data)) FROM corral_blobs").fetchone()[0]
    blobs.close()
    # each message is stored about once (plus the last chunk of each turn), not once a turn
    assert sent > 4_000_000 and total < sent / 10
    assert stored < sent / 30  # what goes into the history: hashes


def test_chunks_cut_where_the_content_says_and_put_back_together() -> None:
    data = b"[" + b",".join(b'{"n":%d,"text":"%s"}' % (i, b"y" * (i % 50)) for i in
                            range(3000)) + b"]"
    parts = chunks(data)
    assert b"".join(parts) == data and len(parts) > 10
    longer = data[:-1] + b',{"n":-1}]'
    assert chunks(longer)[:-2] == parts[:-2]  # appending changes only the end


# -- Temporal with PostgreSQL -------------------------------------------------------------


async def test_a_1000_turn_conversation_stays_small_in_history_and_continues_as_new(
    temporal_server: TemporalDevServer, pg_url: str
) -> None:
    upgrade(pg_url)
    queue = f"chat-{uuid.uuid4().hex[:8]}"
    async with TemporalRuntime(temporal_server.address, task_queue=queue, blobs=pg_url,
                               max_history_events=2500) as rt:
        handle = await rt.start(workflows.long_chat, 1000)
        result = await handle.result(timeout=600)
        assert (result["turns"], result["messages"]) == (1000, 2000)
        client = rt._client()
        runs = [e async for e in client.list_workflows(f"WorkflowId = '{handle.id}'")]
        history = 0
        for execution in runs:
            events = client.get_workflow_handle(handle.id, run_id=execution.run_id)
            async for event in events.fetch_history_events():
                history += event.ByteSize()
    # every model call carried the whole conversation: 189 MB of message text in all, over 3x
    # Temporal's 50 MB cap on a history; the histories hold hashes instead
    assert result["sent"] > 150_000_000, result["sent"]
    assert history < 10_000_000, history
    assert len(runs) >= 3  # continued as new along the way, and finished where it was


# -- a cluster: 3 workers, 1,000 agent runs, one killed -----------------------------------


def _worker(address: str, queue: str, env: dict[str, str], log: Path
            ) -> subprocess.Popen[bytes]:
    with open(log, "wb") as stderr:  # (the child keeps its own copy)
        return subprocess.Popen(
            [sys.executable, "-m", "corral", "worker", "--engine",
             f"temporal://{address}?task_queue={queue}"],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
        )


async def test_three_workers_finish_1000_agent_runs_when_one_is_killed(
    temporal_server: TemporalDevServer, pg_url: str, tmp_path: Path
) -> None:
    upgrade(pg_url)
    log = tmp_path / "steps.log"
    queue = f"cluster-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "CORRAL_DATABASE_URL": pg_url, "CORRAL_TEST_STEP_LOG": str(log),
           "PYTHONPATH": str(HERE)}
    workers = [_worker(temporal_server.address, queue, env, tmp_path / f"worker-{i}.log")
               for i in range(3)]
    try:
        async with TemporalRuntime(temporal_server.address, task_queue=queue, worker=False,
                                   blobs=pg_url) as client:
            handles = await asyncio.gather(*(client.start(workflows.agent_job, n)
                                             for n in range(1000)))
            while log.exists() is False or log.read_text().count("done ") < 600:
                await asyncio.sleep(0.05)  # about a third of the way
            victim = workers[0]
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            results = await asyncio.gather(*(h.result(timeout=300) for h in handles))
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
    # the survivors stopped cleanly on SIGTERM
    assert [w.returncode for w in workers[1:]] == [143, 143], [
        (tmp_path / f"worker-{i}.log").read_text()[-2000:] for i in (1, 2)]
    assert all("order" in r for r in results) and len(results) == 1000
    lines = [line.split() for line in log.read_text().splitlines()]
    done = Counter(key for kind, _, key in lines if kind == "done")
    assert len(done) == 2000  # two recorded steps per run, every one done
    # a step ran twice only if its first run was on the killed worker, in flight at the kill
    killed = str(victim.pid)
    on_victim = Counter(key for kind, pid, key in lines if kind == "done" and pid == killed)
    again = {key for key, n in done.items() if n > 1}
    assert all(done[key] == 2 and on_victim[key] == 1 for key in again), again
    assert len(again) < 50
    assert sum(on_victim.values()) > 0  # the killed worker had done its share


# -- the command line on Temporal ----------------------------------------------------------


def test_the_cli_runs_workers_and_runs_on_temporal_with_a_health_probe(
    temporal_server: TemporalDevServer, tmp_path: Path
) -> None:
    import httpx

    from corral.testing import _free_port

    port = _free_port()
    engine = f"temporal://{temporal_server.address}?task_queue=cli-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "CORRAL_ENGINE": engine, "PYTHONPATH": str(HERE)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "corral", "worker", "--health-port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                probe = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert worker.poll() is None and time.monotonic() < deadline, "no /health"
                time.sleep(0.1)
        assert (probe.status_code, probe.text) == (200, "ok\n")
        assert httpx.get(f"http://127.0.0.1:{port}/metricz", timeout=1).status_code == 404

        run = subprocess.run(
            [sys.executable, "-m", "corral", "run", f"{HERE / 'workflows.py'}:agent_job",
             "--input", "7", "--id", "cli-7", "--no-wait"],
            env=env, capture_output=True, text=True, timeout=60)
        assert (run.returncode, run.stdout.strip()) == (0, "cli-7"), run.stderr
        show = subprocess.run([sys.executable, "-m", "corral", "runs", "show", "cli-7", "--json"],
                              env=env, capture_output=True, text=True, timeout=60)
        assert show.returncode == 0, show.stderr
        assert json.loads(show.stdout)["trace"]["spans"][0]["name"] == \
            "invoke_workflow agent_job"
        again = subprocess.run(  # the same id: the first run's result, after it finishes
            [sys.executable, "-m", "corral", "run", f"{HERE / 'workflows.py'}:agent_job",
             "--input", "7", "--id", "cli-7"],
            env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "order" in again.stdout, again.stderr
        missing = subprocess.run([sys.executable, "-m", "corral", "runs", "show", "nope"],
                                 env=env, capture_output=True, text=True, timeout=60)
        assert missing.returncode == 2 and "no run 'nope'" in missing.stderr
        # the worker's /metrics: runs from Temporal's visibility, its own steps' latencies
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in text_string_to_metric_families(
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)}
        assert any(s.labels["status"] == "completed" and s.value >= 1
                   for s in families["corral_runs"].samples)
        assert any(s.name.endswith("_count") and s.value >= 1
                   for s in families["corral_step_duration_seconds"].samples)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 143, err


async def test_concurrent_decodes_with_a_small_cache_each_get_their_chunks(pg_url: str) -> None:
    upgrade(pg_url)
    blobs = BlobStore(pg_url)
    writer = OffloadCodec(blobs)
    payloads = []
    for n in range(20):
        data = ("[" + ",".join(f'{{"n":{n},"i":{i},"pad":"{"z" * 300}"}}'
                               for i in range(100)) + "]").encode()
        payloads.append((data, (await writer.encode([Payload(data=data)]))[0]))
    reader = OffloadCodec(blobs, cache_bytes=48 * 1024)
    first, ref = payloads[0]
    await reader.decode([ref])  # its chunks are cached now...
    # ...and each of these finds them there, then waits on the database for its own, while
    # the others' chunks arrive and push the first's out of the small cache
    decoded = await asyncio.gather(*(reader.decode([ref, other]) for _, other in payloads[1:]))
    blobs.close()
    assert [[p.data for p in d] for d in decoded] == [[first, data] for data, _ in payloads[1:]]


def test_the_blob_store_reconnects_after_the_database_drops_it(
    pg_url: str, pg_admin: Any
) -> None:
    upgrade(pg_url)
    blobs = BlobStore(pg_url)
    blobs.put({b"k" * 16: b"value"})
    pid = blobs._conn.info.backend_pid
    pg_admin.execute("SELECT pg_terminate_backend(%s)", (pid,))  # a restart, a failover
    assert blobs.get([b"k" * 16]) == {b"k" * 16: b"value"}
    blobs.close()


def test_a_sqlite_url_works_for_the_shared_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    assert [m.version for m in upgrade(url)] == [m.version for m in MIGRATIONS]
    blobs = BlobStore(url)
    blobs.put({b"h" * 16: b"data"})
    assert blobs.get([b"h" * 16, b"x" * 16]) == {b"h" * 16: b"data"}
    blobs.close()


async def test_search_attributes_it_cannot_register_stop_the_runtime_saying_how(
        temporal_server: TemporalDevServer) -> None:
    """corral lists runs by its search attributes: a namespace where it cannot register them
    (here: one that does not exist) stops the runtime at open, naming the commands to run."""
    from corral.runtime._temporal import TemporalRuntime

    runtime = TemporalRuntime(temporal_server.address, namespace="no-such-namespace")
    with pytest.raises(corral.StoreError) as raised:
        await runtime.open()
    message = str(raised.value)
    assert "no-such-namespace" in message
    assert ("temporal operator search-attribute create --namespace no-such-namespace "
            "--name CorralTenant --type Keyword") in message
