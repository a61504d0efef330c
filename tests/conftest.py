from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import corral


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "corral.db")


@pytest.fixture
async def rt(db: str) -> AsyncIterator[corral.Runtime]:
    """A runtime with a worker, tuned to react quickly in tests."""
    async with corral.Runtime(db, poll_interval=0.01, idle_after=0.05, durability="process") as r:
        yield r
