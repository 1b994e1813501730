"""A deployment upgraded mid-batch: a batch left in Redis by the version before the lifecycle module (one part blob
per chunk run, absolute progress, no segments) finishes under this one, exactly once."""

from __future__ import annotations

import time

import orjson
import pytest
import redis
from stack import assert_exactly_once, chat_lines, wait_terminal

from shared import keys

pytestmark = pytest.mark.e2e

N, PER_CHUNK = 90, 30


def _old_output_line(batch_id: str, n: int, custom_id: str) -> bytes:
    return orjson.dumps({"id": f"batch_req_old{batch_id[-6:]}{n}", "custom_id": custom_id,
                         "response": {"status_code": 200, "request_id": f"req_old{n}",
                                      "body": {"object": "chat.completion", "usage": {"prompt_tokens": 3,
                                                                                     "completion_tokens": 4,
                                                                                     "total_tokens": 7}}},
                         "error": None})


def test_a_batch_written_by_the_previous_version_finishes(stack):
    client = stack.client()
    data = chat_lines(N, prefix="up")
    uploaded = client.files.create(file=("input.jsonl", data), purpose="batch")
    r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    batch_id = "batch_" + "0123456789abcdef" * 2
    now = int(time.time())
    bounds, offset = [], 0
    for line in data.splitlines(keepends=True):
        bounds.append((offset, offset + len(line)))
        offset += len(line)
    plan = [f"{bounds[i * PER_CHUNK][0]},{bounds[(i + 1) * PER_CHUNK - 1][1]},{i * PER_CHUNK + 1},{PER_CHUNK}"
            for i in range(N // PER_CHUNK)]

    # What the previous version wrote: its batch hash and indexes, the plan, chunk 0 committed with one part per
    # run, chunk 1 started by a run that died (absolute progress 5:0), chunk 2 never started.
    r.hset(keys.batch(batch_id), mapping={
        "scope": "tenant-a", "status": "in_progress", "endpoint": "/v1/chat/completions",
        "input_file_id": uploaded.id, "completion_window": "24h", "created_at": str(now - 120),
        "expires_at": str(now + 86000), "metadata": "null", "updated_at": str(now - 100), "total": str(N),
        "tenant": "tenant-a", "model": "sim-model", "provider": "default", "dispatched_at": str(now - 100),
        "n_chunks": str(len(plan)), "in_progress_at": str(now - 100)})
    r.zadd(keys.batches_index("tenant-a"), {batch_id: r.incr(keys.SEQ)})
    r.zadd(keys.ACTIVE_BATCHES, {batch_id: now - 120})
    r.rpush(f"{keys.batch(batch_id)}:plan", *plan)
    blobs = stack.root / "data" / "blobs" / "batches" / batch_id
    (blobs / "parts").mkdir(parents=True)
    (blobs / "input.jsonl").write_bytes(data)
    (blobs / "parts" / "00000-oldrun.out.jsonl").write_bytes(
        b"\n".join(_old_output_line(batch_id, i, f"up-{i}") for i in range(PER_CHUNK)) + b"\n")
    r.sadd(f"{keys.batch(batch_id)}:done", 0)
    r.hset(f"{keys.batch(batch_id)}:counts", "0", orjson.dumps({
        "completed": PER_CHUNK, "failed": 0, "usage": [3 * PER_CHUNK, 0, 4 * PER_CHUNK, 0, 7 * PER_CHUNK],
        "run": "oldrun", "started": now - 99, "finished": now - 98, "attempt": 1, "node": "old@host"}).decode())
    r.hset(f"{keys.batch(batch_id)}:attempts", "1", "1")
    r.hset(f"{keys.batch(batch_id)}:progress", "1", "5:0")

    running = client.batches.retrieve(batch_id)
    assert running.status == "in_progress" and running.request_counts.completed == PER_CHUNK + 5

    final = wait_terminal(client, batch_id, timeout=60)  # the sweeper re-drives chunks 1 and 2, then finalize
    assert final.status == "completed"
    out, err = assert_exactly_once(client, final, {f"up-{i}" for i in range(N)})
    assert len(out) == N and err == []
    assert sum(1 for line in out if line["response"]["request_id"].startswith("req_old")) == PER_CHUNK
    assert final.usage.total_tokens > 7 * PER_CHUNK
