"""Prometheus /metrics: scraped while a batch runs, the counters move; only the operator may read them."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from stack import ADMIN_API_KEY, API_KEY, METRICS_TOKEN, chat_lines, submit, wait_terminal
from starlette.datastructures import Headers
from starlette.testclient import TestClient

from api.auth import check_metrics_access
from api.main import create_app
from shared.errors import AuthenticationFailed
from shared.settings import Settings

pytestmark = pytest.mark.e2e


def metrics_url(stack) -> str:
    return stack.base_url.removesuffix("/v1") + "/metrics"


def scrape(stack) -> dict[tuple[str, tuple], float]:
    resp = httpx.get(metrics_url(stack), headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=5)
    assert resp.status_code == 200, resp.text
    text = resp.text
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


def test_metrics_need_the_admin_key_or_the_metrics_token(stack):
    """With tenant keys configured, a tenant's key, no key or a wrong one is a 401 in OpenAI's envelope."""
    url = metrics_url(stack)
    for headers in ({}, {"Authorization": f"Bearer {API_KEY}"}, {"Authorization": "Bearer metrics-token-wrong"},
                    {"x-api-key": METRICS_TOKEN}):
        resp = httpx.get(url, headers=headers, timeout=5)
        assert resp.status_code == 401, headers
        error = resp.json()["error"]
        assert error["code"] == "invalid_api_key" and "BATCHGATE_METRICS_TOKEN" in error["message"]
        assert "batchgate_" not in resp.text
    for token in (METRICS_TOKEN, ADMIN_API_KEY):
        resp = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert resp.status_code == 200 and "batchgate_queue_depth" in resp.text


def test_metrics_are_open_only_in_dev_mode_without_keys(redis_server):
    open_app = TestClient(create_app(Settings(dev_mode=True, redis_url=redis_server)))
    assert open_app.get("/metrics").status_code == 200
    keyed = TestClient(create_app(Settings(dev_mode=True, api_keys="sk-k=t", redis_url=redis_server)))
    assert keyed.get("/metrics").status_code == 401
    token = TestClient(create_app(Settings(api_keys="sk-k=t", metrics_token="tok", redis_url=redis_server)))
    assert token.get("/metrics", headers={"Authorization": "Bearer tok"}).status_code == 200
    assert token.get("/metrics", headers={"Authorization": "Bearer sk-k"}).status_code == 401


def test_metrics_access_rule():
    def allowed(settings: Settings, *headers: tuple[str, str]) -> bool:
        try:
            check_metrics_access(settings, Headers(raw=[(k.encode(), v.encode()) for k, v in headers]))
            return True
        except AuthenticationFailed:
            return False

    assert allowed(Settings(dev_mode=True))
    assert not allowed(Settings(dev_mode=False))  # no keys and not dev mode: nothing is open
    assert not allowed(Settings(dev_mode=False, admin_api_key="", metrics_token=""), ("authorization", "Bearer "))
    prod = Settings(api_keys="sk-k=t", admin_api_key="adm", metrics_token="tok")
    assert allowed(prod, ("authorization", "Bearer tok")) and allowed(prod, ("authorization", "bearer adm"))
    assert not allowed(prod) and not allowed(prod, ("authorization", "Bearer sk-k"))
    assert not allowed(prod, ("authorization", "tok")) and not allowed(prod, ("x-api-key", "tok"))
