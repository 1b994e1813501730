"""Hostile and broken input: every rejection is a clear 4xx (the OpenAI envelope where the app answers), never a 500."""

from __future__ import annotations

import io
import socket
import time

import httpx
import openai
import orjson
import pytest
from stack import API_KEY, assert_exactly_once, chat_lines, submit, wait_terminal

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def envelope(resp: httpx.Response) -> dict:
    assert resp.headers["content-type"].startswith("application/json"), resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.fixture
def http(stack):
    with httpx.Client(base_url=stack.base_url, headers=AUTH, timeout=15) as client:
        yield client


def test_malformed_multipart(http):
    resp = http.post("/files", content=b"--nope\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=x"})
    assert resp.status_code == 400
    envelope(resp)
    resp = http.post("/files", content=b"garbage", headers={"content-type": "multipart/form-data"})
    assert resp.status_code == 400
    envelope(resp)
    resp = http.post("/files", json={"file": "x", "purpose": "batch"})
    assert resp.status_code == 400 and envelope(resp)["param"] == "file"


def test_wrong_types_and_missing_fields(http):
    for body in ([], "a string", 42, {"input_file_id": 5, "endpoint": "/v1/embeddings", "completion_window": "24h"},
                 {"input_file_id": "file-x", "endpoint": ["/v1/embeddings"], "completion_window": "24h"},
                 {"input_file_id": "file-x", "endpoint": "/v1/embeddings", "completion_window": 24},
                 {"input_file_id": "file-x", "endpoint": "/v1/embeddings", "completion_window": "24h", "metadata": []},
                 {"input_file_id": "file-x", "endpoint": "/v1/embeddings", "completion_window": "24h",
                  "metadata": {"k": 5}}):
        resp = http.post("/batches", json=body)
        assert resp.status_code == 400, (body, resp.text)
        envelope(resp)
    files = {"file": ("a.jsonl", b"{}\n")}
    for data in ({"purpose": "batch", "expires_after[seconds]": "soon", "expires_after[anchor]": "created_at"},
                 {"purpose": "batch", "expires_after[anchor]": "yesterday", "expires_after[seconds]": "3600"},
                 {"purpose": ""}):
        resp = http.post("/files", files=files, data=data)
        assert resp.status_code == 400, (data, resp.text)
        envelope(resp)


def test_huge_metadata_and_huge_json(http, stack):
    uploaded = stack.client().files.create(file=("a.jsonl", io.BytesIO(chat_lines(1))), purpose="batch")
    body = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
            "metadata": {"k": "v" * 1_000_000}}
    resp = http.post("/batches", json=body)
    assert resp.status_code == 400 and envelope(resp)["param"] == "metadata"
    resp = http.post("/batches", content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    envelope(resp)


def test_huge_headers_are_refused_without_500(stack):
    resp = httpx.get(stack.base_url + "/files", headers={**AUTH, "x-padding": "a" * 200_000})
    assert resp.status_code == 431 and envelope(resp)["code"] == "request_headers_too_large"
    resp = httpx.get(stack.base_url + "/files", headers={**AUTH, "X-On-Behalf-Of": "u" * 5000})
    assert resp.status_code == 400 and envelope(resp)["param"] == "X-On-Behalf-Of"


@pytest.mark.parametrize("bad_id", ["%00", "..%2F..%2Fetc%2Fpasswd", "file-%E2%9C%93", "batch_" + "a" * 5000,
                                    "%F0%9F%9A%80", "file-\u202e"])
def test_strange_ids_are_404(http, bad_id):
    for path in (f"/files/{bad_id}", f"/files/{bad_id}/content", f"/batches/{bad_id}"):
        resp = http.get(path)
        assert resp.status_code == 404, (path, resp.status_code)
        envelope(resp)


def _multipart(filename: bytes, purpose: bytes = b"batch") -> tuple[bytes, dict]:
    # Built by hand: HTTP clients percent-encode control characters in filenames, a hostile client need not.
    body = (b"--xyz\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n" + purpose +
            b"\r\n--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + filename +
            b"\"\r\nContent-Type: application/octet-stream\r\n\r\n{}\n\r\n--xyz--\r\n")
    return body, {"content-type": "multipart/form-data; boundary=xyz"}


def test_unicode_and_control_characters_in_filenames(http):
    body, headers = _multipart("r\u00e9sum\u00e9\x07\x1b \U0001f680.jsonl".encode())
    resp = http.post("/files", content=body, headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["filename"] == "r\u00e9sum\u00e9 \U0001f680.jsonl"
    body, headers = _multipart(b"\x07\x1b", b"user_data")
    resp = http.post("/files", content=body, headers=headers)
    assert resp.status_code == 400 and envelope(resp)["code"] == "invalid_file_name"
    body, headers = _multipart(b"..\\..\\windows\\evil.jsonl")
    assert http.post("/files", content=body, headers=headers).json()["filename"] == "evil.jsonl"


def _raw(stack, request: bytes, then=None, read_timeout: float = 15.0) -> bytes:
    port = int(stack.base_url.split(":")[-1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(request)
        if then:
            then(sock)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def test_oversize_body_is_413_before_it_is_read(stack):
    request = (b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() +
               b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 99999999999\r\n\r\n--b\r\n")
    started = time.monotonic()
    reply = _raw(stack, request, read_timeout=10)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"request_too_large"' in reply
    assert time.monotonic() - started < 5


def test_slow_upload_is_cut_off(stack):
    request = (b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() +
               b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n")
    started = time.monotonic()
    reply = _raw(stack, request, then=lambda sock: sock.sendall(b"Content-Disposition"), read_timeout=20)
    elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"request_timeout"' in reply
    assert elapsed < 10  # the test stack allows 2 s between pieces of a body


def test_concurrent_cancel_and_finalize(stack):
    client = stack.client()
    batches = [submit(client, chat_lines(40, prefix=f"b{n}")) for n in range(8)]
    for n, batch in enumerate(batches):
        time.sleep(0.05 * n)
        try:
            # Accepted while it runs (and without a move while it is finalizing: there is nothing left to cancel).
            assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled", "finalizing")
        except openai.ConflictError as err:  # it finished first: the contract's 409
            assert "completed" in err.message
    for n, batch in enumerate(batches):
        final = wait_terminal(client, batch.id, timeout=60)
        assert final.status in ("cancelled", "completed"), final.status
        assert_exactly_once(client, final, {f"b{n}-{i}" for i in range(40)} if final.request_counts.total else set())


def _tree_rss(stack) -> dict[str, int]:
    import psutil

    peak = {}
    for name, proc in stack.group.procs.items():
        try:
            root = psutil.Process(proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                peak[f"{name}:{p.pid}"] = p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return peak


def test_hostile_shapes_within_the_limits_keep_every_process_small(make_stack):
    """Lines of 20 MB (over the per-line limit) fail the batch with line errors; a line of 250,000 tiny messages
    (within it) runs; no process of the deployment passes 512 MiB meanwhile."""
    import threading

    stack = make_stack().start(workers=1, concurrency=2)
    client = stack.client(max_retries=2)
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, rss in _tree_rss(stack).items():
                peaks[key] = max(peaks.get(key, 0), rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        huge = b"".join(orjson.dumps({"custom_id": f"h{i}", "method": "POST", "url": "/v1/chat/completions",
                                      "body": {"model": "sim-model", "messages": [
                                          {"role": "user", "content": "x" * 20_000_000}]}}) + b"\n"
                        for i in range(4))
        failed = wait_terminal(client, submit(client, huge).id, timeout=120)
        del huge
        assert failed.status == "failed"
        assert [(e.code, e.line) for e in failed.errors.data] == [("line_too_large", n) for n in (1, 2, 3, 4)]
        many = orjson.dumps({"custom_id": "many", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": "sim-model",
                                      "messages": [{"role": "user", "content": "hi"}] * 250_000}}) + b"\n"
        assert len(many) < 8 * 1024 * 1024
        ran = wait_terminal(client, submit(client, many + chat_lines(10)).id, timeout=120)
        assert ran.status == "completed" and ran.request_counts.total == 11
    finally:
        done.set()
        sampler.join()
    worst = max(peaks, key=peaks.get)
    print(f"\npeak RSS: {worst} {peaks[worst] / 2**20:.0f} MiB over {len(peaks)} processes")
    assert peaks[worst] < 512 * 2**20, {k: v // 2**20 for k, v in peaks.items()}
