"""Redis behind Sentinels in real processes: a primary, a replica (`--replicaof`) and three Sentinels (quorum 2), and
a Stack whose API, workers and beat reach Redis only through them (BATCHGATE_REDIS_SENTINELS)."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import redis
from stack import Stack

from cli import stack as procs
from shared.settings import Settings
from shared.store import Store

MASTER = "batchgate-primary"
# Passwords with characters a URL must escape: they travel inside Celery's sentinel:// URLs.
PASSWORD = "pr1mary:p@ss/w0rd"
SENTINEL_PASSWORD = "sent1nel#p@ss"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
# An address where nothing listens: BATCHGATE_REDIS_URL points there, so a client that ignored the Sentinels fails.
UNUSED_REDIS_URL = "redis://127.0.0.1:1/0"


def sentinel_command(config: Path) -> list[str]:
    """Debian's redis-sentinel when installed, else redis-server in Sentinel mode (the same program)."""
    found = shutil.which("redis-sentinel")
    return [found, str(config)] if found else [procs.find_redis_server(), str(config), "--sentinel"]


class SentinelCluster:
    """redis-server primary + replica and three Sentinels on free ports, in `group` (started, stopped, killed)."""

    def __init__(self, group: procs.ProcessGroup, root: Path, *, password: str | None = PASSWORD,
                 sentinel_password: str | None = SENTINEL_PASSWORD) -> None:
        self.group = group
        self.root = root
        self.password = password
        self.sentinel_password = sentinel_password
        self.ports = {"redis-primary": procs.free_port(), "redis-replica": procs.free_port()}
        self.sentinel_ports = [procs.free_port() for _ in range(3)]

    @property
    def env(self) -> dict[str, str]:
        """The settings every batchgate process gets (BATCHGATE_REDIS_URL leads nowhere)."""
        env = {
            "BATCHGATE_REDIS_URL": UNUSED_REDIS_URL,
            "BATCHGATE_REDIS_SENTINELS": ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports),
            "BATCHGATE_REDIS_MASTER": MASTER,
        }
        if self.password:
            env["BATCHGATE_REDIS_PASSWORD"] = self.password
        if self.sentinel_password:
            env["BATCHGATE_REDIS_SENTINEL_PASSWORD"] = self.sentinel_password
        return env

    def settings(self) -> Settings:
        return Settings(redis_url=UNUSED_REDIS_URL, redis_sentinels=self.env["BATCHGATE_REDIS_SENTINELS"],
                        redis_master=MASTER, redis_password=self.password, redis_sentinel_password=self.sentinel_password)

    def _redis(self, name: str, *extra: str) -> None:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        auth = ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
        self.group.start(name, procs.redis_command(self.ports[name], folder, appendonly=True) + auth + list(extra))

    def start(self) -> "SentinelCluster":
        primary = self.ports["redis-primary"]
        self._redis("redis-primary")
        self._redis("redis-replica", "--replicaof", "127.0.0.1", str(primary))
        for i, port in enumerate(self.sentinel_ports):
            folder = self.root / f"sentinel-{i + 1}"
            folder.mkdir(parents=True, exist_ok=True)
            lines = [
                f"port {port}", "bind 127.0.0.1", f"dir {folder}", "loglevel notice",
                f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2",
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}",
                f"sentinel parallel-syncs {MASTER} 1",
            ]
            if self.password:
                lines.append(f'sentinel auth-pass {MASTER} "{self.password}"')
            if self.sentinel_password:
                lines.append(f'requirepass "{self.sentinel_password}"')  # also what it sends to the other Sentinels
            config = folder / "sentinel.conf"  # Sentinel rewrites its own file: one each
            config.write_text("\n".join(lines) + "\n")
            self.group.start(f"sentinel-{i + 1}", sentinel_command(config))
        self.wait_ready()
        return self

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.sentinel_password, decode_responses=True, socket_timeout=1)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Every Sentinel knows the other two and the replica, and the replica is in sync: a failover can happen."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [self.sentinel(port).sentinel_master(MASTER) for port in self.sentinel_ports]
                replica = redis.Redis(port=self.ports["redis-replica"], password=self.password, socket_timeout=1)
                in_sync = replica.info("replication").get("master_link_status") == "up"
                if in_sync and all(s["num-other-sentinels"] == 2 and s["num-slaves"] == 1 for s in states):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Sentinels did not settle within {timeout:g}s; see {self.root}")
            time.sleep(0.2)

    def master_port(self) -> int | None:
        """The primary's port as the Sentinels' majority reports it now (None: no majority answers)."""
        seen: dict[int, int] = {}
        for port in self.sentinel_ports:
            try:
                address = self.sentinel(port).sentinel_get_master_addr_by_name(MASTER)
            except redis.RedisError:
                continue
            if address:
                seen[int(address[1])] = seen.get(int(address[1]), 0) + 1
        best = max(seen.items(), key=lambda item: item[1], default=None)
        return best[0] if best and best[1] >= 2 else None

    def kill_primary_and_time_failover(self, timeout: float = 30.0) -> float:
        """SIGKILL the primary; seconds until the Sentinels name the replica as the primary."""
        killed_at = time.monotonic()
        self.group.stop("redis-primary", signal.SIGKILL)
        while self.master_port() != self.ports["redis-replica"]:
            if time.monotonic() - killed_at > timeout:
                raise TimeoutError(f"no failover within {timeout:g}s; see {self.root}")
            time.sleep(0.02)
        return time.monotonic() - killed_at


class SentinelStack(Stack):
    """A Stack on Sentinel settings: the cluster replaces the single redis-server; nothing uses BATCHGATE_REDIS_URL."""

    def __init__(self, root: Path, **kwargs: object) -> None:
        super().__init__(root, **kwargs)
        self.cluster = SentinelCluster(self.group, root / "redis")
        self.group.env.update(self.cluster.env)
        self.redis_url = UNUSED_REDIS_URL

    def start_redis(self) -> None:
        self.cluster.start()

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.from_settings(self.cluster.settings())
        return self._store
