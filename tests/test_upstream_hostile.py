"""UpstreamCaller against a real upstream that misbehaves on purpose (tests/hostile_upstream.py), over real sockets.

Each test drives `UpstreamCaller.call` and asserts on the Outcome, on the bytes an output/error line would hold,
and on what the upstream received (how many attempts).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from hostile_upstream import ENCODINGS, HostileUpstream, chat_completion, key_leaks, self_signed_context

from shared.providers import Provider, ProviderRegistry
from shared.settings import DEFAULT_MAX_RESPONSE_BYTES, Settings
from workers.upstream import Outcome, Scrubber, UpstreamCaller

KEY = "sk-upstream-secret-0123456789"
MiB = 1024 * 1024


def run(coro, loop: str = "asyncio"):
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def caller_for(session: aiohttp.ClientSession, *, key: str = KEY, retries: int = 0, timeout_s: float = 10,
               **limits: object) -> UpstreamCaller:
    provider = Provider(name="hostile", base_url="http://unused", api_key=key, max_retries=retries,
                        timeout_s=timeout_s, **limits)
    return UpstreamCaller(session, provider, base_s=0.001, max_s=0.005)


async def call(url: str, request: dict | None = None, *, loop_session: aiohttp.ClientSession | None = None,
               **kwargs: object) -> tuple[Outcome, UpstreamCaller]:
    async with aiohttp.ClientSession(json_serialize=None, raise_for_status=False) as session:
        caller = caller_for(loop_session or session, **kwargs)
        outcome = await caller.call(url, request if request is not None else {"model": "m", "messages": []})
        return outcome, caller


def call_one(behaviour: str, *, loop: str = "asyncio", request: dict | None = None, caller_kwargs=None, **opts):
    """(outcome, requests the upstream received, caller) for one call to `behaviour`."""

    async def go():
        async with HostileUpstream() as server:
            outcome, caller = await call(server.url(behaviour, **opts), request, **(caller_kwargs or {}))
            return outcome, sum(server.seen.values()), caller

    return run(go(), loop)


def written(outcome: Outcome) -> bytes:
    """The line workers/chunk.py writes for an outcome (the output/error file contract)."""
    if outcome.status_code is None:
        line = {"id": "batch_req_1", "custom_id": "c", "response": None,
                "error": {"code": outcome.error_code, "message": outcome.error_message}}
    else:
        line = {"id": "batch_req_1", "custom_id": "c", "error": None,
                "response": {"status_code": outcome.status_code, "request_id": outcome.request_id, "body": outcome.body}}
    return orjson.dumps(line)


def attempts(caller: UpstreamCaller) -> int:
    return caller.metrics.counts["upstream_sent|hostile"]


# ---- 1. a 2xx must be a JSON object ----------------------------------------------------------------------------


@pytest.mark.parametrize(("behaviour", "opts", "says"), [
    ("nonjson", {}, "a body that is not JSON"),
    ("empty", {}, "an empty body"),
    ("notobject", {}, "JSON that is not an object (a list)"),
    ("deep", {}, "JSON nested deeper than the 254 levels orjson can write"),
])
def test_2xx_without_a_json_object_is_invalid_upstream_response(behaviour, opts, says):
    outcome, seen, _ = call_one(behaviour, caller_kwargs={"retries": 3}, **opts)
    assert outcome.status_code is None and not outcome.ok
    assert outcome.error_code == "invalid_upstream_response"
    assert says in outcome.error_message and "HTTP 200" in outcome.error_message
    assert seen == 1, "the upstream answered (and did the work): not retried"
    written(outcome)  # writable


def test_invalid_upstream_response_message_is_truncated_and_scrubbed():
    outcome, _, _ = call_one("nonjson")
    assert "content-type text/html" in outcome.error_message and "(truncated)" in outcome.error_message
    assert len(outcome.error_message) < 500
    outcome, _, _ = call_one("echo", enc="text", status=200)
    assert outcome.error_code == "invalid_upstream_response"
    assert "[redacted]" in outcome.error_message and KEY not in outcome.error_message
    outcome, _, _ = call_one("echo", enc="ctype", status=200)
    assert "[redacted]" in outcome.error_message and KEY not in outcome.error_message


def test_non_2xx_keeps_its_status_and_its_body_as_text():
    outcome, seen, _ = call_one("nonjson", status=502)
    assert outcome.status_code == 502 and outcome.error_code is None
    assert isinstance(outcome.body, str) and outcome.body.startswith("<html>")
    # JSON that orjson cannot write back becomes text too; the line is always writable.
    outcome, _, _ = call_one("deep", status=500)
    assert outcome.status_code == 500 and isinstance(outcome.body, str) and outcome.body.startswith('{"a":[[[')
    written(outcome)


def test_an_ordinary_answer_is_kept_byte_for_byte():
    outcome, seen, _ = call_one("ok")
    assert outcome.ok and seen == 1 and outcome.request_id == "req_hostile"
    assert orjson.dumps(outcome.body) == chat_completion()


# ---- 2. answers larger than max_response_bytes -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cl", "chunked", "gzip"])
def test_answer_over_the_cap_is_response_too_large_and_not_retried(mode):
    outcome, seen, _ = call_one("big", size=2 * MiB, mode=mode, caller_kwargs={"retries": 3, "max_response_bytes": MiB})
    assert outcome.status_code is None and outcome.error_code == "response_too_large"
    message = outcome.error_message
    assert f"max_response_bytes of {MiB} bytes" in message
    assert {"cl": "its Content-Length is 2097152 bytes", "chunked": f"over {MiB} bytes arrived without a Content-Length",
            "gzip": f"over {MiB} decompressed bytes arrived"}[mode] in message
    assert seen == 1


@pytest.mark.parametrize("mode", ["cl", "chunked", "gzip"])
def test_cap_is_inclusive(mode):
    ok, _, _ = call_one("big", size=MiB, mode=mode, caller_kwargs={"max_response_bytes": MiB})
    assert ok.ok and len(ok.body["data"]) == MiB - len('{"data":""}')
    over, _, _ = call_one("big", size=MiB + 1, mode=mode, caller_kwargs={"max_response_bytes": MiB})
    assert over.error_code == "response_too_large"


def test_non_2xx_over_the_cap_too():
    outcome, _, _ = call_one("big", size=2 * MiB, mode="chunked", status=500, caller_kwargs={"max_response_bytes": MiB})
    assert outcome.error_code == "response_too_large" and "HTTP 500" in outcome.error_message


def test_a_dropped_answer_does_not_spoil_the_next_request_on_the_pool():
    async def go():
        async with HostileUpstream() as server:
            connector = aiohttp.TCPConnector(limit=1)  # one connection: the next request must get a clean one
            async with aiohttp.ClientSession(connector=connector) as session:
                caller = caller_for(session, max_response_bytes=MiB)
                too_large = await caller.call(server.url("big", size=4 * MiB, mode="chunked"), {"model": "m"})
                ok = await caller.call(server.url("ok"), {"model": "m"})
                return too_large, ok

    too_large, ok = run(go())
    assert too_large.error_code == "response_too_large" and ok.ok


def test_provider_max_response_bytes_from_toml_and_settings(tmp_path: Path):
    toml = tmp_path / "providers.toml"
    toml.write_text('[providers.a]\nbase_url = "http://a/v1"\nmax_response_bytes = 1048576\n'
                    '[providers.b]\nbase_url = "http://b/v1"\n')
    registry = ProviderRegistry.from_settings(Settings(providers_file=toml, upstream_max_response_bytes=3 * MiB))
    assert registry.get("a").max_response_bytes == MiB
    assert registry.get("b").max_response_bytes == 3 * MiB  # a provider without the key takes the setting
    default = ProviderRegistry.from_settings(Settings()).get("default")
    assert default.max_response_bytes == DEFAULT_MAX_RESPONSE_BYTES == 8 * MiB
    with pytest.raises(ValueError):
        Provider(name="x", base_url="http://x", max_response_bytes=0)


MEMORY_PROBE = r"""
import asyncio, json, sys
sys.path[:0] = [sys.argv[3], sys.argv[3] + "/tests"]
import aiohttp, psutil, uvloop
from shared.providers import Provider
from workers.upstream import UpstreamCaller

async def main(url, n):
    provider = Provider(name="p", base_url="http://unused", api_key="sk-k", max_retries=0, timeout_s=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as session:
        caller = UpstreamCaller(session, provider, base_s=0.01, max_s=0.01)
        await caller.call(url.replace("/big/", "/ok/"), {"model": "m"})  # imports and buffers warmed
        base = psutil.Process().memory_info().rss
        outcomes = await asyncio.gather(*(caller.call(url, {"model": "m"}) for _ in range(n)))
    # VmHWM, not ru_maxrss: on Linux ru_maxrss carries over the forking parent's peak (pytest's) across exec.
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
    print(json.dumps({"codes": sorted({o.error_code for o in outcomes}), "base": base, "peak": peak}))

uvloop.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.parametrize("mode", ["cl", "chunked"])
def test_memory_stays_bounded_while_40_answers_of_16_mib_stream_in(mode):
    # The case: 40 concurrent 16 MiB answers grew one worker to 2 GiB. With the default 8 MiB cap, an answer
    # announced larger is refused unread, and one streamed without a length is dropped at the cap: the process grows
    # by at most 40 x 8 MiB (all 40 streams at the cap at once), in practice much less.
    root = Path(__file__).parent.parent
    server = subprocess.Popen([sys.executable, str(root / "tests" / "hostile_upstream.py")], stdout=subprocess.PIPE,
                              text=True)
    try:
        port = int(server.stdout.readline().split()[1])
        url = f"http://127.0.0.1:{port}/big/size={16 * MiB}/mode={mode}/v1/chat/completions"
        probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, url, "40", str(root)], capture_output=True,
                               text=True, timeout=120, check=True)
    finally:
        server.terminate()
        server.wait()
    result = json.loads(probe.stdout)
    assert result["codes"] == ["response_too_large"]
    grew = (result["peak"] - result["base"]) / MiB
    limit = 24 if mode == "cl" else 40 * 8 + 32
    assert grew < limit, f"grew {grew:.0f} MiB: {result}"
    print(f"{mode}: grew {grew:.1f} MiB")


# ---- 3. no form of the key in anything written -----------------------------------------------------------------

KEYS = [
    KEY,
    "sk-proj-" + "Ab3/+xY9_-Qz" * 13,  # long, with base64 punctuation: percent, JSON '\/' and url-safe forms differ
    "0123456789abcdef0123456789abcdef",  # Azure-style: hex itself
]


def test_the_leak_detector_sees_every_encoding():
    for key in KEYS:
        for enc, encode in ENCODINGS.items():
            line = orjson.dumps({"message": json.loads(b'"' + encode(key.encode()) + b'"')})
            assert key_leaks(line, key), (key, enc)


@pytest.mark.parametrize("key", KEYS, ids=["sk", "punctuated", "hex"])
def test_no_form_of_the_key_survives(key):
    cases = [{"enc": enc, "status": status} for enc in ENCODINGS for status in (401, 200)]
    cases += [{"enc": "header", "status": 200}, {"enc": "ctype", "status": 200}, {"enc": "text", "status": 200},
              {"enc": "text", "status": 403}]

    async def go():
        async with HostileUpstream() as server:
            async with aiohttp.ClientSession() as session:
                caller = caller_for(session, key=key)
                return [(case, await caller.call(server.url("echo", **case), {"model": "m"})) for case in cases]

    failures = []
    for case, outcome in run(go()):
        line = written(outcome)
        if key_leaks(line, key):
            failures.append((case, key_leaks(line, key), line[:300]))
        assert b"[redacted]" in line, case
    assert not failures


def test_short_placeholder_keys_are_matched_as_sent_only():
    # "EMPTY" (vLLM's placeholder) has no encoded forms: a base64 payload is never rewritten by chance.
    scrubber = Scrubber("EMPTY")
    payload = base64.b64encode(bytes(range(256)) * 64)
    assert scrubber.json(payload) is payload
    assert scrubber.text(b"key EMPTY echoed") == b"key [redacted] echoed"


def test_scrubber_leaves_ordinary_bodies_alone():
    scrubber = Scrubber(KEYS[1])
    body = chat_completion("Plain text with %20 percent, a \\/ slash, \\u00e9 and base64 " + "QUJD" * 40)
    assert scrubber.json(body) is body and scrubber.text(body) is body


# ---- 4. one code per transport failure -------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LOOPS = ["asyncio", "uvloop"]


@pytest.mark.parametrize("loop", LOOPS)
def test_connection_refused(loop):
    outcome, _ = run(call(f"http://127.0.0.1:{closed_port()}/v1/chat/completions"), loop)
    assert outcome.error_code == "upstream_connect_refused" and outcome.retryable


@pytest.mark.parametrize("loop", LOOPS)
def test_dns_failure(loop):
    outcome, _ = run(call("http://no-such-upstream.batchgate.invalid/v1/chat/completions"), loop)
    assert outcome.error_code == "upstream_dns_error" and "resolve" in outcome.error_message


@pytest.mark.parametrize("loop", LOOPS)
def test_tls_to_a_plain_http_port(loop):
    async def go():
        async with HostileUpstream() as server:
            return await call(f"https://127.0.0.1:{server.port}/v1/chat/completions")

    outcome, _ = run(go(), loop)
    assert outcome.error_code == "upstream_tls_error", outcome


@pytest.mark.parametrize("loop", LOOPS)
def test_tls_certificate_not_trusted(loop, tmp_path):
    async def go():
        async with HostileUpstream(ssl_context=self_signed_context(tmp_path)) as server:
            return await call(server.url("ok")), server.seen

    (outcome, _), seen = run(go(), loop)
    assert outcome.error_code == "upstream_tls_error" and "CERTIFICATE_VERIFY_FAILED" in outcome.error_message
    assert not seen


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(("behaviour", "opts", "code"), [
    ("reset", {"when": "before"}, "upstream_connection_reset"),
    ("close", {}, "upstream_connection_reset"),
    ("truncate", {"mode": "cl"}, "upstream_truncated_response"),
    ("truncate", {"mode": "chunked"}, "upstream_truncated_response"),
    ("reset", {"when": "mid"}, "upstream_truncated_response"),
    ("garbage", {}, "invalid_upstream_response"),
    ("badgzip", {}, "invalid_upstream_response"),
])
def test_failure_classes(loop, behaviour, opts, code):
    outcome, _, _ = call_one(behaviour, loop=loop, **opts)
    assert (outcome.status_code, outcome.error_code) == (None, code), outcome.error_message
    assert KEY not in outcome.error_message and "127.0.0.1" not in outcome.error_message


@pytest.mark.parametrize("loop", LOOPS)
def test_own_deadline_is_request_timeout(loop):
    started = time.monotonic()
    outcome, _, _ = call_one("slow", s=3, loop=loop, caller_kwargs={"timeout_s": 0.3})
    assert outcome.error_code == "request_timeout" and "0.3 s" in outcome.error_message
    assert time.monotonic() - started < 2.5


def test_redirects_are_answers_not_followed():
    async def go():
        async with HostileUpstream() as elsewhere, HostileUpstream() as server:
            outcome, _ = await call(server.url("redirect", to=elsewhere.url("ok").replace("/", "%2F")))
            return outcome, sum(elsewhere.seen.values())

    outcome, elsewhere_seen = run(go())
    assert outcome.status_code == 307 and not outcome.ok and elsewhere_seen == 0


@pytest.mark.parametrize(("behaviour", "opts", "expected"), [
    ("reset", {}, 4),  # transport failures: retried max_retries times
    ("truncate", {}, 4),
    ("nonjson", {"status": 503}, 4),  # a retryable status
    ("echo", {"enc": "raw"}, 1),  # 401
    ("nonjson", {}, 1),  # invalid_upstream_response
    ("big", {"size": 2 * MiB}, 1),  # response_too_large
])
def test_retry_policy_per_class(behaviour, opts, expected):
    _, seen, caller = call_one(behaviour, caller_kwargs={"retries": 3, "max_response_bytes": MiB}, **opts)
    assert seen == expected == attempts(caller)


def test_dns_and_tls_failures_are_retried_once(tmp_path):
    async def go():
        refused = await call(f"http://127.0.0.1:{closed_port()}/v1", retries=3)
        dns, dns_caller = await call("http://no-such-upstream.batchgate.invalid/v1", retries=3)
        async with HostileUpstream(ssl_context=self_signed_context(tmp_path)) as server:
            tls = await call(server.url("ok"), retries=3)
        return refused, (dns, dns_caller), tls

    (refused, refused_caller), (dns, dns_caller), (tls, tls_caller) = run(go())
    assert (refused.error_code, attempts(refused_caller)) == ("upstream_connect_refused", 4)
    assert (dns.error_code, attempts(dns_caller)) == ("upstream_dns_error", 2)
    assert (tls.error_code, attempts(tls_caller)) == ("upstream_tls_error", 2)


# ---- 5. a request body orjson refuses --------------------------------------------------------------------------


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("request_body", [
    {"model": "m", "messages": _nested(300)},
    {"model": "m", "seed": 2**70},
    {"model": "m", "logit_bias": {1, 2}},
], ids=["nested-300", "int-70-bits", "a-set"])
def test_unserializable_request_is_an_error_outcome_and_never_sent(request_body):
    outcome, seen, caller = call_one("ok", request=request_body, caller_kwargs={"retries": 3})
    assert outcome.error_code == "invalid_request_body" and not outcome.retryable
    assert "cannot be written as JSON" in outcome.error_message
    assert seen == 0 and attempts(caller) == 0
    written(outcome)
