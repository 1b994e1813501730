"""Per-tenant usage totals, added once when each batch ends, for the operator to read."""

from __future__ import annotations

from typing import Protocol

from shared.store import Store

KINDS = ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "total_tokens")


def usage_key(tenant: str) -> str:
    return f"bg:usage:{tenant}"


TENANTS = "bg:usage:tenants"


class UsageLike(Protocol):
    def as_list(self) -> list[int]: ...


def record_tenant_usage(store: Store, tenant: str, usage: UsageLike, completed: int, failed: int) -> None:
    pipe = store.r.pipeline(transaction=True)
    key = usage_key(tenant)
    for kind, value in zip(KINDS, usage.as_list()):
        pipe.hincrby(key, kind, value)
    pipe.hincrby(key, "requests_completed", completed)
    pipe.hincrby(key, "requests_failed", failed)
    pipe.hincrby(key, "batches", 1)
    pipe.sadd(TENANTS, tenant)
    pipe.execute()


def tenant_usage(store: Store) -> dict[str, dict[str, int]]:
    tenants = sorted(store.r.smembers(TENANTS))
    pipe = store.r.pipeline(transaction=False)
    for tenant in tenants:
        pipe.hgetall(usage_key(tenant))
    return {t: {k: int(v) for k, v in raw.items()} for t, raw in zip(tenants, pipe.execute())}
