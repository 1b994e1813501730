"""Redis behind Sentinels (issue 19): every process reaches Redis through BATCHGATE_REDIS_SENTINELS, and a failover
(the primary SIGKILLed, the replica promoted) in the middle of a batch ends with the batch completed, every line
exactly once, and the API answering 503 + Retry-After, never 500, while it happens."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import openai
import pytest
import test_dev
from sentinel_stack import MASTER, SentinelCluster, SentinelStack
from stack import assert_exactly_once, chat_lines, submit, wait_terminal

from cli import stack as procs
from shared import keys
from shared.queue import producer_app
from shared.settings import DEV_API_KEY, Settings
from shared.store import Store
from workers.celery_app import make_app

pytestmark = pytest.mark.e2e

RETRY_AFTER = "2"  # the default of BATCHGATE_STORAGE_RETRY_AFTER_S


def test_celery_gets_sentinel_urls_and_the_master_name(monkeypatch):
    """The broker and result backend of the workers, beat and the API's producer: kombu's and Celery's Sentinel
    transports, the password escaped in the URLs, the master's name and the Sentinels' password in the options."""
    for name, value in {"BATCHGATE_REDIS_SENTINELS": "s1:26379, s2:26380,s3:26381", "BATCHGATE_REDIS_MASTER": "prim",
                        "BATCHGATE_REDIS_PASSWORD": "a:b@c/d", "BATCHGATE_REDIS_SENTINEL_PASSWORD": "s#p"}.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    expected = "sentinel://:a%3Ab%40c%2Fd@s1:26379/0;sentinel://:a%3Ab%40c%2Fd@s2:26380/0;" \
               "sentinel://:a%3Ab%40c%2Fd@s3:26381/0"
    assert settings.celery_broker_url == settings.celery_result_backend == expected
    from shared import settings as settings_module

    monkeypatch.setattr(settings_module, "get_settings", lambda: settings)
    monkeypatch.setattr("shared.queue.get_settings", lambda: settings)
    monkeypatch.setattr("workers.celery_app.get_settings", lambda: settings)
    producer_app.cache_clear()
    try:
        for app in (make_app(), producer_app()):
            for options in (app.conf.broker_transport_options, app.conf.result_backend_transport_options):
                assert options["master_name"] == "prim"
                assert options["sentinel_kwargs"]["password"] == "s#p"
                assert options["visibility_timeout"] == settings.visibility_timeout_s
            with app.connection_for_write() as conn:
                assert type(conn.transport).__name__ == "SentinelTransport"
                assert conn.password == "a:b@c/d"
            backend = app.backend
            assert type(backend).__name__ == "SentinelBackend"
            assert [(h["host"], h["port"]) for h in backend.connparams["hosts"]] == settings.sentinel_addresses()
            assert backend.connparams["password"] == "a:b@c/d"
    finally:
        producer_app.cache_clear()


def test_bad_sentinel_addresses_are_refused():
    for bad in ("s1", "s1:port", ":26379", "s1:26379,s2"):
        with pytest.raises(ValueError, match="Sentinel address"):
            Settings(redis_sentinels=bad)
    assert Settings(redis_sentinels="").sentinel_addresses() == []
    assert Settings(redis_sentinels="[::1]:26379").sentinel_addresses() == [("::1", 26379)]


def test_the_api_and_workers_build_redis_clients_only_from_settings():
    """A client made from a URL would ignore the Sentinels: the API, the workers and beat make theirs with
    `from_settings` (shared/store_client.make_client)."""
    root = Path(__file__).resolve().parents[1]
    offenders = [f"{path.relative_to(root)}:{n}" for package in ("api", "workers")
                 for path in sorted((root / package).rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if ".from_url(" in line or "redis_url" in line]
    assert offenders == []
    stores = (root / "shared" / "store.py").read_text() + (root / "shared" / "store_async.py").read_text() + \
        (root / "shared" / "store_ratelimit.py").read_text()
    assert stores.count("make_client(settings") == 3


LINES = 3000
PROCESSES = 2
SENDERS = 8
CHUNK_LINES = 50  # BATCHGATE_CHUNK_MIN_REQUESTS: 4 waves x 8 senders is fewer


def test_failover_mid_batch_completes_exactly_once_and_the_api_never_answers_500(tmp_path):
    # 2 processes x 8 senders at 20 ms: about 4 s of upstream work, so the primary dies with the batch under way.
    # A requests-per-minute limit far above that rate puts the workers' limiter store (asyncio, its own pool) on
    # the Sentinels too, without slowing anything.
    stack = SentinelStack(tmp_path / "stack", sim_latency_ms=20, upstream_max_concurrency=SENDERS,
                          upstream_rpm=600_000, max_batch_lines=LINES, max_batch_input_bytes=20_000_000)
    try:
        stack.start(workers=1, concurrency=PROCESSES)
        client = stack.client(max_retries=5)
        batch = submit(client, chat_lines(LINES))

        # Call throughout with no SDK retries: reads of the asyncio reader (batches.retrieve) and of the sync store
        # (files.retrieve), and writes (files.create); count every answer by status code.
        answers: Counter = Counter()
        missing_retry_after: list[str] = []
        stop = threading.Event()
        poller = stack.client(max_retries=0, timeout=10)

        def poll() -> None:
            calls = (lambda: poller.batches.retrieve(batch.id), lambda: poller.files.retrieve(batch.input_file_id),
                     lambda: poller.files.create(file=("more.jsonl", chat_lines(2)), purpose="batch"))
            i = 0
            while not stop.is_set():
                try:
                    calls[i % len(calls)]()
                    answers[200] += 1
                except openai.APIStatusError as exc:
                    answers[exc.status_code] += 1
                    if exc.status_code == 503 and exc.response.headers.get("retry-after") != RETRY_AFTER:
                        missing_retry_after.append(repr(exc.response.headers))
                except openai.APIConnectionError:
                    answers["no answer"] += 1
                i += 1
                time.sleep(0.02)

        deadline = time.monotonic() + 60
        while client.batches.retrieve(batch.id).request_counts.completed < 300:
            assert time.monotonic() < deadline, "the batch did not get under way"
            time.sleep(0.05)
        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        time.sleep(0.3)
        before = client.batches.retrieve(batch.id)
        assert before.status == "in_progress" and before.request_counts.completed < LINES, before
        rpm_key = keys.rate_limit("default") + ":rpm"
        tat_before = int(stack.store.r.get(rpm_key))  # the limiter's schedule (µs), on the primary
        failover_s = stack.cluster.kill_primary_and_time_failover()

        final = wait_terminal(client, batch.id, timeout=180)
        time.sleep(0.5)
        stop.set()
        thread.join(15)
        assert final.status == "completed", final
        assert_exactly_once(client, final, {f"req-{i}" for i in range(LINES)})
        resent = stack.sim_stats()["requests"] - LINES
        print(f"\nfailover (SIGKILL -> the Sentinels name the replica): {failover_s:.2f}s; "
              f"{before.request_counts.completed}/{LINES} lines done at the kill; {resent} requests re-sent; "
              f"API answers while polling: {dict(answers)}")
        assert answers[500] == 0, f"500s during the failover: {dict(answers)}"
        assert set(answers) <= {200, 503}, dict(answers)
        assert answers[503] > 0, "no 503 seen: the poller did not catch the switch"
        assert missing_retry_after == []
        # Re-sent lines belong to chunks held when the primary died (the broker's loss terminates the runs; the
        # sweeper resumes them after their durable lines): at most 2 chunks of 50 in hand per process.
        assert 0 <= resent <= PROCESSES * 2 * CHUNK_LINES, resent
        worker_log = (stack.root / "logs" / "w1.log").read_text(errors="replace")
        assert f"{LINES} requests in {LINES // CHUNK_LINES} chunks of {CHUNK_LINES}" in worker_log
        assert stack.cluster.master_port() == stack.cluster.ports["redis-replica"]
        assert int(stack.store.r.get(rpm_key)) > tat_before, "the limiter did not write to the new primary"
        for name in ("w1", "api", "beat"):
            assert stack.group.procs[name].poll() is None, f"{name} exited"
    finally:
        stack.stop()


def test_dev_given_sentinels_starts_no_redis_of_its_own_and_one_sentinel_down_does_not_matter(tmp_path):
    group = procs.ProcessGroup(log_dir=tmp_path / "cluster-logs")
    cluster = SentinelCluster(group, tmp_path / "cluster")
    dev = None
    try:
        cluster.start()
        group.kill("sentinel-1")  # the first Sentinel named is down: every client asks the next one
        dev = test_dev.Dev(tmp_path, env=cluster.env)
        dev.wait_for("Ctrl-C stops everything.", timeout=90, stream="stdout")
        assert "private redis-server" not in dev.stdout
        assert "Sentinels" in dev.stdout and MASTER in dev.stdout
        assert not any("redis-server" in " ".join(p.cmdline()) for p in dev.descendants())
        assert not (tmp_path / "data" / "logs" / "redis.log").exists()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{dev.api_port}/v1", api_key=DEV_API_KEY, max_retries=5)
        # Promptly: each new connection skips the dead Sentinel at once (redis-py's default retry with backoff
        # made it ~5 s a connection, and this batch 36 s).
        batch = wait_terminal(client, submit(client, chat_lines(20)).id, timeout=20)
        assert batch.status == "completed"
        assert_exactly_once(client, batch, {f"req-{i}" for i in range(20)})
        # The batch is in the Sentinels' primary.
        assert cluster.master_port() == cluster.ports["redis-primary"]
        started = time.monotonic()
        store = Store.from_settings(cluster.settings())
        assert store.get_batch(batch.id) is not None
        assert time.monotonic() - started < 1.0, "a new client waited on the dead Sentinel"
        store.close()
    finally:
        if dev is not None:
            dev.stop()
        group.stop_all()
