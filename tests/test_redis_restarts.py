"""Redis SIGKILLed and restarted while a worker is busy: the worker node survives and every batch ends once.

Background (issue 14): with kombu 5.7.0 / celery 5.7.0 a worker whose connection dies while it has tasks running
and a BRPOP in flight exited with "Unrecoverable error: AttributeError(... 'hostname')". The cause and the
workaround are described at `workers.celery_app.finish_close_after_dead_brpop`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from celery.utils.threads import bound_open_broker_sockets
from kombu import Connection, Exchange, Queue
from kombu.common import ignore_errors
from kombu.transport import redis as kombu_redis
from stack import TERMINAL, Stack, assert_exactly_once, chat_lines, submit

from cli import stack as procs
from workers import celery_app

# ---- the exact sequence, in one process, against a real redis-server ------------------------------------------


def _busy_consumer_then_redis_killed(tmp_path: Path) -> tuple[Connection, kombu_redis.Channel]:
    """A connection as a busy worker holds it when Redis dies.

    The default channel has a delivered, unacked task and a BRPOP in flight (a free pool slot); a second channel
    consumes an auto-delete fanout queue, as celery's remote-control (pidbox) channel does.
    """
    port = procs.free_port()
    redis_proc = subprocess.Popen(procs.redis_command(port, tmp_path), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    procs.wait_for_redis(url)
    conn = Connection(url)
    conn.connect()
    channel = conn.default_channel
    tasks = Queue("chunks", Exchange("chunks"), "chunks")
    conn.Producer(channel).publish({"task": 1}, exchange=tasks.exchange, routing_key="chunks", declare=[tasks])
    received = []
    consumer = conn.Consumer(tasks, channel=channel, callbacks=[lambda body, msg: received.append(msg)],
                             accept=["json"])
    consumer.qos(prefetch_count=2)
    consumer.consume()
    conn.drain_events(timeout=5)
    assert received and channel.qos._delivered, "the task was not delivered"
    control = conn.channel()
    conn.Consumer(Queue("w1.pidbox", Exchange("pidbox", type="fanout"), auto_delete=True), channel=control,
                  callbacks=[lambda body, msg: None], accept=["json"]).consume()
    channel._brpop_start()
    assert channel._in_poll is not None
    os.killpg(redis_proc.pid, signal.SIGKILL)
    redis_proc.wait()
    return conn, channel


def _celery_connection_loss_cleanup(conn: Connection) -> None:
    """What celery 5.7.0's Consumer.on_connection_error_after_connected does with the broken connection."""
    bound_open_broker_sockets(conn, 5.0)
    try:
        conn.collect(socket_timeout=5.0)
    except Exception:  # noqa: BLE001 - celery ignores any error here
        pass
    ignore_errors(conn, conn.close)  # an exception escaping this is the worker's "Unrecoverable error"


def test_unpatched_kombu_reproduces_the_crash(tmp_path, monkeypatch):
    """The reproduction is faithful: kombu's own Channel.close raises the AttributeError the worker died of.

    When a kombu release fixes this, this test fails: drop `finish_close_after_dead_brpop` then.
    """
    monkeypatch.setattr(kombu_redis.Channel, "close", kombu_redis.Channel.close._batchgate_original)
    conn, _ = _busy_consumer_then_redis_killed(tmp_path)
    with pytest.raises(AttributeError, match="hostname"):
        _celery_connection_loss_cleanup(conn)


def test_channel_with_dead_brpop_closes_without_crashing(tmp_path):
    celery_app.finish_close_after_dead_brpop()  # idempotent; importing the Celery app has already done it
    assert getattr(kombu_redis.Channel.close, "_batchgate_patched", False)
    conn, channel = _busy_consumer_then_redis_killed(tmp_path)
    _celery_connection_loss_cleanup(conn)
    assert channel.closed


# ---- end to end: a busy worker, Redis SIGKILLed and restarted eight times -----------------------------------------

ROUNDS = 8
LINES = 40


@pytest.mark.e2e
def test_worker_survives_redis_sigkill_and_every_batch_ends_once(make_stack):
    # One chunk per batch (40 requests x 200 ms / 2 in flight = ~4 s) on a worker of 4 processes: tasks are running
    # while a pool slot is free, so the worker always has a BRPOP in flight when Redis dies, the state that crashed.
    stack: Stack = make_stack(appendonly=True, sim_latency_ms=200, upstream_max_concurrency=2,
                              chunk_min_requests=1000)
    stack.start(workers=1, concurrency=4)
    client = stack.client(max_retries=10)
    batches: dict[str, set[str]] = {}
    for round_ in range(ROUNDS):
        batch = submit(client, chat_lines(LINES, prefix=f"r{round_}"))
        batches[batch.id] = {f"r{round_}-{i}" for i in range(LINES)}
        deadline = time.monotonic() + 20
        while client.batches.retrieve(batch.id).status == "validating" and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # its chunk is running
        stack.kill("redis")
        time.sleep(0.3)
        stack.start_redis()
        assert stack.group.procs["w1"].poll() is None, f"worker died after Redis kill {round_ + 1}"

    deadline = time.monotonic() + 60
    pending = set(batches)
    while pending and time.monotonic() < deadline:
        pending = {b for b in pending if client.batches.retrieve(b).status not in TERMINAL}
        time.sleep(0.5)
    assert not pending, f"batches not terminal: {pending}"
    for batch_id, ids in batches.items():
        final = client.batches.retrieve(batch_id)
        assert final.status == "completed", final
        assert_exactly_once(client, final, ids)

    assert stack.group.procs["w1"].poll() is None, "the worker node exited"
    worker_log = (stack.root / "logs" / "w1.log").read_text(errors="replace")
    assert "Unrecoverable error" not in worker_log
    assert worker_log.count("Connection to broker lost") >= ROUNDS  # every kill did reach the worker
