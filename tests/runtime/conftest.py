"""Fixtures for the runtime tests: runtimes on one database, and waiting for observable state.

A crash is simulated in-process by closing a `Runtime` while its runs are mid-flight (they go
back to the store) and opening a new one on the same database (it replays their journals).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

Check = Callable[[], Any]
WaitUntil = Callable[..., Awaitable[Any]]


async def _wait_until(check: Check, *, timeout: float = 3.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.005)


@pytest.fixture
def wait_until() -> WaitUntil:
    """Poll a condition (sync or async) until it is truthy; return its value, or fail."""
    return _wait_until
