"""Webhooks: `batch.completed|failed|expired|cancelled` events, signed per Standard Webhooks, retried with backoff.

An event gets a fixed id from its batch and type, is queued once when the batch ends, and is delivered until the
receiver answers 2xx; a delivered event is never sent again. Delivery never holds up the batch itself.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import datetime, timezone
from typing import Callable

import httpx
import orjson
from standardwebhooks.webhooks import Webhook

from workers.runtime import Runtime

log = logging.getLogger("batchgate.webhooks")

PENDING = "bg:webhooks:pending"
EVENT_TYPES = {"completed": "batch.completed", "failed": "batch.failed", "expired": "batch.expired",
               "cancelled": "batch.cancelled"}


def event_key(event_id: str) -> str:
    return f"bg:event:{event_id}"


def event_id_for(batch_id: str, event_type: str) -> str:
    return "evt_" + hashlib.sha256(f"{batch_id}:{event_type}".encode()).hexdigest()[:24]


def queue_event(rt: Runtime, batch_id: str, status: str) -> str | None:
    """Record the event of a batch that just ended, if its tenant wants webhooks. Returns the event id."""
    fields = rt.store.batch_fields(batch_id)
    tenant = fields.get("tenant", "")
    if status not in EVENT_TYPES or rt.providers.webhook(tenant) is None:
        return None
    event_type = EVENT_TYPES[status]
    event_id = event_id_for(batch_id, event_type)
    created = rt.store.r.hsetnx(event_key(event_id), "type", event_type)
    if created:
        rt.store.r.hset(event_key(event_id), mapping={
            "tenant": tenant, "batch_id": batch_id, "created_at": str(int(time.time())), "attempts": "0"})
        rt.store.r.zadd(PENDING, {event_id: time.time()})
    return event_id


_send: Callable[[str], None] | None = None


def set_sender(send: Callable[[str], None]) -> None:
    """How a queued event is handed to a delivery task (set by the task module; the sweeper is the fallback)."""
    global _send
    _send = send


def batch_finished(rt: Runtime, batch_id: str, status: str) -> None:
    """Called once per batch, by whichever step moved it to a terminal status."""
    try:
        event_id = queue_event(rt, batch_id, status)
        if event_id is not None and _send is not None:
            _send(event_id)
    except Exception:  # noqa: BLE001 - a webhook must never hold up or fail the batch; the sweeper re-drives
        log.exception("could not queue the webhook of %s", batch_id)


def payload(event: dict, event_id: str) -> bytes:
    return orjson.dumps({"id": event_id, "object": "event", "type": event["type"],
                         "created_at": int(event["created_at"]), "data": {"id": event["batch_id"]}})


def deliver(rt: Runtime, event_id: str) -> float | None:
    """Try once. Returns None when done (delivered, given up, or nothing to send), else seconds until the next try."""
    r = rt.store.r
    event = r.hgetall(event_key(event_id))
    if not event or event.get("delivered_at") or event.get("abandoned_at"):
        r.zrem(PENDING, event_id)
        return None
    config = rt.providers.webhook(event["tenant"])
    if config is None:
        r.zrem(PENDING, event_id)
        return None
    attempts = int(r.hincrby(event_key(event_id), "attempts", 1))
    body = payload(event, event_id)
    now = datetime.now(tz=timezone.utc)
    signature = Webhook(config.webhook_secret.get_secret_value()).sign(event_id, now, body.decode())
    headers = {"content-type": "application/json", "webhook-id": event_id,
               "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": signature}
    try:
        resp = httpx.post(config.webhook_url, content=body, headers=headers, timeout=rt.settings.webhook_timeout_s)
        ok = 200 <= resp.status_code < 300
        outcome = str(resp.status_code)
    except httpx.HTTPError as exc:
        ok, outcome = False, type(exc).__name__
    if ok:
        r.hset(event_key(event_id), "delivered_at", str(int(time.time())))
        r.zrem(PENDING, event_id)
        log.info("webhook %s (%s) delivered", event_id, event["type"])
        return None
    if attempts >= rt.settings.webhook_max_attempts:
        r.hset(event_key(event_id), "abandoned_at", str(int(time.time())))
        r.zrem(PENDING, event_id)
        log.error("webhook %s abandoned after %d attempts (last: %s)", event_id, attempts, outcome)
        return None
    delay = min(300.0, rt.settings.webhook_retry_base_s * 2 ** (attempts - 1))
    r.zadd(PENDING, {event_id: time.time() + delay})
    log.warning("webhook %s attempt %d failed (%s); next in %.1fs", event_id, attempts, outcome, delay)
    return delay


def overdue_events(rt: Runtime, grace_s: float) -> list[str]:
    """Events whose next try is long past: their task message was lost."""
    return rt.store.r.zrangebyscore(PENDING, "-inf", time.time() - grace_s, start=0, num=500)
