"""deploy/grafana/batchgate.json: every metric its queries use is one the real /metrics of a running deployment
exports (after a small batch, and one whose requests all fail), and queries aggregate across API pods with max (every
pod reports the whole deployment, so a sum would count it once per pod)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from stack import METRICS_TOKEN, chat_lines, submit, wait_terminal

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "batchgate.json").read_text())
METRIC = re.compile(r"\bbatchgate_[a-z0-9_]+\b")
# What each exposition type adds to a family's name in its samples.
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created")}


def queries() -> list[str]:
    return [target["expr"] for panel in DASHBOARD["panels"] for target in panel.get("targets", [])]


def test_the_dashboard_covers_what_operators_watch():
    assert DASHBOARD["uid"] == "batchgate" and DASHBOARD["panels"]
    titles = " | ".join(panel["title"].lower() for panel in DASHBOARD["panels"])
    for topic in ("throughput", "latency", "error", "429", "queue depth", "status", "tenant", "pending"):
        assert topic in titles, topic
    assert any(v["type"] == "datasource" for v in DASHBOARD["templating"]["list"])
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
    for expr in queries():
        assert expr.count("(") == expr.count(")"), expr
        # every metric is first taken by max (across pods), never summed raw
        for name in METRIC.findall(expr):
            taken_by_max = (r"max(\s+by\s*\([^)]*\))?\s*\((\s*sum without \(provider\) \()?"
                            rf"\s*(rate|increase)?\(?{name}\b")
            assert re.search(taken_by_max, expr), f"{name} in {expr!r} is not aggregated with max"


@pytest.mark.e2e
def test_every_metric_the_dashboard_queries_is_exported(stack):
    client = stack.client()
    stack.sim_config(error_rate=1.0)  # every answer a 500: after the retries each line is an http_500 error line
    try:
        failing = wait_terminal(client, submit(client, chat_lines(3, prefix="fail")).id)
    finally:
        stack.sim_config(error_rate=0.0)
    assert failing.request_counts.failed == 3
    done = wait_terminal(client, submit(client, chat_lines(20)).id)
    assert done.status == "completed"

    resp = httpx.get(stack.base_url.removesuffix("/v1") + "/metrics",
                     headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
    assert resp.status_code == 200
    families = list(text_string_to_metric_families(resp.text))
    exported = {family.name + suffix for family in families for suffix in SUFFIXES.get(family.type, ("",))}
    with_samples = {sample.name for family in families for sample in family.samples}
    used = {name for expr in queries() for name in METRIC.findall(expr)}
    assert used, "the dashboard queries no batchgate metric"
    assert sorted(used - exported) == [], "queried but not exported"
    # The new families carry samples after these batches (bounded labels: tenants, codes, providers).
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    assert samples[("batchgate_tenant_lines_total", (("tenant", "tenant-a"),))] >= 23
    assert samples[("batchgate_error_lines_total", (("code", "http_500"),))] >= 3
    assert ("batchgate_pending_requests", (("provider", "default"),)) in samples
    assert {"batchgate_upstream_requests_sent_total", "batchgate_upstream_latency_seconds_bucket",
            "batchgate_batches_active", "batchgate_queue_depth"} <= with_samples
