"""Fixtures shared by the suite.

Every test that uses a runtime (`rt`, or `runtime` to make several) runs on both engines: the
embedded one and Temporal (a dev server the suite starts once, on a free port). Tests about the
embedded engine's own machinery (its store, its queue) are marked ``embedded_only``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import corral
from corral.testing import TemporalDevServer

ENGINES = ("embedded", "temporal")
PG = os.environ.get("CORRAL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("embedded_only")
        metafunc.parametrize("engine", ["embedded"] if only else list(ENGINES))


@pytest.fixture(scope="session")
def temporal_server() -> Iterator[TemporalDevServer]:
    with TemporalDevServer() as server:
        yield server


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "corral.db")


MakeRuntime = Callable[..., Any]


@pytest.fixture
def runtime(engine: str, db: str, request: pytest.FixtureRequest) -> MakeRuntime:
    """Make runtimes of the test's engine on one database (one Temporal task queue), tuned to
    react quickly; options override. Closing one and opening another is a worker restart."""
    if engine == "embedded":
        def make(**options: Any) -> Any:
            settings: dict[str, Any] = {
                "poll_interval": 0.01, "idle_after": 0.05, "durability": "process", **options,
            }
            return corral.Runtime(db, **settings)

        return make
    from corral.runtime._temporal import TemporalRuntime

    server: TemporalDevServer = request.getfixturevalue("temporal_server")
    queue = f"test-{uuid.uuid4().hex[:12]}"

    def make_temporal(**options: Any) -> Any:
        settings = {k: v for k, v in options.items() if k in ("worker", "max_runs")}
        return TemporalRuntime(server.address, task_queue=queue, heartbeat_timeout=5.0,
                               shutdown_grace=0.0, **settings)

    return make_temporal


@pytest.fixture
async def rt(runtime: MakeRuntime) -> AsyncIterator[Any]:
    """A runtime with a worker, on the test's engine."""
    async with runtime() as r:
        yield r


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Any]:
    import psycopg

    try:
        conn = psycopg.connect(f"{PG}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG} ({exc}); start it (see the machine "
                    "page) or point $CORRAL_TEST_POSTGRES at one")
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The machine's Redis (``$CORRAL_TEST_REDIS``); the suite fails, saying so, without it."""
    import redis

    url = os.environ.get("CORRAL_TEST_REDIS", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {url} ({exc}); start it (see the machine "
                    "page) or point $CORRAL_TEST_REDIS at one")
    finally:
        client.close()
    return url


@pytest.fixture
def pg_url(pg_admin: Any) -> Iterator[str]:
    """A fresh database for the test, dropped after."""
    name = f"corral_test_{uuid.uuid4().hex[:10]}"
    pg_admin.execute(f"CREATE DATABASE {name}")
    yield f"{PG}/{name}"
    pg_admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
