"""Redis down (SIGKILL) or frozen (SIGSTOP): every Redis-backed route answers 503 storage_unavailable with Retry-After
within the Redis timeout, a failed upload leaves no blob behind, and the SDK's own retries ride out a short outage."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest
from stack import chat_lines

pytestmark = pytest.mark.e2e

REDIS_TIMEOUT_S = 2.0  # the default of BATCHGATE_REDIS_TIMEOUT_S
RETRY_AFTER = "2"  # the default of BATCHGATE_STORAGE_RETRY_AFTER_S


def blob_count(stack) -> int:
    folder = stack.root / "data" / "blobs" / "files"
    return sum(1 for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else 0


def calls(client: openai.OpenAI, file_id: str) -> dict:
    """One call of each kind a user makes, each touching Redis."""
    return {
        "files.create": lambda: client.files.create(file=("in.jsonl", chat_lines(3)), purpose="batch"),
        "files.list": lambda: client.files.list(),
        "files.retrieve": lambda: client.files.retrieve(file_id),
        "files.content": lambda: client.files.content(file_id),
        "batches.create": lambda: client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                        completion_window="24h"),
        "batches.list": lambda: client.batches.list(),
        "batches.retrieve": lambda: client.batches.retrieve("batch_0123456789abcdef"),
    }


def assert_503s(stack, file_id: str, within_s: float, only: tuple[str, ...] = ()) -> list[float]:
    """Each call (or those named in `only`) fails with 503 storage_unavailable + Retry-After, within `within_s`;
    returns the times taken."""
    client = stack.client(max_retries=0, timeout=30)
    taken = []
    for name, call in calls(client, file_id).items():
        if only and name not in only:
            continue
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as err:
            call()
        taken.append(time.monotonic() - started)
        assert err.value.status_code == 503, name
        assert err.value.code == "storage_unavailable" and err.value.type == "server_error", name
        assert err.value.response.headers["retry-after"] == RETRY_AFTER, name
        assert err.value.request_id, name
        assert taken[-1] < within_s, (name, taken[-1])
    health = httpx.get(stack.base_url.removesuffix("/v1") + "/healthz", timeout=30)
    assert health.status_code == 503 and health.headers["retry-after"] == RETRY_AFTER
    assert health.json()["error"]["code"] == "storage_unavailable"
    return taken


def in_thread(fn):
    """Run `fn` in a thread; the returned function joins it and returns its result or raises its error."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()

    def result(timeout: float = 60):
        thread.join(timeout)
        assert not thread.is_alive()
        if "error" in box:
            raise box["error"]
        return box["value"]

    return result


def test_frozen_redis_is_503_with_retry_after(make_stack):
    stack = make_stack()
    stack.start_redis()
    stack.start_api()
    client = stack.client(max_retries=0)
    uploaded = client.files.create(file=("in.jsonl", chat_lines(3)), purpose="batch")
    assert blob_count(stack) == 1
    redis_pid = stack.group.procs["redis"].pid

    os.kill(redis_pid, signal.SIGSTOP)
    try:
        # Each costs the Redis timeout: the upload (sync client), a create (sync), a retrieve (asyncio client).
        taken = assert_503s(stack, uploaded.id, within_s=REDIS_TIMEOUT_S + 1.5,
                            only=("files.create", "batches.create", "batches.retrieve"))
        assert blob_count(stack) == 1, "a failed upload left its blob behind"
        print(f"\n503 while Redis is SIGSTOPped: {min(taken) * 1000:.0f}-{max(taken) * 1000:.0f} ms")
        # The SDK with its default retries: the first try gets the 503, the retry after Retry-After succeeds.
        patient = stack.client(timeout=30)
        created = in_thread(lambda: patient.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                           completion_window="24h"))
        time.sleep(1.0)
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    assert created().status == "validating"
    assert client.files.retrieve(uploaded.id).id == uploaded.id


def test_dead_redis_is_503_and_the_sdk_retries_until_it_is_back(make_stack):
    stack = make_stack(appendonly=True)
    stack.start_redis()
    stack.start_api()
    client = stack.client(max_retries=0)
    uploaded = client.files.create(file=("in.jsonl", chat_lines(3)), purpose="batch")
    time.sleep(1.2)  # appendfsync everysec: the record is on disk before the kill

    stack.kill("redis")
    taken = assert_503s(stack, uploaded.id, within_s=1.0)
    with pytest.raises(openai.AuthenticationError):  # a wrong key is still a 401: authentication needs no storage
        stack.client(api_key="sk-wrong", max_retries=0).batches.list()
    assert blob_count(stack) == 1, "a failed upload left its blob behind"
    print(f"\n503 while Redis is SIGKILLed: {min(taken) * 1000:.0f}-{max(taken) * 1000:.0f} ms")

    # Default retries (2, honouring Retry-After): an upload and a create started while Redis is down succeed
    # once it is back.
    patient = stack.client(timeout=30)

    def upload_and_create():
        second = patient.files.create(file=("again.jsonl", chat_lines(2)), purpose="batch")
        return second, patient.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                              completion_window="24h")

    result = in_thread(upload_and_create)
    time.sleep(1.0)
    stack.start_redis()
    second, batch = result()
    assert batch.status == "validating" and batch.input_file_id == uploaded.id
    assert {f.id for f in client.files.list()} == {uploaded.id, second.id}
    assert blob_count(stack) == 2, "one blob per file record, no orphan"
    assert httpx.get(stack.base_url.removesuffix("/v1") + "/healthz", timeout=5).status_code == 200

