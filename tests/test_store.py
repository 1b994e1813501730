"""The store's Lua scripts against a real redis-server: moves, fenced segments and commits, leases, pagination."""

from __future__ import annotations

import threading

import pytest

from shared import keys
from shared.lifecycle import MOVES, BatchSpec, Ending, Lifecycle
from shared.schemas import FileObject
from shared.store import FileRecord, Store
from shared.store_exec import ChunkCommit, ChunkSpec, Segment, SegmentRejected


@pytest.fixture
def store(redis_client):
    return Store(redis_client)


def _batch(store: Store, batch_id: str = "batch_1", scope: str = "t") -> str:
    store.put_batch(BatchSpec(id=batch_id, tenant="t", scope=scope, endpoint="/v1/chat/completions",
                              input_file_id="file-1", completion_window="24h", created_at=1000, expires_at=87400))
    return batch_id


def test_move_only_from_allowed_status_and_sets_timestamp_once(store):
    _batch(store)
    assert store.apply_move("batch_1", MOVES["start"], 1001, {}, None) == (True, "validating")
    assert store.apply_move("batch_1", MOVES["start"], 1002, {}, None) == (False, "in_progress")
    assert store.apply_move("batch_1", MOVES["cancel"], 1003, {}, None)[0]
    batch = store.get_batch("batch_1")
    assert batch.status == "cancelling"
    assert batch.in_progress_at == 1001 and batch.cancelling_at == 1003 and batch.finalizing_at is None


def test_terminal_move_leaves_active_set_with_its_side_effects_in_one_step(store, redis_client):
    _batch(store)
    assert "batch_1" in store.active_batch_ids()
    lifecycle = Lifecycle(store, cleanup_delay_s=60, wants_webhooks=lambda tenant: True)
    record = store.batch_record("batch_1")
    assert lifecycle.start(record, 1001).moved
    assert lifecycle.begin_finalize(record, 1002).moved
    ending = Ending(completed=3, failed=1, usage=[10, 2, 5, 1, 15], output_file_id="file-out")
    assert lifecycle.end(record, "complete", 1003, ending).moved
    assert not lifecycle.end(record, "complete", 1004, ending).moved  # a second finalize changes nothing
    batch = store.get_batch("batch_1")
    assert batch.status == "completed" and batch.completed_at == 1003
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 1)
    assert batch.usage.total_tokens == 15 and batch.output_file_id == "file-out"
    assert "batch_1" not in store.active_batch_ids()
    assert store.tenant_usage()["t"] == {"input_tokens": 10, "cached_tokens": 2, "output_tokens": 5,
                                         "reasoning_tokens": 1, "total_tokens": 15, "requests_completed": 3,
                                         "requests_failed": 1, "batches": 1}
    assert store.due_webhook_events(1003) and store.due_cleanups(1003 + 60) == ["batch_1"]
    assert store.due_cleanups(1003 + 59) == []


def test_concurrent_moves_have_one_winner(store):
    _batch(store)
    results = []

    def attempt(verb: str) -> None:
        results.append(store.apply_move("batch_1", MOVES[verb], 1010, {}, None)[0])

    threads = [threading.Thread(target=attempt, args=("start" if i % 2 else "cancel",)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1


def _segment(run: str, seq: int, pos: list[int], ok: bool = True) -> Segment:
    return Segment(run, seq, len(pos) if ok else 0, 0 if ok else len(pos), [1, 0, 1, 0, 2], pos)


def test_segments_are_fenced_by_the_lease_and_show_as_live_progress(store):
    _batch(store)
    store.save_plan("batch_1", [ChunkSpec(0, 0, 10, 1, 4), ChunkSpec(1, 10, 20, 5, 1)], {"total": "5"})
    assert store.acquire_lease("batch_1", 0, "run-a", 5)
    assert store.begin_run("batch_1", 0, "run-a") == []
    store.commit_segment("batch_1", 0, "run-a", _segment("run-a", 0, [0, 2]), 5)
    store.commit_segment("batch_1", 0, "run-a", _segment("run-a", 1, [1], ok=False), 5)
    assert store.get_batch("batch_1").request_counts.completed == 2
    assert store.get_batch("batch_1").request_counts.failed == 1
    with pytest.raises(SegmentRejected):  # a position made durable once is never taken again
        store.commit_segment("batch_1", 0, "run-a", _segment("run-a", 2, [2]), 5)
    with pytest.raises(SegmentRejected):  # only the lease holder writes
        store.commit_segment("batch_1", 0, "run-b", _segment("run-b", 0, [3]), 5)
    assert store.finished_positions("batch_1", 0, 4) == {0, 1, 2}

    # The holder dies; the next run resumes from the durable positions, progress unchanged.
    store.release_lease("batch_1", 0, "run-a")
    assert store.acquire_lease("batch_1", 0, "run-b", 5)
    earlier = store.begin_run("batch_1", 0, "run-b")
    assert [s.pos for s in earlier] == [[0, 2], [1]]
    assert store.get_batch("batch_1").request_counts.completed == 2
    store.commit_segment("batch_1", 0, "run-b", _segment("run-b", 0, [3]), 5)
    commit = ChunkCommit(3, 1, [0] * 5, earlier + [_segment("run-b", 0, [3])])
    assert store.commit_chunk("batch_1", 0, "run-a", commit, 2) == (False, False)  # lease lost: refused
    assert store.commit_chunk("batch_1", 0, "run-b", commit, 2) == (True, False)
    assert store.commit_chunk("batch_1", 0, "run-b", commit, 2) == (False, False)  # the first commit wins
    counts = store.get_batch("batch_1").request_counts
    assert (counts.total, counts.completed, counts.failed) == (5, 3, 1)
    with pytest.raises(SegmentRejected):  # a committed chunk takes no more segments
        store.commit_segment("batch_1", 0, "run-b", _segment("run-b", 1, [0]), 5)
    assert store.chunk_commits("batch_1")[0].segments[-1].pos == [3]


def test_lease_is_exclusive_and_only_its_holder_renews_or_releases(store):
    _batch(store, "b")
    store.save_plan("b", [ChunkSpec(0, 0, 10, 1, 1)], {"total": "1"})
    assert store.acquire_lease("b", 0, "tok-a", 5)
    assert not store.acquire_lease("b", 0, "tok-b", 5)
    assert not store.renew_lease("b", 0, "tok-b", 5)
    assert store.renew_lease("b", 0, "tok-a", 5)
    store.release_lease("b", 0, "tok-b")
    assert store.execution_facts("b", 1).leased == {0}
    store.release_lease("b", 0, "tok-a")
    assert store.execution_facts("b", 1).leased == set()


def test_working_state_is_deleted_with_every_chunk_key(store, redis_client):
    _batch(store)
    store.save_plan("batch_1", [ChunkSpec(0, 0, 10, 1, 2)], {"total": "2"})
    store.acquire_lease("batch_1", 0, "run", 5)
    store.begin_run("batch_1", 0, "run")
    store.commit_segment("batch_1", 0, "run", _segment("run", 0, [0, 1]), 5)
    store.commit_chunk("batch_1", 0, "run", ChunkCommit(2, 0, [0] * 5, [_segment("run", 0, [0, 1])]), 1)
    store.chunk_attempt("batch_1", 0)
    store.delete_working_state("batch_1", 1)
    assert sorted(redis_client.keys(f"{keys.batch('batch_1')}*")) == [keys.batch("batch_1")]


def test_file_pagination_is_a_total_order_within_one_second(store):
    for i in range(7):
        store.put_file(FileRecord(FileObject(id=f"file-{i}", bytes=1, created_at=1000, filename="a.jsonl",
                                             purpose="batch"), "t", f"files/file-{i}"))
    ids, after = [], None
    while True:
        page = store.list_file_ids("t", None, 3, after, descending=True)
        ids += page.ids
        if not page.has_more:
            break
        after = page.ids[-1]
    assert ids == [f"file-{i}" for i in reversed(range(7))]
    assert store.list_file_ids("other", None, 3, None, descending=True).ids == []
    assert store.list_file_ids("t", None, 3, "file-unknown", descending=True).ids == []
