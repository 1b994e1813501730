"""Slow and idle connections against the real uvicorn command: a connection that sends nothing, or stops inside its
headers, is closed after the header timeout; a body that drips is cut off at the upload deadline with a 408 in
OpenAI's envelope; and meanwhile other clients' GETs answer as fast as ever."""

from __future__ import annotations

import json
import select
import socket
import statistics
import threading
import time

import pytest
from stack import API_KEY

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT_S = 2.0
UPLOAD_DEADLINE_S = 4.0  # the Stack's per-piece body timeout is 2 s; the drip below sends a byte every 0.5 s
DRIP_INTERVAL_S = 0.5
BOUNDARY = "b0undary"


@pytest.fixture
def api(make_stack):
    stack = make_stack(header_timeout_s=HEADER_TIMEOUT_S, upload_deadline_s=UPLOAD_DEADLINE_S)
    stack.start_redis()
    stack.start_api()
    return stack


def connect(stack) -> socket.socket:
    return socket.create_connection(("127.0.0.1", stack.api_port), timeout=10)


def upload_head(length: int) -> bytes:
    return (f"POST /v1/files HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n").encode()


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def read_response(sock: socket.socket, timeout: float = 10) -> bytes:
    """One whole response with a Content-Length, the connection left open."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def wait_closed(socks: list[socket.socket], timeout: float) -> dict[socket.socket, float]:
    """When (monotonic) the server closed each socket; those still open after `timeout` are missing."""
    closed: dict[socket.socket, float] = {}
    deadline = time.monotonic() + timeout
    while len(closed) < len(socks) and time.monotonic() < deadline:
        readable, _, _ = select.select([s for s in socks if s not in closed], [], [], 0.1)
        for sock in readable:
            try:
                if sock.recv(65536) == b"":
                    closed[sock] = time.monotonic()
            except ConnectionResetError:
                closed[sock] = time.monotonic()
    return closed


def test_idle_and_slow_connections_are_closed_and_do_not_slow_others(api):
    client = api.client(max_retries=0, timeout=10)
    client.batches.list()  # warm up

    opened = time.monotonic()
    idle = [connect(api) for _ in range(10)]
    partial = [connect(api) for _ in range(4)]
    for sock in partial:
        sock.sendall(b"GET /v1/batches HTTP/1.1\r\nHost: test\r\nAuthoriz")
    # A keep-alive connection that served a request, then stops inside the next request's headers.
    kept = connect(api)
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    assert read_response(kept).startswith(b"HTTP/1.1 200")
    kept.sendall(b"GET /v1/batches HTTP/1.1\r\nHo")
    partial.append(kept)

    drips = [connect(api) for _ in range(5)]
    for sock in drips:
        sock.sendall(upload_head(100_000) + f"--{BOUNDARY}\r\n".encode())
    drip_started = time.monotonic()
    stop = threading.Event()

    def drip():
        while not stop.is_set():
            for sock in drips:
                try:
                    sock.send(b"x")
                except OSError:
                    pass
            time.sleep(DRIP_INTERVAL_S)

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        # 20 slow or idle connections open: a GET still answers fast.
        latencies = []
        for _ in range(10):
            started = time.monotonic()
            client.batches.list()
            latencies.append(time.monotonic() - started)
            time.sleep(0.1)
        print(f"\nGET /v1/batches with 20 slow/idle connections open: median "
              f"{statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
        assert max(latencies) < 0.5, latencies

        closed = wait_closed(idle + partial, timeout=HEADER_TIMEOUT_S + 3)
        assert len(closed) == len(idle + partial), "a connection without complete headers was kept open"
        assert all(HEADER_TIMEOUT_S - 0.5 < at - opened < HEADER_TIMEOUT_S + 2 for at in closed.values())

        for sock in drips:
            response = read_until_closed(sock, timeout=UPLOAD_DEADLINE_S + 3)
            elapsed = time.monotonic() - drip_started
            head, _, body = response.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), response[:200]
            assert b"x-request-id:" in head.lower() and b"connection: close" in head.lower()
            error = json.loads(body)["error"]
            assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
            assert f"within {UPLOAD_DEADLINE_S:g} s" in error["message"], (elapsed, error)
            assert elapsed < UPLOAD_DEADLINE_S + 2.5, elapsed
    finally:
        stop.set()
        dripper.join()
        for sock in idle + partial + drips:
            sock.close()
    # Nothing of the cut-off uploads was kept, and the API still serves.
    assert client.files.list().data == []
    assert client.batches.list().data == []


def test_a_steady_upload_within_the_deadline_is_not_cut(api):
    """The deadlines bound slowness, not size: an upload sent in pieces over 3 s (under the 4 s deadline, each piece
    well within the 2 s piece timeout, longer than the 2 s header timeout) succeeds."""
    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m", "messages": []}}) + "\n"
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n{line}\r\n--{BOUNDARY}--\r\n").encode()
    sock = connect(api)
    sock.sendall(upload_head(len(body)))
    step = -(-len(body) // 6)
    pieces = [body[i:i + step] for i in range(0, len(body), step)]
    for piece in pieces:
        time.sleep(3.0 / len(pieces))
        sock.sendall(piece)
    response = read_response(sock)
    sock.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response[:300]
    assert json.loads(payload)["filename"] == "in.jsonl"
