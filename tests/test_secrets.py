"""A provider key never appears in a response, an output or error file, or a log line."""

from __future__ import annotations

import httpx
import pytest
from stack import (
    API_KEY,
    METRICS_TOKEN,
    UPSTREAM_SECRET,
    assert_exactly_once,
    chat_lines,
    submit,
    wait_terminal,
)

pytestmark = pytest.mark.e2e


def test_provider_key_stays_secret_through_upstream_errors(make_stack):
    # The upstream expects another key, answers 401 and echoes the key it was sent; some requests also 500.
    stack = make_stack(log_format="json").start(workers=1, concurrency=2)
    stack.sim_config(api_key="sk-some-other-key", error_rate=0.3)
    client = stack.client()
    final = wait_terminal(client, submit(client, chat_lines(200)).id, timeout=60)
    assert final.status == "completed" and final.request_counts.failed == 200
    _, err = assert_exactly_once(client, final, {f"req-{i}" for i in range(200)})
    assert any(line["response"]["status_code"] == 401 for line in err)

    secret = UPSTREAM_SECRET
    echoed = [line for line in err if line["response"]["status_code"] == 401]
    assert echoed and all("[redacted]" in line["response"]["body"]["error"]["message"] for line in echoed)
    assert secret not in client.files.content(final.error_file_id).text

    headers = {"Authorization": f"Bearer {API_KEY}"}
    for path in (f"/batches/{final.id}", "/batches", "/files", f"/files/{final.error_file_id}",
                 f"/files/{final.error_file_id}/content"):
        resp = httpx.get(stack.base_url + path, headers=headers)
        assert resp.status_code == 200
        assert secret not in resp.text and all(secret not in v for v in resp.headers.values())
    metrics_resp = httpx.get(stack.base_url.removesuffix("/v1") + "/metrics",
                             headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert metrics_resp.status_code == 200
    metrics = metrics_resp.text
    assert secret not in metrics

    stack.stop()
    logs = stack.logs()
    assert "batch" in logs  # the processes did log
    assert secret not in logs
    for path in (stack.root / "logs").glob("*.log"):
        assert secret not in path.read_text(errors="replace")
