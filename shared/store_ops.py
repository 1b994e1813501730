"""Operational state in Redis: metric counters, tenant usage, webhook events, worker pool sizes, the sweeper's lock
and the clean-up outbox."""

from __future__ import annotations

from collections import Counter

import redis

from shared import keys, lua
from shared.lifecycle import MICROS

USAGE_KINDS = ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "total_tokens")
COST_FIELD = "cost_micros"  # usage hash fields cost_micros|CUR and cost_micros|CUR|DAY (lua.APPLY_MOVE)


class OpsStore:
    def __init__(self, client: redis.Redis) -> None:
        self._claim_event = client.register_script(lua.CLAIM_EVENT)
        self._release_lock = client.register_script(lua.RELEASE_LEASE)

    r: redis.Redis

    # ---- metrics ----------------------------------------------------------------------------------------------

    def add_metrics(self, counters: Counter[str], latency: Counter[str]) -> None:
        if not counters and not latency:
            return
        pipe = self.r.pipeline(transaction=False)
        for key, amount in counters.items():
            pipe.hincrby(keys.METRIC_COUNTERS, key, amount)
        for key, amount in latency.items():
            pipe.hincrby(keys.METRIC_LATENCY, key, amount)
        pipe.execute()

    def increment(self, name: str, label: str = "", amount: int = 1) -> None:
        self.r.hincrby(keys.METRIC_COUNTERS, f"{name}|{label}", amount)

    def metric_counters(self) -> dict[str, str]:
        return self.r.hgetall(keys.METRIC_COUNTERS)

    def latency_histogram(self) -> dict[str, str]:
        return self.r.hgetall(keys.METRIC_LATENCY)

    def active_statuses(self) -> tuple[list[str], float | None]:
        """The status of every unfinished batch, and the creation time of the oldest."""
        active = self.r.zrange(keys.ACTIVE_BATCHES, 0, -1, withscores=True)
        if not active:
            return [], None
        pipe = self.r.pipeline(transaction=False)
        for batch_id, _ in active:
            pipe.hget(keys.batch(batch_id), "status")
        return [s for s in pipe.execute() if s], active[0][1]

    def memory_used(self) -> int:
        return int(self.r.info("memory")["used_memory"])

    def queue_depth(self, queue: str) -> int:
        """Messages waiting in a Celery queue (kombu keeps a Redis list named after the queue)."""
        return int(self.r.llen(queue))

    # ---- usage ------------------------------------------------------------------------------------------------

    def tenant_usage(self) -> dict[str, dict]:
        """Per tenant: token and request totals, and once a priced batch has ended, `cost` {currency: amount} and
        `cost_by_day` {UTC day of the batches' end: {currency: amount}} (kept in micro-units, shown in units)."""
        tenants = sorted(self.r.smembers(keys.USAGE_TENANTS))
        pipe = self.r.pipeline(transaction=False)
        for tenant in tenants:
            pipe.hgetall(keys.usage(tenant))
        out: dict[str, dict] = {}
        for tenant, raw in zip(tenants, pipe.execute()):
            usage: dict = {}
            for name, value in raw.items():
                kind, _, rest = name.partition("|")
                if kind != COST_FIELD:
                    usage[name] = int(value)
                    continue
                currency, _, day = rest.partition("|")
                amount = int(value) / MICROS
                if day:
                    usage.setdefault("cost_by_day", {}).setdefault(day, {})[currency] = amount
                else:
                    usage.setdefault("cost", {})[currency] = amount
            if "cost_by_day" in usage:
                usage["cost_by_day"] = dict(sorted(usage["cost_by_day"].items()))
            out[tenant] = usage
        return out

    # ---- webhook events (written by terminal moves; see shared/lifecycle.py) ----------------------------------

    def webhook_event(self, event_id: str) -> dict[str, str]:
        return self.r.hgetall(keys.webhook_event(event_id))

    def claim_webhook_event(self, event_id: str, now: float, claim_s: float) -> bool:
        return bool(self._claim_event(keys=[keys.WEBHOOKS_PENDING], args=[event_id, now, claim_s]))

    def count_webhook_attempt(self, event_id: str) -> int:
        return int(self.r.hincrby(keys.webhook_event(event_id), "attempts", 1))

    def close_webhook_event(self, event_id: str, outcome: str, now: float) -> None:
        """`outcome` is `delivered` or `abandoned`."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.webhook_event(event_id), f"{outcome}_at", str(int(now)))
        pipe.zrem(keys.WEBHOOKS_PENDING, event_id)
        pipe.execute()

    def forget_webhook_event(self, event_id: str) -> None:
        self.r.zrem(keys.WEBHOOKS_PENDING, event_id)

    def reschedule_webhook_event(self, event_id: str, due: float) -> None:
        self.r.zadd(keys.WEBHOOKS_PENDING, {event_id: due})

    def due_webhook_events(self, now: float, limit: int = 500) -> list[str]:
        return self.r.zrangebyscore(keys.WEBHOOKS_PENDING, "-inf", now, start=0, num=limit)

    def limiter_state(self, provider: str) -> dict:
        """A provider's shared limiter as the operators' views show it: its adaptive state (the hash of
        lua.ADAPTIVE_RELEASE, empty before the first outcome), requests in flight, ms it stays paused."""
        t_s, t_us = self.r.time()
        now_ms = t_s * 1000 + t_us // 1000
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(keys.adaptive_limit(provider))
        pipe.zcount(keys.rate_limit_inflight(provider), f"({now_ms}", "+inf")
        pipe.get(keys.rate_limit_pause(provider))
        state, inflight, pause_us = pipe.execute()
        return {"adaptive": state, "in_flight": int(inflight),
                "paused_ms": max(0, int(pause_us or 0) // 1000 - now_ms)}

    # ---- worker pool ------------------------------------------------------------------------------------------

    def announce_pool(self, node: str, processes: int, ttl_s: int) -> None:
        self.r.set(f"{keys.POOL_PREFIX}{node}", processes, ex=ttl_s)

    def withdraw_pool(self, node: str) -> None:
        self.r.delete(f"{keys.POOL_PREFIX}{node}")

    def pool_processes(self) -> int:
        """Worker processes announced by live workers (0 when none has announced yet)."""
        names = list(self.r.scan_iter(match=f"{keys.POOL_PREFIX}*", count=1000))
        return sum(int(v) for v in self.r.mget(names) if v is not None) if names else 0

    # ---- the sweeper ------------------------------------------------------------------------------------------

    def acquire_sweeper_lock(self, token: str, ttl_s: float) -> bool:
        return bool(self.r.set(keys.SWEEPER_LOCK, token, nx=True, px=int(ttl_s * 1000)))

    def release_sweeper_lock(self, token: str) -> None:
        self._release_lock(keys=[keys.SWEEPER_LOCK], args=[token])

    def due_cleanups(self, now: float, limit: int = 100) -> list[str]:
        return self.r.zrangebyscore(keys.CLEANUP_OUTBOX, "-inf", now, start=0, num=limit)

    def cleanup_done(self, batch_id: str) -> None:
        self.r.zrem(keys.CLEANUP_OUTBOX, batch_id)
