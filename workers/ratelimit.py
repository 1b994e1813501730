"""A provider's limits shared by every worker process through Redis.

Requests and tokens per minute are GCRA schedules: each request reserves the next free slot in one Lua call and
sleeps until it, so there is no polling and no herd. A 429 with Retry-After pauses the whole provider. An optional
cap on requests in flight across all processes is a Redis sorted-set semaphore. Celery's `rate_limit` is per worker
and cannot do any of this.
"""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from shared.providers import Provider

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

SLOT_POLL_S = 0.01
RPM_MARGIN = 1.01  # a hair under the limit, so a sliding-window counter upstream never sees limit + 1


def estimate_tokens(body: bytes, parsed: dict) -> int:
    """Prompt tokens guessed from the body's size, plus the completion budget it asks for."""
    budget = parsed.get("max_completion_tokens") or parsed.get("max_tokens") or parsed.get("max_output_tokens") or 0
    return len(body) // 4 + (budget if isinstance(budget, int) else 0)


class ProviderLimiter:
    def __init__(self, client: aioredis.Redis, provider: Provider) -> None:
        self.client = client
        self.provider = provider
        base = f"bg:rl:{provider.name}"
        self.keys = [f"{base}:rpm", f"{base}:tpm", f"{base}:pause"]
        self.slots_key = f"{base}:inflight"
        self.us_per_request = int(60_000_000 * RPM_MARGIN / provider.rpm) if provider.rpm else 0
        self.us_per_token = int(60_000_000 / provider.tpm) if provider.tpm else 0
        self._reserve = client.register_script(RESERVE)
        self._pause = client.register_script(PAUSE)
        self._acquire = client.register_script(ACQUIRE_SLOT)
        self.waited_s = 0.0

    @staticmethod
    def needed(provider: Provider) -> bool:
        return bool(provider.rpm or provider.tpm or provider.max_inflight)

    async def wait_turn(self, tokens: int) -> None:
        wait_us = await self._reserve(keys=self.keys, args=[self.us_per_request, self.us_per_token, tokens])
        if wait_us > 0:
            self.waited_s += wait_us / 1_000_000
            await asyncio.sleep(wait_us / 1_000_000)

    async def pause(self, seconds: float) -> None:
        await self._pause(keys=[self.keys[2]], args=[seconds])

    async def acquire_slot(self) -> str | None:
        if not self.provider.max_inflight:
            return None
        holder = uuid.uuid4().hex
        lease_ms = int(self.provider.timeout_s * 1000) + 5000
        while not await self._acquire(keys=[self.slots_key], args=[self.provider.max_inflight, holder, lease_ms]):
            self.waited_s += SLOT_POLL_S
            await asyncio.sleep(SLOT_POLL_S)
        return holder

    async def release_slot(self, holder: str | None) -> None:
        if holder is not None:
            await self.client.zrem(self.slots_key, holder)
