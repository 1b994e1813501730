"""Operational counters kept in Redis, so every worker process on every host adds to one set of figures.

Workers count into a local buffer and flush it with one pipelined round trip per progress tick; the API's
/metrics reads the hashes at scrape time and renders them for Prometheus.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.store import Store

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def field(name: str, label: str = "") -> str:
    return f"{name}|{label}"


class MetricsBuffer:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.latency: Counter[str] = Counter()

    def inc(self, name: str, label: str = "", amount: int = 1) -> None:
        self.counts[field(name, label)] += amount

    def observe_latency(self, provider: str, seconds: float) -> None:
        self.latency[f"{provider}|{bisect.bisect_left(LATENCY_BUCKETS_S, seconds)}"] += 1
        self.latency[f"{provider}|sum_ms"] += int(seconds * 1000)
        self.latency[f"{provider}|count"] += 1

    def flush(self, store: "Store") -> None:
        store.add_metrics(self.counts, self.latency)
        self.counts.clear()
        self.latency.clear()
