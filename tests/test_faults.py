"""Fault tests: kill and restart the parts of a running deployment mid-batch; every line is still accounted for."""

from __future__ import annotations

import signal
import time

import openai
import pytest
from celery import Celery
from stack import TERMINAL, Stack, assert_exactly_once, chat_lines, submit

from shared.queue import CHUNKS_QUEUE, RUN_CHUNK

pytestmark = pytest.mark.e2e

N = 1200
IDS = {f"req-{i}" for i in range(N)}
# Slow enough that a fault lands mid-batch: 2 processes x 8 in flight at 30 ms is ~500 requests/s at best.
SLOW = {"sim_latency_ms": 30, "upstream_max_concurrency": 8, "chunk_min_requests": 40}


def progress(batch) -> int:
    return batch.request_counts.completed + batch.request_counts.failed


class Poller:
    """Polls a batch like a user's script would, recording what it saw."""

    def __init__(self, client: openai.OpenAI, batch_id: str) -> None:
        self.client = client
        self.batch_id = batch_id
        self.seen: list[int] = []
        self.server_errors = 0
        self.connection_errors = 0

    def poll(self):
        try:
            batch = self.client.batches.retrieve(self.batch_id)
        except openai.InternalServerError:
            self.server_errors += 1
            return None
        except openai.APIConnectionError:
            self.connection_errors += 1
            return None
        if batch.status == "in_progress":
            self.seen.append(progress(batch))
        return batch

    def until(self, predicate, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = self.poll()
            if batch is not None and predicate(batch):
                return batch
            time.sleep(0.1)
        raise TimeoutError(f"condition not reached for {self.batch_id}")

    def finish(self, timeout: float = 150.0):
        return self.until(lambda b: b.status in TERMINAL, timeout)


def start(make_stack, **kwargs) -> tuple[Stack, openai.OpenAI, Poller]:
    stack: Stack = make_stack(**{**SLOW, **kwargs}).start(workers=1, concurrency=2)
    client = stack.client(max_retries=5)
    batch = submit(client, chat_lines(N))
    poller = Poller(client, batch.id)
    poller.until(lambda b: b.status == "in_progress" and progress(b) >= N // 6)
    return stack, client, poller


def assert_monotonic(seen: list[int]) -> None:
    assert all(b >= a for a, b in zip(seen, seen[1:])), f"progress went backwards: {seen}"


def test_sigkill_one_worker_child(make_stack):
    stack, client, poller = start(make_stack)
    child = stack.worker_children("w1")[0]
    child.send_signal(signal.SIGKILL)
    final = poller.finish()
    assert final.status == "completed"
    assert_exactly_once(client, final, IDS)
    assert_monotonic(poller.seen)


def test_sigkill_whole_worker_then_start_another(make_stack):
    stack, client, poller = start(make_stack)
    stack.kill("w1")
    before = progress(client.batches.retrieve(poller.batch_id))
    time.sleep(1)
    assert progress(client.batches.retrieve(poller.batch_id)) == before  # nothing runs while no worker lives
    stack.start_worker("w2")
    final = poller.finish()
    assert final.status == "completed"
    assert_exactly_once(client, final, IDS)


def test_api_restart_is_invisible_to_the_sdk(make_stack):
    stack, client, poller = start(make_stack)
    stack.group.stop("api")
    stack.start_api()
    final = poller.finish()
    assert final.status == "completed"
    assert poller.server_errors == 0
    assert_exactly_once(client, final, IDS)


def test_redis_restart_with_aof(make_stack):
    stack, client, poller = start(make_stack, appendonly=True)
    stack.group.stop("redis")  # SIGTERM: redis flushes its append-only file and exits
    time.sleep(1)
    stack.start_redis()
    final = poller.finish(timeout=200)
    assert final.status == "completed"
    assert poller.server_errors == 0
    assert_exactly_once(client, final, IDS)


def test_cancel_mid_batch(make_stack):
    stack, client, poller = start(make_stack)
    cancelling = client.batches.cancel(poller.batch_id)
    assert cancelling.status == "cancelling"
    final = poller.finish()
    assert final.status == "cancelled" and final.cancelled_at is not None
    out, err = assert_exactly_once(client, final, IDS)
    assert out, "completed responses are kept"
    cancelled = [line for line in err if line["error"] and line["error"]["code"] == "batch_cancelled"]
    assert cancelled and all(line["response"] is None for line in cancelled)
    assert final.request_counts.total == N


def test_shortened_window_expires_mid_batch(make_stack):
    stack, client, poller = start(make_stack, completion_window_s=4, upstream_max_concurrency=2)
    final = poller.finish()
    assert final.status == "expired" and final.expired_at is not None
    out, err = assert_exactly_once(client, final, IDS)
    assert out, "responses completed before expiry are kept"
    assert err and all(line["error"]["code"] == "batch_expired" for line in err)
    assert all(line["error"]["message"] == "This request could not be executed before the completion window expired."
               for line in err)


def test_chunk_delivered_again_after_commit_changes_nothing(make_stack):
    stack, client, poller = start(make_stack)
    app = Celery("test-producer", broker=stack.redis_url)
    done = stack.store.done_chunks(poller.batch_id)
    assert done
    for index in done:
        app.send_task(RUN_CHUNK, args=[poller.batch_id, index], queue=CHUNKS_QUEUE)
    counts_before = client.batches.retrieve(poller.batch_id).request_counts
    final = poller.finish()
    assert final.status == "completed"
    assert_exactly_once(client, final, IDS)
    assert final.request_counts.completed >= counts_before.completed
    for index in done:
        app.send_task(RUN_CHUNK, args=[poller.batch_id, index], queue=CHUNKS_QUEUE)
    time.sleep(2)
    again = client.batches.retrieve(poller.batch_id)
    assert again.request_counts == final.request_counts and again.output_file_id == final.output_file_id
    assert_exactly_once(client, again, IDS)


def test_upstream_down_for_ten_seconds(make_stack):
    stack, client, poller = start(make_stack)
    stack.kill("simulator")
    time.sleep(10)
    stack.start_simulator()
    final = poller.finish()
    assert final.status == "completed"
    out, err = assert_exactly_once(client, final, IDS)
    assert out
    for line in err:
        assert line["response"] is None and line["error"]["code"] == "upstream_connect_refused"
