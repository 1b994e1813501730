"""Batch create/retrieve/list/cancel and their error paths through the SDK."""

from __future__ import annotations

import io

import httpx
import openai
import pytest
from stack import API_KEY, chat_lines, submit, wait_terminal

pytestmark = pytest.mark.e2e


@pytest.fixture
def input_file(stack):
    return stack.client().files.create(file=("in.jsonl", io.BytesIO(chat_lines(2))), purpose="batch")


def test_create_returns_validating_batch_with_every_field(stack, input_file):
    client = stack.client()
    batch = client.batches.create(
        input_file_id=input_file.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"job": "nightly-eval"},
    )
    assert batch.id.startswith("batch_") and batch.object == "batch"
    assert batch.status == "validating" and batch.expires_at == batch.created_at + 86400
    assert batch.metadata == {"job": "nightly-eval"}
    assert batch.request_counts.total == 0 and batch.output_file_id is None
    raw = httpx.get(f"{stack.base_url}/batches/{batch.id}", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    for name in ("errors", "output_file_id", "error_file_id", "in_progress_at", "finalizing_at", "completed_at",
                 "failed_at", "expired_at", "cancelling_at", "cancelled_at", "usage", "model", "metadata"):
        assert name in raw, name
    assert client.batches.retrieve(batch.id).id == batch.id


@pytest.mark.parametrize(
    ("override", "status", "param", "code"),
    [
        ({"input_file_id": None}, 400, "input_file_id", "missing_required_parameter"),
        ({"endpoint": None}, 400, "endpoint", "missing_required_parameter"),
        ({"completion_window": None}, 400, "completion_window", "missing_required_parameter"),
        ({"endpoint": "/v1/audio/speech"}, 400, "endpoint", "unsupported_endpoint"),
        ({"completion_window": "2h"}, 400, "completion_window", "invalid_value"),
        ({"input_file_id": "file-doesnotexist"}, 404, "input_file_id", "file_not_found"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata", "invalid_value"),
        ({"metadata": {"k" * 65: "v"}}, 400, "metadata", "invalid_value"),
        ({"metadata": {"k": "v" * 513}}, 400, "metadata", "invalid_value"),
        ({"output_expires_after": {"anchor": "created_at", "seconds": 5}}, 400, "output_expires_after.seconds",
         "invalid_value"),
    ],
)
def test_create_errors(stack, input_file, override, status, param, code):
    body = {"input_file_id": input_file.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **override}
    body = {k: v for k, v in body.items() if v is not None}
    client = stack.client(max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        client.post("/batches", body=body, cast_to=openai.types.Batch)
    assert err.value.status_code == status
    assert err.value.param == param and err.value.code == code
    assert err.value.body["message"]


def test_create_rejects_a_file_that_is_not_for_batches(stack):
    client = stack.client()
    other = client.files.create(file=("notes.jsonl", io.BytesIO(b"{}\n")), purpose="user_data")
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=other.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert err.value.code == "invalid_file_purpose"


def test_create_with_invalid_json_body_is_400(stack):
    resp = httpx.post(f"{stack.base_url}/batches", content=b"{nope", headers={
        "Authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"


def test_list_batches_paginates_newest_first(stack):
    client = stack.client(default_headers={"X-On-Behalf-Of": "batch-lister"})
    f = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(1))), purpose="batch")
    created = [
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(25)
    ]
    listed = [b.id for b in client.batches.list(limit=7)]
    assert listed == list(reversed(created))
    page = client.batches.list()
    assert len(page.data) == 20 and page.has_more is True


def test_cancel_and_cancel_again_then_409_on_finished(stack):
    client = stack.client()
    batch = submit(client, chat_lines(5))
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at is not None
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    final = wait_terminal(client, batch.id, timeout=60)
    assert final.status == "cancelled" and final.cancelled_at is not None

    done = wait_terminal(client, submit(client, chat_lines(3)).id, timeout=60)
    assert done.status == "completed"
    with pytest.raises(openai.ConflictError) as err:
        stack.client(max_retries=0).batches.cancel(done.id)
    assert err.value.message.endswith("Cannot cancel a batch with status 'completed'.")
    assert err.value.response.headers["x-should-retry"] == "false"


def test_unknown_batch_is_404(stack):
    with pytest.raises(openai.NotFoundError) as err:
        stack.client().batches.retrieve("batch_0000")
    assert err.value.code == "batch_not_found" and err.value.param == "id"
    with pytest.raises(openai.NotFoundError):
        stack.client().batches.cancel("batch_0000")
