"""The size of the worker pool, as the workers announce it in Redis, so a batch is cut for the pool that runs it.

Each `celery worker` writes its process count under its node name every few seconds with a short expiry, so a
worker that stops is forgotten on its own.
"""

from __future__ import annotations

import logging

import redis
from celery import bootsteps

from shared.settings import get_settings

log = logging.getLogger("batchgate.pool")

KEY_PREFIX = "bg:pool:"
ANNOUNCE_EVERY_S = 5.0
FORGET_AFTER_S = 20


def announce(r: redis.Redis, node: str, processes: int) -> None:
    r.set(f"{KEY_PREFIX}{node}", processes, ex=FORGET_AFTER_S)


def withdraw(r: redis.Redis, node: str) -> None:
    r.delete(f"{KEY_PREFIX}{node}")


def pool_processes(r: redis.Redis) -> int:
    """Worker processes announced by live workers (0 when none has announced yet)."""
    keys = list(r.scan_iter(match=f"{KEY_PREFIX}*", count=1000))
    return sum(int(v) for v in r.mget(keys) if v is not None) if keys else 0


class PoolAnnouncer(bootsteps.StartStopStep):
    """A worker bootstep: announce this worker's process count on start and every few seconds after."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs) -> None:
        super().__init__(worker, **kwargs)
        self.timer_ref = None
        self.redis: redis.Redis | None = None

    def _announce(self, worker) -> None:
        try:
            announce(self.redis, worker.hostname, int(worker.concurrency or 1))
        except redis.RedisError:
            log.warning("could not announce the pool size", exc_info=True)

    def start(self, worker) -> None:
        self.redis = redis.Redis.from_url(get_settings().redis_url)
        self._announce(worker)
        self.timer_ref = worker.timer.call_repeatedly(ANNOUNCE_EVERY_S, self._announce, (worker,), priority=10)

    def stop(self, worker) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
        if self.redis is not None:
            try:
                withdraw(self.redis, worker.hostname)
            except redis.RedisError:
                pass
