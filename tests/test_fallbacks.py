"""Fallbacks, circuit breakers and weights with real workers, real upstream processes and the real SDK: a dead
primary's requests end at the secondary, the breaker stops sending to it within its configured time, two healthy
upstreams share by weight, and a tenant not allowed the fallback gets error lines."""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from stack import OTHER_API_KEY, UPSTREAM_SECRET, Stack, chat_lines, read_lines, submit, wait_terminal

from cli import stack as procs

pytestmark = pytest.mark.e2e

UPSTREAM = str(Path(__file__).parent / "strict_upstream.py")


def start_upstream(stack: Stack, name: str, *args: str) -> int:
    port = procs.free_port()
    stack.group.start(name, [sys.executable, UPSTREAM, "--port", str(port), "--name", name,
                             "--key", UPSTREAM_SECRET, *args])
    procs.wait_for_http(f"http://127.0.0.1:{port}/health")
    return port


def stats(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/_stats", timeout=5).json()


def table(name: str, port: int, **options: str) -> str:
    lines = [f"[providers.{name}]", f'base_url = "http://127.0.0.1:{port}/v1"', f'api_key = "{UPSTREAM_SECRET}"',
             "max_concurrency = 8"]
    return "\n".join(lines + [f"{k} = {v}" for k, v in options.items()]) + "\n\n"


def configure(stack: Stack, text: str) -> None:
    path = stack.root / "providers.toml"
    path.write_text(text)
    stack.group.env["BATCHGATE_PROVIDERS_FILE"] = str(path)


def by_provider(lines: list[dict]) -> Counter:
    return Counter(line.get("provider") for line in lines)


def served_by(line: dict) -> str:
    return line["response"]["body"]["choices"][0]["message"]["content"].removeprefix("served by ")


def test_dead_primary_falls_back_and_its_circuit_opens(make_stack):
    stack = make_stack()
    secondary = start_upstream(stack, "secondary", "--latency-ms", "20")
    down = start_upstream(stack, "down", "--status", "503")  # listening, answering 503 to everything: counted
    closed = procs.free_port()  # nothing listens: connections refused
    breaker = {"max_retries": "2", "fallbacks": '["secondary"]', "circuit_open_after_s": "1",
               "circuit_retry_after_s": "600"}
    configure(stack, 'default = "primary"\n'
              + table("primary", down, models='["sim-model"]', **breaker)
              + table("refusing", closed, **breaker)
              + table("secondary", secondary)
              + '[tenants.tenant-b]\nproviders = ["primary", "refusing"]\n')
    stack.start(workers=1, concurrency=2)
    client = stack.client()

    # A primary refusing connections: every line answered by the secondary.
    refused = wait_terminal(client, submit(client, chat_lines(120, prefix="refused"),
                                           extra_headers={"x-batchgate-provider": "refusing"}).id, timeout=120)
    assert refused.status == "completed", refused
    assert (refused.request_counts.completed, refused.request_counts.failed) == (120, 0)
    out = read_lines(client, refused.output_file_id)
    assert by_provider(out) == {"secondary": 120}
    assert {served_by(line) for line in out} == {"secondary"}

    # A primary answering 503 to everything, chosen by the batch's model: the same, and its circuit opens.
    started = time.time()
    first = wait_terminal(client, submit(client, chat_lines(400, prefix="down")).id, timeout=120)
    took = time.time() - started
    assert first.status == "completed", first
    assert (first.request_counts.completed, first.request_counts.failed) == (400, 0)
    assert by_provider(read_lines(client, first.output_file_id)) == {"secondary": 400}
    dead = stats(down)
    reached, open_after = dead["requests"], dead["last_at"] - dead["first_at"]
    print(f"\ndead primary (503): {reached} attempts reached it, the last {open_after:.2f} s after the first; "
          f"400 lines in {took:.1f} s")
    # Each process opens its breaker once it has failed for 1 s: no attempt reaches the primary after that (plus
    # the attempts in flight then, each at most one backoff of retry_max_s = 1 s later).
    assert open_after < 1 + 1 + 1.5, dead
    assert reached < 400, dead  # far fewer than one per line, let alone 3 attempts per line

    # Open for circuit_retry_after_s: a second batch goes straight to the secondary, not one attempt to the primary.
    second = wait_terminal(client, submit(client, chat_lines(200, prefix="again")).id, timeout=120)
    assert (second.request_counts.completed, second.request_counts.failed) == (200, 0)
    assert stats(down)["requests"] == reached
    counters = stack.store.metric_counters()
    print("metrics:", {k: v for k, v in counters.items() if "fallback" in k or "circuit" in k})
    assert 1 <= int(counters["upstream_circuit_opened|primary"]) <= 2  # once per worker process at most
    assert int(counters["upstream_fallback|primary"]) == 600
    assert int(counters["upstream_circuit_opened|refusing"]) >= 1

    # tenant-b may not use the secondary: its lines end as error lines at the primary (the last it may use is always
    # tried, open circuit or not).
    other = stack.client(api_key=OTHER_API_KEY)
    denied = wait_terminal(other, submit(other, chat_lines(10, prefix="b")).id, timeout=120)
    assert denied.status == "completed"
    assert (denied.request_counts.completed, denied.request_counts.failed) == (0, 10)
    errors = read_lines(other, denied.error_file_id)
    assert by_provider(errors) == {"primary": 10}
    assert {line["response"]["status_code"] for line in errors} == {503}
    refused_b = wait_terminal(other, submit(other, chat_lines(5, prefix="rb"),
                                            extra_headers={"x-batchgate-provider": "refusing"}).id, timeout=120)
    errors = read_lines(other, refused_b.error_file_id)
    assert by_provider(errors) == {"refusing": 5}
    assert {line["error"]["code"] for line in errors} == {"upstream_connect_refused"}
    assert stats(secondary)["served"] == 120 + 400 + 200


def test_weights_share_requests_and_a_pinned_batch_takes_no_share(make_stack):
    stack = make_stack()
    heavy = start_upstream(stack, "heavy", "--latency-ms", "5")
    light = start_upstream(stack, "light", "--latency-ms", "5")
    configure(stack, 'default = "heavy"\n'
              + table("heavy", heavy, models='["sim-*"]', weight="3")
              + table("light", light, models='["sim-*"]', weight="1")
              + '[tenants.tenant-b]\nproviders = ["heavy"]\n')
    stack.start(workers=1, concurrency=2)
    client = stack.client()

    shared = wait_terminal(client, submit(client, chat_lines(800, prefix="w")).id, timeout=120)
    assert (shared.request_counts.completed, shared.request_counts.failed) == (800, 0)
    out = read_lines(client, shared.output_file_id)
    assert all(line["provider"] == served_by(line) for line in out)
    shares = by_provider(out)
    print(f"\nweights 3:1 over 800 requests: {dict(shares)}, heavy {shares['heavy'] / 800:.3f}")
    # Smooth weighted round robin per process: 3:1 to within a request or two per chunk run.
    assert abs(shares["heavy"] / 800 - 0.75) < 0.03, shares
    assert stats(heavy)["served"] == shares["heavy"] and stats(light)["served"] == shares["light"]

    pinned = wait_terminal(client, submit(client, chat_lines(40, prefix="p"),
                                          extra_headers={"x-batchgate-provider": "light"}).id, timeout=120)
    assert by_provider(read_lines(client, pinned.output_file_id)) == {"light": 40}
    # A tenant allowed only one of the two gets no share of the other.
    other = stack.client(api_key=OTHER_API_KEY)
    only = wait_terminal(other, submit(other, chat_lines(40, prefix="b")).id, timeout=120)
    assert by_provider(read_lines(other, only.output_file_id)) == {"heavy": 40}
