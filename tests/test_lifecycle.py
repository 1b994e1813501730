"""The lifecycle's decision code on fakeredis: every move of the table allowed and refused, the side effects of a
terminal move written once, every recovery rule, and finalize's idempotence."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import fakeredis
import orjson
import pytest

from shared import keys, lifecycle
from shared.blobs import LocalBlobStore
from shared.lifecycle import MOVES, NO_OP, STATUSES, TERMINAL, BatchRecord, BatchSpec, Ending, Lifecycle
from shared.recovery import Timing, recover
from shared.settings import Settings
from shared.store import Store
from shared.store_exec import ChunkCommit, ChunkSpec, ExecutionFacts, Segment
from workers import finalize as finalize_mod
from shared.blob_keys import batch_input_key, segment_key

DOCS = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


@pytest.fixture
def store():
    return Store(fakeredis.FakeRedis(decode_responses=True))


def _spec(batch_id: str = "batch_1", expires_at: int = 87400) -> BatchSpec:
    return BatchSpec(id=batch_id, tenant="t", scope="t", endpoint="/v1/chat/completions", input_file_id="file-1",
                     completion_window="24h", created_at=1000, expires_at=expires_at)


def _at(store: Store, status: str, batch_id: str = "batch_1") -> BatchRecord:
    store.put_batch(_spec(batch_id))
    store.r.hset(keys.batch(batch_id), "status", status)
    return store.batch_record(batch_id)


@pytest.mark.parametrize("verb", sorted(MOVES))
@pytest.mark.parametrize("status", STATUSES)
def test_every_move_from_every_status(store, verb, status):
    move = MOVES[verb]
    record = _at(store, status)
    life = Lifecycle(store, cleanup_delay_s=60, wants_webhooks=lambda tenant: True)
    if move.terminal:
        outcome = life.end(record, verb, 2000, Ending(completed=1, usage=[1, 0, 1, 0, 2]))
    else:
        outcome = life._move(record.id, verb, 2000)
    after = store.batch_record(record.id)
    if status in move.froms:
        assert outcome.moved and outcome.status == status
        assert after.state.status == move.to and after.state.timestamps[move.timestamp] == 2000
        assert (record.id in store.active_batch_ids()) == (move.to not in TERMINAL)
        if move.terminal:
            assert store.tenant_usage()["t"]["batches"] == 1
            assert store.due_cleanups(2060) == [record.id]
            event = store.webhook_event(lifecycle.webhook_event_id(record.id, lifecycle.WEBHOOK_EVENTS[move.to]))
            assert event["batch_id"] == record.id
    else:
        assert not outcome.moved and outcome.status == status
        assert after.state.status == status and move.timestamp not in after.state.timestamps
        assert store.tenant_usage() == {} and store.due_cleanups(10**10) == []


def test_cancel_of_a_finalizing_batch_is_accepted_without_a_move(store):
    record = _at(store, "finalizing")
    outcome = Lifecycle(store, cleanup_delay_s=0).cancel(record.id, 2000)
    assert not outcome.moved and outcome.status in NO_OP["cancel"]
    assert store.batch_record(record.id).state.status == "finalizing"


def test_terminal_side_effects_are_recorded_once_and_usage_saturates(store):
    record = _at(store, "finalizing")
    life = Lifecycle(store, cleanup_delay_s=0, wants_webhooks=lambda tenant: True)
    huge = Ending(completed=2, usage=[2**64 - 1] * 5)
    assert life.end(record, "complete", 2000, huge).moved
    for _ in range(3):  # a re-run finalize, a duplicate message: refused, nothing added
        assert not life.end(record, "complete", 2001, huge).moved
    usage = store.tenant_usage()["t"]
    assert usage["total_tokens"] == lifecycle.USAGE_CEILING and usage["batches"] == 1
    assert store.get_batch(record.id).usage.total_tokens == lifecycle.USAGE_CEILING
    assert len(store.due_webhook_events(2000)) == 1


def test_diagram_in_the_docs_is_generated_from_the_table():
    assert f"```mermaid\n{lifecycle.diagram()}```" in DOCS.read_text()


# ---- recovery rules ---------------------------------------------------------------------------------------------

T = Timing(redrive_after_s=3)


def _record(status: str, *, planned: bool = False, n_chunks: int = 2, expires_at: int = 10**10, **fields) -> BatchRecord:
    f = {**_spec(expires_at=expires_at).hash_fields(), "status": status, "updated_at": "1000", "total": "4"}
    if planned:
        f.update({"n_chunks": str(n_chunks), "dispatched_at": "1000"})
    f.update({k: str(v) for k, v in fields.items()})
    return BatchRecord.from_hash("batch_1", f)


def _facts(done=(), leased=(), started=(), redriven=None, finalize_leased=False, ready=()) -> ExecutionFacts:
    return ExecutionFacts(set(done), set(leased), set(started), redriven or {}, finalize_leased, frozenset(ready))


def kinds(actions) -> list[tuple]:
    return [(a.kind, a.chunks, a.reason) for a in actions]


def test_validating_without_a_plan_is_orchestrated_again_once_stale():
    assert recover(_record("validating"), None, 1002, T) == []
    assert kinds(recover(_record("validating"), None, 1004, T)) == [("orchestrate", (), None)]
    sent = _record("validating", orchestrate_sent_at=1003)
    assert recover(sent, None, 1004, T) == []


def test_validating_past_its_window_expires():
    assert kinds(recover(_record("validating", expires_at=1001), None, 1002, T)) == [("expire", (), None)]


def test_validating_with_a_saved_plan_moves_on():
    record = _record("validating", planned=True)
    assert recover(record, _facts(), 1002, T) == []
    assert kinds(recover(record, _facts(), 1004, T)) == [("start", (), None)]


def test_in_progress_releases_lost_chunks_again_but_not_leased_or_waiting_ones():
    record = _record("in_progress", planned=True, n_chunks=4)
    assert kinds(recover(record, _facts(done={0}, leased={1}, started={2}, ready={3}), 1004, T)) == \
        [("redrive_chunks", (2,), None)]
    # Taken but never started (the process died between the take and the lease): lost too.
    assert kinds(recover(record, _facts(done={0}, leased={1}, started={2}), 1004, T)) == \
        [("redrive_chunks", (2, 3), None)]
    # Not before a run could have begun.
    assert recover(record, _facts(done={0}, leased={1}), 1002, T) == []
    assert recover(record, _facts(done={0}, leased={1}, started={2}, redriven={2: 1003, 3: 1003}), 1004, T) == []


def test_in_progress_with_every_chunk_done_is_finalized_unless_a_finalize_holds_the_lease():
    record = _record("in_progress", planned=True)
    assert kinds(recover(record, _facts(done={0, 1}), 1004, T)) == [("finalize", (), None)]
    assert recover(record, _facts(done={0, 1}, finalize_leased=True), 1004, T) == []


def test_in_progress_past_its_window_stops_and_closes_the_chunks_no_run_holds():
    record = _record("in_progress", planned=True, n_chunks=3, expires_at=1001)
    actions = kinds(recover(record, _facts(done={0}, leased={1}), 1002, T))
    assert actions == [("stop", (), "expired"), ("close_chunks", (2,), "expired")]


def test_cancelling_without_a_plan_ends_cancelled_and_with_one_closes_its_chunks():
    assert kinds(recover(_record("cancelling"), None, 1001, T)) == [("end_cancelled", (), None)]
    record = _record("cancelling", planned=True)
    assert kinds(recover(record, _facts(done={0}), 1001, T)) == [("close_chunks", (1,), "cancelled")]


def test_finalizing_is_finalized_again_once_its_lease_lapsed():
    record = _record("finalizing", planned=True)
    assert recover(record, _facts(done={0, 1}, finalize_leased=True), 1004, T) == []
    assert kinds(recover(record, _facts(done={0, 1}), 1004, T)) == [("finalize", (), None)]
    assert recover(_record("finalizing", planned=True, finalize_sent_at=1003), _facts(done={0, 1}), 1004, T) == []


# ---- finalize ------------------------------------------------------------------------------------------------------


def _runtime(store: Store, tmp_path: Path):
    settings = Settings(data_dir=tmp_path, chunk_lease_s=5)
    return SimpleNamespace(store=store, blobs=LocalBlobStore(tmp_path / "blobs"), settings=settings,
                           lifecycle=Lifecycle(store, cleanup_delay_s=0))


def _finished_batch(rt, lines_per_chunk=2, chunks=2) -> str:
    store = rt.store
    store.put_batch(_spec())
    ids = [f"r{i}" for i in range(lines_per_chunk * chunks)]
    data = b"".join(orjson.dumps({"custom_id": c, "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": "m"}}) + b"\n" for c in ids)
    rt.blobs.put(batch_input_key("batch_1"), data)
    bounds, offset = [], 0
    for line in data.splitlines(keepends=True):
        bounds.append((offset, offset + len(line)))
        offset += len(line)
    plan = [ChunkSpec(i, bounds[i * lines_per_chunk][0], bounds[(i + 1) * lines_per_chunk - 1][1],
                      i * lines_per_chunk + 1, lines_per_chunk) for i in range(chunks)]
    store.save_plan("batch_1", plan, {"total": str(len(ids)), "model": "m"})
    rt.lifecycle.start(store.batch_record("batch_1"), 1001)
    for spec in plan:
        token = f"run{spec.index}"
        store.acquire_lease("batch_1", spec.index, token, 5)
        pos = list(range(spec.n_lines))
        segment = Segment(token, 0, spec.n_lines, 0, [1, 0, 1, 0, 2], pos)
        body = b"".join(orjson.dumps({"id": f"x{spec.index}{p}", "custom_id": ids[spec.index * lines_per_chunk + p],
                                      "response": {"status_code": 200, "request_id": "r", "body": {}}, "error": None})
                        + b"\n" for p in pos)
        rt.blobs.put(segment_key("batch_1", spec.index, token, 0, "out"), body)
        store.commit_segment("batch_1", spec.index, token, segment, 5)
        store.commit_chunk("batch_1", spec.index, token, ChunkCommit(spec.n_lines, 0, [1, 0, 1, 0, 2], [segment]),
                           chunks)
    return "batch_1"


def test_finalize_is_idempotent(store, tmp_path):
    rt = _runtime(store, tmp_path)
    _finished_batch(rt)
    assert finalize_mod.finalize(rt, "batch_1") == "completed"
    first = store.get_batch("batch_1")
    output = rt.blobs.open(f"files/{first.output_file_id}").read()
    assert finalize_mod.finalize(rt, "batch_1") is None
    again = store.get_batch("batch_1")
    assert again == first and rt.blobs.open(f"files/{again.output_file_id}").read() == output
    assert sorted(orjson.loads(line)["custom_id"] for line in output.splitlines()) == ["r0", "r1", "r2", "r3"]
    assert store.tenant_usage()["t"]["batches"] == 1 and first.usage.total_tokens == 4


def test_finalize_turns_a_lost_segment_into_result_lost_lines(store, tmp_path):
    rt = _runtime(store, tmp_path)
    _finished_batch(rt)
    rt.blobs.delete(segment_key("batch_1", 1, "run1", 0, "out"))
    assert finalize_mod.finalize(rt, "batch_1") == "completed"
    batch = store.get_batch("batch_1")
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 2)
    errors = [orjson.loads(line) for line in rt.blobs.open(f"files/{batch.error_file_id}").read().splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("r2", "result_lost"), ("r3", "result_lost")]


def test_a_segment_whose_commit_reply_was_lost_keeps_exactly_its_lines(store, tmp_path):
    """Redis applied the commit but the reply never came (it went down just after): the retry must not rewrite the
    recorded segment's blobs, or finalize would join lines that a later run writes again."""
    from shared import lines as wire
    from workers.chunk import SegmentWriter
    from shared.store_exec import SegmentRejected

    rt = _runtime(store, tmp_path)
    store.put_batch(_spec())
    store.save_plan("batch_1", [ChunkSpec(0, 0, 10, 1, 4)], {"total": "4"})
    assert store.acquire_lease("batch_1", 0, "tok", 5)
    writer = SegmentWriter(rt, "batch_1", 0, "tok")
    applied = store.commit_segment

    def reply_lost(*args, **kwargs):
        applied(*args, **kwargs)
        raise ConnectionError("Connection closed by server.")

    writer.add(0, wire.error_line("batch_1", 1, "r0", "x", "first"))
    store.commit_segment = reply_lost
    writer.try_flush()  # recorded in Redis, unknown to the writer: the line stays pending
    store.commit_segment = applied
    writer.add(1, wire.error_line("batch_1", 2, "r1", "x", "second"))
    with pytest.raises(SegmentRejected):
        writer.flush()  # position 0 is durable already: refused, and this run stops

    [segment] = store.segments("batch_1", 0)
    assert segment.pos == [0]
    blob = rt.blobs.open(segment_key("batch_1", 0, "tok", segment.seq, "err")).read()
    assert [orjson.loads(line)["custom_id"] for line in blob.splitlines()] == ["r0"]

    # The run ends without committing: line r1 is not durable, and a commit would have dropped it for good.
    from workers.chunk import ChunkRun, end_chunk

    run = ChunkRun(store.batch_record("batch_1"), 0, "tok", 0.0, 1, [], 0, [], writer, None, None)
    assert end_chunk(rt, run, "node") is False
    assert store.done_chunks("batch_1") == set()
    assert store.acquire_lease("batch_1", 0, "next-run", 5)  # released for the next run


# ---- forwarded batches (batch_api = native) ---------------------------------------------------------------------


@pytest.mark.parametrize("status", ["validating", "in_progress", "finalizing", "cancelling"])
def test_a_forwarded_batch_gets_a_new_forward_chain_only_when_its_step_is_overdue_and_unheld(status):
    record = _record(status, forward="1", forward_due_at=1010, updated_at=1000)
    assert recover(record, None, 1012, T) == []  # due 2 s ago: its step may still be on its way
    assert kinds(recover(record, None, 1014, T)) == [("forward", (), None)]
    assert recover(record, None, 1014, T, forward_leased=True) == []  # a step is running (a long download)
    # Never the chunk rules: a forwarded batch has no plan, and expiry is passed on to the provider by its steps.
    assert recover(_record(status, forward="1", forward_due_at=10**10, expires_at=900), None, 1014, T) == []


@pytest.mark.parametrize("local, remote, stop, verb", [
    ("validating", "failed", None, "fail"),
    ("in_progress", "failed", None, "fail_remote"),
    ("cancelling", "failed", None, "fail_remote"),
    ("finalizing", "completed", None, "complete"),
    ("finalizing", "completed", "expired", "complete"),  # it finished before the cancel took: every result
    ("cancelling", "completed", "cancelled", "end_cancelled"),
    ("in_progress", "expired", None, "expire"),
    ("in_progress", "cancelled", "expired", "expire"),  # cancelled by batchgate for the local window
    ("validating", "cancelled", "expired", "expire"),
    ("cancelling", "cancelled", "cancelled", "end_cancelled"),
    ("in_progress", "cancelled", None, "end_cancelled"),  # cancelled at the provider by someone else
])
def test_how_a_forwarded_batch_ends(local, remote, stop, verb):
    assert lifecycle.forward_ending(local, remote, stop) == verb
    # mirror's moves and then the ending are allowed from where the batch is
    status = local
    for v in lifecycle.FORWARD_MIRROR[remote]:
        if status in MOVES[v].froms:
            status = MOVES[v].to
    if verb == "end_cancelled" and status != "cancelling":
        status = MOVES["cancel"].to
    assert status in MOVES[verb].froms


def test_mirroring_moves_a_forwarded_batch_level_with_its_provider(store):
    record = _at(store, "validating")
    life = Lifecycle(store, cleanup_delay_s=0)
    assert life.mirror(record, "validating", 1500) == "validating"
    assert life.mirror(record, "finalizing", 1501) == "finalizing"
    after = store.batch_record(record.id).state
    assert after.timestamps["in_progress_at"] == after.timestamps["finalizing_at"] == 1501
    cancelled = _at(store, "cancelling", "batch_2")
    assert life.mirror(cancelled, "in_progress", 1502) == "cancelling"  # a cancel under way is never undone
