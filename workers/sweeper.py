"""The sweeper: re-drives whatever a lost message or a dead worker left behind, and applies expiry.

Run periodically by celery beat. It decides only from state in Redis, so running it twice, or from two beats at
once, is harmless; a lock keeps two sweeps from overlapping anyway.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from shared import metrics
from shared.file_service import expire_files
from shared.queue import CHUNKS_QUEUE
from shared.store import batch_key
from workers import webhooks
from workers.runtime import Runtime

log = logging.getLogger("batchgate.sweeper")

LOCK_KEY = "bg:sweeper:lock"


@dataclass
class Repairs:
    orchestrate: list[str] = field(default_factory=list)
    chunks: list[tuple[str, int]] = field(default_factory=list)
    finalize: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    files_deleted: int = 0
    webhooks: list[str] = field(default_factory=list)


@dataclass
class Dispatch:
    orchestrate: Callable[[str], None]
    chunk: Callable[[str, int], None]
    finalize: Callable[[str], None]
    webhook: Callable[[str], None] = lambda event_id: None


def _age(fields: dict, name: str, now: float) -> float:
    value = fields.get(name)
    return now - float(value) if value else float("inf")


def sweep(rt: Runtime, dispatch: Dispatch) -> Repairs | None:
    store, settings = rt.store, rt.settings
    token = str(time.time())
    if not store.r.set(LOCK_KEY, token, nx=True, px=int(max(settings.sweep_interval_s, 1) * 2000)):
        return None
    repairs = Repairs()
    try:
        now = time.time()
        queue_idle = store.r.llen(CHUNKS_QUEUE) == 0
        for batch_id in store.active_batch_ids():
            _sweep_batch(rt, batch_id, now, queue_idle, dispatch, repairs)
        repairs.files_deleted = expire_files(store, rt.blobs, int(now))
        for event_id in webhooks.overdue_events(rt, grace_s=max(settings.redrive_after_s, 30.0)):
            dispatch.webhook(event_id)
            repairs.webhooks.append(event_id)
    finally:
        if store.r.get(LOCK_KEY) == token:
            store.r.delete(LOCK_KEY)
    counts = {"orchestrate": len(repairs.orchestrate), "chunk": len(repairs.chunks),
              "finalize": len(repairs.finalize), "expire": len(repairs.expired), "file_deleted": repairs.files_deleted,
              "webhook": len(repairs.webhooks)}
    for kind, n in counts.items():
        if n:
            metrics.increment(store.r, "sweeper_repairs", kind, n)
    if repairs.orchestrate or repairs.chunks or repairs.finalize or repairs.expired:
        log.warning("sweeper repairs: %s", repairs)
    return repairs


def _sweep_batch(rt: Runtime, batch_id: str, now: float, queue_idle: bool, dispatch: Dispatch, repairs: Repairs) -> None:
    store, settings = rt.store, rt.settings
    fields = store.batch_fields(batch_id)
    if not fields:
        store.r.zrem("bg:active", batch_id)
        return
    status = fields["status"]
    planned = "n_chunks" in fields
    redrive_after = settings.redrive_after_s

    if int(fields.get("expires_at", 0) or 0) <= now and status in ("validating", "in_progress") and not fields.get("stop"):
        if planned:
            store.r.hsetnx(batch_key(batch_id), "stop", "expired")
        else:
            moved, _ = store.transition(batch_id, ("validating",), "expired", int(now), timestamp_field="expired_at",
                                        fields={"completed": "0", "failed": "0"}, terminal=True)
            if moved:
                webhooks.batch_finished(rt, batch_id, "expired")
        repairs.expired.append(batch_id)
        return

    if not planned:
        if status in ("validating", "cancelling") and _age(fields, "updated_at", now) > redrive_after:
            if _age(fields, "orchestrate_sent_at", now) > redrive_after:
                store.set_batch_fields(batch_id, {"orchestrate_sent_at": str(int(now))})
                dispatch.orchestrate(batch_id)
                repairs.orchestrate.append(batch_id)
        return

    n_chunks = int(fields["n_chunks"])
    done = store.done_chunks(batch_id)
    if len(done) >= n_chunks:
        if _age(fields, "finalize_sent_at", now) > redrive_after and _age(fields, "updated_at", now) > redrive_after / 2:
            store.set_batch_fields(batch_id, {"finalize_sent_at": str(int(now))})
            dispatch.finalize(batch_id)
            repairs.finalize.append(batch_id)
        return

    missing = [i for i in range(n_chunks) if i not in done]
    leased = store.lease_held(batch_id, missing)
    attempts = store.r.hgetall(f"{batch_key(batch_id)}:attempts")
    redriven = store.r.hgetall(f"{batch_key(batch_id)}:redriven")
    for index, held in zip(missing, leased):
        if held:
            continue
        started = str(index) in attempts
        last_sent = max(float(redriven.get(str(index), 0)), float(fields.get("dispatched_at", 0)))
        if now - last_sent <= redrive_after:
            continue
        # A started chunk with no live lease lost its runner; one never started was lost with its message,
        # which is only certain when nothing is waiting in the queue.
        if started or queue_idle:
            store.r.hset(f"{batch_key(batch_id)}:redriven", str(index), str(int(now)))
            dispatch.chunk(batch_id, index)
            repairs.chunks.append((batch_id, index))
