"""The shared rate limiter: unit checks on a real redis-server, and a batch that never trips the upstream's limit."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from stack import Stack, assert_exactly_once, chat_lines, submit, wait_terminal

from shared.providers import Provider
from shared.store_ratelimit import LimiterStore
from workers.ratelimit import ProviderLimiter


def _run(redis_url: str, provider: Provider, coro_factory):
    async def main():
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await coro_factory(ProviderLimiter(LimiterStore(client), provider))
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_requests_per_minute_spaces_requests_evenly(redis_server, redis_client):
    provider = Provider(name="p", base_url="http://x/v1", rpm=600)

    async def go(limiter):
        stamps = []

        async def one():
            await limiter.wait_turn(0)
            stamps.append(time.monotonic())

        await asyncio.gather(*(one() for _ in range(11)))
        return sorted(stamps)

    stamps = _run(redis_server, provider, go)
    assert 0.98 <= stamps[-1] - stamps[0] <= 1.3  # 10 intervals of 0.1 s (+1% margin)


def test_tokens_per_minute_charges_by_estimate(redis_server, redis_client):
    provider = Provider(name="t", base_url="http://x/v1", tpm=60_000)  # 1,000 tokens a second

    async def go(limiter):
        start = time.monotonic()
        for _ in range(3):
            await limiter.wait_turn(500)
        return time.monotonic() - start

    assert 0.95 <= _run(redis_server, provider, go) <= 1.3


def test_pause_holds_every_caller(redis_server, redis_client):
    provider = Provider(name="q", base_url="http://x/v1", rpm=6000)

    async def go(limiter):
        await limiter.pause(0.5)
        start = time.monotonic()
        await limiter.wait_turn(0)
        return time.monotonic() - start

    assert 0.45 <= _run(redis_server, provider, go) <= 0.8


def test_inflight_cap_is_global(redis_server, redis_client):
    provider = Provider(name="c", base_url="http://x/v1", max_inflight=3)

    async def go(limiter):
        peak = current = 0

        async def one():
            nonlocal peak, current
            holder = await limiter.acquire_slot()
            current += 1
            peak = max(peak, current)
            await asyncio.sleep(0.02)
            current -= 1
            await limiter.release_slot(holder)

        await asyncio.gather(*(one() for _ in range(12)))
        return peak

    assert _run(redis_server, provider, go) == 3


@pytest.mark.e2e
def test_batch_over_two_processes_never_trips_the_upstream_limit(make_stack):
    stack: Stack = make_stack(upstream_rpm=1200).start(workers=1, concurrency=2)
    stack.sim_config(max_rpm=1200)
    client = stack.client()
    start = time.monotonic()
    final = wait_terminal(client, submit(client, chat_lines(150)).id, timeout=60)
    elapsed = time.monotonic() - start
    assert final.status == "completed"
    assert_exactly_once(client, final, {f"req-{i}" for i in range(150)})
    assert stack.sim_stats()["by_status"].get("429", 0) == 0
    assert elapsed >= 149 * 60 / 1200  # 20 requests a second, shared by both processes
