"""A graph: research and outline run in parallel and join at the draft; an editor reviews in a
cycle (at most a few rounds); then the graph stops for a human's approval, a durable wait for a
signal, and publishes.

    python examples/graph.py [--db PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json

from pydantic import BaseModel

import corral
from corral.agents import END, START, Graph, interrupt


class Article(BaseModel):
    topic: str
    research: str = ""
    outline: str = ""
    draft: str = ""
    reviews: int = 0
    approved_by: str = ""
    published: bool = False


researcher = corral.Agent("researcher", model="simulator:default",
                          instructions="Find three facts about the topic.")
outliner = corral.Agent("outliner", model="simulator:default",
                        instructions="Outline an article in three parts.")
writer = corral.Agent("writer", model="simulator:default",
                      instructions="Write the article from the research and the outline.")

graph = Graph(Article, max_steps=12)
graph.add_agent(researcher, prompt=lambda s: f"Research: {s.topic}", output="research")
graph.add_agent(outliner, prompt=lambda s: f"Outline: {s.topic}", output="outline")
graph.add_agent(writer, output="draft",
                prompt=lambda s: f"Write about {s.topic}.\n{s.research}\n{s.outline}")


@graph.node
async def review(state: Article) -> dict[str, int]:
    return {"reviews": state.reviews + 1}


@graph.node
async def approval(state: Article) -> dict[str, str]:
    decision = await interrupt("approve")  # waits, durably, for `corral runs signal ...`
    return {"approved_by": decision["by"]}


@graph.node
async def publish(state: Article) -> dict[str, bool]:
    return {"published": True}


graph.edge(START, ["researcher", "outliner"])  # parallel branches...
graph.edge("researcher", "writer")  # ...that join at the writer
graph.edge("outliner", "writer")
graph.edge("writer", "review")
graph.edge("review", lambda s: "writer" if s.reviews < 2 else "approval")  # a bounded cycle
graph.edge("approval", "publish")
graph.edge("publish", END)


@corral.workflow
async def write_article(ctx: corral.Context, topic: str) -> Article:
    return await graph.run(Article(topic=topic))


async def main(db: str) -> None:
    async with corral.Runtime(db) as rt:
        handle = await rt.start(write_article, "durable execution for AI agents")
        while not any(e.name == "approve" for e in rt.store.journal(handle.id)):
            await asyncio.sleep(0.05)  # the graph is waiting for a human now
        print("waiting for approval; approving as maria")
        await handle.signal("approve", {"by": "maria"})
        article = await handle.result()
        print(json.dumps(article.model_dump(exclude={"research", "outline", "draft"}), indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", default=".corral/corral.db")
    asyncio.run(main(parser.parse_args().db))
