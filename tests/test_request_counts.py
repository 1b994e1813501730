"""request_counts' extensions (cancelled, expired, succeeded, errored, processing, errors_by_code), read through the
real openai SDK: in every terminal status they equal what the files hold."""

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


def assert_counts_match_files(batch, out: list[dict], err: list[dict]) -> None:
    extra = batch.request_counts.model_extra
    err_codes = _codes(err)
    assert extra["errors_by_code"] == err_codes
    assert extra["succeeded"] == len(out) == batch.request_counts.completed
    assert extra["cancelled"] == err_codes.get("batch_cancelled", 0)
    assert extra["expired"] == err_codes.get("batch_expired", 0)
    assert extra["errored"] == len(err) - extra["cancelled"] - extra["expired"]
    assert extra["processing"] == 0


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
    out, err = assert_exactly_once(client, cancelled, ids)
    assert_counts_match_files(cancelled, out, err)
    counts = cancelled.request_counts
    # The SDK parses the object; the extension fields are its extras, and `failed` still counts them (as OpenAI's).
    assert counts.model_extra["cancelled"] == _codes(err)["batch_cancelled"] > 0
    assert counts.model_extra["expired"] == 0
    assert counts.failed == counts.model_extra["cancelled"] and counts.completed > 0
    assert cancelled.to_dict()["request_counts"]["cancelled"] == counts.model_extra["cancelled"]

    expired = wait_terminal(client, to_expire.id, timeout=60)
    assert expired.status == "expired"
    out, err = assert_exactly_once(client, expired, ids)
    assert_counts_match_files(expired, out, err)
    counts = expired.request_counts
    assert counts.model_extra["expired"] == _codes(err)["batch_expired"] > 0
    assert counts.model_extra["cancelled"] == 0 and counts.failed == counts.model_extra["expired"]

    # A batch with real failures keeps them apart: failed, none cancelled or expired.
    dep.sim_config(latency_ms=0, error_rate=1.0)
    failing = wait_terminal(client, submit(client, chat_lines(3)).id, timeout=30)
    assert failing.request_counts.failed == 3
    extra = failing.request_counts.model_extra
    assert (extra["cancelled"], extra["expired"], extra["errored"]) == (0, 0, 3)
    out, err = assert_exactly_once(client, failing, {f"req-{i}" for i in range(3)})
    assert_counts_match_files(failing, out, err)


def test_a_completed_batch_with_failures_counts_as_its_files(make_stack):
    # Half failing: a completed batch whose counts split as its files do; while it ran, processing counted down.
    dep = make_stack(sim_latency_ms=50, upstream_max_concurrency=4, upstream_max_retries=0)
    dep.start(workers=1, concurrency=2)
    client = dep.client()
    dep.sim_config(error_rate=0.5)
    mixed = submit(client, chat_lines(200))
    seen_processing = []
    while (batch := client.batches.retrieve(mixed.id)).status not in ("completed", "failed", "expired", "cancelled"):
        if batch.status == "in_progress":
            counts = batch.request_counts
            assert counts.model_extra["processing"] == counts.total - counts.completed - counts.failed
            seen_processing.append(counts.model_extra["processing"])
        time.sleep(0.1)
    assert batch.status == "completed" and seen_processing and max(seen_processing) > 0
    out, err = assert_exactly_once(client, batch, {f"req-{i}" for i in range(200)})
    assert out and err
    assert_counts_match_files(batch, out, err)
