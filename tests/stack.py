"""Test deployments and helpers: a Stack is a Deployment with two tenants and short timings."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import openai
import orjson

from bench.deployment import Deployment

UPSTREAM_SECRET = "sk-upstream-secret-0123456789"
API_KEY = "sk-test-tenant-a"
OTHER_API_KEY = "sk-test-tenant-b"
ADMIN_API_KEY = "sk-admin-test"
METRICS_TOKEN = "metrics-token-test"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


class Stack(Deployment):
    """A deployment with two tenants, an upstream that checks its key, and timings short enough for tests."""

    def __init__(self, root: Path, **kwargs: object) -> None:
        env = {
            "BATCHGATE_DEV_MODE": "0",
            "BATCHGATE_API_KEYS": f"{API_KEY}=tenant-a,{OTHER_API_KEY}=tenant-b",
            "BATCHGATE_UPSTREAM_API_KEY": UPSTREAM_SECRET,
            "BATCHGATE_SIM_API_KEY": UPSTREAM_SECRET,
            "BATCHGATE_SWEEP_INTERVAL_S": "1",
            "BATCHGATE_REDRIVE_AFTER_S": "3",
            "BATCHGATE_CHUNK_LEASE_S": "4",
            "BATCHGATE_VISIBILITY_TIMEOUT_S": "30",
            "BATCHGATE_CHUNK_TIME_LIMIT_S": "25",
            "BATCHGATE_RETRY_BASE_S": "0.05",
            "BATCHGATE_RETRY_MAX_S": "1",
            "BATCHGATE_PROGRESS_INTERVAL_S": "0.2",
            "BATCHGATE_ADMIN_API_KEY": ADMIN_API_KEY,
            "BATCHGATE_METRICS_TOKEN": METRICS_TOKEN,
            "BATCHGATE_BODY_READ_TIMEOUT_S": "2",
        }
        super().__init__(root, api_key=API_KEY, env=env, **kwargs)


# ---- batch helpers ------------------------------------------------------------------------------------------------


def chat_lines(n: int, *, model: str = "sim-model", prefix: str = "req") -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"{prefix}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": f"Say hello to number {i}"}]},
            }
        )
        + b"\n"
        for i in range(n)
    )


def submit(client: openai.OpenAI, content: bytes, endpoint: str = "/v1/chat/completions", **kwargs):
    uploaded = client.files.create(file=("input.jsonl", io.BytesIO(content)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h", **kwargs)


def wait_terminal(client: openai.OpenAI, batch_id: str, timeout: float = 120.0, on_poll=None):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if on_poll is not None:
            on_poll(batch)
        if batch.status in TERMINAL:
            return batch
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} still {batch.status} after {timeout:g}s: {batch.request_counts}")
        time.sleep(0.2)


def read_lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()]


def assert_exactly_once(client: openai.OpenAI, batch, expected_ids: set[str]) -> tuple[list[dict], list[dict]]:
    """Invariant 1: every custom_id in exactly one line of the two files, and the counts equal the files."""
    out = read_lines(client, batch.output_file_id)
    err = read_lines(client, batch.error_file_id)
    seen = [line["custom_id"] for line in out + err]
    assert len(seen) == len(set(seen)), "a custom_id appears more than once"
    assert set(seen) == expected_ids
    assert batch.request_counts.completed == len(out)
    assert batch.request_counts.failed == len(err)
    assert batch.request_counts.completed + batch.request_counts.failed == batch.request_counts.total
    return out, err
