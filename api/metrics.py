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
from shared.providers import Provider, ProviderRegistry
from shared.queue import CHUNKS_QUEUE, CONTROL_QUEUE
from shared.lifecycle import ACTIVE as ACTIVE_STATUSES
from shared.lifecycle import MICROS
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


def provider_limits(store: Store, provider: Provider) -> dict:
    """A provider's limits as the operators see them (GET /admin/providers, the adaptive gauge): the configured
    ones, requests in flight across every worker, and for `adaptive = true` the limit AIMD holds now."""
    state = store.limiter_state(provider.name)
    view = {"name": provider.name, "max_concurrency": provider.max_concurrency, "max_inflight": provider.max_inflight,
            "rpm": provider.rpm, "tpm": provider.tpm, "adaptive": provider.adaptive,
            "adaptive_min": provider.adaptive_min, "in_flight": state["in_flight"], "paused_ms": state["paused_ms"],
            "adaptive_limit": None}
    if provider.adaptive:
        processes = store.pool_processes()
        ceiling = provider.max_inflight or provider.max_concurrency * max(1, processes)
        floor = min(provider.adaptive_min, ceiling)
        adaptive = state["adaptive"]
        current = float(adaptive.get("limit", floor))
        view["adaptive_limit"] = {
            "current": int(max(floor, min(ceiling, current))),  # the cap applied: the limit's whole part
            "min": floor, "max": ceiling, "decreases": int(adaptive.get("cuts", 0)),
            "latency_ewma_ms": round(float(adaptive["ewma_ms"]), 1) if "ewma_ms" in adaptive else None,
            "latency_base_ms": round(float(adaptive["base_ms"]), 1) if "base_ms" in adaptive else None,
        }
    return view


class RedisCollector:
    def __init__(self, store: Store, providers: ProviderRegistry | None = None) -> None:
        self.store = store
        self.providers = providers

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

        cost = CounterMetricFamily("batchgate_cost", "Cost of the ended batches' usage at the [prices] of the "
                                   "providers file, in the currency's units", labels=["tenant", "currency"])
        for label, micros in sorted(by_name.get("cost_micros", {}).items()):
            currency, _, tenant = label.partition("|")
            cost.add_metric([tenant, currency], micros / MICROS)
        yield cost

        reruns = CounterMetricFamily("batchgate_chunk_reruns", "Chunk runs after the first (crash recovery)")
        reruns.add_metric([], sum(by_name.get("chunk_reruns", {}).values()))
        yield reruns

        repairs = CounterMetricFamily("batchgate_sweeper_repairs", "Work the sweeper re-drove", labels=["kind"])
        for kind, value in sorted(by_name.get("sweeper_repairs", {}).items()):
            repairs.add_metric([kind], value)
        yield repairs

        # Result lines made durable: by tenant (the configured tenants), and error-file lines by code (README
        # "Error codes", plus http_<status> for a non-2xx answer); both label sets are bounded.
        lines = CounterMetricFamily("batchgate_tenant_lines", "Result lines written (output and error), by tenant",
                                    labels=["tenant"])
        for tenant, value in sorted(by_name.get("tenant_lines", {}).items()):
            lines.add_metric([tenant], value)
        yield lines
        errors = CounterMetricFamily("batchgate_error_lines", "Error-file lines written, by error code",
                                     labels=["code"])
        for code, value in sorted(by_name.get("error_lines", {}).items()):
            errors.add_metric([code], value)
        yield errors

        yield from self._active()
        yield from self._pending()
        yield from self._latency()
        yield from self._adaptive()

    def _adaptive(self):
        adaptive = [p for p in (self.providers.providers.values() if self.providers else ()) if p.adaptive]
        limit = GaugeMetricFamily("batchgate_upstream_adaptive_limit",
                                  "Requests in flight the adaptive (AIMD) limit allows now, across every worker",
                                  labels=["provider"])
        cuts = CounterMetricFamily("batchgate_upstream_adaptive_decreases",
                                   "Times the adaptive limit was halved (429, 503 or rising latency)",
                                   labels=["provider"])
        for provider in sorted(adaptive, key=lambda p: p.name):
            view = provider_limits(self.store, provider)["adaptive_limit"]
            limit.add_metric([provider.name], view["current"])
            cuts.add_metric([provider.name], view["decreases"])
        yield limit
        yield cuts

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

    def _pending(self):
        """The autoscaling signal (deploy/k8s/keda.yaml): requests of running batches not yet answered, by the
        provider their batch runs on (fallbacks aside), every configured provider present (0 when idle)."""
        gauge = GaugeMetricFamily("batchgate_pending_requests",
                                  "Requests of running batches waiting to be sent or answered, by provider",
                                  labels=["provider"])
        totals: dict[str, int] = defaultdict(int)
        if self.providers is not None:
            for name in self.providers.providers:
                totals[name] = 0
        for (provider, model), pending in self.store.pending_requests().items():
            totals[self._provider_of(provider, model)] += pending
        for provider, pending in sorted(totals.items()):
            gauge.add_metric([provider], pending)
        yield gauge

    def _provider_of(self, provider: str, model: str) -> str:
        """The provider a batch runs on, as a chunk run picks it (workers/chunk.py begin_chunk)."""
        if self.providers is None:
            return provider or "default"
        chosen = self.providers.get(provider) or self.providers.for_model(model or None)
        return chosen.name if chosen is not None else (provider or "default")

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


def make_registry(store: Store, providers: ProviderRegistry | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(store, providers))
    return registry
