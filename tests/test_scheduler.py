"""The scheduler's decisions on fakeredis: which released chunk is taken next (weighted fair share between tenants;
stopped, urgent, priority, deadline octave and round robin within one), and the line of batches over their
tenant's cap. The same Lua runs in the real Redis of the end-to-end tests (tests/test_scheduling.py)."""

from __future__ import annotations

from collections import Counter

import fakeredis
import pytest

from shared import keys
from shared.lifecycle import QUEUED, BatchSpec, Ending, Lifecycle
from shared.recovery import Timing, recover
from shared.store import Store
from shared.store_exec import ChunkSpec

NOW = 1_000_000
DAY = 86400


@pytest.fixture
def store():
    return Store(fakeredis.FakeRedis(decode_responses=True))


def add_batch(store: Store, batch_id: str, tenant: str, *, chunks: int = 4, lines: int = 100, window: int = DAY,
              created: int = NOW, priority: int = 0, weight: float = 1.0, status: str = "in_progress",
              release: bool = True) -> None:
    spec = BatchSpec(id=batch_id, tenant=tenant, scope=tenant, endpoint="/v1/chat/completions",
                     input_file_id="file-1", completion_window="24h", created_at=created,
                     expires_at=created + window, priority=priority)
    store.put_batch(spec)
    plan = [ChunkSpec(i, i * 10, i * 10 + 10, i * lines + 1, lines) for i in range(chunks)]
    store.save_plan(batch_id, plan, {"total": str(chunks * lines)})
    store.r.hset(keys.batch(batch_id), "status", status)
    if release:
        store.release_chunks(batch_id, tenant, weight, list(range(chunks)))


def take_all(store: Store, now: float = NOW) -> list[tuple[str, int]]:
    taken = []
    while (got := store.take_chunk(now)) is not None:
        taken.append((got.batch_id, got.index))
    return taken


def test_chunks_of_one_batch_are_taken_in_order_once(store):
    add_batch(store, "b1", "t")
    store.release_chunks("b1", "t", 1.0, [0, 1])  # released again: not twice
    assert take_all(store) == [("b1", 0), ("b1", 1), ("b1", 2), ("b1", 3)]
    assert store.ready_chunks("b1") == set() and store.tenants_with_work() == 0


def test_tenants_alternate_so_a_small_batch_does_not_wait_for_a_big_backlog(store):
    add_batch(store, "big", "a", chunks=80)
    assert store.take_chunk(NOW).batch_id == "big"
    add_batch(store, "small", "b", chunks=1)
    assert store.take_chunk(NOW).batch_id == "small"


@pytest.mark.parametrize("weights", [(1, 1), (3, 1), (5, 2)])
def test_weights_set_each_tenant_share_of_the_chunks_taken(store, weights):
    add_batch(store, "a1", "a", chunks=200, weight=weights[0])
    add_batch(store, "b1", "b", chunks=200, weight=weights[1])
    first = Counter(store.take_chunk(NOW).batch_id for _ in range(140))
    want = weights[0] / sum(weights)
    assert abs(first["a1"] / 140 - want) <= 0.02


def test_a_tenant_back_from_idle_gets_no_saved_up_credit(store):
    add_batch(store, "a1", "a", chunks=100)
    add_batch(store, "b1", "b", chunks=2)
    took = [store.take_chunk(NOW).batch_id for _ in range(4)]
    assert Counter(took) == {"a1": 2, "b1": 2}
    for _ in range(30):
        store.take_chunk(NOW)
    add_batch(store, "b2", "b", chunks=40)  # b was idle while a ran 30 chunks alone: b gets half from now on
    took = Counter(store.take_chunk(NOW).batch_id for _ in range(20))
    assert took == {"a1": 10, "b2": 10}


def test_batches_of_one_tenant_share_by_round_robin(store):
    add_batch(store, "x", "t", chunks=3)
    add_batch(store, "y", "t", chunks=3)
    assert [b for b, _ in take_all(store)] == ["x", "y", "x", "y", "x", "y"]


def test_higher_priority_runs_first_within_a_tenant(store):
    add_batch(store, "low", "t", chunks=2)
    add_batch(store, "high", "t", chunks=2, priority=5)
    assert [b for b, _ in take_all(store)] == ["high", "high", "low", "low"]


def test_a_shorter_window_overtakes_a_longer_one(store):
    add_batch(store, "week", "t", chunks=3, window=7 * DAY)
    add_batch(store, "hour", "t", chunks=3, window=3600, created=NOW + 5)
    assert [b for b, _ in take_all(store, NOW + 10)] == ["hour"] * 3 + ["week"] * 3


def test_a_batch_near_its_deadline_goes_before_priority(store):
    add_batch(store, "urgent", "t", chunks=2, window=DAY, created=NOW - DAY + 600)  # 10 minutes left
    add_batch(store, "vip", "t", chunks=2, priority=100)
    assert [b for b, _ in take_all(store)] == ["urgent", "urgent", "vip", "vip"]


def test_a_stopped_batch_is_taken_first_and_costs_its_tenant_nothing(store):
    add_batch(store, "a1", "a", chunks=10)
    add_batch(store, "b1", "b", chunks=10)
    add_batch(store, "cancelled", "a", chunks=3)
    store.set_stop("cancelled", "cancelled")
    taken = [store.take_chunk(NOW).batch_id for _ in range(5)]
    assert taken[0] == "cancelled" and taken.count("cancelled") == 3
    assert Counter(taken[3:]) == {"a1": 1, "b1": 1}


def test_finished_batches_are_dropped_from_the_scheduler(store):
    add_batch(store, "gone", "t", chunks=3)
    store.r.hset(keys.batch("gone"), "status", "completed")
    assert store.take_chunk(NOW) is None and store.tenants_with_work() == 0


# ---- the line of batches over their tenant's cap ---------------------------------------------------------------------


def test_batches_are_let_in_first_come_first_served_while_they_fit(store):
    for i, lines in enumerate((400, 500, 100)):
        add_batch(store, f"q{i}", "t", chunks=1, lines=lines, status="validating", release=False)
    assert store.admit("t", 1000, "q0", place=1) == ["q0"]
    assert store.admit("t", 1000, "q1", place=2) == ["q1"]
    assert store.admit("t", 1000, "q2", place=3) == ["q2"]  # 400 + 500 + 100 fits exactly
    assert store.enqueued_requests("t") == 1000
    add_batch(store, "q3", "t", chunks=1, lines=300, status="validating", release=False)
    add_batch(store, "q4", "t", chunks=1, lines=10, status="validating", release=False)
    assert store.admit("t", 1000, "q3", place=4) == []
    assert store.admit("t", 1000, "q4", place=5) == []  # fits, but waits its turn behind q3
    store.r.hset(keys.batch("q3"), "status", QUEUED)
    store.r.hset(keys.batch("q4"), "status", QUEUED)
    assert store.get_batches(["q3", "q4"])[0].queue_position == 1
    assert store.get_batches(["q4"])[0].queue_position == 2
    assert store.get_batches(["q4"])[0].status == "validating"

    # q1's terminal move gives its 500 back; the line then lets both in.
    Lifecycle(store, cleanup_delay_s=0).end(store.batch_record("q1"), "expire", NOW, Ending())
    assert store.enqueued_requests("t") == 500
    assert store.admit("t", 1000) == ["q3", "q4"]
    assert store.enqueued_requests("t") == 810
    assert store.batch_record("q4").state.admitted == 10


def test_a_cancelled_waiting_batch_leaves_the_line(store):
    add_batch(store, "full", "t", chunks=1, lines=1000, status="validating", release=False)
    add_batch(store, "w1", "t", chunks=1, lines=10, status="validating", release=False)
    add_batch(store, "w2", "t", chunks=1, lines=10, status="validating", release=False)
    assert store.admit("t", 1000, "full", place=1) == ["full"]
    assert store.admit("t", 1000, "w1", place=2) == [] and store.admit("t", 1000, "w2", place=3) == []
    store.r.hset(keys.batch("w1"), "status", "cancelling")
    Lifecycle(store, cleanup_delay_s=0).end(store.batch_record("full"), "expire", NOW, Ending())
    assert store.admit("t", 1000) == ["w2"]


def test_a_queued_batch_has_its_own_recovery_rule(store):
    add_batch(store, "w", "t", chunks=1, status="queued", release=False)
    t = Timing(redrive_after_s=3)
    record = store.batch_record("w")
    assert [a.kind for a in recover(record, None, NOW, t)] == ["admit"]  # never "start" before it is let in
    assert [a.kind for a in recover(record, None, NOW + DAY, t)] == ["expire"]
    store.r.hset(keys.batch("w"), "admitted", "100")
    assert recover(store.batch_record("w"), None, NOW + 1, t) == []  # just let in: its orchestrate is on the way
    assert [a.kind for a in recover(store.batch_record("w"), None, NOW + 10, t)] == ["start"]


def test_a_tenant_keeps_its_place_when_its_first_candidates_are_all_dead(store):
    # More ended batches, their chunks still on their ready lists (closed by the sweeper), than a take looks at.
    for i in range(70):
        add_batch(store, f"dead{i:02d}", "t", chunks=2)
        store.r.hset(keys.batch(f"dead{i:02d}"), "status", "cancelled")
    add_batch(store, "live", "t", chunks=2)
    assert [b for b, _ in take_all(store)] == ["live", "live"]


def test_a_queued_batch_past_its_window_ends_with_its_lines_expired(store):
    from shared.store_exec import ExecutionFacts

    add_batch(store, "w", "t", chunks=2, status="queued", release=False)
    facts = ExecutionFacts(set(), set(), set(), {}, False, frozenset())
    record = store.batch_record("w")
    actions = [(a.kind, a.chunks, a.reason) for a in recover(record, facts, NOW + DAY + 1, Timing(redrive_after_s=3))]
    assert actions == [("stop", (), "expired"), ("close_chunks", (0, 1), "expired")]


def test_an_idempotency_answer_is_kept_even_when_its_claim_lapsed(store):
    assert store.claim_idempotency("s", "k", "fp1", 60) is None
    store.r.delete(keys.idempotency("s", "k"))  # the claim lapsed while the first request worked
    store.finish_idempotency("s", "k", "fp1", 200, b'{"id": "x"}', 3600)
    kept = store.claim_idempotency("s", "k", "fp1", 60)
    assert (kept.state, kept.status, kept.body) == ("done", 200, b'{"id": "x"}')
    # Another request that claimed the key after the lapse keeps it: the late answer does not overwrite it.
    assert store.claim_idempotency("s", "k2", "fp2", 60) is None
    store.finish_idempotency("s", "k2", "fp1", 200, b"late", 3600)
    assert store.claim_idempotency("s", "k2", "fp2", 60).state == "pending"
