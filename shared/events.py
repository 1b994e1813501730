"""One log line per batch event, for people: created, and how it ended (counts and duration, or why it failed).

They go to the `batchgate.events` logger at INFO, so they are in every deployment's logs, and `batchgate dev`
shows them on its console (cli/console.py), where per-request and per-sweep lines would drown them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.lifecycle import BatchSpec, Ending

log = logging.getLogger("batchgate.events")


def size(n: int) -> str:
    for unit, scale in (("MB", 1024 * 1024), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 1:
        return "under 1 s"  # created_at is kept in whole seconds
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02} min"


def created(spec: "BatchSpec", filename: str, n_bytes: int, provider: str | None = None) -> None:
    via = f", provider {provider}" if provider else ""
    log.info("%s created: %s, input %s (%s, %s)%s", spec.id, spec.endpoint, spec.input_file_id, filename,
             size(n_bytes), via, extra={"batch_id": spec.id, "event": "batch.created"})


def ended(batch_id: str, status: str, ending: "Ending", seconds: float | None, why: str) -> None:
    """A terminal move was applied: `status` is completed, failed, expired or cancelled."""
    took = f" in {duration(seconds)}" if seconds is not None else ""
    done = ending.completed + ending.failed
    if status == "failed":
        errors = ending.errors or []
        if errors:
            first = errors[0]
            where = f" (line {first['line']})" if first.get("line") else ""
            more = f"; {len(errors) - 1} more error(s)" if len(errors) > 1 else ""
            reason = f"{first.get('code')}: {first.get('message')}{where}{more}"
        else:
            reason = why
        log.warning("%s failed%s: %s", batch_id, took, reason, extra={"batch_id": batch_id, "event": "batch.failed"})
        return
    counts = f"{ending.completed}/{done} ok, {ending.failed} failed"
    log.info("%s %s: %s%s", batch_id, status, counts, took, extra={"batch_id": batch_id, "event": f"batch.{status}"})


def queued(batch_id: str, reason: str) -> None:
    """A planned batch waits for room under its tenant's max_enqueued_requests."""
    log.info("%s waits in line: %s", batch_id, reason, extra={"batch_id": batch_id, "event": "batch.queued"})
