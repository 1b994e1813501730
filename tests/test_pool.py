"""Workers announce their process count in Redis; orchestrate cuts batches into whole rounds of that pool."""

from __future__ import annotations

import time

import redis

from workers.pool import FORGET_AFTER_S, announce, pool_processes, withdraw


def test_pool_size_sums_live_workers(redis_server, redis_client):
    r = redis.Redis.from_url(redis_server)
    assert pool_processes(r) == 0
    announce(r, "w1@host-a", 4)
    announce(r, "w2@host-b", 2)
    assert pool_processes(r) == 6
    assert 0 < r.ttl("bg:pool:w1@host-a") <= FORGET_AFTER_S
    withdraw(r, "w1@host-a")
    assert pool_processes(r) == 2


def test_running_worker_announces_its_processes(stack):
    deadline = time.monotonic() + 10
    while pool_processes(stack.store.r) != 2:
        assert time.monotonic() < deadline, "the worker (concurrency 2) never announced its pool"
        time.sleep(0.2)
