"""Finalizing a batch: join its chunks' parts into the output and error files and set its terminal status.

Runs only when every chunk has committed, and is idempotent: the files have ids derived from the batch, every
write replaces whole blobs, and the terminal move is a compare-and-set.
"""

from __future__ import annotations

import logging
import time

import orjson

from shared.blobs import concat_blobs
from shared.file_service import file_blob_key
from shared.ids import derived_file_id
from shared.schemas import TERMINAL_STATUSES, FileObject
from shared.store import FileRecord
from shared.usage import record_tenant_usage
from workers.chunk import part_key
from workers.runtime import Runtime
from workers.usage import Usage
from workers.webhooks import batch_finished

log = logging.getLogger("batchgate.finalize")

# The status a batch ends in, by why its chunks stopped.
_ENDINGS = {None: ("completed", "completed_at"), "cancelled": ("cancelled", "cancelled_at"),
            "expired": ("expired", "expired_at")}


def _register(rt: Runtime, batch_id: str, kind: str, parts: list[str], scope: str, ttl: int, now: int) -> str | None:
    if not parts:
        return None
    file_id = derived_file_id(batch_id, kind)
    size = concat_blobs(rt.blobs, parts, file_blob_key(file_id))
    file = FileObject(
        id=file_id, bytes=size, created_at=now, expires_at=now + ttl, filename=f"{batch_id}_{kind}.jsonl",
        purpose="batch_output",
    )
    rt.store.put_file(FileRecord(file, scope, file_blob_key(file_id)))
    return file_id


def finalize(rt: Runtime, batch_id: str) -> str | None:
    """Finish the batch if every chunk has committed. Returns the terminal status it set, else None."""
    store = rt.store
    fields = store.batch_fields(batch_id)
    if not fields or fields.get("status") in TERMINAL_STATUSES or "n_chunks" not in fields:
        return None
    n_chunks = int(fields["n_chunks"])
    counts = store.chunk_counts(batch_id)
    if len(counts) < n_chunks:
        return None

    stop = store.stop_reason(batch_id)
    status, timestamp_field = _ENDINGS[stop]
    now = int(time.time())
    if status == "completed":
        moved, current = store.transition(batch_id, ("in_progress",), "finalizing", now, timestamp_field="finalizing_at")
        if not moved and current != "finalizing":
            if current == "cancelling":
                status, timestamp_field = _ENDINGS["cancelled"]
            else:
                return None

    out_parts, err_parts = [], []
    usage = Usage()
    completed = failed = 0
    for index in range(n_chunks):
        chunk = counts[index]
        completed += chunk["completed"]
        failed += chunk["failed"]
        usage.merge(chunk["usage"])
        if chunk["completed"]:
            out_parts.append(part_key(batch_id, index, chunk["run"], "out"))
        if chunk["failed"]:
            err_parts.append(part_key(batch_id, index, chunk["run"], "err"))

    ttl = int(fields.get("output_ttl") or rt.settings.output_default_ttl_s)
    output_file_id = _register(rt, batch_id, "output", out_parts, fields["scope"], ttl, now)
    error_file_id = _register(rt, batch_id, "error", err_parts, fields["scope"], ttl, now)
    moved, _ = store.transition(
        batch_id,
        ("in_progress", "finalizing", "cancelling"),
        status,
        int(time.time()),
        timestamp_field=timestamp_field,
        fields={
            "completed": str(completed),
            "failed": str(failed),
            "usage": orjson.dumps(usage.as_batch_usage()).decode(),
            "output_file_id": output_file_id or "",
            "error_file_id": error_file_id or "",
        },
        terminal=True,
    )
    if moved:
        record_tenant_usage(store, fields.get("tenant", ""), usage, completed, failed)
        batch_finished(rt, batch_id, status)
        rt.blobs.delete_prefix(f"batches/{batch_id}")
        log.info("batch %s %s: %d completed, %d failed", batch_id, status, completed, failed)
        return status
    return None
