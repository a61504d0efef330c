"""What each agent of a run did, read from the run's journal."""

from __future__ import annotations

import json
from collections import Counter

from pydantic import BaseModel, Field

from ..stores import JournalEntry
from ._agent import PRICES


class AgentStats(BaseModel):
    agent: str
    model_calls: int = 0
    tool_calls: Counter[str] = Field(default_factory=Counter)
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    seconds: float = 0.0
    """Time in this agent's model calls."""


def agent_report(journal: list[JournalEntry],
                 prices: dict[str, tuple[float, float]] | None = None) -> list[AgentStats]:
    """One line per agent, in the order agents first spoke: from its journaled model steps."""
    table = {**PRICES, **(prices or {})}
    stats: dict[str, AgentStats] = {}
    for entry in sorted(journal, key=lambda e: e.started_at):
        if entry.kind != "step" or not entry.name.endswith(":model") or entry.status != "ok":
            continue
        agent = entry.name.removesuffix(":model")
        line = stats.setdefault(agent, AgentStats(agent=agent))
        response = json.loads(entry.value or "{}")
        usage = response.get("usage", {})
        line.model_calls += 1
        line.input_tokens += usage.get("input_tokens", 0)
        line.output_tokens += usage.get("output_tokens", 0)
        price_in, price_out = table.get(response.get("model", ""), (0.0, 0.0))
        line.cost += (usage.get("input_tokens", 0) * price_in
                      + usage.get("output_tokens", 0) * price_out) / 1e6
        line.tool_calls.update(call["name"] for call in response.get("tool_calls", []))
        if entry.ended_at is not None:
            line.seconds += entry.ended_at - entry.started_at
    return list(stats.values())
