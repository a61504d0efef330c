"""What the HTTP load benchmarks share: a free port, the machine's busy CPU time, and wrk's
open-loop pacing in Lua."""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def busy_seconds() -> float:
    """CPU time all cores spent busy since boot (everything but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# Lua for wrk: with BENCH_RATE set, every request takes the next slot of one absolute schedule
LUA_PACING = """\
-- open-loop pacing: every request takes the next slot of one absolute schedule (rate/s),
-- whichever connection is free; a late slot is sent at once (the backlog is never dropped)
local rate = tonumber(os.getenv("BENCH_RATE") or "0")
if rate > 0 then
  local interval, next_at = 1000 / rate, nil
  function delay()
    local now = now_ms()
    if next_at == nil then next_at = now end
    local wait = next_at - now
    next_at = next_at + interval
    if wait < 0 then return 0 end
    return wait
  end
end
"""


def tree_cpu_seconds(pid: int, root: bool = True) -> float:
    """User + system CPU of a process's live descendants (and of the process itself, with
    ``root``), in seconds, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = ({pid} if root else set()), [pid]
    while frontier:
        parent = frontier.pop()
        for child, p in parents.items():
            if p == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(times.get(p, 0.0) for p in tree)


class OTLPSink(http.server.BaseHTTPRequestHandler):
    """A collector's stand-in: keeps the bodies POSTed to .../v1/traces (200), and on GET
    /stats answers ``stats(bodies)`` for what arrived since the last /stats, then forgets it
    (see `serve_sink`)."""

    protocol_version = "HTTP/1.1"  # (keep-alive, as a collector does)
    bodies: list[tuple[str, bytes]] = []
    lock = threading.Lock()
    stats: Callable[[list[tuple[str, bytes]]], dict[str, Any]]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes = b"", kind: str = "application/x-protobuf"
                ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not self.path.endswith("/v1/traces"):
            self._answer(404)
            return
        with self.lock:
            self.bodies.append((self.headers.get("Content-Encoding", ""), body))
        self._answer(200)

    def do_GET(self) -> None:
        if self.path != "/stats":
            self._answer(404)
            return
        with self.lock:
            bodies, self.bodies[:] = list(self.bodies), []
        self._answer(200, json.dumps(self.stats(bodies)).encode(), "application/json")


def serve_sink(stats: Callable[[list[tuple[str, bytes]]], dict[str, Any]]) -> None:
    """An `OTLPSink` on a free port of 127.0.0.1, for ever; prints the port first."""
    handler = type("Sink", (OTLPSink,), {"stats": staticmethod(stats)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()
