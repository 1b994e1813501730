"""Adaptive concurrency (AIMD): the decision on fakeredis, the shared limiter on a real redis-server, and a batch
against an upstream that answers 429 above 20 requests in flight (tests/inflight_upstream.py), on real workers."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import fakeredis
import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from stack import ADMIN_API_KEY, API_KEY, METRICS_TOKEN, Stack, assert_exactly_once, chat_lines, submit, wait_terminal

from cli import stack as procs
from shared.providers import Provider
from shared.store_ratelimit import LimiterStore
from workers import ratelimit
from workers.ratelimit import CONGESTION, NEUTRAL, SUCCESS, ProviderLimiter

P = "p"
LEASE_MS = 10_000


class Aimd:
    """One provider's AIMD state on fakeredis, stepped by outcomes of slots it acquires itself."""

    def __init__(self, floor: int = 4, ceiling: int = 400, cooldown_ms: int = 0) -> None:
        self.store = LimiterStore(fakeredis.FakeAsyncRedis())
        self.floor, self.ceiling, self.cooldown_ms = floor, ceiling, cooldown_ms
        self.n = 0

    async def acquire(self) -> str | None:
        self.n += 1
        holder = f"h{self.n}"
        got, _ = await self.store.adaptive_acquire(P, holder, LEASE_MS, self.floor, self.ceiling)
        return holder if got else None

    async def outcome(self, holder: str | None, signal: int, latency_ms: int = 50, retry_after_ms: int = 0):
        return await self.store.adaptive_release(
            P, holder, lease_ms=LEASE_MS, floor=self.floor, ceiling=self.ceiling, signal=signal,
            latency_ms=latency_ms if signal == SUCCESS else -1, retry_after_ms=retry_after_ms,
            cooldown_ms=self.cooldown_ms, probe=ratelimit.ADAPTIVE_PROBE,
            latency_factor=ratelimit.ADAPTIVE_LATENCY_FACTOR, ttl_ms=60_000)

    async def one(self, signal: int, **kw):
        """A request that got a slot and ended with `signal` (sent a little after the last one: times are in ms)."""
        await asyncio.sleep(0.002)
        holder = await self.acquire()
        assert holder is not None
        return await self.outcome(holder, signal, **kw)

    async def limit(self) -> float:
        state = await self.store.client.hgetall("bg:rl:p:adaptive")
        return float(state[b"limit"])


def test_slow_start_then_a_halving_then_one_per_round():
    async def go():
        a = Aimd()
        assert (await a.one(SUCCESS))[0] == 5  # before any congestion: +1 per success (doubles per round trip)
        for _ in range(11):
            await a.one(SUCCESS)
        assert await a.limit() == 16
        limit, change = await a.one(CONGESTION)
        assert (limit, change) == (8, -1)
        # Below the last decrease's level: +1 per limit/2 successes.
        for _ in range(3):
            assert (await a.one(SUCCESS))[1] == 0
        assert await a.one(SUCCESS) == (9, 1)
        # Up to 2 below it, then within 2 of it: probe-factor times slower (14 -> 15 takes 14 x 4 successes).
        while await a.limit() < 14:
            await a.one(SUCCESS)
        for _ in range(14 * ratelimit.ADAPTIVE_PROBE - 1):
            assert (await a.one(SUCCESS))[1] == 0
        assert await a.one(SUCCESS) == (15, 1)

    asyncio.run(go())


def test_a_burst_of_429s_halves_once_and_the_next_congestion_halves_again():
    async def go():
        a = Aimd(floor=4, ceiling=400)
        for _ in range(36):
            await a.one(SUCCESS)
        assert await a.limit() == 40
        burst = [await a.acquire() for _ in range(40)]
        assert None not in burst and await a.acquire() is None  # the limit is the cap: the 41st waits
        changes = [(await a.outcome(h, CONGESTION))[1] for h in burst]
        assert changes.count(-1) == 1 and await a.limit() == 20  # twenty-odd 429s of one burst: one halving
        # A request sent after the halving that meets congestion again halves again.
        assert await a.one(CONGESTION) == (10, -1)
        # Never below the floor; neutral outcomes (a 400, a transport error) change nothing.
        for _ in range(5):
            await a.one(CONGESTION)
        assert await a.limit() == 4
        assert (await a.one(NEUTRAL))[1] == 0 and await a.limit() == 4

    asyncio.run(go())


def test_the_cool_down_spaces_halvings():
    async def go():
        a = Aimd(cooldown_ms=300)
        for _ in range(60):
            await a.one(SUCCESS)
        assert (await a.one(CONGESTION))[1] == -1
        assert (await a.one(CONGESTION))[1] == 0  # sent after the cut, but within the cool-down
        await asyncio.sleep(0.35)
        assert (await a.one(CONGESTION))[1] == -1

    asyncio.run(go())


def test_latency_well_above_its_minimum_is_congestion():
    async def go():
        a = Aimd()
        for _ in range(40):
            await a.one(SUCCESS, latency_ms=50)
        before = await a.limit()
        assert before == 44  # steady latency: no decrease
        changes = [(await a.one(SUCCESS, latency_ms=400))[1] for _ in range(30)]
        assert -1 in changes and await a.limit() < before

    asyncio.run(go())


def test_the_limit_stays_within_floor_and_ceiling():
    async def go():
        a = Aimd(floor=3, ceiling=10)
        for _ in range(50):
            await a.one(SUCCESS)
        assert await a.limit() == 10
        held = [await a.acquire() for _ in range(11)]
        assert held.count(None) == 1  # ten in flight at most
        for h in held:
            await a.outcome(h, CONGESTION)
        for _ in range(10):
            await a.one(CONGESTION)
        assert await a.limit() == 3

    asyncio.run(go())


def test_retry_after_pauses_the_provider_and_a_dead_holder_lapses():
    async def go():
        a = Aimd()
        holder = await a.acquire()
        await a.outcome(holder, CONGESTION, retry_after_ms=400)
        got, paused_ms = await a.store.adaptive_acquire(P, "x", LEASE_MS, 4, 400)
        assert not got and 300 <= paused_ms <= 400
        await asyncio.sleep(0.45)
        # A worker killed while holding slots: its leases lapse and the slots come back.
        for i in range(4):
            assert (await a.store.adaptive_acquire(P, f"dead{i}", 200, 4, 400))[0]
        assert not (await a.store.adaptive_acquire(P, "live", LEASE_MS, 4, 400))[0]
        await asyncio.sleep(0.25)
        assert (await a.store.adaptive_acquire(P, "live", LEASE_MS, 4, 400))[0]

    asyncio.run(go())


def test_many_senders_over_a_small_limit_keep_to_it_without_polling_redis(redis_server, redis_client):
    """300 senders of one process over an adaptive limit: never more in flight than the limit, Retry-After holds
    every sender, and the Redis calls stay near one per slot freed instead of one per sender per poll."""
    provider = Provider(name="ad", base_url="http://x/v1", adaptive=True, adaptive_min=4, max_inflight=8)

    async def go():
        store = LimiterStore.from_url(redis_server)
        client = store.client
        limiter = ProviderLimiter(store, provider)
        current = peak = 0
        starts: list[float] = []

        class Answer:
            def __init__(self, status: int, retry_after_s: float | None = None) -> None:
                self.status_code, self.retry_after_s = status, retry_after_s

        async def one(i: int) -> None:
            nonlocal current, peak
            holder = await limiter.acquire_slot()
            starts.append(time.monotonic())
            current += 1
            peak = max(peak, current)
            await asyncio.sleep(0.01)
            current -= 1
            answer = Answer(429, 0.3) if i == 150 else Answer(200)
            await limiter.release_slot(holder, answer, 0.01)

        try:
            await client.config_resetstat()
            began = time.monotonic()
            await asyncio.gather(*(one(i) for i in range(300)))
            stats = await client.info("commandstats")
        finally:
            await client.aclose()
        calls = sum(v["calls"] for k, v in stats.items() if k.startswith("cmdstat_evalsha"))
        gaps = [b - a for a, b in zip(sorted(starts), sorted(starts)[1:])]
        return peak, calls, max(gaps), time.monotonic() - began

    peak, calls, longest_gap, took = asyncio.run(go())
    print(f"peak {peak}, evalsha calls {calls}, longest gap {longest_gap:.3f} s, {took:.2f} s")
    assert 4 <= peak <= 8
    assert longest_gap >= 0.28  # the 429's Retry-After of 0.3 s held every sender
    assert calls < 300 * 4, calls  # a herd polling every 10 ms would make tens of thousands


# ---- end to end: real workers, an upstream that refuses more than 20 in flight --------------------------------

UPSTREAM = Path(__file__).parent / "inflight_upstream.py"


def start_inflight_upstream(stack: Stack, *, max_inflight: int = 20, latency_ms: int = 100) -> str:
    port = str(procs.free_port())
    stack.group.start("inflight", [sys.executable, str(UPSTREAM), "--port", port, "--max-inflight", str(max_inflight),
                                   "--latency-ms", str(latency_ms), "--retry-after", "1"])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            if httpx.get(f"{url}/stats", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the in-flight upstream did not start")
        time.sleep(0.1)


@pytest.mark.e2e
def test_adaptive_limit_finds_an_upstreams_capacity(make_stack):
    stack: Stack = make_stack(chunk_time_limit_s=240, visibility_timeout_s=600)
    stack.start_redis()
    upstream = start_inflight_upstream(stack)
    providers = stack.root / "providers.toml"
    providers.write_text(f'[providers.default]\nbase_url = "{upstream}/v1"\napi_key = "sk-upstream-key"\n'
                         "max_concurrency = 200\nadaptive = true\n")
    stack.group.env["BATCHGATE_PROVIDERS_FILE"] = str(providers)
    stack.start_api()
    stack.start_worker("w1", 2)
    stack.start_beat()
    client = stack.client()
    began = time.monotonic()
    final = wait_terminal(client, submit(client, chat_lines(2000)).id, timeout=240)
    took = time.monotonic() - began
    stats = httpx.get(f"{upstream}/stats", timeout=5).json()
    share = stats["by_status"].get("429", 0) / stats["answers"]
    print(f"upstream answers {stats['answers']}, 429s {stats['by_status'].get('429', 0)} ({share:.1%}), "
          f"peak in flight {stats['peak_inflight']}, {took:.1f} s")
    assert final.status == "completed" and final.request_counts.failed == 0, final.request_counts
    assert_exactly_once(client, final, {f"req-{i}" for i in range(2000)})
    assert stats["by_status"].get("200", 0) == 2000
    assert share < 0.10

    # The operators see the current limit; a tenant's key sees neither view.
    base = stack.base_url.removesuffix("/v1")
    admin = httpx.get(f"{base}/admin/providers", headers={"Authorization": f"Bearer {ADMIN_API_KEY}"}, timeout=5)
    assert admin.status_code == 200, admin.text
    view = {p["name"]: p for p in admin.json()["data"]}["default"]
    assert view["adaptive"] is True and 4 <= view["adaptive_limit"]["current"] <= 400
    assert view["adaptive_limit"]["max"] == 400  # max_concurrency 200 x 2 worker processes
    assert view["adaptive_limit"]["decreases"] >= 1
    metrics = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=5)
    gauges = {s.labels.get("provider"): s.value for f in text_string_to_metric_families(metrics.text)
              for s in f.samples if s.name == "batchgate_upstream_adaptive_limit"}
    assert gauges["default"] == view["adaptive_limit"]["current"]
    for path in ("/admin/providers", "/metrics"):
        assert httpx.get(f"{base}{path}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).status_code == 401
