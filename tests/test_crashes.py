"""Crash tests at the worst instants, with real processes: every batch still ends, exactly once, with its usage
recorded once, one webhook delivery and nothing of it left behind; a killed run re-sends at most what it had in
flight."""

from __future__ import annotations

import random
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
from stack import TERMINAL, Stack, assert_exactly_once, chat_lines, submit, wait_terminal
from webhook_receiver import Receiver, providers_toml

from cli.stack import free_port
from shared.lifecycle import USAGE_CEILING

pytestmark = pytest.mark.e2e

TESTS = Path(__file__).resolve().parent
N = 1000
IDS = {f"req-{i}" for i in range(N)}
LEASE_S = 4.0
SWEEP_S = 1.0


class Crashing:
    """A stack whose worker kills itself at one named instant (tests/crashpoints.py), with a webhook receiver."""

    def __init__(self, root: Path, point: str, **settings: object) -> None:
        self.marker = root / "crashed"
        self.receiver = Receiver(free_port())
        self.stack = Stack(root / "stack", webhook_allowed_hosts="127.0.0.1", webhook_retry_base_s=0.5,
                           cleanup_delay_s=1, **settings)
        providers = root / "providers.toml"
        providers.write_text(providers_toml(self.stack.sim_port, self.receiver.port))
        self.stack.group.env["BATCHGATE_PROVIDERS_FILE"] = str(providers)
        self.point = point

    def start(self) -> "Crashing":
        self.receiver.start()
        s = self.stack
        s.start_redis()
        s.start_simulator()
        s.start_api()
        s.start_worker("w1", 2, app="crashpoints", env={
            "PYTHONPATH": str(TESTS), "BATCHGATE_TEST_CRASH_AT": self.point,
            "BATCHGATE_TEST_CRASH_MARKER": str(self.marker)})
        s.start_beat()
        return self

    def stop(self) -> None:
        self.receiver.stop()
        self.stack.stop()

    def crashed_at(self) -> float:
        assert self.marker.exists(), f"the worker never reached {self.point}"
        return self.marker.stat().st_mtime

    def deliveries(self, batch_id: str) -> list[dict]:
        return [d for d in self.receiver.deliveries if d["event"]["data"]["id"] == batch_id]

    def batch_blobs(self, batch_id: str) -> Path:
        return self.stack.root / "data" / "blobs" / "batches" / batch_id

    def usage(self) -> dict:
        resp = httpx.get(f"http://127.0.0.1:{self.stack.api_port}/admin/usage",
                         headers={"authorization": "Bearer sk-admin-test"}, timeout=5)
        return resp.json()["tenants"]


@pytest.fixture
def crashing(tmp_path):
    made: list[Crashing] = []

    def factory(point: str, **settings: object) -> Crashing:
        made.append(Crashing(tmp_path / f"c{len(made)}", point, **settings).start())
        return made[-1]

    yield factory
    for c in made:
        c.stop()


def until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout:g} s")


def assert_side_effects_once(c: Crashing, batch) -> None:
    """Usage recorded once, one webhook delivery, and none of the batch's working blobs left."""
    until(lambda: c.deliveries(batch.id), 15, "the webhook delivery")
    until(lambda: not c.batch_blobs(batch.id).exists(), 10, "the clean-up of the batch's blobs")
    time.sleep(2)  # room for a duplicate delivery to show up
    deliveries = c.deliveries(batch.id)
    assert len(deliveries) == 1 and deliveries[0]["event"]["type"] == f"batch.{batch.status}"
    usage = c.usage()["tenant-a"]
    assert usage["batches"] == 1 and usage["requests_completed"] == batch.request_counts.completed
    assert usage["total_tokens"] == batch.usage.total_tokens > 0


def test_orchestrate_killed_right_after_saving_the_plan(crashing):
    c = crashing("after_plan")
    client = c.stack.client(max_retries=5)
    batch = submit(client, chat_lines(N))
    started = until(lambda: (b := client.batches.retrieve(batch.id)).status != "validating" and b, 30,
                    "the move out of validating")
    recovery = started.in_progress_at - c.crashed_at()
    final = wait_terminal(client, batch.id, timeout=60)
    print(f"\norchestrate killed after the plan: in_progress {recovery:.1f} s after the kill")
    assert final.status == "completed"
    assert recovery <= LEASE_S + SWEEP_S + 1
    assert_exactly_once(client, final, IDS)
    assert_side_effects_once(c, final)


@pytest.mark.parametrize("point", ["after_finalizing", "after_terminal"])
def test_finalize_killed_mid_way(crashing, point):
    c = crashing(point)
    client = c.stack.client(max_retries=5)
    batch = submit(client, chat_lines(N))
    final = wait_terminal(client, batch.id, timeout=60)
    crashed = c.crashed_at()
    assert final.status == "completed"
    assert_exactly_once(client, final, IDS)
    assert_side_effects_once(c, final)
    delivered = min(d["received_at"] for d in c.deliveries(batch.id))
    print(f"\nfinalize killed {point}: completed_at {final.completed_at - crashed:+.1f} s, "
          f"webhook {delivered - crashed:.1f} s after the kill")
    assert final.completed_at - crashed <= LEASE_S + SWEEP_S + 2
    assert delivered - crashed <= LEASE_S + SWEEP_S + 4


def test_redis_restored_from_an_older_append_only_file(make_stack, tmp_path):
    """Redis comes back missing the seconds in which the batch finished and was cleaned up."""
    receiver = Receiver(free_port())
    stack: Stack = make_stack(appendonly=True, sim_latency_ms=50, chunk_min_requests=40,
                              cleanup_delay_s=0.5, webhook_allowed_hosts="127.0.0.1")
    providers = tmp_path / "providers.toml"
    providers.write_text(providers_toml(stack.sim_port, receiver.port, max_concurrency=4))
    stack.group.env["BATCHGATE_PROVIDERS_FILE"] = str(providers)
    receiver.start()
    try:
        stack.start(workers=1, concurrency=2)
        client = stack.client(max_retries=8)
        batch = submit(client, chat_lines(N))
        until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= N // 4, 60, "a quarter")
        aof = stack.root / "redis" / "appendonlydir"
        time.sleep(1.1)  # appendfsync everysec: what is on disk now includes the state of a moment ago
        snapshot = tmp_path / "aof-snapshot"
        shutil.copytree(aof, snapshot)
        first = wait_terminal(client, batch.id, timeout=60)
        assert first.status == "completed"
        until(lambda: not (stack.root / "data" / "blobs" / "batches" / batch.id).exists(), 15, "the clean-up")
        until(lambda: receiver.deliveries, 15, "the first webhook")

        stack.kill("redis")
        shutil.rmtree(aof)
        shutil.copytree(snapshot, aof)
        stack.start_redis()
        restored = client.batches.retrieve(batch.id)
        assert restored.status not in TERMINAL, "the restored Redis should predate the batch's end"
        final = wait_terminal(client, batch.id, timeout=90)
        until(lambda: len(receiver.deliveries) >= 2, 15, "the webhook of the second ending")
        time.sleep(2)
    finally:
        receiver.stop()
    print(f"\nrestored at {restored.request_counts}; then {final.status}, {final.request_counts}")
    assert final.status == "completed"
    out, err = assert_exactly_once(client, final, IDS)
    assert out, "the requests not yet durable at the restored instant ran again"
    assert err and all(line["error"]["code"] == "result_lost" for line in err)
    assert {d["event"]["id"] for d in receiver.deliveries} == {receiver.deliveries[0]["event"]["id"]}


def test_absurd_usage_from_the_upstream_saturates(make_stack):
    stack: Stack = make_stack().start(workers=1, concurrency=2)
    stack.sim_config(usage_total_tokens=2**64 - 1)
    client = stack.client()
    final = wait_terminal(client, submit(client, chat_lines(N)).id, timeout=60)
    assert final.status == "completed"
    assert final.usage.total_tokens == USAGE_CEILING and final.usage.input_tokens == USAGE_CEILING
    assert_exactly_once(client, final, IDS)


def test_random_worker_kills_resend_at_most_what_was_in_flight(make_stack):
    n, kills, senders = 10_000, 6, 16
    stack: Stack = make_stack(sim_latency_ms=20, upstream_max_concurrency=senders, max_batch_lines=n,
                              max_batch_input_bytes=20_000_000).start(workers=1, concurrency=2)
    client = stack.client(max_retries=5)
    batch = submit(client, chat_lines(n))
    until(lambda: client.batches.retrieve(batch.id).request_counts.completed > 500, 60, "the batch under way")
    rng = random.Random(7)
    done = 0
    while done < kills:
        children = stack.worker_children("w1")
        status = client.batches.retrieve(batch.id)
        if status.status in TERMINAL:
            break
        if children:
            rng.choice(children).send_signal(signal.SIGKILL)
            done += 1
        time.sleep(rng.uniform(0.6, 1.2))
    assert done == kills, f"the batch finished after only {done} kills"
    final = wait_terminal(client, batch.id, timeout=180)
    assert final.status == "completed"
    assert_exactly_once(client, final, {f"req-{i}" for i in range(n)})
    sent = stack.sim_stats()["requests"]
    resent = sent - n
    bound = 2 * kills * senders
    print(f"\n{kills} kills: {sent} requests sent upstream for {n} lines, {resent} re-sent (bound {bound})")
    assert 0 <= resent <= bound
