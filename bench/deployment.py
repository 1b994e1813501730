"""A whole batchgate deployment on this machine in real processes, for the end-to-end tests and bench/."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import openai
import psutil

from cli import stack
from shared.store import Store


class Deployment:
    """redis-server, the simulator, uvicorn and `celery worker` as subprocesses, each on its own port.

    `settings` become BATCHGATE_* variables of every process; any part can be killed and restarted.
    """

    def __init__(self, root: Path, *, sim_latency_ms: float = 0.0, appendonly: bool = False,
                 api_key: str = "sk-batchgate-dev", env: dict[str, str] | None = None, api_workers: int = 1,
                 **settings: object) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.redis_port = stack.free_port()
        self.sim_port = stack.free_port()
        self.api_port = stack.free_port()
        self.appendonly = appendonly
        self.sim_latency_ms = sim_latency_ms
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.api_key = api_key
        self.api_workers = api_workers
        base = {
            "BATCHGATE_REDIS_URL": self.redis_url,
            "BATCHGATE_DATA_DIR": str(root / "data"),
            "BATCHGATE_DEV_MODE": "1",
            "BATCHGATE_UPSTREAM_BASE_URL": f"http://127.0.0.1:{self.sim_port}/v1",
        }
        base.update(env or {})
        base.update({f"BATCHGATE_{k.upper()}": str(v) for k, v in settings.items()})
        self.group = stack.ProcessGroup(log_dir=root / "logs")
        self.group.env.update(base)
        self._store: Store | None = None

    # ---- parts ------------------------------------------------------------------------------------------------

    def start_redis(self) -> None:
        (self.root / "redis").mkdir(exist_ok=True)
        self.group.start("redis", stack.redis_command(self.redis_port, self.root / "redis", appendonly=self.appendonly))
        stack.wait_for_redis(self.redis_url)

    def start_simulator(self) -> None:
        self.group.start("simulator", stack.simulator_command(self.sim_port, self.sim_latency_ms))
        stack.wait_for_http(f"http://127.0.0.1:{self.sim_port}/health")

    def start_api(self) -> None:
        self.group.start("api", stack.api_command(self.api_port, self.api_workers))
        stack.wait_for_http(f"http://127.0.0.1:{self.api_port}/healthz")

    def start_worker(self, name: str = "w1", concurrency: int = 2, env: dict[str, str] | None = None,
                     app: str = "workers.celery_app") -> subprocess.Popen:
        """A `celery worker`; `env` overrides settings for this one (e.g. a data dir of its own, as on another host),
        `app` the Celery app module it loads (a test's variant of batchgate's)."""
        proc = self.group.start(name, stack.worker_command(concurrency, name=name, app=app), env=env)
        deadline = time.monotonic() + 30
        while len(self.worker_children(name)) < concurrency:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"worker {name} did not start; see {self.root / 'logs'}")
            time.sleep(0.1)
        return proc

    def start_beat(self) -> None:
        self.group.start("beat", stack.beat_command(self.root / "celerybeat-schedule"))

    def start(self, *, workers: int = 1, concurrency: int = 2, beat: bool = True) -> "Deployment":
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

    def client(self, api_key: str | None = None, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key or self.api_key, **kwargs)

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
