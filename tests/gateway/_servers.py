"""A real OpenAI-compatible upstream on 127.0.0.1 whose behaviour the model name picks, and
the gateway as a subprocess (`corral gateway`) in front of it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from corral.testing import _free_port


class Upstream:
    """Models: ``ok`` answers; ``down`` 503; ``busy`` 429 with Retry-After 1; ``garbage`` 200
    with text; ``cut`` streams one chunk and hangs up; ``flaky`` 503 then ok; ``hang`` waits
    30 s; ``slow`` answers after 50 ms (``most_at_once`` counts how many it held at once);
    ``json`` answers ``{"answer": 42}``; ``sure`` and ``unsure`` answer with logprobs of high
    and low confidence. /v1/embeddings answers 3-dimensional vectors."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.keys: list[str] = []
        self.bodies: list[dict[str, Any]] = []
        self.at_once = self.most_at_once = 0
        app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"]),
                                Route("/v1/embeddings", self.embeddings, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="error", lifespan="off",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def completion(self, model: str, text: str) -> dict[str, Any]:
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}

    async def embeddings(self, request: Request) -> Response:
        body = await request.json()
        self.calls[body["model"]] += 1
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        return JSONResponse({"object": "list", "model": body["model"], "data": [
            {"object": "embedding", "index": i, "embedding": [len(t), 1.0, 0.5]}
            for i, t in enumerate(texts)], "usage": {"prompt_tokens": 2 * len(texts),
                                                     "total_tokens": 2 * len(texts)}})

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        model = body["model"]
        self.calls[model] += 1
        self.keys.append(request.headers.get("authorization", ""))
        self.bodies.append(body)
        if model == "slow":
            self.at_once += 1
            self.most_at_once = max(self.most_at_once, self.at_once)
            await asyncio.sleep(0.05)
            self.at_once -= 1
        if model == "json":
            return JSONResponse(self.completion(model, '{"answer": 42}'))
        if model in ("sure", "unsure"):
            answer = self.completion(model, f"{model} answer")
            logprob = -0.01 if model == "sure" else -2.0
            answer["choices"][0]["logprobs"] = {"content": [
                {"token": t, "logprob": logprob, "bytes": None, "top_logprobs": []}
                for t in (model, " answer")]} if body.get("logprobs") else None
            return JSONResponse(answer)
        if model == "down" or (model == "flaky" and self.calls[model] == 1):
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        if model == "busy":
            return JSONResponse({"error": {"message": "slow down"}}, status_code=429,
                                headers={"Retry-After": "1"})
        if model == "hang":
            await asyncio.sleep(30)
        if model == "garbage":
            return PlainTextResponse("<html>oops</html>")
        text = f"hello from {model}: {body['messages'][-1]['content']}"
        if not body.get("stream"):
            return JSONResponse(self.completion(model, text))

        async def events() -> AsyncIterator[bytes]:
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                  "finish_reason": None}]}
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            if model == "cut":
                await asyncio.sleep(0.05)
                raise ConnectionResetError("the upstream died mid-answer")
            done = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield b"data: " + json.dumps(done).encode() + b"\n\n"
            usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 5,
                                                       "completion_tokens": 3,
                                                       "total_tokens": 8}}
            yield b"data: " + json.dumps(usage).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def start(self) -> None:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


KEY = "sk-corral-test-key"

CONFIG = """
[gateway]
master_key_env = "CORRAL_TEST_GATEWAY_KEY"
retry = {{ attempts = 2, initial = 0.05, max_wait = 2 }}
breaker = {{ failures = 3, cooldown = 60 }}

[[gateway.deployments]]
name = "ok"
provider = "openai"
model = "ok"
base_url = "{url}"
api_key_env = "CORRAL_TEST_UPSTREAM_KEY"

[[gateway.deployments]]
name = "down"
provider = "openai"
model = "down"
base_url = "{url}"

[[gateway.deployments]]
name = "busy"
provider = "openai"
model = "busy"
base_url = "{url}"

[[gateway.deployments]]
name = "garbage"
provider = "openai"
model = "garbage"
base_url = "{url}"

[[gateway.deployments]]
name = "cut"
provider = "openai"
model = "cut"
base_url = "{url}"

[[gateway.deployments]]
name = "sim"
provider = "simulator"
model = "sim"

[gateway.aliases]
fast = ["down", "ok"]
junk-first = ["garbage", "ok"]

[gateway.prices.ok]
input = 1.0
output = 2.0
"""


class GatewayProcess:
    """``corral gateway`` on a free port, with ``config`` (default: CONFIG) and the shared
    database ``db`` (default: a SQLite file in ``tmp``)."""

    def __init__(self, url: str, tmp: Path, config: str = CONFIG, *, db: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.config = tmp / f"corral-{self.port}.toml"
        self.config.write_text(config.format(url=url))
        self.db = db or str(tmp / "shared.db")
        self.env = env = {**os.environ, "CORRAL_TEST_GATEWAY_KEY": KEY,
                          "CORRAL_TEST_UPSTREAM_KEY": "sk-upstream",
                          "CORRAL_DATABASE_URL": self.db, **(env or {})}
        subprocess.run([sys.executable, "-m", "corral", "db", "upgrade"], env=env, check=True,
                       capture_output=True, cwd=tmp)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "corral", "gateway", "--config", str(self.config),
             "--port", str(self.port)], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except httpx.TransportError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the gateway did not start: {self.stop()}") from None
                time.sleep(0.05)

    def corral(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A corral command on this gateway's database and config."""
        return subprocess.run([sys.executable, "-m", "corral", *args, "--config",
                               str(self.config)], env=self.env, capture_output=True, text=True,
                              timeout=60)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
        _, err = self.process.communicate(timeout=30)
        return err
