"""A provider's limits shared by every worker process through Redis.

Requests and tokens per minute are GCRA schedules: each request reserves the next free slot in one Lua call and
sleeps until it, so there is no polling and no herd. A 429 with Retry-After pauses the whole provider. An optional
cap on requests in flight across all processes is a Redis sorted-set semaphore. Celery's `rate_limit` is per worker
and cannot do any of this.

`adaptive = true` makes that cap a limit found by AIMD (additive increase, multiplicative decrease), held in Redis
for every worker: it starts at `adaptive_min`, grows while requests succeed and halves on a 429 or 503 or on latency
well above its running minimum, up to `max_inflight` (else `max_concurrency` x the worker processes announced in
Redis). Each request's outcome is one Lua call that frees its slot and takes the step (lua.ADAPTIVE_RELEASE); a
Retry-After on a 429/503 pauses the provider until it passes. Slots are leased, so a killed worker's lapse.

Within a process one waiter at a time asks Redis for a slot (the others wait their turn in line behind it, woken as
this process frees a slot), so hundreds of senders over a small limit cost about one Redis call per slot freed, not
one per sender per poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from shared.providers import Provider
from shared.store_ratelimit import LimiterStore

log = logging.getLogger("batchgate.ratelimit")

SLOT_POLL_S = 0.01
RPM_MARGIN = 1.01  # a hair under the limit, so a sliding-window counter upstream never sees limit + 1

# The adaptive limit's constants (lua.ADAPTIVE_RELEASE explains each).
CONGESTION_STATUS = frozenset({429, 503})
ADAPTIVE_COOLDOWN_MS = 500  # at most one halving per this long
ADAPTIVE_PROBE = 8  # successes per +1 near the level of the last decrease: `limit` x this (a plateau where
#                     congestion was met, so it is met again less often: each meeting costs a halving and a pause)
ADAPTIVE_LATENCY_FACTOR = 2.0  # smoothed latency over this x its running minimum is congestion
ADAPTIVE_TTL_MS = 3_600_000  # the learned limit is forgotten after an hour without requests
CEILING_REFRESH_S = 10.0  # how often the worker processes announced in Redis are counted again
SUCCESS, CONGESTION, NEUTRAL = 1, 2, 0


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
        self.lease_ms = int(provider.timeout_s * 1000) + 5000
        self.adaptive = provider.adaptive
        self.limit: float | None = None  # the adaptive limit as this process last saw it
        self._ceiling = provider.max_inflight or provider.max_concurrency
        self._ceiling_at = float("-inf")
        self._line = asyncio.Lock()  # the senders of this process waiting for a slot, first come first served
        self._freed = asyncio.Event()  # set when this process frees a slot

    @staticmethod
    def needed(provider: Provider) -> bool:
        return bool(provider.rpm or provider.tpm or provider.max_inflight or provider.adaptive)

    async def ceiling(self) -> int:
        """The adaptive limit's maximum: max_inflight, else max_concurrency x the worker processes."""
        if self.provider.max_inflight:
            return self.provider.max_inflight
        now = time.monotonic()
        if now - self._ceiling_at >= CEILING_REFRESH_S:
            self._ceiling_at = now
            try:
                processes = await self.store.pool_processes()
            except Exception:  # noqa: BLE001 - keep the last figure; the slot calls report Redis trouble themselves
                processes = 0
            if processes:
                self._ceiling = self.provider.max_concurrency * processes
        return self._ceiling

    async def _bounds(self) -> tuple[int, int]:
        ceiling = await self.ceiling()
        return min(self.provider.adaptive_min, ceiling), ceiling

    async def wait_turn(self, tokens: int) -> None:
        if self.adaptive and not (self.us_per_request or self.us_per_token):
            return  # nothing to schedule; the adaptive slot itself waits out a pause
        wait_us = await self.store.reserve(self.provider.name, self.us_per_request, self.us_per_token, tokens)
        if wait_us > 0:
            self.waited_s += wait_us / 1_000_000
            await asyncio.sleep(wait_us / 1_000_000)

    async def pause(self, seconds: float) -> None:
        await self.store.pause(self.provider.name, seconds)

    async def _try_slot(self, holder: str) -> tuple[bool, float]:
        """(got one, seconds to wait before asking again)."""
        if not self.adaptive:
            got = await self.store.acquire_slot(self.provider.name, self.provider.max_inflight, holder, self.lease_ms)
            return got, SLOT_POLL_S
        floor, ceiling = await self._bounds()
        got, paused_ms = await self.store.adaptive_acquire(self.provider.name, holder, self.lease_ms, floor, ceiling)
        return got, max(SLOT_POLL_S, paused_ms / 1000)

    async def acquire_slot(self) -> str | None:
        """A slot under the shared in-flight cap (or the adaptive limit); None when the provider has neither."""
        if not (self.provider.max_inflight or self.adaptive):
            return None
        holder = uuid.uuid4().hex
        started = time.monotonic()
        async with self._line:
            while True:
                self._freed.clear()
                got, wait_s = await self._try_slot(holder)
                if got:
                    self.waited_s += time.monotonic() - started
                    return holder
                try:
                    await asyncio.wait_for(self._freed.wait(), wait_s)
                except TimeoutError:
                    pass

    async def release_slot(self, holder: str | None, outcome=None, latency_s: float | None = None) -> None:
        """Frees the slot; with an adaptive limit, the request's outcome (an upstream Outcome, None when the attempt
        never ended) adjusts it."""
        if holder is None:
            return
        try:
            if not self.adaptive:
                await self.store.release_slot(self.provider.name, holder)
                return
            status = getattr(outcome, "status_code", None)
            if status in CONGESTION_STATUS:
                signal = CONGESTION
            elif status is not None and 200 <= status < 300:
                signal = SUCCESS
            else:
                signal = NEUTRAL
            retry_after = getattr(outcome, "retry_after_s", None)
            floor, ceiling = await self._bounds()
            limit, change = await self.store.adaptive_release(
                self.provider.name, holder, lease_ms=self.lease_ms, floor=floor, ceiling=ceiling, signal=signal,
                latency_ms=int(latency_s * 1000) if latency_s is not None and signal == SUCCESS else -1,
                retry_after_ms=int(retry_after * 1000) if retry_after else 0, cooldown_ms=ADAPTIVE_COOLDOWN_MS,
                probe=ADAPTIVE_PROBE, latency_factor=ADAPTIVE_LATENCY_FACTOR, ttl_ms=ADAPTIVE_TTL_MS)
            if change < 0:
                log.info("provider %s: congestion (HTTP %s), adaptive limit halved to %g", self.provider.name,
                         status if signal == CONGESTION else "latency", limit)
            self.limit = limit
        finally:
            self._freed.set()
