"""A batch's progress over time: the history the store samples as chunks commit, with the rate and time left.

The store (SAMPLE_PROGRESS in shared/lua.py) keeps at most one sample every 2 s, at most 500, thinned evenly as a
run grows long, so a page opened late still draws the whole run. Here the samples become the series a client draws:
it starts at `in_progress_at` with nothing done and ends with the batch's counts now (or at its end).
"""

from __future__ import annotations

import time

from shared import batch_service
from shared.schemas import Batch, BatchProgress, ProgressSample
from shared.store import Store

RATE_WINDOW_S = 10.0  # the rate is measured over about the last this many seconds
RUNNING = ("in_progress", "finalizing", "cancelling")


def _ended_at(batch: Batch) -> int | None:
    return batch.completed_at or batch.failed_at or batch.expired_at or batch.cancelled_at


def series(samples: list[tuple[float, int, int]], batch: Batch, now: float) -> list[ProgressSample]:
    points = [ProgressSample(t=t, completed=c, failed=f) for t, c, f in samples]
    start = batch.in_progress_at
    if start is not None and (not points or points[0].t > start):
        points.insert(0, ProgressSample(t=start, completed=0, failed=0))
    end = now if batch.status in RUNNING else _ended_at(batch)
    if points and end is not None and end > points[-1].t:
        counts = batch.request_counts
        points.append(ProgressSample(t=round(end, 3), completed=counts.completed, failed=counts.failed))
    return points


def rate(points: list[ProgressSample], window_s: float = RATE_WINDOW_S) -> float | None:
    """Requests finished per second between the last point and the last one at least `window_s` before it (or the
    first point, in a shorter history)."""
    if len(points) < 2:
        return None
    last = points[-1]
    earlier = [p for p in points[:-1] if p.t <= last.t - window_s]
    base = earlier[-1] if earlier else points[0]
    if last.t <= base.t:
        return None
    return max(0.0, (last.completed + last.failed - base.completed - base.failed) / (last.t - base.t))


def progress(batch: Batch, samples: list[tuple[float, int, int]], now: float) -> BatchProgress:
    points = series(samples, batch, now)
    if batch.status != "in_progress":
        return BatchProgress(data=points)
    per_second = rate(points)
    counts = batch.request_counts
    left = max(0, counts.total - counts.completed - counts.failed)
    eta = None
    if left == 0:
        eta = 0.0
    elif per_second:
        eta = round(left / per_second, 1)
    return BatchProgress(data=points, requests_per_second=None if per_second is None else round(per_second, 2),
                         eta_seconds=eta)


def batch_progress(store: Store, scope: str, batch_id: str, now: float | None = None) -> BatchProgress:
    """What `GET /v1/batches/{id}/progress` answers; a batch outside `scope` is the API's 404."""
    batch = batch_service.get_batch(store, scope, batch_id)
    return progress(batch, store.progress_samples(batch_id), time.time() if now is None else now)
