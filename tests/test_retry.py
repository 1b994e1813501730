"""`POST /v1/batches/{id}/retry` (issue 18, item 4): a new batch of exactly a finished batch's failed lines, through
the real openai SDK against a real deployment (redis-server, API, celery workers, the simulator failing chosen lines
deterministically), and the selection's pure parts."""

from __future__ import annotations

import io
import json
import re
import time

import httpx
import openai
import orjson
import pytest
from openai.types import Batch
from stack import API_KEY, OTHER_API_KEY, Stack, assert_exactly_once, read_lines, submit, wait_terminal

from shared import retry_service
from shared.errors import InvalidRequest
from shared.lifecycle import BatchRecord
from shared.lines import encode, error_line, response_line

# ---- the selection, pure ------------------------------------------------------------------------------------------


def _result(custom_id: str, status: int | None = None, code: str | None = None) -> bytes:
    line = (response_line("b", 1, custom_id, status, "req_1", {"error": {"message": "x" * 50}}) if status
            else error_line("b", 1, custom_id, code, "went wrong"))
    return encode(line) + b"\n"


def test_select_failed_matches_errors_by_code():
    lines = [_result("a", 500), _result("b", 429), _result("c", code="rate_limit_exceeded"),
             _result("d", code="batch_cancelled"), _result("e", code="batch_expired"), b"\n", b"not json\n"]
    assert retry_service.select_failed(lines, None) == {"a", "b", "c", "d", "e"}
    assert retry_service.select_failed(lines, frozenset({"http_500"})) == {"a"}
    assert retry_service.select_failed(lines, frozenset({"rate_limit_exceeded", "http_429"})) == {"b", "c"}
    assert retry_service.select_failed(lines, frozenset({"batch_expired", "batch_cancelled"})) == {"d", "e"}
    assert retry_service.select_failed(lines, frozenset({"http_404"})) == set()


def test_pick_lines_keeps_bytes_and_input_order():
    raw = [
        b'\xef\xbb\xbf{"custom_id": "x1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}\r\n',
        b'{"custom_id":"x2","method":"POST","url":"/v1/chat/completions","body":{"model":"m","n":1}}\n',
        b"\n",
        '{"body": {"model": "m", "messages": ["h\u00e9 \\u00e9"]}, "url": "/v1/chat/completions", '
        '"method": "POST", "custom_id": "x3"}'.encode(),  # last line, no newline
    ]
    source = io.BytesIO(b"".join(raw))
    picked = list(retry_service.pick_lines(retry_service.input_lines(source, 1 << 20), {"x3", "x1"}))
    assert picked == [raw[0][3:], raw[3] + b"\n"]  # BOM dropped (it is the file's, not the line's); order kept
    # A line past the limit is skipped without being read whole; the ones after it still count.
    long = b'{"custom_id": "big", "body": "' + b"y" * 5000 + b'"}\n'
    source = io.BytesIO(long + raw[1])
    assert list(retry_service.pick_lines(retry_service.input_lines(source, 1000), {"big", "x2"})) == [raw[1]]


@pytest.mark.parametrize("body", [[], "x", {"codes": []}, {"codes": "http_500"}, {"codes": [1]}, {"codes": [""]},
                                  {"code": ["http_500"]}, {"codes": ["x"] * 101}])
def test_parse_codes_refuses_what_is_not_a_list_of_codes(body):
    with pytest.raises(InvalidRequest):
        retry_service.parse_codes(body)


def test_parse_codes_and_the_retried_by_fields():
    assert retry_service.parse_codes(None) is None and retry_service.parse_codes({}) is None
    assert retry_service.parse_codes({"codes": None}) is None
    assert retry_service.parse_codes({"codes": ["a", "b", "a"]}) == {"a", "b"}
    fields = {"endpoint": "/v1/chat/completions", "input_file_id": "file-1", "created_at": "1", "status": "completed",
              "retried_by:batch_b": "9", "retried_by:batch_a": "12", "retry_of": "batch_0"}
    batch = BatchRecord.from_hash("batch_x", fields).to_batch(0, 0)
    assert batch.retried_by == ["batch_b", "batch_a"] and batch.retry_of == "batch_0"


# ---- end to end ---------------------------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"


def line(custom_id: str, content: str, compact: bool = True) -> bytes:
    obj = {"custom_id": custom_id, "method": "POST", "url": CHAT,
           "body": {"model": "sim-model", "messages": [{"role": "user", "content": content}]}}
    # Two spellings, so "byte-identical" is tested against more than one serializer's output.
    return orjson.dumps(obj) + b"\n" if compact else json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def retry(client: openai.OpenAI, batch_id: str, **body) -> Batch:
    return client.post(f"/batches/{batch_id}/retry", cast_to=Batch, body=body or None)


def reset_stats(dep: Stack) -> None:
    httpx.post(f"http://127.0.0.1:{dep.sim_port}/_sim/reset", timeout=5).raise_for_status()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """This module's own deployment (named like conftest's, whose failure hook then attaches its logs): no upstream
    retries, so one injected failure is one failed line; 2 processes x 8 senders."""
    running = Stack(tmp_path_factory.mktemp("retry"), upstream_max_retries=0, upstream_max_concurrency=8)
    running.start(workers=1, concurrency=2)
    yield running
    running.stop()


@pytest.mark.e2e
def test_retry_sends_exactly_the_100_failed_lines_of_1000(stack):
    dep = stack
    client = dep.client()
    chosen = {f"req-{i}" for i in range(1000) if i % 10 == 7}
    lines = [line(f"req-{i}", f"FAIL-500 please, {i} é" if f"req-{i}" in chosen else f"hello {i}", compact=i % 2 == 0)
             for i in range(1000)]
    dep.sim_config(fail_when_contains={"FAIL-500": 500})
    old = wait_terminal(client, submit(client, b"".join(lines), metadata={"run": "r1"}).id)
    assert old.status == "completed"
    out, err = assert_exactly_once(client, old, {f"req-{i}" for i in range(1000)})
    assert {e["custom_id"] for e in err} == chosen and len(err) == 100
    assert old.request_counts.model_extra["errors_by_code"] == {"http_500": 100}
    assert old.model_extra["retried_by"] == [] and old.model_extra["retry_of"] is None

    dep.sim_config(fail_when_contains={})  # the upstream is healthy again
    reset_stats(dep)
    new = retry(client, old.id)
    assert new.status == "validating" and new.id != old.id
    assert new.model_extra["retry_of"] == old.id
    assert (new.endpoint, new.completion_window, new.metadata) == (old.endpoint, old.completion_window, {"run": "r1"})

    # Its input: a new file holding exactly the chosen lines as they were written, in input order.
    uploaded = client.files.retrieve(new.input_file_id)
    assert (uploaded.filename, uploaded.purpose) == (f"{old.id}-retry.jsonl", "batch")
    expected = b"".join(raw for i, raw in enumerate(lines) if f"req-{i}" in chosen)
    assert client.files.content(new.input_file_id).content == expected and uploaded.bytes == len(expected)

    done = wait_terminal(client, new.id)
    assert done.status == "completed" and done.request_counts.total == 100
    out, err = assert_exactly_once(client, done, chosen)
    assert len(out) == 100 and err == []
    stats = dep.sim_stats()
    assert stats["requests"] == 100 and stats["by_path"] == {CHAT: 100}  # exactly those lines went upstream again
    sent = {json.loads(raw)["custom_id"] for raw in expected.splitlines()}
    assert sent == chosen

    again = client.batches.retrieve(old.id)
    assert again.model_extra["retried_by"] == [new.id]
    assert again.status == "completed" and again.request_counts.failed == 100  # the old batch is otherwise unchanged
    listed = {b.id: b for b in client.batches.list(limit=10)}
    assert listed[old.id].model_extra["retried_by"] == [new.id] and listed[new.id].model_extra["retry_of"] == old.id
    # The provider the model chose for the old batch serves the retry too.
    old_provider = dep.store.batch_record(old.id).state.provider
    assert old_provider and dep.store.batch_record(new.id).state.provider == old_provider


@pytest.mark.e2e
def test_retry_with_a_codes_filter_keeps_the_batch_settings(stack):
    # An end user's batch, with a window, metadata, priority and output expiry of its own, and a named provider.
    dep = stack
    client = dep.client(default_headers={"X-On-Behalf-Of": "alice"})
    kinds = {i: "FAIL-500" if i % 6 == 1 else "FAIL-400" if i % 6 == 2 else "fine" for i in range(60)}
    content = b"".join(line(f"c-{i}", f"{kinds[i]} {i}") for i in range(60))
    dep.sim_config(fail_when_contains={"FAIL-500": 500, "FAIL-400": 400})
    uploaded = client.files.create(file=("codes.jsonl", io.BytesIO(content)), purpose="batch")
    old = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="1h",
                                metadata={"team": "evals"}, extra_headers={"x-batchgate-provider": "default"},
                                extra_body={"priority": 7, "output_expires_after": {"anchor": "created_at",
                                                                                    "seconds": 7200}})
    old = wait_terminal(client, old.id)
    assert old.request_counts.model_extra["errors_by_code"] == {"http_500": 10, "http_400": 10}
    ids = {code: {f"c-{i}" for i, k in kinds.items() if k == kind} for code, kind in
           (("http_500", "FAIL-500"), ("http_400", "FAIL-400"))}

    only_400 = retry(client, old.id, codes=["http_400"])
    assert {json.loads(raw)["custom_id"] for raw in
            client.files.content(only_400.input_file_id).content.splitlines()} == ids["http_400"]
    assert (only_400.completion_window, only_400.metadata, only_400.model_extra["priority"]) == ("1h", {"team": "evals"}, 7)
    record = dep.store.batch_record(only_400.id)
    assert record.spec.output_ttl_s == 7200 and record.spec.scope == "tenant-a\x1falice"
    assert (record.state.provider, record.state.pinned) == ("default", True)
    both = retry(client, old.id, codes=["http_400", "http_500", "rate_limit_exceeded"])
    # Still failing upstream: the retries fail again, each exactly its own lines.
    for batch, expected in ((only_400, ids["http_400"]), (both, ids["http_400"] | ids["http_500"])):
        done = wait_terminal(client, batch.id)
        out, err = assert_exactly_once(client, done, expected)
        assert out == [] and len(err) == len(expected)
    assert client.batches.retrieve(old.id).model_extra["retried_by"] == [only_400.id, both.id]

    with pytest.raises(openai.BadRequestError) as refused:
        retry(client, old.id, codes=["rate_limit_exceeded"])
    assert refused.value.code == "nothing_to_retry" and "http_400, http_500" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        retry(client, old.id, codes="http_500")
    assert refused.value.code == "invalid_value" and refused.value.param == "codes"
    with pytest.raises(openai.BadRequestError):
        retry(client, old.id, code=["http_500"])  # a misspelt filter is refused, not taken for "everything"
    # Outside the batch's scope (the tenant without the end user, another tenant) it does not exist.
    for other in (dep.client(), dep.client(api_key=OTHER_API_KEY)):
        with pytest.raises(openai.NotFoundError):
            retry(other, old.id)
    with pytest.raises(openai.NotFoundError):
        retry(client, "batch_nope")

    dep.sim_config(fail_when_contains={})
    clean = wait_terminal(client, submit(client, content).id)
    with pytest.raises(openai.BadRequestError) as refused:
        retry(client, clean.id)
    assert refused.value.code == "nothing_to_retry"
    assert client.batches.retrieve(clean.id).model_extra["retried_by"] == []


@pytest.mark.e2e
def test_a_running_batch_is_409_and_its_cancelled_lines_are_retried(stack):
    dep = stack
    client = dep.client()
    dep.sim_config(latency_ms=1500)
    try:
        running = submit(client, b"".join(line(f"r-{i}", f"slow {i}") for i in range(60)))
        with pytest.raises(openai.ConflictError) as refused:
            retry(client, running.id)
        assert refused.value.code == "batch_not_finished"
        client.batches.cancel(running.id)
        with pytest.raises(openai.ConflictError):  # cancelling is not finished either
            retry(client, running.id)
        cancelled = wait_terminal(client, running.id)
    finally:
        dep.sim_config(latency_ms=0)
    assert cancelled.status == "cancelled"
    out, err = assert_exactly_once(client, cancelled, {f"r-{i}" for i in range(60)})
    never_sent = {e["custom_id"] for e in err if e["error"] and e["error"]["code"] == "batch_cancelled"}
    assert never_sent and len(out) + len(never_sent) == 60

    time.sleep(1.6)  # requests the simulator still holds from the cancelled batch are counted when they end
    reset_stats(dep)
    new = retry(client, cancelled.id, codes=["batch_cancelled"])
    done = wait_terminal(client, new.id)
    out, err = assert_exactly_once(client, done, never_sent)
    assert err == [] and dep.sim_stats()["requests"] == len(never_sent)


@pytest.mark.e2e
def test_a_deleted_input_file_is_409_and_retries_are_idempotent(stack):
    dep = stack
    client = dep.client()
    dep.sim_config(fail_when_contains={"FAIL-500": 500})
    try:
        old = wait_terminal(client, submit(client, b"".join(line(f"d-{i}", f"FAIL-500 {i}" if i < 3 else "ok")
                                                            for i in range(10))).id)
    finally:
        dep.sim_config(fail_when_contains={})
    assert old.request_counts.failed == 3

    # The same Idempotency-Key twice: one new batch, the same answer replayed.
    headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": "retry-1"}
    first = httpx.post(f"{dep.base_url}/batches/{old.id}/retry", headers=headers, json={"codes": ["http_500"]})
    again = httpx.post(f"{dep.base_url}/batches/{old.id}/retry", headers=headers, json={"codes": ["http_500"]})
    assert first.status_code == again.status_code == 200, first.text
    assert again.headers.get("idempotent-replayed") == "true" and again.json() == first.json()
    assert client.batches.retrieve(old.id).model_extra["retried_by"] == [first.json()["id"]]
    other = httpx.post(f"{dep.base_url}/batches/{old.id}/retry", headers=headers, json={})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert wait_terminal(client, first.json()["id"]).request_counts.completed == 3

    client.files.delete(old.error_file_id)
    with pytest.raises(openai.ConflictError) as refused:
        retry(client, old.id)
    assert refused.value.code == "error_file_deleted"
    files_before = {f.id for f in client.files.list()}
    client.files.delete(old.input_file_id)
    with pytest.raises(openai.ConflictError) as refused:
        retry(client, old.id)
    assert refused.value.code == "input_file_deleted" and refused.value.param == "input_file_id"
    assert {f.id for f in client.files.list()} == files_before - {old.input_file_id}  # no file left behind
    assert client.batches.retrieve(old.id).model_extra["retried_by"] == [first.json()["id"]]


@pytest.mark.e2e
def test_the_cli_retries_by_code_and_waits(stack):
    import os
    import subprocess
    import sys
    from pathlib import Path

    dep = stack
    client = dep.client()
    dep.sim_config(fail_when_contains={"FAIL-500": 500, "FAIL-400": 400})
    try:
        content = b"".join(line(f"k-{i}", "FAIL-500" if i < 4 else "FAIL-400" if i < 6 else "ok") for i in range(20))
        old = wait_terminal(client, submit(client, content).id)
    finally:
        dep.sim_config(fail_when_contains={})
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(OPENAI_BASE_URL=dep.base_url, OPENAI_API_KEY=dep.api_key, COLUMNS="120")
    batchgate = str(Path(sys.executable).parent / "batchgate")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([batchgate, *args], env=env, capture_output=True, text=True, timeout=60)

    done = run("retry", old.id, "--code", "http_500", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr  # every retried request succeeded
    new_id = done.stdout.split()[0]
    new = client.batches.retrieve(new_id)
    assert new.model_extra["retry_of"] == old.id and new.status == "completed"
    assert {r["custom_id"] for r in read_lines(client, new.output_file_id)} == {f"k-{i}" for i in range(4)}
    assert "4 completed, 0 failed, 4 total" in done.stdout and f"batchgate download {new_id}" in done.stdout
    shown = run("status", old.id)
    assert re.search(rf"retried by\s+{new_id}", shown.stdout), shown.stdout

    refused = run("retry", old.id, "--code", "batch_expired")
    assert refused.returncode == 1 and "No failed line" in refused.stderr and "HTTP 400" in refused.stderr
