"""Sending Celery tasks by name, so the API can enqueue work without importing the workers."""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery

from shared.settings import Settings, get_settings
from shared.store_client import sentinel_kwargs

log = logging.getLogger(__name__)

ORCHESTRATE = "batchgate.orchestrate"
RUN_CHUNK = "batchgate.run_chunk"
RUN_WORK = "batchgate.run_work"  # a ticket: a free process runs what the scheduler gives it
FINALIZE = "batchgate.finalize"
SWEEP = "batchgate.sweep"
DELIVER_WEBHOOK = "batchgate.deliver_webhook"
FORWARD = "batchgate.forward"  # one step of a batch forwarded to a provider's own Batch API

CONTROL_QUEUE = "control"
CHUNKS_QUEUE = "chunks"

_PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def transport_options(settings: Settings) -> dict:
    """Broker and result backend alike. With Sentinels: the master's name, and how to reach the Sentinels."""
    options: dict = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.sentinel_addresses():
        options["master_name"] = settings.redis_master
        options["sentinel_kwargs"] = sentinel_kwargs(settings)
    return options


@lru_cache
def producer_app() -> Celery:
    settings = get_settings()
    app = Celery("batchgate-producer", broker=settings.celery_broker_url, backend=settings.celery_result_backend)
    app.conf.broker_transport_options = transport_options(settings)
    app.conf.result_backend_transport_options = transport_options(settings)
    app.conf.broker_connection_retry_on_startup = True
    return app


def enqueue_orchestrate(batch_id: str) -> bool:
    """Publish the batch's orchestrate task. A lost publish is not fatal: the sweeper re-drives `validating` batches."""
    try:
        producer_app().send_task(
            ORCHESTRATE, args=[batch_id], queue=CONTROL_QUEUE, retry=True, retry_policy=_PUBLISH_RETRY
        )
        return True
    except Exception:  # noqa: BLE001 - any broker failure leaves the batch for the sweeper
        log.exception("could not enqueue orchestrate for %s; the sweeper will re-drive it", batch_id)
        return False


def enqueue_forward(batch_id: str) -> bool:
    """Ask for one forward step of a forwarded batch now (after a cancel: the provider hears of it at once). A lost
    publish is not fatal: the batch's chain of steps polls again within BATCHGATE_FORWARD_POLL_MAX_S."""
    try:
        producer_app().send_task(FORWARD, args=[batch_id, None], queue=CONTROL_QUEUE, retry=True,
                                 retry_policy=_PUBLISH_RETRY)
        return True
    except Exception:  # noqa: BLE001
        log.exception("could not enqueue a forward step for %s; its next poll will see the cancel", batch_id)
        return False
