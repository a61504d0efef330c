"""Fixtures: the upstream (in this process) and the gateway (a subprocess)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _servers import GatewayProcess, Upstream


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GatewayProcess]:
    process = GatewayProcess(upstream.url, tmp_path_factory.mktemp("gateway"))
    yield process
    process.stop()
