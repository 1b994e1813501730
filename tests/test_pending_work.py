"""The autoscaling signal on fakeredis: requests of running batches not yet answered (released chunks waiting plus the
undone lines of running ones), per provider, as /metrics exports it for the KEDA ScaledObject (deploy/k8s/keda.yaml).
The same Lua runs in the real Redis of the end-to-end dashboard test (tests/test_dashboard_metrics.py)."""

from __future__ import annotations

import fakeredis
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import make_registry
from shared import keys
from shared.lifecycle import BatchSpec
from shared.providers import Provider, ProviderRegistry
from shared.store import Store
from shared.store_exec import ChunkSpec, Segment
from shared.store_sched import PENDING_SCAN_LIMIT

NOW = 1_000_000


@pytest.fixture
def store():
    return Store(fakeredis.FakeRedis(decode_responses=True))


def add_batch(store: Store, batch_id: str, *, chunks: int = 4, lines: int = 100, status: str = "in_progress",
              model: str = "gpt-x", provider: str = "", **fields: str) -> None:
    spec = BatchSpec(id=batch_id, tenant="t", scope="t", endpoint="/v1/chat/completions", input_file_id="file-1",
                     completion_window="24h", created_at=NOW, expires_at=NOW + 86400)
    store.put_batch(spec)
    plan = [ChunkSpec(i, i * 10, i * 10 + 10, i * lines + 1, lines) for i in range(chunks)]
    store.save_plan(batch_id, plan, {"total": str(chunks * lines), "model": model, "provider": provider, **fields})
    store.r.hset(keys.batch(batch_id), "status", status)
    store.release_chunks(batch_id, "t", 1.0, list(range(chunks)))


def test_released_chunks_count_whole_and_running_ones_count_their_undone_lines(store):
    add_batch(store, "b1", chunks=4, lines=100)
    assert store.pending_requests() == {("", "gpt-x"): 400}
    taken = store.take_chunk(NOW)  # taken, not yet started: still all pending
    assert store.pending_requests() == {("", "gpt-x"): 400}
    assert store.acquire_lease("b1", taken.index, "tok", 30)
    store.begin_run("b1", taken.index, "tok")
    store.commit_segment("b1", taken.index, "tok", Segment("tok", 0, 30, 5, [0] * 5, list(range(35))), 30)
    assert store.pending_requests() == {("", "gpt-x"): 365}  # 35 lines of the running chunk are durable
    store.r.sadd(keys.BatchKeys("b1").done, taken.index)  # committed: none of its lines is pending
    store.r.hdel(keys.BatchKeys("b1").progress, taken.index)
    assert store.pending_requests() == {("", "gpt-x"): 300}


def test_only_running_batches_that_batchgate_executes_count(store):
    add_batch(store, "run", chunks=2, lines=10, provider="local")
    add_batch(store, "queued", chunks=2, lines=10, status="queued")
    add_batch(store, "cancelling", chunks=2, lines=10, status="cancelling")
    add_batch(store, "forwarded", chunks=2, lines=10, forward="1")
    assert store.pending_requests() == {("local", "gpt-x"): 20}


def test_the_scan_is_bounded():
    assert 0 < PENDING_SCAN_LIMIT <= 10_000
    store = Store(fakeredis.FakeRedis(decode_responses=True))
    for i in range(5):
        add_batch(store, f"b{i}", chunks=1, lines=7)
    assert sum(store.pending_requests(limit=3).values()) == 21


def test_the_gauge_is_exported_per_provider(store):
    providers = ProviderRegistry([Provider(name="default", base_url="http://a/v1"),
                                  Provider(name="vllm", base_url="http://b/v1", models=["llama"]),
                                  Provider(name="idle", base_url="http://c/v1")], "default")
    add_batch(store, "b1", chunks=2, lines=50, model="llama")
    add_batch(store, "b2", chunks=1, lines=30, model="gpt-x")
    add_batch(store, "b3", chunks=1, lines=5, model="llama", provider="default")  # pinned at planning
    text = generate_latest(make_registry(store, providers)).decode()
    samples = {s.labels["provider"]: s.value for f in text_string_to_metric_families(text)
               if f.name == "batchgate_pending_requests" for s in f.samples}
    assert samples == {"default": 35, "vllm": 100, "idle": 0}
