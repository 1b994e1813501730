"""Prometheus /metrics: scraped while a batch runs, the counters move."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from stack import chat_lines, submit, wait_terminal

pytestmark = pytest.mark.e2e


def scrape(stack) -> dict[tuple[str, tuple], float]:
    text = httpx.get(stack.base_url.removesuffix("/v1") + "/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_during_a_batch(stack):
    stack.sim_config(latency_ms=50)
    try:
        before = scrape(stack)
        client = stack.client()
        batch = submit(client, chat_lines(1500))
        during = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            current = client.batches.retrieve(batch.id)
            if current.status == "in_progress":
                during.append(scrape(stack))
            if current.status in ("completed", "failed") or len(during) >= 3:
                break
            time.sleep(0.3)
        final = wait_terminal(client, batch.id)
        after = scrape(stack)
    finally:
        stack.sim_config(latency_ms=0)
    assert final.status == "completed"
    sent = "batchgate_upstream_requests_sent_total"
    assert during, "never scraped while the batch ran"
    assert value(during[0], "batchgate_batches_active", status="in_progress") >= 1
    assert value(during[0], sent, provider="default") < value(after, sent, provider="default")
    assert value(after, sent, provider="default") - value(before, sent, provider="default") >= 1500
    assert value(after, "batchgate_upstream_requests_succeeded_total", provider="default") >= \
        value(before, "batchgate_upstream_requests_succeeded_total", provider="default") + 1500
    assert value(after, "batchgate_batches_finished_total", status="completed") > \
        value(before, "batchgate_batches_finished_total", status="completed")
    assert value(after, "batchgate_upstream_latency_seconds_count", provider="default") >= 1500
    assert value(after, "batchgate_upstream_latency_seconds_bucket", provider="default", le="0.025") < \
        value(after, "batchgate_upstream_latency_seconds_bucket", provider="default", le="0.1")
    assert ("batchgate_queue_depth", (("queue", "chunks"),)) in after
