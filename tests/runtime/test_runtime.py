"""The Runtime object itself: several on one event loop, opening and closing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import corral


@corral.step
async def double(x: int) -> int:
    return 2 * x


@corral.workflow
async def fan_out(ctx: corral.Context, n: int) -> list[int]:
    return list(await asyncio.gather(*(double(i) for i in range(n))))


async def test_closing_one_runtime_leaves_another_on_the_same_loop_working(
    tmp_path: Path,
) -> None:
    options = {"poll_interval": 0.01, "durability": "process"}
    first = corral.Runtime(tmp_path / "a.db", **options)
    async with corral.Runtime(tmp_path / "b.db", **options) as second:
        await first.open()
        await first.close()
        handle = await second.start(fan_out, 3)
        assert await handle.result(timeout=5) == [0, 2, 4]
        keys = sorted(entry.key for entry in second.store.journal(handle.id))
    # each branch of the gather kept its own deterministic scope
    assert keys == ["0/0", "1/0", "2/0"]
    assert asyncio.get_running_loop().get_task_factory() is None
