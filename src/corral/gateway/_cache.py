"""The exact cache: the same request from the same tenant gets the same answer, within a TTL.

A request's key is the SHA-256 of its tenant and its body in canonical JSON, less what does not
change the answer (``stream``, ``stream_options``, ``user``). Answers live in this process (an
LRU of ``max_entries``) or, when the gateway's counters are in Redis, in Redis for every
replica.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any

_IGNORED = ("stream", "stream_options", "user", "metadata")


def request_key(tenant: str, body: dict[str, Any]) -> str:
    canonical = {k: v for k, v in body.items() if k not in _IGNORED}
    data = json.dumps([tenant, canonical], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()


class MemoryCache:
    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    async def get(self, key: str) -> dict[str, Any] | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[0] <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return found[1]

    async def put(self, key: str, answer: dict[str, Any]) -> None:
        self._entries[key] = (time.monotonic() + self.ttl, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def close(self) -> None:
        pass


class RedisCache:
    def __init__(self, url: str, ttl: float, prefix: str = "corral:gw:cache:") -> None:
        import redis.asyncio as aioredis

        self._redis: Any = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool
                                          .from_url(url, max_connections=64, timeout=10,
                                                    socket_connect_timeout=5,
                                                    socket_timeout=5))
        self.ttl = ttl
        self.prefix = prefix

    async def get(self, key: str) -> dict[str, Any] | None:
        data = await self._redis.get(self.prefix + key)
        return None if data is None else dict(json.loads(data))

    async def put(self, key: str, answer: dict[str, Any]) -> None:
        await self._redis.set(self.prefix + key, json.dumps(answer), px=int(self.ttl * 1000))

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)


ExactCache = MemoryCache | RedisCache
