"""The size of the worker pool, as the workers announce it in Redis, so a batch is cut for the pool that runs it.

Each `celery worker` writes its process count under its node name every few seconds with a short expiry, so a
worker that stops is forgotten on its own.
"""

from __future__ import annotations

import logging

from celery import bootsteps

from shared.settings import get_settings
from shared.store import Store
from shared.store_client import STORAGE_ERROR

log = logging.getLogger("batchgate.pool")

ANNOUNCE_EVERY_S = 5.0
FORGET_AFTER_S = 20


class PoolAnnouncer(bootsteps.StartStopStep):
    """A worker bootstep: announce this worker's process count on start and every few seconds after."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs) -> None:
        super().__init__(worker, **kwargs)
        self.timer_ref = None
        self.store: Store | None = None

    def _announce(self, worker) -> None:
        try:
            self.store.announce_pool(worker.hostname, int(worker.concurrency or 1), FORGET_AFTER_S)
        except STORAGE_ERROR:
            log.warning("could not announce the pool size", exc_info=True)

    def start(self, worker) -> None:
        self.store = Store.from_settings(get_settings())
        try:
            self.store.clear_stopping(worker.hostname)  # a node of this name that stopped before is back
        except STORAGE_ERROR:
            pass
        self._announce(worker)
        self.timer_ref = worker.timer.call_repeatedly(ANNOUNCE_EVERY_S, self._announce, (worker,), priority=10)

    def stop(self, worker) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
        if self.store is not None:
            try:
                self.store.withdraw_pool(worker.hostname)
            except STORAGE_ERROR:
                pass
