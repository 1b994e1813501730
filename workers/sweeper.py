"""The sweeper: carries out the recovery rules of shared/recovery.py for every active batch, delivers the outbox
(due clean-ups, webhooks whose message was lost) and deletes expired files.

Run periodically by celery beat. It decides only from state in Redis, so running it twice, or from two beats at
once, is harmless; a lock keeps two sweeps from overlapping anyway.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from shared.blob_keys import batch_blob_prefix
from shared.file_service import expire_files
from shared.lifecycle import USAGE_CEILING, BatchRecord, Ending
from shared.queue import CHUNKS_QUEUE
from shared.recovery import Action, Timing, recover
from workers import chunk, orchestrate, runner, webhooks
from workers.runtime import Runtime

log = logging.getLogger("batchgate.sweeper")


@dataclass
class Repairs:
    actions: list[tuple[str, str]] = field(default_factory=list)  # (batch id, action kind)
    chunks: list[tuple[str, int]] = field(default_factory=list)
    files_deleted: int = 0
    cleaned: list[str] = field(default_factory=list)
    webhooks: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[str]:
        return [batch_id for batch_id, k in self.actions if k == kind]


@dataclass
class Dispatch:
    orchestrate: Callable[[str], None]
    finalize: Callable[[str], None]
    webhook: Callable[[str], None] = lambda event_id: None
    tickets: Callable[[int], None] = lambda n: None
    forward: Callable[[str, str], None] = lambda batch_id, token: None


def sweep(rt: Runtime, dispatch: Dispatch) -> Repairs | None:
    store, settings = rt.store, rt.settings
    token = str(time.time())
    if not store.acquire_sweeper_lock(token, max(settings.sweep_interval_s, 1) * 2):
        return None
    repairs = Repairs()
    try:
        now = time.time()
        queue_idle = store.queue_depth(CHUNKS_QUEUE) == 0
        timing = Timing(redrive_after_s=settings.redrive_after_s)
        for batch_id in store.active_batch_ids():
            try:
                _sweep_batch(rt, batch_id, now, timing, dispatch, repairs)
            except Exception:  # noqa: BLE001 - one batch's trouble must not stop the others' recovery
                log.exception("sweeping %s failed", batch_id)
        if store.tenants_with_work() and queue_idle and now - store.last_take() > settings.redrive_after_s / 3:
            # Chunks are waiting, no ticket is and no runner took one lately: the messages that would run them were
            # lost.
            dispatch.tickets(max(1, store.pool_processes()))
            repairs.actions.append(("", "tickets"))
        for batch_id in store.due_cleanups(now):
            clean_up(rt, batch_id)
            repairs.cleaned.append(batch_id)
        repairs.files_deleted = expire_files(store, rt.blobs, int(now))
        for event_id in webhooks.due_events(rt):
            dispatch.webhook(event_id)
            repairs.webhooks.append(event_id)
    finally:
        store.release_sweeper_lock(token)
    counts: dict[str, int] = {}
    for _, kind in repairs.actions:
        counts[kind] = counts.get(kind, 0) + 1
    counts.update({"file_deleted": repairs.files_deleted, "webhook": len(repairs.webhooks),
                   "cleanup": len(repairs.cleaned)})
    for kind, n in counts.items():
        if n:
            store.increment("sweeper_repairs", kind, n)
    if repairs.actions:
        log.warning("sweeper repairs: %s", repairs.actions)
    return repairs


def _sweep_batch(rt: Runtime, batch_id: str, now: float, timing: Timing, dispatch: Dispatch,
                 repairs: Repairs) -> None:
    store = rt.store
    record = store.batch_record(batch_id)
    if record is None:
        store.forget_active(batch_id)
        return
    if record.state.terminal:  # a terminal move always leaves the active set; this is a record from before that
        store.forget_active(batch_id)
        return
    facts = store.execution_facts(batch_id, record.state.n_chunks or 0) if record.state.planned else None
    leased = store.forward_leased(batch_id) if record.state.forwarded else False
    for action in recover(record, facts, now, timing, forward_leased=leased):
        _carry_out(rt, record, action, now, dispatch, repairs)


def _carry_out(rt: Runtime, record, action: Action, now: float, dispatch: Dispatch, repairs: Repairs) -> None:
    store, batch_id = rt.store, record.id
    repairs.actions.append((batch_id, action.kind))
    if action.kind in ("orchestrate", "start"):
        # For "start" the planning run died before starting the batch; orchestrate starts it and sends its chunks.
        store.mark_sent(batch_id, "orchestrate", now)
        dispatch.orchestrate(batch_id)
    elif action.kind == "admit":
        cap = rt.providers.max_enqueued_requests(record.spec.tenant)
        if cap is not None and orchestrate.fail_if_over_cap(rt, record, record.state.total, cap):
            return
        for batch_id in admit_waiting(rt, record):
            store.mark_sent(batch_id, "orchestrate", now)
            dispatch.orchestrate(batch_id)
    elif action.kind == "expire":
        rt.lifecycle.end(record, "expire", now, Ending())
    elif action.kind == "end_cancelled":
        rt.lifecycle.end(record, "end_cancelled", now, Ending())
    elif action.kind == "stop":
        store.set_stop(batch_id, action.reason or "expired")
    elif action.kind == "close_chunks":
        last = False
        for index in action.chunks:
            last = chunk.run_chunk(rt, batch_id, index, node="sweeper", close=action.reason) or last
            repairs.chunks.append((batch_id, index))
        if last:
            dispatch.finalize(batch_id)
    elif action.kind == "redrive_chunks":
        for index in action.chunks:
            store.mark_redriven(batch_id, index, now)
            repairs.chunks.append((batch_id, index))
        runner.release(rt, record, list(action.chunks))
        dispatch.tickets(runner.tickets_for(rt, len(action.chunks)))
    elif action.kind == "finalize":
        store.mark_sent(batch_id, "finalize", now)
        dispatch.finalize(batch_id)
    elif action.kind == "forward":
        token = uuid.uuid4().hex[:16]  # the lost chain's steps find another token and drop
        store.hand_on_forward(batch_id, None, token, now)
        dispatch.forward(batch_id, token)


def admit_waiting(rt: Runtime, record: BatchRecord | None) -> list[str]:
    """Let in the batches of `record`'s tenant that wait for room under its cap; returns those to start."""
    if record is None:
        return []
    tenant = record.spec.tenant
    cap = rt.providers.max_enqueued_requests(tenant)
    return rt.store.admit(tenant, cap if cap is not None else USAGE_CEILING)


def clean_up(rt: Runtime, batch_id: str) -> None:
    """Delete a finished batch's working blobs and execution keys (its record and files stay)."""
    record = rt.store.batch_record(batch_id)
    if record is not None and not record.state.terminal:
        rt.store.cleanup_done(batch_id)  # restored from before its end: it is running again, keep its state
        return
    rt.blobs.delete_prefix(batch_blob_prefix(batch_id))
    if record is not None:
        rt.store.delete_working_state(batch_id, record.state.n_chunks or 0)
    rt.store.cleanup_done(batch_id)
