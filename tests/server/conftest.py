from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from _serve import Server, start_server, stop_server


@pytest.fixture(scope="module", params=["embedded", "temporal"])
def server(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`corral serve` on the embedded engine, or on Temporal (the suite's dev server, a task
    queue of its own) with a worker in the server."""
    extra: list[str] = []
    if request.param == "temporal":
        address = request.getfixturevalue("temporal_server").address
        extra = ["--engine", f"temporal://{address}?task_queue=serve-{uuid.uuid4().hex[:8]}"]
    running = start_server(tmp_path_factory.mktemp("serve"), *extra)
    running.engine = request.param
    yield running
    stop_server(running)
