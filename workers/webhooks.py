"""Webhooks: `batch.completed|failed|expired|cancelled` events, signed per Standard Webhooks, retried with backoff.

A batch's terminal move writes its event (a fixed id from the batch and type) and puts it in the pending set, in the
same transaction as the status (shared/lifecycle.py). This module delivers pending events until the receiver answers
2xx: a deliverer first claims an event by pushing its due time past the attempt, so a duplicate message or the
sweeper finds it not due; a delivered event is never sent again. Delivery never holds up the batch itself.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

import httpx
import orjson
from standardwebhooks.webhooks import Webhook

from shared.lifecycle import WEBHOOK_EVENTS, webhook_event_id
from workers.runtime import Runtime

log = logging.getLogger("batchgate.webhooks")


def event_for(rt: Runtime, batch_id: str, status: str, tenant: str) -> str | None:
    """The id of the event a batch's terminal move wrote, if its tenant wants webhooks."""
    if status not in WEBHOOK_EVENTS or rt.providers.webhook(tenant) is None:
        return None
    return webhook_event_id(batch_id, WEBHOOK_EVENTS[status])


def payload(event: dict, event_id: str) -> bytes:
    return orjson.dumps({"id": event_id, "object": "event", "type": event["type"],
                         "created_at": int(event["created_at"]), "data": {"id": event["batch_id"]}})


def deliver(rt: Runtime, event_id: str) -> float | None:
    """Try once. Returns None when done (delivered, given up, not due, or nothing to send), else seconds until the
    next try."""
    store, settings = rt.store, rt.settings
    event = store.webhook_event(event_id)
    if not event or event.get("delivered_at") or event.get("abandoned_at"):
        store.forget_webhook_event(event_id)
        return None
    config = rt.providers.webhook(event["tenant"])
    if config is None:
        store.forget_webhook_event(event_id)
        return None
    if not store.claim_webhook_event(event_id, time.time() + 1.0, settings.webhook_timeout_s + 5):
        return None  # another deliverer has it, or its next try is not due yet
    attempts = store.count_webhook_attempt(event_id)
    body = payload(event, event_id)
    now = datetime.now(tz=timezone.utc)
    signature = Webhook(config.webhook_secret.get_secret_value()).sign(event_id, now, body.decode())
    headers = {"content-type": "application/json", "webhook-id": event_id,
               "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": signature}
    try:
        resp = httpx.post(config.webhook_url, content=body, headers=headers, timeout=settings.webhook_timeout_s)
        ok = 200 <= resp.status_code < 300
        outcome = str(resp.status_code)
    except httpx.HTTPError as exc:
        ok, outcome = False, type(exc).__name__
    if ok:
        store.close_webhook_event(event_id, "delivered", time.time())
        log.info("webhook %s (%s) delivered", event_id, event["type"])
        return None
    if attempts >= settings.webhook_max_attempts:
        store.close_webhook_event(event_id, "abandoned", time.time())
        log.error("webhook %s abandoned after %d attempts (last: %s)", event_id, attempts, outcome)
        return None
    delay = min(300.0, settings.webhook_retry_base_s * 2 ** (attempts - 1))
    store.reschedule_webhook_event(event_id, time.time() + delay)
    log.warning("webhook %s attempt %d failed (%s); next in %.1fs", event_id, attempts, outcome, delay)
    return delay


def due_events(rt: Runtime) -> list[str]:
    """Events due now whose delivery message may have been lost (a claimed event is not due until its claim ends)."""
    return rt.store.due_webhook_events(time.time() - 1.0)
