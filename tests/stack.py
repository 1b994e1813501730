"""A whole batchgate deployment in real processes, for end-to-end and fault tests.

redis-server, the simulator, uvicorn and `celery worker` run as subprocesses with the same commands
`batchgate dev` uses; each stack has its own ports and data directory, and can kill and restart any part.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import orjson
import psutil

from cli import stack as procs
from shared.store import Store

API_KEY = "sk-test-tenant-a"
OTHER_API_KEY = "sk-test-tenant-b"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


class Stack:
    def __init__(self, root: Path, *, sim_latency_ms: float = 0.0, appendonly: bool = False, **settings: object) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.redis_port = procs.free_port()
        self.sim_port = procs.free_port()
        self.api_port = procs.free_port()
        self.appendonly = appendonly
        self.sim_latency_ms = sim_latency_ms
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        env = {
            "BATCHGATE_REDIS_URL": self.redis_url,
            "BATCHGATE_DATA_DIR": str(root / "data"),
            "BATCHGATE_API_KEYS": f"{API_KEY}=tenant-a,{OTHER_API_KEY}=tenant-b",
            "BATCHGATE_UPSTREAM_BASE_URL": f"http://127.0.0.1:{self.sim_port}/v1",
            "BATCHGATE_UPSTREAM_API_KEY": "sk-upstream-secret-0123456789",
            "BATCHGATE_SWEEP_INTERVAL_S": "1",
            "BATCHGATE_REDRIVE_AFTER_S": "3",
            "BATCHGATE_CHUNK_LEASE_S": "4",
            "BATCHGATE_VISIBILITY_TIMEOUT_S": "30",
            "BATCHGATE_CHUNK_TIME_LIMIT_S": "25",
            "BATCHGATE_RETRY_BASE_S": "0.05",
            "BATCHGATE_RETRY_MAX_S": "1",
            "BATCHGATE_PROGRESS_INTERVAL_S": "0.2",
            "BATCHGATE_SIM_API_KEY": "sk-upstream-secret-0123456789",
        }
        env.update({f"BATCHGATE_{k.upper()}": str(v) for k, v in settings.items()})
        self.group = procs.ProcessGroup(log_dir=root / "logs")
        self.group.env.update(env)
        self._store: Store | None = None

    # ---- parts ------------------------------------------------------------------------------------------------

    def start_redis(self) -> None:
        (self.root / "redis").mkdir(exist_ok=True)
        self.group.start("redis", procs.redis_command(self.redis_port, self.root / "redis", appendonly=self.appendonly))
        procs.wait_for_redis(self.redis_url)

    def start_simulator(self) -> None:
        self.group.start("simulator", procs.simulator_command(self.sim_port, self.sim_latency_ms))
        procs.wait_for_http(f"http://127.0.0.1:{self.sim_port}/health")

    def start_api(self) -> None:
        self.group.start("api", procs.api_command(self.api_port))
        procs.wait_for_http(f"http://127.0.0.1:{self.api_port}/healthz")

    def start_worker(self, name: str = "w1", concurrency: int = 2) -> subprocess.Popen:
        proc = self.group.start(name, procs.worker_command(concurrency, name=name))
        deadline = time.monotonic() + 30
        while len(self.worker_children(name)) < concurrency:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"worker {name} did not start; see {self.root / 'logs'}")
            time.sleep(0.1)
        return proc

    def start_beat(self) -> None:
        self.group.start("beat", procs.beat_command(self.root / "celerybeat-schedule"))

    def start(self, *, workers: int = 1, concurrency: int = 2, beat: bool = True) -> "Stack":
        self.start_redis()
        self.start_simulator()
        self.start_api()
        for i in range(workers):
            self.start_worker(f"w{i + 1}", concurrency)
        if beat:
            self.start_beat()
        return self

    def stop(self) -> None:
        self.group.stop_all()

    def worker_children(self, name: str) -> list[psutil.Process]:
        proc = self.group.procs.get(name)
        if proc is None:
            return []
        try:
            return psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    def kill(self, name: str) -> None:
        self.group.kill(name)

    def sim_config(self, **changes: object) -> dict:
        resp = httpx.post(f"http://127.0.0.1:{self.sim_port}/_sim/config", json=changes, timeout=5)
        resp.raise_for_status()
        return resp.json()

    def sim_stats(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.sim_port}/_sim/stats", timeout=5).json()

    # ---- clients ----------------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/v1"

    def client(self, api_key: str = API_KEY, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, **kwargs)

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.from_url(self.redis_url)
        return self._store

    def logs(self) -> str:
        out = []
        for path in sorted((self.root / "logs").glob("*.log")):
            out.append(f"==> {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)


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
