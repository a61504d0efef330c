"""The agents demo: a support desk of four agents on the simulator (no network, no keys), two
levels of delegation, one durable run; then what each agent did, read from the journal.

    python examples/agents_demo.py [--db PATH] [--model openai:gpt-4o-mini]

With a real model: CORRAL_DEMO_MODEL=openai:gpt-4o-mini OPENAI_API_KEY=... make demo, or a
local server: OPENAI_BASE_URL=http://127.0.0.1:11434/v1 CORRAL_DEMO_MODEL=openai:llama3.1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from supervisor import manager, support_desk

import corral
from corral.agents import SimulatorModel, agent_report, resolve_model


async def main(db: str, model: str | None) -> None:
    from supervisor import billing_lead, refunds, tech_lead

    for agent in (manager, billing_lead, tech_lead, refunds):
        # a real model (OPENAI_API_KEY, or OPENAI_BASE_URL for a local server), or the
        # simulator with the latency of a small hosted model
        agent.model = resolve_model(model) if model else SimulatorModel(latency=0.15)
    async with corral.Runtime(db) as rt:
        ticket = "ann@example.com was charged twice for March"
        print(f"== ticket: {ticket!r}")
        started = time.perf_counter()
        handle = await rt.start(support_desk, ticket)
        result = await handle.result()
        took = time.perf_counter() - started
        print(f"== resolution, from run {handle.id} ({took * 1000:.0f} ms):")
        print("  ", json.dumps(result["resolution"]))
        print(f"\n{'AGENT':14} {'CALLS':>5} {'TOKENS IN/OUT':>14} {'COST $':>10} "
              f"{'TIME':>8}  TOOL CALLS")
        for line in agent_report(rt.store.journal(handle.id)):
            tools = ", ".join(f"{name} x{n}" for name, n in line.tool_calls.items()) or "-"
            print(f"{line.agent:14} {line.model_calls:>5} "
                  f"{f'{line.input_tokens}/{line.output_tokens}':>14} {line.cost:>10.6f} "
                  f"{line.seconds * 1000:>6.1f}ms  {tools}")
        print(f"\nevery model and tool call above is a journaled step: "
              f"`corral runs show {handle.id} --db {db}`")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", default=".corral/corral.db")
    parser.add_argument("--model", default=os.environ.get("CORRAL_DEMO_MODEL"),
                        help="run the agents on a real model, e.g. openai:gpt-4o-mini "
                             "(default: $CORRAL_DEMO_MODEL, else the simulator)")
    args = parser.parse_args()
    asyncio.run(main(args.db, args.model))
