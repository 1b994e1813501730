"""docker-compose.yml cannot run here (no Docker engine), so it is checked by reading: every command it names
resolves to this project's entry points, every setting it passes is a real one, and the reliability settings hold."""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml
from celery import Celery

from cli.stack import API_PROTOCOL, api_command, free_port, wait_for_http
from shared.settings import Settings
from simulator.config import SimulatorConfig

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SERVICES = COMPOSE["services"]


def _resolve(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_services_and_reliability_settings():
    assert {"redis", "simulator", "api", "worker", "beat", "flower"} <= set(SERVICES)
    redis_cmd = " ".join(SERVICES["redis"]["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert flag in redis_cmd
    assert "healthcheck" in SERVICES["redis"]
    worker = SERVICES["worker"]
    assert "container_name" not in worker and "ports" not in worker, "the worker must scale with --scale worker=N"
    grace = re.fullmatch(r"(\d+)m", worker["stop_grace_period"])
    assert grace and int(grace.group(1)) * 60 > Settings().chunk_time_limit_s
    assert SERVICES["flower"]["profiles"] == ["monitoring"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "data" in COMPOSE["volumes"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_command_resolves_to_the_project(name):
    service = SERVICES[name]
    command = service.get("command")
    if not service.get("build"):  # Redis's own image: the primary, the replica and the Sentinels
        assert service["image"].startswith("redis:")
        assert command[0] == "redis-server" or "exec redis-server " in command[-1], name
        return
    program, args = command[0], command[1:]
    scripts = PYPROJECT["project"]["scripts"]
    if program == "uvicorn":
        app = _resolve(args[0])
        assert callable(app)
        # The API runs on the protocol with a header deadline, as `batchgate dev` and the tests do.
        assert args[args.index("--http") + 1] == API_PROTOCOL
        assert issubclass(_resolve(API_PROTOCOL), asyncio.Protocol)
    elif program == "celery":
        module = args[args.index("-A") + 1]
        app = importlib.import_module(module).app
        assert isinstance(app, Celery)
        subcommand = args[args.index("-A") + 2]
        assert subcommand in ("worker", "beat", "flower")
        if subcommand == "worker":
            queues = args[args.index("-Q") + 1].split(",")
            routed = {route["queue"] for route in app.conf.task_routes.values()}
            assert routed <= set(queues)
        if subcommand == "flower":
            assert any(dep.startswith("flower") for dep in PYPROJECT["project"]["optional-dependencies"]["monitoring"])
    else:
        assert program in scripts, f"{program} is not a console script of the project"
        assert callable(_resolve(scripts[program]))


def test_the_sentinel_profile():
    """Profile `sentinel`: a replica of `redis` kept like it, three Sentinels (quorum 2) watching the primary under
    the name the app is given, and the app switched to them by one variable (README: Redis Sentinel)."""
    app_env = COMPOSE["x-app"]["environment"]
    master = app_env["BATCHGATE_REDIS_MASTER"]
    assert app_env["BATCHGATE_REDIS_SENTINELS"] == "${BATCHGATE_REDIS_SENTINELS:-}"
    assert Settings(redis_sentinels="").sentinel_addresses() == []  # unset: the app keeps BATCHGATE_REDIS_URL
    replica = SERVICES["redis-replica"]
    assert replica["profiles"] == ["sentinel"]
    replica_cmd = " ".join(replica["command"])
    assert "--replicaof redis 6379" in replica_cmd
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert flag in replica_cmd
    sentinels = sorted(name for name in SERVICES if name.startswith("sentinel-"))
    assert sentinels == ["sentinel-1", "sentinel-2", "sentinel-3"]
    for name in sentinels:
        service = SERVICES[name]
        assert service["profiles"] == ["sentinel"]
        script = service["command"][-1]
        assert f"'sentinel monitor {master} redis 6379 2'" in script
        assert script.rstrip().endswith("--sentinel")
    # What the README tells to put in .env names exactly these Sentinels.
    readme = (ROOT / "README.md").read_text()
    line = re.search(r"BATCHGATE_REDIS_SENTINELS=(\S+)", readme).group(1)
    assert Settings(redis_sentinels=line).sentinel_addresses() == [(name, 26379) for name in sentinels]
    assert "COMPOSE_PROFILES=sentinel" in readme
    # No app service waits for a service of the profile: without it, compose would refuse to start them.
    for service in SERVICES.values():
        if service.get("build"):
            assert not set(service.get("depends_on") or {}) & {"redis-replica", *sentinels}


def _env_names(service: dict) -> set[str]:
    env = dict(COMPOSE["x-app"]["environment"]) if service.get("build") else {}
    env.update(service.get("environment") or {})
    return set(env)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_variable_is_a_real_setting(name):
    settings = {f"BATCHGATE_{field.upper()}" for field in Settings.model_fields}
    simulator = {f"BATCHGATE_SIM_{field.upper()}" for field in SimulatorConfig.model_fields}
    for var in _env_names(SERVICES[name]):
        assert var in settings or var in simulator, f"{name}: {var} is not a setting"


def test_make_compose_check_validates_the_file_offline(tmp_path):
    """`make compose-check` (docker-compose config -q, no Docker engine) passes on the file, and fails on a broken
    copy, so it checks something. .ci/run installs Debian's docker-compose when it is missing."""
    import shutil

    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; .ci/run does)")
    assert "compose-check:" in (ROOT / "Makefile").read_text()
    run = subprocess.run(["make", "-s", "compose-check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    broken = tmp_path / "docker-compose.yml"
    text = (ROOT / "docker-compose.yml").read_text()
    broken.write_text(text.replace("  worker:\n", "  worker:\n    no_such_option: 1\n", 1))
    run = subprocess.run(["docker-compose", "-f", str(broken), "config", "-q"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0


def test_healthchecks_hit_real_routes():
    from starlette.testclient import TestClient

    from api.main import create_app
    from simulator.app import create_app as create_simulator

    # No Redis here: /healthz answers 503, which still proves the route exists (an unknown one is 404).
    api = TestClient(create_app(Settings(dev_mode=True, redis_url="redis://127.0.0.1:1/0")))
    assert "/healthz" in " ".join(SERVICES["api"]["healthcheck"]["test"])
    assert api.get("/healthz").status_code in (200, 503)
    assert api.get("/no-such-route").status_code == 404
    assert "/health" in " ".join(SERVICES["simulator"]["healthcheck"]["test"])
    assert TestClient(create_simulator()).get("/health").status_code == 200


def test_dockerfile_installs_every_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install" in dockerfile
    for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        name = package.rstrip("*")
        assert f"COPY {name} ./{name}" in dockerfile, f"Dockerfile does not copy {name}/"


# ---- the placeholder key ------------------------------------------------------------------------------------------


def _compose_environment(service: dict) -> dict[str, str]:
    """The service's environment as compose gives it when none of the variables it names is set."""
    env = dict(COMPOSE["x-app"]["environment"]) if service.get("build") else {}
    env.update(service.get("environment") or {})
    return {name: re.sub(r"\$\{[A-Z_0-9]+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))
            for name, value in env.items()}


def _run_api(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess | None:
    """Run the API; its result when it exits within `timeout`, else None (it is serving; it is stopped)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(command, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None


@pytest.mark.e2e
def test_the_api_refuses_compose_s_placeholder_key_unless_in_dev_mode(redis_server, tmp_path):
    api = SERVICES["api"]
    compose_env = _compose_environment(api)
    assert compose_env["BATCHGATE_API_KEYS"] == "sk-change-me=default"
    base = {k: v for k, v in os.environ.items() if not k.startswith("BATCHGATE_")}
    env = {**base, **compose_env, "BATCHGATE_REDIS_URL": redis_server, "BATCHGATE_DATA_DIR": str(tmp_path)}
    port = free_port()
    args = api["command"][1:]
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    compose_command = [sys.executable, "-m", "uvicorn", *args]  # compose's own command: 2 worker processes
    for command in (compose_command, api_command(port)):
        refused = _run_api(command, env, timeout=60)
        assert refused is not None, f"{command} started with the placeholder key"
        assert "refusing to start: BATCHGATE_API_KEYS holds the placeholder key sk-change-me" in refused.stderr
        assert "BATCHGATE_DEV_MODE=1" in refused.stderr and ".env" in refused.stderr
        if command is not compose_command:  # uvicorn's supervisor of N workers stops, but exits 0
            assert refused.returncode != 0

    # Dev mode: it starts and serves with the placeholder.
    dev_env = {**env, "BATCHGATE_DEV_MODE": "1"}
    proc = subprocess.Popen(api_command(port), cwd=ROOT, env=dev_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout=30)
        answer = httpx.get(f"http://127.0.0.1:{port}/v1/batches", headers={"Authorization": "Bearer sk-change-me"})
        assert answer.status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
