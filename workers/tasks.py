"""Celery tasks: thin wrappers that dispatch and re-dispatch; the work lives in plain functions."""

from __future__ import annotations

import logging

from shared.settings import get_settings
from shared.queue import (
    CHUNKS_QUEUE,
    CONTROL_QUEUE,
    DELIVER_WEBHOOK,
    FINALIZE,
    FORWARD,
    ORCHESTRATE,
    RUN_CHUNK,
    RUN_WORK,
    SWEEP,
)
from workers import chunk, finalize, forward, orchestrate, runner, sweeper, webhooks
from workers.celery_app import app
from workers.runtime import get_runtime

log = logging.getLogger("batchgate.tasks")


def send_tickets(n: int) -> None:
    for _ in range(n):
        run_work_task.apply_async(queue=CHUNKS_QUEUE)


def send_finalize(batch_id: str) -> None:
    finalize_task.apply_async(args=[batch_id], queue=CONTROL_QUEUE)


def send_orchestrate(batch_id: str) -> None:
    orchestrate_task.apply_async(args=[batch_id], queue=CONTROL_QUEUE)


def send_forward(batch_id: str, token: str | None, countdown: float = 0.0) -> None:
    forward_task.apply_async(args=[batch_id, token], queue=CONTROL_QUEUE, countdown=countdown or None)


def send_webhook(event_id: str) -> None:
    deliver_webhook_task.apply_async(args=[event_id], queue=CONTROL_QUEUE)


def _send_event(batch_id: str, status: str | None) -> None:
    """The fast path of a finished batch's webhook; the sweeper delivers it if this message is lost."""
    if status is None:
        return
    rt = get_runtime()
    record = rt.store.batch_record(batch_id)
    event_id = webhooks.event_for(rt, batch_id, status, record.spec.tenant if record else "")
    if event_id is not None:
        send_webhook(event_id)


@app.task(name=ORCHESTRATE, ignore_result=True)
def orchestrate_task(batch_id: str) -> None:
    rt = get_runtime()
    indexes = orchestrate.orchestrate(rt, batch_id, start_other=send_orchestrate, forward=send_forward)
    if not indexes:
        record = rt.store.batch_record(batch_id)
        if record is not None and record.state.terminal:
            _send_event(batch_id, record.state.status)
        return
    # Finalize is sent by the run that commits the last chunk, or else by the sweeper.
    record = rt.store.batch_record(batch_id)
    if record is not None:
        runner.release(rt, record, indexes)
        send_tickets(runner.tickets_for(rt, len(indexes)))


def _work_time_limit() -> int:
    settings = get_settings()
    return int(settings.chunk_time_limit_s + settings.runner_budget_s + 60)


@app.task(name=RUN_WORK, bind=True, ignore_result=True, time_limit=_work_time_limit(),
          soft_time_limit=_work_time_limit() - 10)
def run_work_task(self) -> None:
    rt = get_runtime()
    stopped_early = rt.run(runner.serve(rt, self.request.hostname or "", rt.settings.runner_budget_s, send_finalize))
    if stopped_early:
        send_tickets(1)  # a no-op for the process that takes it when nothing is left


@app.task(name=RUN_CHUNK, bind=True, max_retries=None)
def run_chunk_task(self, batch_id: str, index: int) -> int:
    """A chunk sent on its own (by versions before the scheduler, or by hand)."""
    try:
        finished_batch = chunk.run_chunk(get_runtime(), batch_id, index, node=self.request.hostname or "")
    except chunk.LeaseHeld as held:
        raise self.retry(countdown=held.retry_in, max_retries=None) from None
    except Exception:  # noqa: BLE001 - a chunk never fails its chord; the sweeper re-drives uncommitted chunks
        log.exception("chunk %d of %s failed; the sweeper will run it again", index, batch_id)
        return index
    if finished_batch:
        send_finalize(batch_id)
    return index


@app.task(name=FINALIZE, ignore_result=True)
def finalize_task(batch_id: str) -> None:
    rt = get_runtime()
    status = finalize.finalize(rt, batch_id)
    _send_event(batch_id, status)
    if status is not None:
        # The batch's requests no longer count against its tenant's cap: start what waited for the room.
        for waiting in sweeper.admit_waiting(rt, rt.store.batch_record(batch_id)):
            send_orchestrate(waiting)


@app.task(name=FORWARD, ignore_result=True)
def forward_task(batch_id: str, token: str | None = None) -> None:
    """One step of a batch forwarded to its provider's Batch API; the step hands the chain on to the next one.
    Without a token it is a one-off step (sent after a cancel), and the chain carries on as it was."""
    rt = get_runtime()
    result = forward.step(rt, batch_id, token)
    if result.ended is not None:
        _send_event(batch_id, result.ended)
        return
    if result.delay is None or token is None:
        return
    nxt = forward.hand_on(rt, batch_id, token, result.delay)
    if nxt is not None:
        send_forward(batch_id, nxt, result.delay)


@app.task(name=SWEEP, ignore_result=True)
def sweep_task() -> None:
    sweeper.sweep(get_runtime(), sweeper.Dispatch(send_orchestrate, send_finalize, send_webhook,
                                                  send_tickets, send_forward))


@app.task(name=DELIVER_WEBHOOK, bind=True, ignore_result=True, max_retries=None)
def deliver_webhook_task(self, event_id: str) -> None:
    retry_in = webhooks.deliver(get_runtime(), event_id)
    if retry_in is not None:
        raise self.retry(countdown=retry_in)
