"""Shared pieces of the benchmarks: a deployment in a temp dir, batch inputs, timing a batch to the end."""

from __future__ import annotations

import io
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import orjson

from bench.deployment import Deployment

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def chat_input(n: int, model: str = "bench-model") -> bytes:
    return b"".join(
        orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}]}}) + b"\n"
        for i in range(n)
    )


@contextmanager
def deployment(*, workers: int = 1, concurrency: int = 2, **settings: object) -> Iterator[Deployment]:
    with tempfile.TemporaryDirectory(prefix="batchgate-bench-") as tmp:
        dep = Deployment(Path(tmp), **settings)
        try:
            dep.start(workers=workers, concurrency=concurrency, beat=True)
            yield dep
        finally:
            dep.stop()


def run_batch(dep: Deployment, content: bytes, poll_s: float = 0.05) -> tuple[float, object]:
    """Seconds from create to a terminal status, and the final batch."""
    client = dep.client()
    uploaded = client.files.create(file=("bench.jsonl", io.BytesIO(content)), purpose="batch")
    start = time.perf_counter()
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    while batch.status not in TERMINAL:
        time.sleep(poll_s)
        batch = client.batches.retrieve(batch.id)
    return time.perf_counter() - start, batch
