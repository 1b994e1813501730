"""The simulator's Files and Batches API, driven by the openai SDK against a real simulator process: a batch runs to
`completed` with every custom_id once, a cancel part-way leaves the rest as batch_cancelled lines, and the injected
failure and expiry end it as a provider's batch would."""

from __future__ import annotations

import io
import json
import time

import httpx
import openai
import pytest
from stack import chat_lines

from cli import stack as procs

KEY = "sk-sim-batches"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    port = procs.free_port()
    group = procs.ProcessGroup(log_dir=tmp_path_factory.mktemp("sim"))
    group.env["BATCHGATE_SIM_API_KEY"] = KEY
    group.start("simulator", procs.simulator_command(port))
    procs.wait_for_http(f"http://127.0.0.1:{port}/health")
    yield f"http://127.0.0.1:{port}"
    group.stop_all()


@pytest.fixture
def client(sim):
    httpx.post(f"{sim}/_sim/config", json={"batch_lines_per_s": 500, "batch_fail_after": None,
                                           "batch_expire_after": None, "batch_validating_s": 0.1}).raise_for_status()
    return openai.OpenAI(base_url=f"{sim}/v1", api_key=KEY)


def _run(client: openai.OpenAI, n: int, **create):
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(n))), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(chat_lines(n))
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                                 metadata={"origin": "test"}, **create)


def _wait(client: openai.OpenAI, batch_id: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)
    return batch


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()] if file_id else []


def test_a_batch_runs_to_completed_with_every_id_once(client):
    batch = _run(client, 200)
    assert batch.status == "validating" and batch.metadata == {"origin": "test"}
    seen = set()
    deadline = time.monotonic() + 20
    while (b := client.batches.retrieve(batch.id)).status != "completed":
        seen.add(b.status)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert "in_progress" in seen and b.request_counts.completed == 200 and b.request_counts.total == 200
    out = _lines(client, b.output_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(200))
    assert b.usage.total_tokens == sum(line["response"]["body"]["usage"]["total_tokens"] for line in out) > 0
    assert b.error_file_id is None and b.completed_at >= b.in_progress_at
    assert batch.id in [x.id for x in client.batches.list(limit=100).data]


def test_cancel_part_way_leaves_the_rest_as_batch_cancelled(client, sim):
    httpx.post(f"{sim}/_sim/config", json={"batch_lines_per_s": 100}).raise_for_status()
    batch = _run(client, 300)
    while client.batches.retrieve(batch.id).request_counts.completed < 20:
        time.sleep(0.05)
    assert client.batches.cancel(batch.id).status == "cancelling"
    final = _wait(client, batch.id)
    out, err = _lines(client, final.output_file_id), _lines(client, final.error_file_id)
    assert final.status == "cancelled" and 20 <= len(out) < 300
    assert {line["error"]["code"] for line in err} == {"batch_cancelled"}
    ids = [line["custom_id"] for line in out + err]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(300))
    assert final.request_counts.completed + final.request_counts.failed == 300


def test_injected_failure_and_expiry(client, sim):
    httpx.post(f"{sim}/_sim/config", json={"batch_fail_after": 10}).raise_for_status()
    failed = _wait(client, _run(client, 50).id)
    assert failed.status == "failed" and failed.errors.data[0].code == "simulated_failure"
    httpx.post(f"{sim}/_sim/config", json={"batch_fail_after": None, "batch_expire_after": 30}).raise_for_status()
    expired = _wait(client, _run(client, 50).id)
    err = _lines(client, expired.error_file_id)
    assert expired.status == "expired" and len(_lines(client, expired.output_file_id)) == 30
    assert len(err) == 20 and {line["error"]["code"] for line in err} == {"batch_expired"}


def test_the_batch_api_checks_the_key(sim):
    bad = openai.OpenAI(base_url=f"{sim}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.batches.list()
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=f"{sim}/v1", api_key=KEY).batches.create(
            input_file_id="file-x", endpoint="/v1/chat/completions", completion_window="48h")
