"""Orchestrating a batch: validate its input in one pass, plan its chunks, and move it to `in_progress`."""

from __future__ import annotations

import logging
import time

import orjson

from shared.blobs import BlobNotFound
from shared.schemas import TERMINAL_STATUSES
from workers.chunk import batch_input_key
from workers.pool import pool_processes
from workers.runtime import Runtime
from workers.validation import LineError, chunk_size_for, plan_chunks, scan_input
from workers.webhooks import batch_finished

log = logging.getLogger("batchgate.orchestrate")


def _fail(rt: Runtime, batch_id: str, errors: list[LineError]) -> None:
    moved, _ = rt.store.transition(
        batch_id,
        ("validating",),
        "failed",
        int(time.time()),
        timestamp_field="failed_at",
        fields={
            "errors": orjson.dumps({"object": "list", "data": [e.as_dict() for e in errors]}).decode(),
            "completed": "0",
            "failed": "0",
        },
        terminal=True,
    )
    if moved:
        batch_finished(rt, batch_id, "failed")


def orchestrate(rt: Runtime, batch_id: str) -> list[int]:
    """Validate and plan. Returns the chunk indexes to dispatch (empty when there is nothing to run)."""
    store, settings = rt.store, rt.settings
    fields = store.batch_fields(batch_id)
    status = fields.get("status")
    if not fields or status in TERMINAL_STATUSES:
        return []
    if "n_chunks" in fields:
        # Planned already (a re-delivered orchestrate): send whatever has not committed yet.
        done = store.done_chunks(batch_id)
        return [i for i in range(int(fields["n_chunks"])) if i not in done]
    if status == "cancelling":
        moved, _ = store.transition(batch_id, ("cancelling",), "cancelled", int(time.time()),
                                    timestamp_field="cancelled_at", fields={"completed": "0", "failed": "0"},
                                    terminal=True)
        if moved:
            batch_finished(rt, batch_id, "cancelled")
        return []

    record = store.get_file(fields["input_file_id"])
    try:
        if record is None:
            raise BlobNotFound(fields["input_file_id"])
        rt.blobs.link(record.blob_key, batch_input_key(batch_id))
    except BlobNotFound:
        _fail(rt, batch_id, [LineError("file_not_found", f"The input file {fields['input_file_id']} no longer exists.")])
        return []

    size = rt.blobs.size(batch_input_key(batch_id))
    if size > settings.max_batch_input_bytes:
        _fail(rt, batch_id, [LineError(
            "file_too_large",
            f"The batch input file is larger than the {settings.max_batch_input_bytes} maximum. "
            "Please try again with a smaller batch.",
        )])
        return []
    with rt.blobs.open(batch_input_key(batch_id)) as source:
        scan = scan_input(source, fields["endpoint"], max_lines=settings.max_batch_lines)
    if scan.errors:
        _fail(rt, batch_id, scan.errors)
        return []

    provider = rt.providers.get(fields.get("provider", "")) or rt.providers.for_tenant_model(
        fields.get("tenant", ""), scan.model
    )
    if provider is None:
        _fail(rt, batch_id, [LineError("provider_not_allowed",
                                       f"No provider this API key may use serves the model '{scan.model}'.")])
        return []
    size_per_chunk = chunk_size_for(
        scan.total,
        target_chunks=settings.chunk_target_count,
        minimum=settings.chunk_min_requests,
        maximum=settings.chunk_max_requests,
        concurrency=provider.max_concurrency,
        waves=settings.chunk_waves,
        processes=pool_processes(store.r),
    )
    if provider.rpm:
        # A rate-limited chunk must still finish well inside its time limit.
        size_per_chunk = max(1, min(size_per_chunk, provider.rpm * settings.chunk_time_limit_s // 120))
    chunks = plan_chunks(scan, size_per_chunk)
    now = int(time.time())
    store.save_plan(
        batch_id,
        chunks,
        {"total": str(scan.total), "model": scan.model or "", "provider": provider.name, "dispatched_at": str(now)},
    )
    moved, status = store.transition(batch_id, ("validating",), "in_progress", now, timestamp_field="in_progress_at")
    if not moved and status in TERMINAL_STATUSES:
        return []
    log.info("batch %s: %d requests in %d chunks of %d", batch_id, scan.total, len(chunks), size_per_chunk)
    return [c.index for c in chunks]
