"""The store's Lua scripts against a real redis-server."""

from __future__ import annotations

import threading

import pytest

from shared.schemas import Batch, FileObject
from shared.store import ChunkSpec, FileRecord, Store


@pytest.fixture
def store(redis_client):
    return Store(redis_client)


def _batch(store: Store, batch_id: str = "batch_1", scope: str = "t") -> str:
    batch = Batch(id=batch_id, endpoint="/v1/chat/completions", input_file_id="file-1", status="validating",
                  created_at=1000, expires_at=87400)
    store.put_batch(batch, scope, {"total": "0"})
    return batch_id


def test_transition_moves_only_from_allowed_status_and_sets_timestamp_once(store):
    _batch(store)
    assert store.transition("batch_1", ["validating"], "in_progress", 1001, timestamp_field="in_progress_at") == (
        True, "validating")
    assert store.transition("batch_1", ["validating"], "failed", 1002, timestamp_field="failed_at") == (
        False, "in_progress")
    assert store.transition("batch_1", ["in_progress"], "cancelling", 1003, timestamp_field="cancelling_at")[0]
    batch = store.get_batch("batch_1")
    assert batch.status == "cancelling"
    assert batch.in_progress_at == 1001 and batch.cancelling_at == 1003 and batch.failed_at is None


def test_terminal_transition_leaves_active_set_and_sets_fields(store):
    _batch(store)
    assert "batch_1" in store.active_batch_ids()
    moved, _ = store.transition("batch_1", ["validating"], "failed", 1005, timestamp_field="failed_at",
                                fields={"completed": "0", "failed": "0"}, terminal=True)
    assert moved
    assert "batch_1" not in store.active_batch_ids()
    assert store.get_batch("batch_1").failed_at == 1005


def test_concurrent_transitions_have_one_winner(store):
    _batch(store)
    results = []

    def attempt(target: str) -> None:
        results.append(store.transition("batch_1", ["validating"], target, 1010)[0])

    threads = [threading.Thread(target=attempt, args=("in_progress" if i % 2 else "cancelling",)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1


def test_commit_chunk_first_wins_and_reports_completion(store):
    _batch(store)
    store.save_plan("batch_1", [ChunkSpec(0, 0, 10, 1, 1), ChunkSpec(1, 10, 20, 2, 1)], {"total": "2"})
    store.set_progress("batch_1", 0, 1, 0)
    assert store.get_batch("batch_1").request_counts.completed == 1
    assert store.commit_chunk("batch_1", 0, {"completed": 1, "failed": 0}, 2) == (True, False)
    assert store.commit_chunk("batch_1", 0, {"completed": 0, "failed": 1}, 2) == (False, False)
    assert store.commit_chunk("batch_1", 1, {"completed": 0, "failed": 1}, 2) == (True, True)
    counts = store.get_batch("batch_1").request_counts
    assert (counts.total, counts.completed, counts.failed) == (2, 1, 1)


def test_progress_never_moves_back_and_ignores_committed_chunks(store):
    _batch(store)
    store.save_plan("batch_1", [ChunkSpec(0, 0, 10, 1, 5)], {"total": "5"})
    store.set_progress("batch_1", 0, 3, 1)
    store.set_progress("batch_1", 0, 1, 0)  # a re-run starting over
    assert store.get_batch("batch_1").request_counts.completed == 3
    store.commit_chunk("batch_1", 0, {"completed": 5, "failed": 0}, 1)
    store.set_progress("batch_1", 0, 2, 0)
    assert store.get_batch("batch_1").request_counts.completed == 5


def test_lease_is_exclusive_and_only_its_holder_renews_or_releases(store):
    assert store.acquire_lease("b", 0, "tok-a", 5)
    assert not store.acquire_lease("b", 0, "tok-b", 5)
    assert not store.renew_lease("b", 0, "tok-b", 5)
    assert store.renew_lease("b", 0, "tok-a", 5)
    store.release_lease("b", 0, "tok-b")
    assert store.lease_held("b", [0]) == [True]
    store.release_lease("b", 0, "tok-a")
    assert store.lease_held("b", [0]) == [False]


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
