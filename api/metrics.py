"""Prometheus exposition of the figures in Redis, read at scrape time (so every worker on every host counts)."""

from __future__ import annotations

import time
from collections import defaultdict

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from shared import metrics
from shared.queue import CHUNKS_QUEUE, CONTROL_QUEUE
from shared.lifecycle import ACTIVE as ACTIVE_STATUSES
from shared.store import Store

_COUNTERS = {
    "upstream_sent": ("batchgate_upstream_requests_sent", "HTTP requests sent upstream (each attempt)"),
    "upstream_succeeded": ("batchgate_upstream_requests_succeeded", "Requests that ended with a 2xx"),
    "upstream_failed": ("batchgate_upstream_requests_failed", "Requests that ended in the error file"),
    "upstream_retried": ("batchgate_upstream_requests_retried", "Requests that needed at least one retry"),
    "upstream_429": ("batchgate_upstream_429", "429 answers from the upstream"),
    "upstream_fallback": ("batchgate_upstream_fallbacks", "Requests passed on to a fallback provider, by the one left"),
    "upstream_circuit_opened": ("batchgate_upstream_circuit_opened", "Times a provider's circuit breaker opened"),
}


class RedisCollector:
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self):
        counters = self.store.metric_counters()
        by_name: dict[str, dict[str, int]] = defaultdict(dict)
        for key, value in counters.items():
            name, _, label = key.partition("|")
            by_name[name][label] = int(value)

        for name, (metric, doc) in _COUNTERS.items():
            family = CounterMetricFamily(metric, doc, labels=["provider"])
            for provider, value in sorted(by_name.get(name, {}).items()):
                family.add_metric([provider], value)
            yield family

        waits = CounterMetricFamily("batchgate_limiter_wait_seconds", "Time requests waited for the rate limiter",
                                    labels=["provider"])
        for provider, ms in sorted(by_name.get("limiter_wait_ms", {}).items()):
            waits.add_metric([provider], ms / 1000)
        yield waits

        finished = CounterMetricFamily("batchgate_batches_finished", "Batches that reached a terminal status",
                                       labels=["status"])
        for status, value in sorted(by_name.get("batches_finished", {}).items()):
            finished.add_metric([status], value)
        yield finished

        reruns = CounterMetricFamily("batchgate_chunk_reruns", "Chunk runs after the first (crash recovery)")
        reruns.add_metric([], sum(by_name.get("chunk_reruns", {}).values()))
        yield reruns

        repairs = CounterMetricFamily("batchgate_sweeper_repairs", "Work the sweeper re-drove", labels=["kind"])
        for kind, value in sorted(by_name.get("sweeper_repairs", {}).items()):
            repairs.add_metric([kind], value)
        yield repairs

        yield from self._active()
        yield from self._latency()

    def _active(self):
        statuses, oldest_created = self.store.active_statuses()
        gauge = GaugeMetricFamily("batchgate_batches_active", "Batches not yet finished, by status", labels=["status"])
        for status in sorted(ACTIVE_STATUSES):
            gauge.add_metric([status], sum(1 for s in statuses if s == status))
        yield gauge
        oldest = GaugeMetricFamily("batchgate_oldest_active_batch_age_seconds", "Age of the oldest unfinished batch")
        oldest.add_metric([], max(0.0, time.time() - oldest_created) if oldest_created is not None else 0.0)
        yield oldest
        depth = GaugeMetricFamily("batchgate_queue_depth", "Messages waiting in a Celery queue", labels=["queue"])
        for queue in (CHUNKS_QUEUE, CONTROL_QUEUE):
            depth.add_metric([queue], self.store.queue_depth(queue))
        yield depth

    def _latency(self):
        raw = self.store.latency_histogram()
        per_provider: dict[str, dict[str, int]] = defaultdict(dict)
        for key, value in raw.items():
            provider, _, part = key.partition("|")
            per_provider[provider][part] = int(value)
        family = HistogramMetricFamily("batchgate_upstream_latency_seconds", "Upstream answer time per attempt",
                                       labels=["provider"])
        for provider, parts in sorted(per_provider.items()):
            cumulative, buckets = 0, []
            for i, bound in enumerate(metrics.LATENCY_BUCKETS_S):
                cumulative += parts.get(str(i), 0)
                buckets.append((str(bound), cumulative))
            buckets.append(("+Inf", parts.get("count", 0)))
            family.add_metric([provider], buckets, parts.get("sum_ms", 0) / 1000)
        yield family


def make_registry(store: Store) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(store))
    return registry
