"""Native batch forwarding (providers with batch_api = "native"), end to end in real processes: against the
simulator's Batches API, and against a second batchgate deployment as the provider."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import openai
import pytest
from stack import UPSTREAM_SECRET, Stack, assert_exactly_once, chat_lines, submit, wait_terminal

pytestmark = pytest.mark.e2e

TESTS = Path(__file__).resolve().parent


def native_toml(base_url: str, key_env: str = "BATCHGATE_UPSTREAM_API_KEY", rpm: int = 20) -> str:
    """`local` executes lines against the simulator; `native` forwards whole batches to `base_url`, and is chosen
    by header or by a model named native-*; `native-paced` does too, within `rpm` calls a minute."""
    return f"""
default = "local"

[providers.local]
base_url = "{base_url}"
api_key_env = "{key_env}"

[providers.native]
base_url = "{base_url}"
api_key_env = "{key_env}"
models = ["native-*"]
batch_api = "native"

[providers.native-paced]
base_url = "{base_url}"
api_key_env = "{key_env}"
batch_api = "native"
rpm = {rpm}
"""


def native_stack(root: Path, base_url: str | None = None, **settings) -> Stack:
    stack = Stack(root, **settings)
    providers = root / "providers.toml"
    providers.write_text(native_toml(base_url or f"http://127.0.0.1:{stack.sim_port}/v1"))
    stack.group.env["BATCHGATE_PROVIDERS_FILE"] = str(providers)
    return stack


def test_a_window_under_24h_on_a_provider_named_by_header_is_a_400(tmp_path):
    stack = native_stack(tmp_path / "s")
    try:
        stack.start_redis()
        stack.start_simulator()
        stack.start_api()
        client = stack.client()
        uploaded = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(3))), purpose="batch")
        with pytest.raises(openai.BadRequestError) as refused:
            client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="1h",
                                  extra_headers={"x-batchgate-provider": "native"})
        error = refused.value.body
        assert error["code"] == "completion_window_too_short" and error["param"] == "completion_window"
        assert "24h" in error["message"] and "native" in error["message"]
        # The same window on an executing provider, and 24h or longer on the native one, are accepted.
        assert client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="1h", extra_headers={"x-batchgate-provider": "local"})
        for window in ("24h", "48h"):
            assert client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                         completion_window=window, extra_headers={"x-batchgate-provider": "native"})
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def forwarding(tmp_path_factory):
    """A deployment whose `native` provider is its own simulator's Batches API."""
    stack = native_stack(tmp_path_factory.mktemp("native"), forward_poll_min_s=0.5, forward_poll_max_s=3)
    stack.start(workers=1, concurrency=2)
    yield stack
    stack.stop()


def _sim_batch(stack: Stack, provider_batch_id: str) -> dict:
    resp = httpx.get(f"http://127.0.0.1:{stack.sim_port}/v1/batches/{provider_batch_id}",
                     headers={"authorization": f"Bearer {UPSTREAM_SECRET}"}, timeout=5)
    resp.raise_for_status()
    return resp.json()


def test_a_batch_forwarded_to_the_simulator_mirrors_its_progress_and_completes(forwarding):
    stack = forwarding
    stack.sim_config(batch_lines_per_s=250, batch_fail_after=None, batch_expire_after=None)
    before = stack.sim_stats()
    client = stack.client()
    n = 1000
    batch = submit(client, chat_lines(n), extra_headers={"x-batchgate-provider": "native"})
    polls: list = []
    final = wait_terminal(client, batch.id, timeout=60, on_poll=polls.append)
    assert final.status == "completed", final
    out, err = assert_exactly_once(client, final, {f"req-{i}" for i in range(n)})
    assert len(out) == n and err == []
    # Mirrored while it ran: in_progress with part of the lines done, and the provider's batch id shown.
    assert any(p.status == "in_progress" and 0 < p.request_counts.completed < n for p in polls)
    assert final.provider_batch_id and final.model_extra.get("provider_batch_id", final.provider_batch_id)
    remote = _sim_batch(stack, final.provider_batch_id)
    assert remote["status"] == "completed" and remote["metadata"] == {"batchgate_batch_id": batch.id}
    assert final.usage.total_tokens == remote["usage"]["total_tokens"] > 0
    assert final.usage.input_tokens == sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in out)
    after = stack.sim_stats()
    assert after["files_uploaded"] - before["files_uploaded"] == 1
    assert after["batches_created"] - before["batches_created"] == 1
    assert after["requests"] == before["requests"], "no line was sent to the synchronous endpoint"
    took = final.completed_at - final.created_at
    print(f"\n{n} lines forwarded: {took} s, {after['batch_polls'] - before['batch_polls']} polls")


def test_calls_to_the_provider_keep_within_its_rpm(forwarding):
    stack = forwarding
    stack.sim_config(batch_lines_per_s=40, batch_fail_after=None, batch_expire_after=None)
    client = stack.client()
    started = time.time()
    final = wait_terminal(client, submit(client, chat_lines(200), extra_headers={"x-batchgate-provider": "native-paced"}
                                         ).id, timeout=90)
    assert final.status == "completed"
    assert_exactly_once(client, final, {f"req-{i}" for i in range(200)})
    calls = [t for t in httpx.get(f"http://127.0.0.1:{stack.sim_port}/_sim/batch_api_calls").json()["calls"]
             if t >= started]
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    print(f"\nrpm 20: {len(calls)} calls to the provider over {calls[-1] - calls[0]:.1f} s, shortest gap "
          f"{min(gaps):.2f} s")
    assert len(calls) >= 5 and min(gaps) >= 60 / 20 * 0.9  # upload, create, polls, the file download


def test_a_window_under_24h_on_a_provider_chosen_by_model_fails_the_batch(forwarding):
    client = forwarding.client()
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(5, model="native-model"))),
                                   purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="1h")
    final = wait_terminal(client, batch.id, timeout=30)
    assert final.status == "failed" and final.errors.data[0].code == "completion_window_too_short"
    assert "native" in final.errors.data[0].message and final.provider_batch_id is None
    ok = submit(client, chat_lines(5, model="native-model"))
    assert wait_terminal(client, ok.id, timeout=30).status == "completed"
    assert wait_terminal(client, ok.id).provider_batch_id is not None


def test_a_provider_failure_after_start_fails_the_batch_with_its_errors(forwarding):
    stack = forwarding
    stack.sim_config(batch_lines_per_s=200, batch_fail_after=100, batch_expire_after=None)
    client = stack.client()
    try:
        batch = submit(client, chat_lines(300), extra_headers={"x-batchgate-provider": "native"})
        polls: list = []
        final = wait_terminal(client, batch.id, timeout=60, on_poll=polls.append)
    finally:
        stack.sim_config(batch_fail_after=None)
    assert final.status == "failed" and final.failed_at is not None and final.in_progress_at is not None
    assert [e.code for e in final.errors.data] == ["simulated_failure"]
    _, err = assert_exactly_once(client, final, {f"req-{i}" for i in range(300)})
    assert {line["error"]["code"] for line in err} == {"batch_failed"}
    assert any(p.status == "in_progress" for p in polls)


def test_a_provider_expiry_ends_the_batch_expired(forwarding):
    stack = forwarding
    stack.sim_config(batch_lines_per_s=500, batch_fail_after=None, batch_expire_after=120)
    client = stack.client()
    try:
        final = wait_terminal(client, submit(client, chat_lines(200), extra_headers={"x-batchgate-provider": "native"}
                                             ).id, timeout=60)
    finally:
        stack.sim_config(batch_expire_after=None)
    assert final.status == "expired"
    out, err = assert_exactly_once(client, final, {f"req-{i}" for i in range(200)})
    assert len(out) == 120 and {line["error"]["code"] for line in err} == {"batch_expired"}
    assert final.request_counts.expired == 80


def test_cancel_reaches_the_provider_and_every_line_ends_once(forwarding):
    stack = forwarding
    stack.sim_config(batch_lines_per_s=100, batch_fail_after=None, batch_expire_after=None)
    client = stack.client()
    n = 1000
    batch = submit(client, chat_lines(n), extra_headers={"x-batchgate-provider": "native"})
    until = time.monotonic() + 30
    while (b := client.batches.retrieve(batch.id)).request_counts.completed < 50:
        assert time.monotonic() < until, b
        time.sleep(0.2)
    cancelled_at = time.monotonic()
    assert client.batches.cancel(batch.id).status == "cancelling"
    remote_id = b.provider_batch_id
    while _sim_batch(stack, remote_id)["status"] not in ("cancelling", "cancelled"):
        assert time.monotonic() - cancelled_at < 60, "the provider's batch was not cancelled within 60 s"
        time.sleep(0.1)
    reached = time.monotonic() - cancelled_at
    final = wait_terminal(client, batch.id, timeout=60)
    assert final.status == "cancelled"
    out, err = assert_exactly_once(client, final, {f"req-{i}" for i in range(n)})
    assert 50 <= len(out) < n and {line["error"]["code"] for line in err} == {"batch_cancelled"}
    assert final.request_counts.cancelled == len(err)
    extra = final.request_counts.model_extra
    assert extra["errors_by_code"] == {"batch_cancelled": len(err)} and extra["succeeded"] == len(out)
    assert extra["errored"] == 0 and extra["processing"] == 0
    print(f"\ncancel reached the provider in {reached:.2f} s; {len(out)} done, {len(err)} cancelled")


@pytest.mark.parametrize("point", ["after_remote_upload", "after_remote_create"])
def test_a_forward_step_killed_between_a_provider_call_and_its_record_creates_nothing_twice(tmp_path, point):
    """The worker process SIGKILLs itself right after the provider answered the upload (or the create) and before
    the id is recorded: the next step finds the provider's file by name, its batch by metadata."""
    marker = tmp_path / "crashed"
    stack = native_stack(tmp_path / "s", forward_poll_min_s=0.5, forward_poll_max_s=3)
    try:
        stack.start_redis()
        stack.start_simulator()
        stack.start_api()
        stack.start_worker("w1", 2, app="crashpoints", env={
            "PYTHONPATH": str(TESTS), "BATCHGATE_TEST_CRASH_AT": point, "BATCHGATE_TEST_CRASH_MARKER": str(marker)})
        stack.start_beat()
        client = stack.client(max_retries=5)
        batch = submit(client, chat_lines(300), extra_headers={"x-batchgate-provider": "native"})
        final = wait_terminal(client, batch.id, timeout=90)
        assert marker.exists(), f"the worker never reached {point}"
        assert final.status == "completed"
        assert_exactly_once(client, final, {f"req-{i}" for i in range(300)})
        stats = stack.sim_stats()
        print(f"\nkilled {point}: {stats['files_uploaded']} upload(s), {stats['batches_created']} create(s); "
              f"completed {final.completed_at - marker.stat().st_mtime:.1f} s after the kill")
        assert stats["files_uploaded"] == 1 and stats["batches_created"] == 1
    finally:
        stack.stop()


# ---- a second batchgate as the provider --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two deployments: `front` forwards batches named `native` to `back`'s /v1 with `back`'s API key; `back` runs
    them line by line against its simulator with 2 x 4 senders."""
    root = tmp_path_factory.mktemp("pair")
    back = Stack(root / "back", upstream_max_concurrency=4)
    back.start(workers=1, concurrency=2)
    front = native_stack(root / "front", back.base_url, forward_poll_min_s=0.5, forward_poll_max_s=3)
    front.group.env["BATCHGATE_TEST_BACK_KEY"] = back.api_key
    (root / "front" / "providers.toml").write_text(native_toml(back.base_url, key_env="BATCHGATE_TEST_BACK_KEY"))
    front.start(workers=1, concurrency=2)
    yield front, back
    front.stop()
    back.stop()


def _back_batches(back: Stack, front_batch_id: str) -> list:
    return [b for b in back.client().batches.list(limit=100).data
            if (b.metadata or {}).get("batchgate_batch_id") == front_batch_id]


def test_a_1000_line_batch_through_a_second_batchgate_completes_every_id_once(pair):
    front, back = pair
    back.sim_config(latency_ms=20)
    client, n = front.client(), 1000
    batch = submit(client, chat_lines(n), extra_headers={"x-batchgate-provider": "native"})
    polls: list = []
    final = wait_terminal(client, batch.id, timeout=120, on_poll=polls.append)
    assert final.status == "completed", final
    out, err = assert_exactly_once(client, final, {f"req-{i}" for i in range(n)})
    assert len(out) == n and err == []
    [remote] = _back_batches(back, batch.id)
    assert remote.id == final.provider_batch_id and remote.status == "completed"
    assert remote.completion_window == "24h" and remote.request_counts.completed == n
    summed = sum(line["response"]["body"]["usage"]["total_tokens"] for line in out)
    assert final.usage.total_tokens == remote.usage.total_tokens == summed > 0
    assert any(p.status == "in_progress" and 0 < p.request_counts.completed < n for p in polls)
    assert front.sim_stats()["requests"] == 0 and back.sim_stats()["requests"] == n
    print(f"\n{n} lines through a second batchgate: created {final.created_at}, in_progress +"
          f"{final.in_progress_at - final.created_at} s, completed +{final.completed_at - final.created_at} s; "
          f"usage {final.usage.total_tokens} tokens")


def test_cancel_on_the_first_cancels_the_second(pair):
    front, back = pair
    back.sim_config(latency_ms=100)  # 8 senders: about 80 lines a second
    client, n = front.client(), 1000
    batch = submit(client, chat_lines(n), extra_headers={"x-batchgate-provider": "native"})
    deadline = time.monotonic() + 60
    while (b := client.batches.retrieve(batch.id)).request_counts.completed < 100:
        assert time.monotonic() < deadline, b
        time.sleep(0.2)
    asked = time.monotonic()
    client.batches.cancel(batch.id)
    remote = back.client().batches
    while remote.retrieve(b.provider_batch_id).status not in ("cancelling", "cancelled"):
        assert time.monotonic() - asked < 60, "the second batchgate's batch was not cancelled within 60 s"
        time.sleep(0.1)
    reached = time.monotonic() - asked
    final = wait_terminal(client, batch.id, timeout=120)
    back_final = wait_terminal(back.client(), b.provider_batch_id, timeout=30)
    assert final.status == "cancelled" and back_final.status == "cancelled"
    out, err = assert_exactly_once(client, final, {f"req-{i}" for i in range(n)})
    assert 100 <= len(out) < n and {line["error"]["code"] for line in err} == {"batch_cancelled"}
    assert final.request_counts.completed == back_final.request_counts.completed
    assert final.request_counts.cancelled == len(err)
    print(f"\ncancel reached the second batchgate in {reached:.2f} s; {len(out)} completed, {len(err)} cancelled")


def test_the_forwarding_worker_killed_mid_way_still_ends_completed(pair):
    front, back = pair
    back.sim_config(latency_ms=50)  # about 160 lines a second
    client, n = front.client(max_retries=5), 1000
    batch = submit(client, chat_lines(n), extra_headers={"x-batchgate-provider": "native"})
    deadline = time.monotonic() + 60
    while (b := client.batches.retrieve(batch.id)).request_counts.completed < 100:
        assert time.monotonic() < deadline, b
        time.sleep(0.2)
    front.kill("w1")  # SIGKILL to the worker and its pool processes
    killed_at = time.time()
    time.sleep(1.0)
    front.start_worker("w2", 2)
    final = wait_terminal(client, batch.id, timeout=120)
    assert final.status == "completed", final
    out, _ = assert_exactly_once(client, final, {f"req-{i}" for i in range(n)})
    assert len(out) == n
    assert len(_back_batches(back, batch.id)) == 1
    print(f"\nworker killed at {b.request_counts.completed} mirrored; completed "
          f"{final.completed_at - killed_at:.1f} s after the kill")


def test_the_local_window_is_enforced_by_cancelling_the_provider_batch(tmp_path):
    """A 24h window shortened to 6 s (BATCHGATE_COMPLETION_WINDOW_S) on a provider batch that needs 20 s: batchgate
    cancels it at its own deadline and ends the batch expired, the unrun lines as batch_expired."""
    stack = native_stack(tmp_path / "s", forward_poll_min_s=0.5, forward_poll_max_s=3, completion_window_s=6)
    try:
        stack.start(workers=1, concurrency=2)
        stack.sim_config(batch_lines_per_s=50)
        client = stack.client()
        batch = submit(client, chat_lines(1000), extra_headers={"x-batchgate-provider": "native"})
        final = wait_terminal(client, batch.id, timeout=60)
        assert final.status == "expired" and final.expired_at - final.expires_at <= 3
        remote = _sim_batch(stack, final.provider_batch_id)
        assert remote["status"] == "cancelled"
        out, err = assert_exactly_once(client, final, {f"req-{i}" for i in range(1000)})
        assert 0 < len(out) < 1000 and {line["error"]["code"] for line in err} == {"batch_expired"}
        assert final.request_counts.expired == len(err) and final.request_counts.cancelled == 0
        print(f"\nexpired {final.expired_at - final.expires_at} s after expires_at; {len(out)} done, "
              f"{len(err)} expired")
    finally:
        stack.stop()
