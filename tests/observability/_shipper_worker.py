"""A worker exporting over OTLP, for test_shipper: runs ``count`` runs of ``twice``, prints
their ids and its shipper's pid, and waits to be killed.

    python _shipper_worker.py DB ENDPOINT COUNT
"""

from __future__ import annotations

import asyncio
import sys

import corral
from corral.observability._otlp import OTLPExporter
from corral.observability._tracing import Tracing


@corral.step
async def double(x: int) -> int:
    return 2 * x


@corral.workflow
async def twice(ctx: corral.Context, x: int) -> int:
    return await double(await double(x))


async def main(db: str, endpoint: str, count: int) -> None:
    tracing = Tracing(exporter=OTLPExporter(endpoint))
    async with corral.Runtime(db, durability="process", tracing=tracing) as rt:
        ids = [(await rt.start(twice, n)).id for n in range(count)]
        for run_id in ids:
            await rt.handle(run_id).result(timeout=30)
        assert rt._shipper is not None
        print(" ".join(ids), rt._shipper.process.pid, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
