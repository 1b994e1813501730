"""A 150 MB upload streams through the API: its resident memory grows by far less than the file."""

from __future__ import annotations

import threading
import time

import psutil
import pytest

pytestmark = pytest.mark.e2e

SIZE = 150 * 1024 * 1024
LIMIT = 64 * 1024 * 1024


def test_150mb_upload_keeps_api_memory_flat(stack, tmp_path):
    path = tmp_path / "big.jsonl"
    line = b'{"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "' + b"a" * 900 + b'"}}\n'
    with open(path, "wb") as fh:
        written = 0
        block = line * 1024
        while written < SIZE:
            fh.write(block)
            written += len(block)
    size = path.stat().st_size

    api = psutil.Process(stack.group.procs["api"].pid)
    baseline = api.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, api.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with open(path, "rb") as fh:
            uploaded = stack.client().files.create(file=("big.jsonl", fh), purpose="batch")
    finally:
        done.set()
        sampler.join()
    growth = peak - baseline
    print(f"150 MB upload: API RSS baseline {baseline / 2**20:.1f} MiB, peak growth {growth / 2**20:.1f} MiB")
    assert uploaded.bytes == size
    assert growth < LIMIT, f"API grew by {growth / 2**20:.1f} MiB"
