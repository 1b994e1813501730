"""Batches run end to end: real worker processes, the simulator upstream, the SDK reading the files."""

from __future__ import annotations

import io
import json

import orjson
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from stack import assert_exactly_once, chat_lines, submit, wait_terminal

pytestmark = pytest.mark.e2e


@pytest.fixture
def sim(stack):
    yield stack
    stack.sim_config(latency_ms=0, jitter_ms=0, error_rate=0, rate_429=0)


def test_two_thousand_requests_complete_exactly_once_with_live_progress(sim):
    sim.sim_config(latency_ms=100)
    client = sim.client()
    batch = submit(client, chat_lines(2000), metadata={"suite": "execution"})
    seen_progress: list[int] = []

    def watch(b) -> None:
        if b.status == "in_progress":
            seen_progress.append(b.request_counts.completed + b.request_counts.failed)

    final = wait_terminal(client, batch.id, timeout=180, on_poll=watch)
    assert final.status == "completed", final
    assert final.request_counts.total == 2000 and final.request_counts.completed == 2000
    assert final.error_file_id is None
    assert final.model == "sim-model"
    assert final.in_progress_at and final.finalizing_at and final.completed_at
    assert final.in_progress_at <= final.finalizing_at <= final.completed_at

    out, _ = assert_exactly_once(client, final, {f"req-{i}" for i in range(2000)})
    input_tokens = output_tokens = total_tokens = 0
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        completion = ChatCompletion.model_validate(line["response"]["body"])
        input_tokens += completion.usage.prompt_tokens
        output_tokens += completion.usage.completion_tokens
        total_tokens += completion.usage.total_tokens
    assert final.usage.input_tokens == input_tokens
    assert final.usage.output_tokens == output_tokens
    assert final.usage.total_tokens == total_tokens

    output_file = client.files.retrieve(final.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.bytes > 0

    increasing = [b for a, b in zip(seen_progress, seen_progress[1:]) if b > a]
    assert len(seen_progress) >= 2 and increasing, f"no live progress observed: {seen_progress}"
    assert all(0 < n < 2000 for n in seen_progress[1:-1]) or seen_progress


def test_injected_500s_and_429s_are_retried_to_success(sim):
    sim.sim_config(error_rate=0.05, rate_429=0.05, retry_after_s=0.05)
    before = sim.sim_stats()
    client = sim.client()
    final = wait_terminal(client, submit(client, chat_lines(600)).id, timeout=120)
    assert final.status == "completed"
    out, err = assert_exactly_once(client, final, {f"req-{i}" for i in range(600)})
    after = sim.sim_stats()
    statuses = {k: after["by_status"].get(k, 0) - before["by_status"].get(k, 0) for k in after["by_status"]}
    assert statuses.get("500", 0) > 0 and statuses.get("429", 0) > 0, statuses
    assert len(out) == 600 and err == []


def test_exhausted_retries_become_error_lines_with_their_status(sim):
    sim.sim_config(error_rate=1.0)
    client = sim.client()
    final = wait_terminal(client, submit(client, chat_lines(20)).id, timeout=120)
    assert final.status == "completed"
    assert final.output_file_id is None and final.request_counts.failed == 20
    _, err = assert_exactly_once(client, final, {f"req-{i}" for i in range(20)})
    for line in err:
        assert line["error"] is None
        assert line["response"]["status_code"] == 500
        assert line["response"]["body"]["error"]["type"] == "server_error"


def test_embeddings_batch(sim):
    client = sim.client()
    lines = b"".join(
        orjson.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                      "body": {"model": "sim-embed", "input": f"text {i}"}}) + b"\n"
        for i in range(50)
    )
    final = wait_terminal(client, submit(client, lines, endpoint="/v1/embeddings").id)
    assert final.status == "completed"
    out, _ = assert_exactly_once(client, final, {f"e{i}" for i in range(50)})
    assert all(CreateEmbeddingResponse.model_validate(o["response"]["body"]).data for o in out)
    assert final.usage.input_tokens > 0


def _line(i: int, **over) -> dict:
    obj = {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}}
    obj.update(over)
    return obj


def _jsonl(objs: list) -> bytes:
    return b"".join((o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n" for o in objs)


VALIDATION_CASES = {
    "invalid_json_line": (_jsonl([_line(0), b"{not json"]), 2, None),
    "missing_required_parameter": (_jsonl([_line(0), {k: v for k, v in _line(1).items() if k != "method"}]), 2, "method"),
    "duplicate_custom_id": (_jsonl([_line(0), _line(1), _line(0)]), 3, "custom_id"),
    "mismatched_model": (_jsonl([_line(0), _line(1, body={"model": "other", "messages": []})]), 2, "body.model"),
    "invalid_url": (_jsonl([_line(0, url="/v1/embeddings")]), 1, "url"),
    "invalid_method": (_jsonl([_line(0), _line(1), _line(2, method="GET")]), 3, "method"),
    "empty_file": (b"\n\n", None, None),
}


@pytest.mark.parametrize("code", sorted(VALIDATION_CASES))
def test_validation_failures(stack, code):
    content, line, param = VALIDATION_CASES[code]
    client = stack.client()
    final = wait_terminal(client, submit(client, content).id, timeout=60)
    assert final.status == "failed" and final.failed_at is not None
    first = final.errors.data[0]
    assert first.code == code and first.line == line and first.param == param and first.message


def test_too_many_requests_and_too_large(stack):
    client = stack.client()
    final = wait_terminal(client, submit(client, chat_lines(5001)).id, timeout=60)
    assert final.status == "failed" and final.errors.data[0].code == "too_many_requests"

    padding = "x" * 1000
    big = b"".join(
        json.dumps(_line(i, body={"model": "sim-model", "messages": [], "pad": padding})).encode() + b"\n"
        for i in range(9000)
    )
    final = wait_terminal(client, submit(client, big).id, timeout=60)
    assert final.status == "failed" and final.errors.data[0].code == "file_too_large"


def test_input_file_deleted_while_the_batch_runs_never_hangs(stack):
    client = stack.client()
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(300))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    client.files.delete(uploaded.id)
    final = wait_terminal(client, batch.id, timeout=60)
    if final.status == "failed":
        assert final.errors.data[0].code == "file_not_found"
    else:
        assert final.status == "completed"
        assert_exactly_once(client, final, {f"req-{i}" for i in range(300)})


def test_operator_reads_usage_per_tenant(stack):
    import httpx

    admin = {"Authorization": "Bearer sk-admin-test"}
    url = stack.base_url.removesuffix("/v1") + "/admin/usage"
    before = httpx.get(url, headers=admin).json()["tenants"].get("tenant-a", {})
    client = stack.client()
    final = wait_terminal(client, submit(client, chat_lines(30)).id)
    after = httpx.get(url, headers=admin).json()["tenants"]["tenant-a"]
    assert after["total_tokens"] - before.get("total_tokens", 0) == final.usage.total_tokens
    assert after["requests_completed"] - before.get("requests_completed", 0) == 30
    assert after["batches"] - before.get("batches", 0) == 1
    assert httpx.get(url, headers={"Authorization": "Bearer sk-test-tenant-a"}).status_code == 401
