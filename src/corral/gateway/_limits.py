"""Rate limits and budgets, counted in this process or in Redis for every replica at once.

Rate limits are token buckets: a limit of N per minute holds N and refills N/60 a second. A
request takes 1 from each requests-per-minute bucket that applies to it (its tenant's, its
key's, its model's) and its prompt's estimated tokens from each tokens-per-minute bucket; when
it ends, the tokens it really used are settled (a bucket may go below zero: the next requests
wait for it).

Budgets are money per period. Before a call, the call's estimated cost (its prompt, plus
``max_tokens`` or ``output_estimate`` completion tokens, at the model's price) is *reserved*;
the call is refused if what was spent plus what is reserved plus its own estimate would pass the
limit. When it ends, the reservation is released and the real cost is spent. So a budget is
never passed by calls whose estimate held, and by at most what the calls in flight spent over
their estimates otherwise.

Every check and every update of one request happens at once: under the event loop in this
process, in one Lua script in Redis. Nothing is taken when anything refuses.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._config import GatewayConfig, Limit

if TYPE_CHECKING:
    from ._router import Caller

log = logging.getLogger("corral.gateway")
_MINUTE = 60.0


@dataclass(slots=True)
class Bucket:
    """A token bucket holding ``capacity`` a minute; this request takes ``cost`` from it."""

    key: str
    capacity: float
    cost: float


@dataclass(slots=True)
class Slot:
    """A budget's current period."""

    key: str
    scope: str
    name: str
    limit: float | None
    soft: float | None
    since: float
    until: float | None  # None: the budget never renews


@dataclass(slots=True)
class Refusal:
    what: str  # "rate" | "budget"
    index: int
    retry_after: float | None


def period(name: str, now: float) -> tuple[float, float | None]:
    """The start and end (UTC) of the period holding ``now``."""
    if name == "total":
        return 0.0, None
    t = time.gmtime(now)
    if name == "hour":
        start = now - now % 3600
        return start, start + 3600
    if name == "day":
        start = now - now % 86400
        return start, start + 86400
    start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return start, calendar.timegm((year, month, 1, 0, 0, 0))


class MemoryCounters:
    """The counters of one process. Atomic because nothing here awaits. Once a minute, past
    periods and buckets idle long enough to be full again are forgotten."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key: (level, at)
        self._budgets: dict[str, list[float]] = {}  # key: [spent, reserved, until]
        self._sweep_at = 0.0

    def _level(self, key: str, capacity: float, now: float) -> float:
        level, at = self._buckets.get(key, (capacity, now))
        return min(capacity, level + (now - at) * capacity / _MINUTE)

    def _sweep(self, now: float, wall: float) -> None:
        self._sweep_at = now + _MINUTE
        for key in [k for k, (level, at) in self._buckets.items()
                    if level >= 0 and now - at > _MINUTE]:  # (full again; debts are kept)
            del self._buckets[key]
        for key in [k for k, counts in self._budgets.items() if counts[2] <= wall]:
            del self._budgets[key]

    def seeded(self, key: str) -> bool:
        return key in self._budgets

    def seed(self, key: str, spent: float) -> None:
        self._budgets.setdefault(key, [spent, 0.0, float("inf")])

    def _counts(self, slot: Slot) -> list[float]:
        counts = self._budgets.get(slot.key)
        if counts is None:
            counts = self._budgets[slot.key] = [0.0, 0.0, float("inf")]
        if slot.until is not None:
            counts[2] = slot.until
        return counts

    async def admit(self, buckets: list[Bucket], slots: list[Slot],
                    reserve: float) -> Refusal | None:
        now = time.monotonic()
        if now >= self._sweep_at:
            self._sweep(now, time.time())
        levels = []
        for i, b in enumerate(buckets):
            level = self._level(b.key, b.capacity, now)
            cost = min(b.cost, b.capacity)
            if level < cost:
                return Refusal("rate", i, (cost - level) * _MINUTE / b.capacity)
            levels.append(level - cost)
        counts = [self._counts(s) for s in slots]
        for j, (s, (spent, reserved, _)) in enumerate(zip(slots, counts, strict=True)):
            if s.limit is not None and spent + reserved + reserve > s.limit:
                return Refusal("budget", j, None if s.until is None else s.until - time.time())
        for b, level in zip(buckets, levels, strict=True):
            self._buckets[b.key] = (level, now)
        for c in counts:
            c[1] += reserve
        return None

    async def settle(self, buckets: list[Bucket], slots: list[Slot], reserved: float,
                     spent: float) -> list[float]:
        """Take ``cost`` more from each bucket (negative: give back); release ``reserved``
        and spend ``spent`` in each slot; return each slot's spending."""
        now = time.monotonic()
        for b in buckets:
            self._buckets[b.key] = (self._level(b.key, b.capacity, now) - b.cost, now)
        totals = []
        for s in slots:
            counts = self._counts(s)
            counts[0] += spent
            counts[1] = max(0.0, counts[1] - reserved)
            totals.append(counts[0])
        return totals

    async def close(self) -> None:
        pass


_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local nb, ns = tonumber(ARGV[1]), tonumber(ARGV[2])
local reserve = tonumber(ARGV[3])
local levels = {}
for i = 1, nb do
  local cap, cost = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  local st = redis.call('HMGET', KEYS[i], 'l', 't')
  local level = cap
  if st[1] then
    level = math.min(cap, tonumber(st[1]) + (now - tonumber(st[2])) * cap / 60)
  end
  if cost > cap then cost = cap end
  if level < cost then return {'rate', i, tostring((cost - level) * 60 / cap)} end
  levels[i] = level - cost
end
local base = 3 + 2 * nb
for j = 1, ns do
  local limit = tonumber(ARGV[base + 2 * j - 1])
  if limit >= 0 then
    local st = redis.call('HMGET', KEYS[nb + j], 's', 'r')
    if tonumber(st[1] or '0') + tonumber(st[2] or '0') + reserve > limit then
      return {'budget', j, ''}
    end
  end
end
for i = 1, nb do
  redis.call('HSET', KEYS[i], 'l', tostring(levels[i]), 't', tostring(now))
  redis.call('EXPIRE', KEYS[i], 120)
end
for j = 1, ns do
  redis.call('HINCRBYFLOAT', KEYS[nb + j], 'r', reserve)
  local ttl = tonumber(ARGV[base + 2 * j])
  if ttl > 0 then redis.call('EXPIRE', KEYS[nb + j], ttl) end
end
return {'ok'}
"""

_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local nb, ns = tonumber(ARGV[1]), tonumber(ARGV[2])
local reserved, spent = tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 1, nb do
  local cap, cost = tonumber(ARGV[3 + 2 * i]), tonumber(ARGV[4 + 2 * i])
  local st = redis.call('HMGET', KEYS[i], 'l', 't')
  local level = cap
  if st[1] then
    level = math.min(cap, tonumber(st[1]) + (now - tonumber(st[2])) * cap / 60)
  end
  redis.call('HSET', KEYS[i], 'l', tostring(level - cost), 't', tostring(now))
  -- kept until full again: a debt (usage over the estimate) is not forgiven by expiry
  redis.call('EXPIRE', KEYS[i], 120 + math.ceil(math.max(0, cost - level) * 60 / cap))
end
local totals = {}
for j = 1, ns do
  local k = KEYS[nb + j]
  local r = tonumber(redis.call('HINCRBYFLOAT', k, 'r', -reserved))
  if r < 0 then redis.call('HSET', k, 'r', '0') end
  totals[j] = redis.call('HINCRBYFLOAT', k, 's', spent)
end
return totals
"""


class RedisCounters:
    """The counters in Redis, shared by every gateway replica."""

    def __init__(self, url: str, prefix: str = "corral:gw:") -> None:
        import redis.asyncio as aioredis

        self._redis: Any = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool
                                          .from_url(url, max_connections=64, timeout=10,
                                                    socket_connect_timeout=5,
                                                    socket_timeout=5))
        self.prefix = prefix
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)

    def seeded(self, key: str) -> bool:
        return True  # Redis keeps the spending across restarts: nothing to restore

    def seed(self, key: str, spent: float) -> None:
        pass

    def _keys(self, buckets: list[Bucket], slots: list[Slot]) -> list[str]:
        return [self.prefix + b.key for b in buckets] + [self.prefix + s.key for s in slots]

    async def admit(self, buckets: list[Bucket], slots: list[Slot],
                    reserve: float) -> Refusal | None:
        wall = time.time()
        args: list[Any] = [len(buckets), len(slots), reserve]
        for b in buckets:
            args += [b.capacity, b.cost]
        for s in slots:
            args += [-1 if s.limit is None else s.limit,
                     0 if s.until is None else int(s.until - wall) + 3600]
        answer = await self._admit(keys=self._keys(buckets, slots), args=args)
        if answer[0] == b"ok":
            return None
        index = int(answer[1]) - 1
        if answer[0] == b"rate":
            return Refusal("rate", index, float(answer[2]))
        until = slots[index].until
        return Refusal("budget", index, None if until is None else until - wall)

    async def settle(self, buckets: list[Bucket], slots: list[Slot], reserved: float,
                     spent: float) -> list[float]:
        args: list[Any] = [len(buckets), len(slots), reserved, spent]
        for b in buckets:
            args += [b.capacity, b.cost]
        totals = await self._settle(keys=self._keys(buckets, slots), args=args)
        return [float(t) for t in totals]

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)


Counters = MemoryCounters | RedisCounters


@dataclass(slots=True)
class Ticket:
    """What one admitted call took, to settle when it ends."""

    tpm: list[Bucket]
    slots: list[Slot]
    tokens: int
    reserved: float
    settled: bool = field(default=False)


class Limiter:
    """The rate limits and budgets that apply to a call, from the config and the caller's key.
    ``spent_since(scope, name, since)`` restores a budget's spending after a restart when the
    counters are in memory (from the cost ledger)."""

    def __init__(self, config: GatewayConfig, counters: Counters,
                 spent_since: Callable[[str, str, float], float] | None = None) -> None:
        self.config = config
        self.counters = counters
        self.spent_since = spent_since
        self.rejected: dict[str, int] = {}  # by what refused: "rate:tenant", "budget:key"...
        self.soft_crossed: set[str] = set()
        self.utilization: dict[tuple[str, str], float] = {}  # (scope, name): spent / limit
        self.in_flight = self.most_in_flight = 0  # admitted calls not yet settled
        self._periods: dict[str, tuple[float, float | None]] = {}
        self.enabled = bool(config.budgets) or any(
            limit.rpm or limit.tpm for limit in self._all_limits())

    def applies(self, caller: Caller) -> bool:
        key = caller.key
        return self.enabled or (key is not None and bool(key.rpm or key.tpm or key.budget))

    def _all_limits(self) -> list[Limit]:
        rl = self.config.rate_limits
        return [rl.tenant, rl.key, rl.model, *rl.tenants.values(), *rl.models.values()]

    def _buckets(self, caller: Caller, model: str, tokens: int) -> list[Bucket]:
        rl = self.config.rate_limits
        scopes = [("tenant", caller.tenant, rl.tenants.get(caller.tenant, rl.tenant)),
                  ("model", model, rl.models.get(model, rl.model))]
        if caller.key is not None:
            key = caller.key
            scopes.append(("key", key.id, Limit(rpm=key.rpm or rl.key.rpm,
                                                tpm=key.tpm or rl.key.tpm)))
        buckets = []
        for scope, name, limit in scopes:
            if limit.rpm:
                buckets.append(Bucket(f"rpm:{scope}:{name}", limit.rpm, 1))
            if limit.tpm:
                buckets.append(Bucket(f"tpm:{scope}:{name}", limit.tpm, tokens))
        return buckets

    def _period(self, every: str, now: float) -> tuple[float, float | None]:
        found = self._periods.get(every)
        if found is None or (found[1] is not None and now >= found[1]):
            found = self._periods[every] = period(every, now)
        return found

    def _slots(self, caller: Caller) -> list[Slot]:
        now = time.time()
        names = {"tenant": caller.tenant, "key": caller.key_id, "workflow": caller.workflow,
                 "run": caller.run_id}
        budgets: list[tuple[str, str, float | None, float | None, str]] = [
            (b.scope, b.name, b.limit, b.soft, b.period) for b in self.config.budgets]
        if caller.key is not None and caller.key.budget is not None:
            budgets.append(("key", caller.key.id, caller.key.budget, None,
                            caller.key.budget_period or "month"))
        slots = []
        for scope, pattern, limit, soft, every in budgets:
            name = names[scope]
            if name is None or pattern not in ("*", name):
                continue
            since, until = self._period(every, now)
            slots.append(Slot(f"budget:{scope}:{name}:{every}:{int(since)}", scope, name,
                              limit, soft, since, until))
        return slots

    async def admit(self, caller: Caller, model: str, tokens: int, cost: float) -> Ticket:
        """Take what the call needs, or raise a 429 `GatewayError` saying which limit."""
        from ._router import GatewayError

        buckets = self._buckets(caller, model, tokens)
        slots = self._slots(caller)
        for s in slots:
            if not self.counters.seeded(s.key):
                spent = 0.0
                if self.spent_since is not None and s.scope in ("tenant", "key"):
                    spent = await asyncio.to_thread(self.spent_since, s.scope, s.name, s.since)
                self.counters.seed(s.key, spent)
        # counted from before the reservation is taken until after it is settled, so that
        # most_in_flight bounds the reservations outstanding at once, in Redis as in memory
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            refusal = await self.counters.admit(buckets, slots, cost)
        except BaseException:
            self.in_flight -= 1
            raise
        if refusal is None:
            return Ticket([b for b in buckets if b.key.startswith("tpm:")], slots, tokens, cost)
        self.in_flight -= 1
        if refusal.what == "rate":
            b = buckets[refusal.index]
            kind, scope, name = b.key.split(":", 2)
            self.rejected[f"rate:{scope}"] = self.rejected.get(f"rate:{scope}", 0) + 1
            unit = "requests" if kind == "rpm" else "tokens"
            raise GatewayError(429, f"rate limit: {scope} {name!r} may send {int(b.capacity)} "
                               f"{unit} a minute; retry after the Retry-After seconds",
                               type="rate_limit_error", code="rate_limit_exceeded",
                               retry_after=refusal.retry_after)
        s = slots[refusal.index]
        self.rejected[f"budget:{s.scope}"] = self.rejected.get(f"budget:{s.scope}", 0) + 1
        when = ("it never renews: raise the limit" if s.until is None
                else "it renews at the start of the next period (Retry-After)")
        raise GatewayError(429, f"budget exhausted: {s.scope} {s.name!r} has spent its "
                           f"${s.limit:g}; {when}", type="insufficient_quota",
                           code="budget_exceeded", retry_after=refusal.retry_after)

    async def settle(self, ticket: Ticket, tokens: int, cost: float) -> None:
        """The call ended having used ``tokens`` and cost ``cost``."""
        if ticket.settled:
            return
        ticket.settled = True
        for b in ticket.tpm:  # (admission took at most the bucket's capacity)
            b.cost = tokens - min(ticket.tokens, b.capacity)
        # shielded: a caller that leaves mid-settlement must not leave the reservation taken
        try:
            totals = await asyncio.shield(
                self.counters.settle(ticket.tpm, ticket.slots, ticket.reserved, cost))
        finally:
            self.in_flight -= 1
        for s, spent in zip(ticket.slots, totals, strict=True):
            if s.limit and s.scope in ("tenant", "key"):  # (runs would flood /metrics)
                self.utilization[(s.scope, s.name)] = spent / s.limit
            if s.soft is not None and spent >= s.soft and s.key not in self.soft_crossed:
                from ..observability._alerts import alerts

                self.soft_crossed.add(s.key)
                alerts().fire("budget_soft_limit", s.key, f"budget: {s.scope} {s.name!r} has "
                              f"spent ${spent:.4f}, past its soft limit ${s.soft:g}",
                              scope=s.scope, name=s.name, spent=spent, soft=s.soft,
                              limit=s.limit)
