"""Orchestrating a batch: validate its input in one pass, plan its chunks, and start it.

Running it again at any point is harmless: a batch planned already is only started (if the run that planned it died
before the move) and its uncommitted chunks are returned to be sent.
"""

from __future__ import annotations

import logging
import time

import uuid
from typing import Callable

from shared import events, forwarding
from shared.blobs import BlobNotFound

from shared.lifecycle import CANCELLING, IN_PROGRESS, QUEUED, VALIDATING, BatchRecord, Ending
from shared.providers import Provider
from shared.blob_keys import batch_input_key
from workers.runtime import Runtime
from workers.validation import LineError, chunk_size_for, plan_chunks, scan_input

log = logging.getLogger("batchgate.orchestrate")

# A chunk's input is read whole; this bounds what one read holds, whatever the lines' sizes.
MAX_CHUNK_BYTES = 32 * 1024 * 1024


def _fail(rt: Runtime, record: BatchRecord, errors: list[LineError]) -> None:
    rt.lifecycle.fail(record, time.time(), [e.as_dict() for e in errors])


def fail_if_over_cap(rt: Runtime, record: BatchRecord, total: int, cap: int) -> bool:
    """A batch bigger than its tenant's whole cap can never start: it fails (also once it waits in line, when the
    cap was lowered meanwhile, so it does not hold up the line behind it)."""
    if total <= cap:
        return False
    _fail(rt, record, [LineError(
        "token_limit_exceeded",
        f"This batch has {total:,} requests, more than the {cap:,} this API key may have enqueued at once "
        "(max_enqueued_requests). Split it into smaller batches.")])
    return True


def admit(rt: Runtime, record: BatchRecord, total: int, now: float, start_other: Callable[[str], None]) -> bool:
    """Whether a planned batch may start: its tenant has no max_enqueued_requests, or room under it. Otherwise it
    waits in line (`queued`), or fails at once when it alone is over the cap. Batches the line lets in before it
    are passed to `start_other`."""
    tenant = record.spec.tenant
    cap = rt.providers.max_enqueued_requests(tenant)
    if cap is None or record.state.admitted:
        return True
    if fail_if_over_cap(rt, record, total, cap):
        return False
    admitted = rt.store.admit(tenant, cap, record.id, place=now)
    for other in admitted:
        if other != record.id:
            start_other(other)
    if record.id in admitted:
        return True
    if record.state.status == VALIDATING:
        used = rt.store.enqueued_requests(tenant)
        reason = (f"Waiting for room under this API key's limit of {cap:,} enqueued requests (max_enqueued_requests): "
                  f"{used:,} are in batches that have not finished, and this batch has {total:,}.")
        if rt.lifecycle.queue(record, now, reason).moved:
            events.queued(record.id, reason)
    return False


def _admit_and_start(rt: Runtime, record: BatchRecord, total: int, now: float,
                     start_other: Callable[[str], None]) -> bool:
    """Whether the planned batch runs now: let in under its tenant's cap and moved to `in_progress` (or found
    there, or `cancelling`: its chunks then write their cancelled lines)."""
    if not admit(rt, record, total, now, start_other):
        return False
    outcome = rt.lifecycle.start(record, now)
    return outcome.moved or outcome.status in (CANCELLING, IN_PROGRESS)


def _resume(rt: Runtime, record: BatchRecord, start_other: Callable[[str], None]) -> list[int]:
    """A planned batch: start it if the planning run died before doing so (or it waited in line and may start
    now), and return its uncommitted chunks."""
    if record.state.status in (VALIDATING, QUEUED):
        if not _admit_and_start(rt, record, record.state.total, time.time(), start_other):
            return []
    done = rt.store.done_chunks(record.id)
    return [i for i in range(record.state.n_chunks or 0) if i not in done]


def hand_to_provider(rt: Runtime, record: BatchRecord, total: int, model: str | None, provider: Provider,
                     forward: Callable[[str, str], None]) -> None:
    """A batch for a provider with a Batch API of its own (batch_api = native): no chunks, a chain of forward steps
    (workers/forward.py) instead. Its window must be the provider's 24h or longer."""
    if forwarding.window_too_short(rt.settings, record.spec.completion_window):
        _fail(rt, record, [LineError(forwarding.WINDOW_TOO_SHORT, forwarding.window_message(
            record.spec.completion_window, provider.name))])
        return
    now = time.time()
    token = uuid.uuid4().hex[:16]
    rt.store.save_forward(record.id, forward=1, total=total, model=model or "", provider=provider.name,
                          dispatched_at=int(now), forward_interval=rt.settings.forward_poll_min_s)
    rt.store.hand_on_forward(record.id, None, token, now)
    log.info("batch %s: %d requests forwarded to provider %s's Batch API", record.id, total, provider.name)
    forward(record.id, token)


def orchestrate(rt: Runtime, batch_id: str, start_other: Callable[[str], None] = lambda batch_id: None,
                forward: Callable[[str, str], None] = lambda batch_id, token: None) -> list[int]:
    """Validate and plan. Returns the chunk indexes to dispatch (empty when there is nothing to run, or the batch
    waits for room under its tenant's cap); `start_other` is given batches that room was found for meanwhile, and
    `forward` (batch id, chain token) a batch handed to its provider's own Batch API."""
    store, settings = rt.store, rt.settings
    record = store.batch_record(batch_id)
    if record is None or record.state.terminal:
        return []
    if record.state.forwarded:
        return []  # a repeated message: its chain of forward steps (or the sweeper) carries the batch on
    if record.state.planned:
        return _resume(rt, record, start_other)
    if record.state.status == CANCELLING:
        rt.lifecycle.end(record, "end_cancelled", time.time(), Ending())
        return []

    spec = record.spec
    uploaded = store.get_file(spec.input_file_id)
    try:
        if uploaded is None:
            raise BlobNotFound(spec.input_file_id)
        rt.blobs.link(uploaded.blob_key, batch_input_key(batch_id))
    except BlobNotFound:
        _fail(rt, record, [LineError("file_not_found", f"The input file {spec.input_file_id} no longer exists.")])
        return []

    size = rt.blobs.size(batch_input_key(batch_id))
    if size > settings.max_batch_input_bytes:
        _fail(rt, record, [LineError(
            "file_too_large",
            f"The batch input file is larger than the {settings.max_batch_input_bytes} maximum. "
            "Please try again with a smaller batch.",
        )])
        return []
    with rt.blobs.open(batch_input_key(batch_id)) as source:
        scan = scan_input(source, spec.endpoint, max_lines=settings.max_batch_lines,
                          max_line_bytes=settings.max_line_bytes)
    if scan.errors:
        _fail(rt, record, scan.errors)
        return []
    # GET /v1/batches/{id}/requests/{custom_id} finds a request by its place (shared/results.py).
    store.save_custom_ids(batch_id, scan.custom_ids)

    provider = rt.providers.get(record.state.provider or "") or rt.providers.for_tenant_model(spec.tenant, scan.model)
    if provider is None:
        _fail(rt, record, [LineError("provider_not_allowed",
                                     f"No provider this API key may use serves the model '{scan.model}'.")])
        return []
    if provider.batch_api == "native":
        hand_to_provider(rt, record, scan.total, scan.model, provider, forward)
        return []
    size_per_chunk = chunk_size_for(
        scan.total,
        minimum=settings.chunk_min_requests,
        maximum=settings.chunk_max_requests,
        concurrency=provider.max_concurrency,
        waves=settings.chunk_waves,
        processes=store.pool_processes(),
    )
    if provider.rpm:
        # A rate-limited chunk must still finish well inside its time limit.
        size_per_chunk = max(1, min(size_per_chunk, provider.rpm * settings.chunk_time_limit_s // 120))
    chunks = plan_chunks(scan, size_per_chunk, max_bytes=MAX_CHUNK_BYTES)
    now = time.time()
    store.save_plan(
        batch_id,
        chunks,
        {"total": str(scan.total), "model": scan.model or "", "provider": provider.name,
         "dispatched_at": str(int(now))},
    )
    if not _admit_and_start(rt, record, scan.total, now, start_other):
        return []
    log.info("batch %s: %d requests in %d chunks of %d", batch_id, scan.total, len(chunks), size_per_chunk)
    return [c.index for c in chunks]
