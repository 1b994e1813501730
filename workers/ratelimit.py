"""A provider's limits shared by every worker process through Redis.

Requests and tokens per minute are GCRA schedules: each request reserves the next free slot in one Lua call and
sleeps until it, so there is no polling and no herd. A 429 with Retry-After pauses the whole provider. An optional
cap on requests in flight across all processes is a Redis sorted-set semaphore. Celery's `rate_limit` is per worker
and cannot do any of this.
"""

from __future__ import annotations

import asyncio
import uuid

from shared.providers import Provider
from shared.store_ratelimit import LimiterStore

SLOT_POLL_S = 0.01
RPM_MARGIN = 1.01  # a hair under the limit, so a sliding-window counter upstream never sees limit + 1


def estimate_tokens(body: bytes, parsed: dict) -> int:
    """Prompt tokens guessed from the body's size, plus the completion budget it asks for."""
    budget = parsed.get("max_completion_tokens") or parsed.get("max_tokens") or parsed.get("max_output_tokens") or 0
    return len(body) // 4 + (budget if isinstance(budget, int) else 0)


class ProviderLimiter:
    def __init__(self, store: LimiterStore, provider: Provider) -> None:
        self.store = store
        self.provider = provider
        self.us_per_request = int(60_000_000 * RPM_MARGIN / provider.rpm) if provider.rpm else 0
        self.us_per_token = int(60_000_000 / provider.tpm) if provider.tpm else 0
        self.waited_s = 0.0

    @staticmethod
    def needed(provider: Provider) -> bool:
        return bool(provider.rpm or provider.tpm or provider.max_inflight)

    async def wait_turn(self, tokens: int) -> None:
        wait_us = await self.store.reserve(self.provider.name, self.us_per_request, self.us_per_token, tokens)
        if wait_us > 0:
            self.waited_s += wait_us / 1_000_000
            await asyncio.sleep(wait_us / 1_000_000)

    async def pause(self, seconds: float) -> None:
        await self.store.pause(self.provider.name, seconds)

    async def acquire_slot(self) -> str | None:
        if not self.provider.max_inflight:
            return None
        holder = uuid.uuid4().hex
        lease_ms = int(self.provider.timeout_s * 1000) + 5000
        while not await self.store.acquire_slot(self.provider.name, self.provider.max_inflight, holder, lease_ms):
            self.waited_s += SLOT_POLL_S
            await asyncio.sleep(SLOT_POLL_S)
        return holder

    async def release_slot(self, holder: str | None) -> None:
        if holder is not None:
            await self.store.release_slot(self.provider.name, holder)
