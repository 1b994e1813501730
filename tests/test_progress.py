"""A batch's progress history: sampled by the store as chunks commit (real redis-server), read as a series with a
rate and an ETA."""

from __future__ import annotations

import time

import pytest

from shared import keys
from shared.lifecycle import MOVES, BatchSpec
from shared.progress import batch_progress, progress, rate, series
from shared.errors import NotFound
from shared.schemas import Batch, ProgressSample
from shared.store import Store
from shared.store_exec import SAMPLE_GAP_MS, ChunkCommit, ChunkSpec, Segment


@pytest.fixture
def store(redis_client):
    return Store(redis_client)


def _started_batch(store: Store, batch_id: str = "batch_p", n_lines: tuple[int, ...] = (4, 4)) -> str:
    store.put_batch(BatchSpec(id=batch_id, tenant="t", scope="t", endpoint="/v1/chat/completions",
                              input_file_id="file-1", completion_window="24h", created_at=int(time.time()) - 5,
                              expires_at=int(time.time()) + 86400))
    chunks, line = [], 1
    for i, n in enumerate(n_lines):
        chunks.append(ChunkSpec(i, i * 100, i * 100 + 100, line, n))
        line += n
    store.save_plan(batch_id, chunks, {"total": str(sum(n_lines))})
    store.apply_move(batch_id, MOVES["start"], int(time.time()) - 4, {}, None)
    return batch_id


def _segment(run: str, seq: int, pos: list[int], ok: int) -> Segment:
    return Segment(run, seq, ok, len(pos) - ok, [0] * 5, pos)


def test_commits_sample_the_whole_batch_at_most_every_two_seconds(store, redis_client):
    batch_id = _started_batch(store)
    for index in (0, 1):
        assert store.acquire_lease(batch_id, index, f"run-{index}", 5)
        store.begin_run(batch_id, index, f"run-{index}")
    store.commit_segment(batch_id, 0, "run-0", _segment("run-0", 0, [0, 1], ok=1), 5)
    # Right after: throttled, however many commits come (the second chunk's too).
    store.commit_segment(batch_id, 0, "run-0", _segment("run-0", 1, [2], ok=1), 5)
    store.commit_segment(batch_id, 1, "run-1", _segment("run-1", 0, [0, 1, 2], ok=3), 5)
    samples = store.progress_samples(batch_id)
    assert [(c, f) for _, c, f in samples] == [(1, 1)]
    assert abs(samples[0][0] - time.time()) < 2
    assert SAMPLE_GAP_MS == 2000

    # Past the gap, a commit samples the live counts of every chunk: committed ones and those still running.
    time.sleep(SAMPLE_GAP_MS / 1000 + 0.1)
    commit = ChunkCommit(3, 1, [0] * 5, [_segment("run-0", 0, [0, 1], 1), _segment("run-0", 1, [2], 1)])
    store.commit_segment(batch_id, 0, "run-0", _segment("run-0", 2, [3], ok=1), 5)
    assert [(c, f) for _, c, f in store.progress_samples(batch_id)] == [(1, 1), (6, 1)]
    assert store.commit_chunk(batch_id, 0, "run-0", commit, 2) == (True, False)  # throttled again
    assert len(store.progress_samples(batch_id)) == 2

    # The last chunk's commit is always sampled: the history ends with the final counts.
    final = ChunkCommit(4, 0, [0] * 5, [_segment("run-1", 0, [0, 1, 2], 3), _segment("run-1", 1, [3], 1)])
    store.commit_segment(batch_id, 1, "run-1", _segment("run-1", 1, [3], ok=1), 5)
    assert store.commit_chunk(batch_id, 1, "run-1", final, 2) == (True, True)
    samples = store.progress_samples(batch_id)
    assert [(c, f) for _, c, f in samples] == [(1, 1), (6, 1), (7, 1)]
    assert [t for t, _, _ in samples] == sorted(t for t, _, _ in samples)

    # The history goes with the batch's other working keys at clean-up.
    assert keys.BatchKeys(batch_id).history in keys.BatchKeys(batch_id).working(2)
    store.delete_working_state(batch_id, 2)
    assert not redis_client.exists(keys.BatchKeys(batch_id).history)


def test_a_long_history_is_thinned_evenly_and_keeps_its_ends(store):
    batch_id = _started_batch(store)
    taken, refused = [], 0
    while len(taken) < 20:  # with no fixed gap, the gap is the span / half the cap: the history spreads out
        if store.sample_progress(batch_id, gap_ms=0, max_samples=8):
            taken.append(store.progress_samples(batch_id)[-1][0])
        else:
            refused += 1
        time.sleep(0.003)
    assert refused > 0
    kept = [t for t, _, _ in store.progress_samples(batch_id)]
    assert 4 <= len(kept) <= 8
    assert kept[0] == taken[0] and kept[-1] == taken[-1]  # the whole run, start to now
    assert kept == sorted(kept)
    # Once thinned, the gap grows with the span: an immediate sample is refused even with no fixed gap.
    assert not store.sample_progress(batch_id, gap_ms=0, max_samples=8)


def _batch(status: str, completed: int, failed: int, total: int = 100, **times) -> Batch:
    return Batch.model_validate({"id": "batch_x", "endpoint": "/v1/chat/completions", "input_file_id": "file-1",
                                 "status": status, "created_at": 1000, "in_progress_at": 1000, **times,
                                 "request_counts": {"total": total, "completed": completed, "failed": failed}})


def test_series_runs_from_the_start_to_now_and_the_rate_is_over_the_last_ten_seconds():
    samples = [(1002.0, 5, 0), (1004.0, 10, 0), (1006.0, 20, 0), (1008.0, 30, 0), (1010.0, 40, 0),
               (1012.0, 50, 0), (1014.0, 60, 0)]
    points = series(samples, _batch("in_progress", 64, 1), now=1014.5)
    assert points[0] == ProgressSample(t=1000, completed=0, failed=0)
    assert points[-1] == ProgressSample(t=1014.5, completed=64, failed=1)
    # From the last point at least 10 s back (t=1004, 10 done) to now (65 done): 55 in 10.5 s.
    assert rate(points) == pytest.approx(55 / 10.5)
    answer = progress(_batch("in_progress", 64, 1), samples, now=1014.5)
    assert answer.requests_per_second == pytest.approx(55 / 10.5, abs=0.01)
    assert answer.eta_seconds == pytest.approx(35 / (55 / 10.5), abs=0.1)

    # A stall shows: no new counts for 12 s, the rate falls to nothing and there is no ETA.
    stalled = progress(_batch("in_progress", 60, 0), samples + [(1020.0, 60, 0)], now=1026)
    assert stalled.requests_per_second == 0 and stalled.eta_seconds is None

    # A short history measures from its start; a finished batch has no rate, and its series ends at its end.
    assert rate(series([(1001.0, 4, 0)], _batch("in_progress", 8, 0), now=1002)) == pytest.approx(4.0)
    done = progress(_batch("completed", 99, 1, completed_at=1030), samples, now=5000)
    assert done.requests_per_second is None and done.eta_seconds is None
    assert done.data[-1] == ProgressSample(t=1030, completed=99, failed=1)


def test_batch_progress_reads_the_store_within_the_callers_scope(store):
    batch_id = _started_batch(store, "batch_q")
    assert store.sample_progress(batch_id)
    answer = batch_progress(store, "t", batch_id)
    assert answer.object == "list" and len(answer.data) == 3  # start, the sample, now
    assert [p.completed for p in answer.data] == [0, 0, 0]
    with pytest.raises(NotFound):
        batch_progress(store, "someone-else", batch_id)
