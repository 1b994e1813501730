"""Idempotency-Key on the writes, through the real SDK and API with real workers: a retried create makes one batch
(also under 20 identical creates at once), a reused key with another request is a 409, uploads and cancels too."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from stack import API_KEY, OTHER_API_KEY, chat_lines, wait_terminal

pytestmark = pytest.mark.e2e


def key(name: str) -> dict[str, str]:
    return {"Idempotency-Key": name}


def test_a_retried_create_makes_one_batch(stack):
    client = stack.client()
    uploaded = client.files.create(file=("a.jsonl", io.BytesIO(chat_lines(3))), purpose="batch")
    body = dict(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    before = {b.id for b in client.batches.list(limit=100)}
    first = client.batches.create(**body, extra_headers=key("create-1"))
    again = client.batches.with_raw_response.create(**body, extra_headers=key("create-1"))
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.parse().id == first.id and again.parse().status == first.status == "validating"
    created = {b.id for b in client.batches.list(limit=100)} - before
    assert created == {first.id}
    assert wait_terminal(client, first.id).status == "completed"

    # The same key with another request: 409, nothing created.
    with pytest.raises(openai.ConflictError) as err:
        client.batches.create(**{**body, "metadata": {"run": "2"}}, extra_headers=key("create-1"))
    assert err.value.code == "idempotency_key_reused"
    # Keys are the caller's own: another tenant's identical key is a different key.
    other = stack.client(api_key=OTHER_API_KEY)
    theirs = other.files.create(file=("a.jsonl", io.BytesIO(chat_lines(3))), purpose="batch")
    mine_again = other.batches.create(input_file_id=theirs.id, endpoint="/v1/chat/completions",
                                      completion_window="24h", extra_headers=key("create-1"))
    assert mine_again.id != first.id


def test_twenty_identical_creates_at_once_make_one_batch(stack):
    client = stack.client()
    uploaded = client.files.create(file=("b.jsonl", io.BytesIO(chat_lines(2))), purpose="batch")
    body = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    before = {b.id for b in client.batches.list(limit=100)}

    def create(_: int) -> httpx.Response:
        return httpx.post(f"{stack.base_url}/batches", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}", **key("burst-1")})

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(create, range(20)))
    assert [a.status_code for a in answers] == [200] * 20
    assert len({a.json()["id"] for a in answers}) == 1
    assert {b.id for b in client.batches.list(limit=100)} - before == {answers[0].json()["id"]}


def test_a_client_error_is_kept_and_replayed(stack):
    headers = {"Authorization": f"Bearer {API_KEY}", **key("bad-1")}
    body = {"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    first = httpx.post(f"{stack.base_url}/batches", json=body, headers=headers)
    again = httpx.post(f"{stack.base_url}/batches", json=body, headers=headers)
    assert first.status_code == again.status_code == 404
    assert first.json() == again.json() and again.headers["idempotent-replayed"] == "true"


def test_uploads_and_cancels_are_idempotent(stack):
    client = stack.client()
    content = chat_lines(5)
    first = client.files.create(file=("c.jsonl", io.BytesIO(content)), purpose="batch", extra_headers=key("up-1"))
    again = client.files.create(file=("c.jsonl", io.BytesIO(content)), purpose="batch", extra_headers=key("up-1"))
    assert again.id == first.id
    assert sum(1 for f in client.files.list(limit=100) if f.filename == "c.jsonl") == 1
    with pytest.raises(openai.ConflictError) as err:
        client.files.create(file=("c.jsonl", io.BytesIO(content + chat_lines(1, prefix="x"))), purpose="batch",
                            extra_headers=key("up-1"))
    assert err.value.code == "idempotency_key_reused"

    batch = client.batches.create(input_file_id=first.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelled = client.batches.cancel(batch.id, extra_headers=key("cancel-1"))
    replay = client.batches.cancel(batch.id, extra_headers=key("cancel-1"))
    assert replay.model_dump() == cancelled.model_dump()
    with pytest.raises(openai.ConflictError):
        client.batches.cancel("batch_other", extra_headers=key("cancel-1"))
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.cancel(batch.id, extra_headers=key("k" * 300))
    assert err.value.code == "invalid_idempotency_key"


def test_the_header_and_the_counts_are_in_the_openapi_schema(stack):
    spec = httpx.get(f"{stack.base_url.removesuffix('/v1')}/openapi.json").json()
    for path in ("/v1/files", "/v1/batches", "/v1/batches/{batch_id}/cancel"):
        assert "Idempotency-Key" in [p["name"] for p in spec["paths"][path]["post"].get("parameters", [])], path
    counts = spec["components"]["schemas"]["BatchRequestCounts"]["properties"]
    assert {"succeeded", "errored", "processing", "cancelled", "expired", "errors_by_code"} <= set(counts)
