"""Waiting on a run's journal, on either engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import corral


def journal_is(rt: Any, run_id: str, check: Callable[[list[Any]], bool]) -> Callable[[], Any]:
    """A condition for `wait_until` on a run's journal, on either engine."""

    async def condition() -> bool:
        try:
            return check(await rt.journal(run_id))
        except corral.RunNotFound:  # not started yet
            return False

    return condition
