"""request_counts.cancelled and .expired (batchgate's extensions), read through the real openai SDK."""

from __future__ import annotations

import time

import pytest
from stack import assert_exactly_once, chat_lines, submit, wait_terminal

pytestmark = pytest.mark.e2e

N = 400


def _codes(lines: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in lines:
        code = line["error"]["code"] if line["error"] else f"http_{line['response']['status_code']}"
        out[code] = out.get(code, 0) + 1
    return out


def test_cancelled_and_expired_lines_are_counted_apart_from_failures(make_stack):
    # 2 processes x 2 senders at 100 ms: about 40 requests a second, so 400 take ~10 s and a 4 s window cuts them off.
    dep = make_stack(sim_latency_ms=100, upstream_max_concurrency=2, completion_window_s=4)
    dep.start(workers=1, concurrency=2)
    client = dep.client()
    ids = {f"req-{i}" for i in range(N)}
    to_cancel = submit(client, chat_lines(N))
    to_expire = submit(client, chat_lines(N))
    while client.batches.retrieve(to_cancel.id).request_counts.completed < 5:
        time.sleep(0.1)
    client.batches.cancel(to_cancel.id)

    cancelled = wait_terminal(client, to_cancel.id, timeout=60)
    assert cancelled.status == "cancelled"
    _, err = assert_exactly_once(client, cancelled, ids)
    counts = cancelled.request_counts
    # The SDK parses the object; the extension fields are its extras, and `failed` still counts them (as OpenAI's).
    assert counts.model_extra["cancelled"] == _codes(err)["batch_cancelled"] > 0
    assert counts.model_extra["expired"] == 0
    assert counts.failed == counts.model_extra["cancelled"] and counts.completed > 0
    assert cancelled.to_dict()["request_counts"]["cancelled"] == counts.model_extra["cancelled"]

    expired = wait_terminal(client, to_expire.id, timeout=60)
    assert expired.status == "expired"
    _, err = assert_exactly_once(client, expired, ids)
    counts = expired.request_counts
    assert counts.model_extra["expired"] == _codes(err)["batch_expired"] > 0
    assert counts.model_extra["cancelled"] == 0 and counts.failed == counts.model_extra["expired"]

    # A batch with real failures keeps them apart: failed, none cancelled or expired.
    dep.sim_config(latency_ms=0, error_rate=1.0)
    failing = wait_terminal(client, submit(client, chat_lines(3)).id, timeout=30)
    assert failing.request_counts.failed == 3
    assert failing.request_counts.model_extra == {"cancelled": 0, "expired": 0}
