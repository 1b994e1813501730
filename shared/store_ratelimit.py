"""The providers' shared limiters in Redis (asyncio): GCRA schedules, the shared pause, the in-flight semaphore.

The decisions live in workers/ratelimit.py; this module holds the keys and the Lua that make each step atomic.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from shared import keys, lua
from shared.settings import Settings
from shared.store_client import make_client

POOL_CONNECTIONS = 32  # a worker process's connections for its limiters

# KEYS: rpm tat, tpm tat, pause-until. ARGV: µs per request (0 = off), µs per token (0 = off), tokens.
# Returns the µs to wait before sending.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait = 0
local function reserve(key, cost)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  redis.call('SET', key, tat + cost, 'PX', math.floor((tat + cost - now) / 1000) + 60000)
  return tat - now
end
if tonumber(ARGV[1]) > 0 then wait = math.max(wait, reserve(KEYS[1], tonumber(ARGV[1]))) end
if tonumber(ARGV[2]) > 0 then wait = math.max(wait, reserve(KEYS[2], tonumber(ARGV[2]) * tonumber(ARGV[3]))) end
local pause = tonumber(redis.call('GET', KEYS[3]) or '0')
if pause > now then wait = math.max(wait, pause - now) end
return wait
"""

# KEYS: pause-until. ARGV: seconds. Moves the pause later, never earlier.
PAUSE = """
local t = redis.call('TIME')
local until_us = tonumber(t[1]) * 1000000 + tonumber(t[2]) + math.floor(tonumber(ARGV[1]) * 1000000)
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_us > cur then
  redis.call('SET', KEYS[1], until_us, 'PX', math.floor(tonumber(ARGV[1]) * 1000) + 1000)
  return 1
end
return 0
"""

# KEYS: holders zset. ARGV: cap, holder, lease ms. A holder that died is dropped when its lease lapses.
ACQUIRE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  return 1
end
return 0
"""


class LimiterStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._reserve = client.register_script(RESERVE)
        self._pause = client.register_script(PAUSE)
        self._acquire = client.register_script(ACQUIRE_SLOT)
        self._adaptive_acquire = client.register_script(lua.ADAPTIVE_ACQUIRE)
        self._adaptive_release = client.register_script(lua.ADAPTIVE_RELEASE)

    @classmethod
    def from_url(cls, url: str) -> "LimiterStore":
        # A blocking pool: more senders than connections wait for one (a plain pool raises past 100 at once).
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=POOL_CONNECTIONS, timeout=30)
        return cls(aioredis.Redis(connection_pool=pool))

    @classmethod
    def from_settings(cls, settings: Settings) -> "LimiterStore":
        """The deployment's Redis (`redis_url`, or the primary its Sentinels name), with the same blocking pool."""
        return cls(make_client(settings, asyncio=True, max_connections=POOL_CONNECTIONS, pool_timeout=30))

    @staticmethod
    def _keys(provider: str) -> tuple[str, str, str, str]:
        base = keys.rate_limit(provider)
        return f"{base}:rpm", f"{base}:tpm", keys.rate_limit_pause(provider), keys.rate_limit_inflight(provider)

    async def reserve(self, provider: str, us_per_request: int, us_per_token: int, tokens: int) -> int:
        """Microseconds to wait before the next request may be sent."""
        rpm, tpm, pause, _ = self._keys(provider)
        return int(await self._reserve(keys=[rpm, tpm, pause], args=[us_per_request, us_per_token, tokens]))

    async def pause(self, provider: str, seconds: float) -> None:
        await self._pause(keys=[self._keys(provider)[2]], args=[seconds])

    async def acquire_slot(self, provider: str, cap: int, holder: str, lease_ms: int) -> bool:
        return bool(await self._acquire(keys=[self._keys(provider)[3]], args=[cap, holder, lease_ms]))

    async def release_slot(self, provider: str, holder: str) -> None:
        await self.client.zrem(self._keys(provider)[3], holder)

    # ---- the adaptive limit (AIMD; the decision is lua.ADAPTIVE_RELEASE) -------------------------------------

    def _adaptive_keys(self, provider: str) -> list[str]:
        _, _, pause, inflight = self._keys(provider)
        return [inflight, keys.adaptive_limit(provider), pause]

    async def adaptive_acquire(self, provider: str, holder: str, lease_ms: int, floor: int,
                               ceiling: int) -> tuple[bool, int]:
        """(got a slot, ms the provider stays paused: 0 when it is not)."""
        got, paused_ms = await self._adaptive_acquire(keys=self._adaptive_keys(provider),
                                                      args=[holder, lease_ms, floor, ceiling])
        return bool(got), int(paused_ms)

    async def adaptive_release(self, provider: str, holder: str | None, *, lease_ms: int, floor: int, ceiling: int,
                               signal: int, latency_ms: int, retry_after_ms: int, cooldown_ms: int, probe: float,
                               latency_factor: float, ttl_ms: int) -> tuple[float, int]:
        """Frees the holder's slot and takes one AIMD step: (the limit now, +1 raised / -1 halved / 0 kept)."""
        limit, change = await self._adaptive_release(
            keys=self._adaptive_keys(provider),
            args=[holder or "", lease_ms, floor, ceiling, signal, latency_ms, retry_after_ms, cooldown_ms, probe,
                  latency_factor, ttl_ms])
        return float(limit), int(change)

    async def pool_processes(self) -> int:
        """Worker processes announced by live workers (as shared/store_ops.py reads them; 0 when none has)."""
        names = [name async for name in self.client.scan_iter(match=f"{keys.POOL_PREFIX}*", count=1000)]
        return sum(int(v) for v in await self.client.mget(names) if v is not None) if names else 0

    async def close(self) -> None:
        await self.client.aclose()
