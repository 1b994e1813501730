from __future__ import annotations

import sys
from pathlib import Path

import pytest
import redis

sys.path.insert(0, str(Path(__file__).parent))

from stack import Stack  # noqa: E402

from cli import stack as procs  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server for unit tests of the store."""
    port = procs.free_port()
    group = procs.ProcessGroup()
    group.start("redis", procs.redis_command(port, tmp_path_factory.mktemp("redis")))
    url = f"redis://127.0.0.1:{port}/0"
    procs.wait_for_redis(url)
    yield url
    group.stop_all()


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's) on loopback; tests make their own buckets in it."""
    port = procs.free_port()
    group = procs.ProcessGroup()
    group.start("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
    url = f"http://127.0.0.1:{port}"
    procs.wait_for_http(f"{url}/moto-api/")
    yield url
    group.stop_all()


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One running deployment shared by the end-to-end tests that do not break it."""
    running = Stack(
        tmp_path_factory.mktemp("stack"), max_batch_lines=5000, max_batch_input_bytes=8_000_000
    ).start(workers=1, concurrency=2)
    yield running
    running.stop()


@pytest.fixture
def make_stack(tmp_path):
    """Fresh deployments for tests that kill or reconfigure their parts."""
    made: list[Stack] = []

    def factory(**kwargs) -> Stack:
        made.append(Stack(tmp_path / f"stack{len(made)}", **kwargs))
        return made[-1]

    yield factory
    for s in made:
        s.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed:
        for name in ("stack", "make_stack"):
            value = item.funcargs.get(name)
            if isinstance(value, Stack):
                report.sections.append(("stack logs", value.logs()))
    return report
