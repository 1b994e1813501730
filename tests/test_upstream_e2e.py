"""One batch through a real deployment against the hostile upstream: every misbehaviour ends as its own line."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import pytest
from hostile_upstream import key_leaks
from stack import UPSTREAM_SECRET, assert_exactly_once, submit, wait_terminal

from cli import stack as procs

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024

# custom_id -> (what the upstream does, where the line must end and with what)
CASES = {
    "ok-1": ("ok", ("out", 200)),
    "ok-2": ("ok", ("out", 200)),
    "nonjson-200": ("nonjson", ("err", "invalid_upstream_response")),
    "array-200": ("notobject", ("err", "invalid_upstream_response")),
    "deep-200": ("deep", ("err", "invalid_upstream_response")),
    "html-502": ("nonjson status=502", ("err", 502)),
    "big-cl": (f"big size={2 * MiB} mode=cl", ("err", "response_too_large")),
    "big-chunked": (f"big size={2 * MiB} mode=chunked", ("err", "response_too_large")),
    "gzip-bomb": (f"big size={64 * MiB} mode=gzip", ("err", "response_too_large")),
    "echo-b64": ("echo enc=b64_1 status=401", ("err", 401)),
    "echo-basic": ("echo enc=basic status=401", ("err", 401)),
    "echo-hex": ("echo enc=HEX status=401", ("err", 401)),
    "echo-pct": ("echo enc=pct_all status=401", ("err", 401)),
    "echo-json": ("echo enc=json_one status=200", ("out", 200)),
    "echo-b64url": ("echo enc=b64url status=200", ("out", 200)),
    "echo-header": ("echo enc=header status=200", ("out", 200)),
    "echo-text": ("echo enc=text status=200", ("err", "invalid_upstream_response")),
    "truncated": ("truncate", ("err", "upstream_truncated_response")),
    "reset": ("reset", ("err", "upstream_connection_reset")),
    "closed": ("close", ("err", "upstream_connection_reset")),
}


def hostile_lines() -> bytes:
    return b"".join(
        orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "sim-model", "messages": [{"role": "user", "content": f"hostile:{how}"}]}})
        + b"\n"
        for cid, (how, _) in CASES.items()
    )


def test_a_batch_against_a_hostile_upstream(make_stack):
    port = procs.free_port()
    stack = make_stack(upstream_base_url=f"http://127.0.0.1:{port}/v1", upstream_max_retries=1,
                       upstream_max_response_bytes=MiB, log_format="json")
    stack.group.start("hostile", [sys.executable, str(Path(__file__).parent / "hostile_upstream.py"),
                                  "--port", str(port)])
    procs.wait_for_http(f"http://127.0.0.1:{port}/health")
    stack.start(workers=1, concurrency=2)
    client = stack.client()

    final = wait_terminal(client, submit(client, hostile_lines()).id, timeout=90)
    assert final.status == "completed", final
    out, err = assert_exactly_once(client, final, set(CASES))

    got = {}
    for kind, lines in (("out", out), ("err", err)):
        for line in lines:
            got[line["custom_id"]] = (kind, line["error"]["code"] if line["error"] else line["response"]["status_code"])
    assert got == {cid: expected for cid, (_, expected) in CASES.items()}

    by_id = {line["custom_id"]: line for line in out + err}
    assert by_id["html-502"]["response"]["body"].startswith("<html>")
    assert "not JSON" in by_id["nonjson-200"]["error"]["message"]
    assert "max_response_bytes of 1048576 bytes" in by_id["gzip-bomb"]["error"]["message"]
    assert by_id["echo-header"]["response"]["request_id"] == "req_[redacted]"

    # No form of the key in any byte batchgate wrote: both files, and every log of every process.
    for file_id in (final.output_file_id, final.error_file_id):
        for raw in client.files.content(file_id).content.splitlines():
            assert not key_leaks(raw, UPSTREAM_SECRET), raw[:300]
    stack.stop()
    for path in (stack.root / "logs").glob("*.log"):
        assert UPSTREAM_SECRET not in path.read_text(errors="replace"), path.name
