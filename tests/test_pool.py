"""Workers announce their process count in Redis; orchestrate cuts batches into whole rounds of that pool."""

from __future__ import annotations

import time

from shared import keys
from shared.store import Store
from workers.pool import FORGET_AFTER_S


def test_pool_size_sums_live_workers(redis_client):
    store = Store(redis_client)
    assert store.pool_processes() == 0
    store.announce_pool("w1@host-a", 4, FORGET_AFTER_S)
    store.announce_pool("w2@host-b", 2, FORGET_AFTER_S)
    assert store.pool_processes() == 6
    assert 0 < redis_client.ttl(f"{keys.POOL_PREFIX}w1@host-a") <= FORGET_AFTER_S
    store.withdraw_pool("w1@host-a")
    assert store.pool_processes() == 2


def test_running_worker_announces_its_processes(stack):
    deadline = time.monotonic() + 10
    while stack.store.pool_processes() != 2:
        assert time.monotonic() < deadline, "the worker (concurrency 2) never announced its pool"
        time.sleep(0.2)
