"""Workflows `corral serve` offers in the API tests."""

from __future__ import annotations

import corral


@corral.step
async def prepare(request: dict) -> str:
    return f"deploy {request.get('service', '?')}"


@corral.workflow
async def deploy(ctx: corral.Context, request: dict) -> dict:
    """Waits for a person's approval."""
    what = await prepare(request)
    decision = await ctx.wait_for("approval")
    return {"what": what, "approved": bool((decision or {}).get("approved"))}


@corral.workflow
async def echo(ctx: corral.Context, value: object = None) -> object:
    return value
