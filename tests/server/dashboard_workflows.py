"""Workflows `corral serve` offers in the dashboard's browser test."""

from __future__ import annotations

import corral


@corral.tool
async def lookup_service(service: str) -> dict:
    """Find who owns a service.

    Args:
        service: the service's name
    """
    return {"service": service, "owner": "platform", "tier": 1}


# on the simulator: no network, no keys; its model and tool calls show in the trace
triage = corral.Agent(
    "triage", model="simulator:default", tools=[lookup_service],
    instructions="You triage deploy requests. Look up the service first.",
)


@corral.step
async def prepare(request: dict) -> str:
    return f"deploy {request.get('service', '?')}"


@corral.workflow
async def approval(ctx: corral.Context, request: dict) -> dict:
    """Prepares, lets an agent triage, then waits for a person's approval."""
    what = await prepare(request)
    assessment = await triage.run(f"{what}: is it risky?")
    decision = await ctx.wait_for("approval")
    return {"what": what, "triage": str(assessment.output)[:200],
            "approved": bool((decision or {}).get("approved"))}
