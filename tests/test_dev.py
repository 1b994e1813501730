"""`batchgate dev` as a user runs it: a child that dies comes back; one that keeps dying stops everything, loudly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import psutil
import pytest
from stack import assert_exactly_once, chat_lines, submit, wait_terminal

from cli import stack as procs
from shared.settings import DEV_API_KEY

pytestmark = pytest.mark.e2e

BATCHGATE = str(Path(sys.executable).parent / "batchgate")


class Dev:
    """A `batchgate dev` subprocess on free ports, its console captured to files."""

    def __init__(self, root: Path, *, sim_port: int | None = None, data_dir: bool = True,
                 env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.api_port = procs.free_port()
        self.sim_port = sim_port or procs.free_port()
        self.stdout_path = root / "stdout.txt"
        self.stderr_path = root / "stderr.txt"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHGATE_")}  # its own Redis, simulator
        full_env.update(env or {})
        command = [BATCHGATE, "dev", "--port", str(self.api_port), "--simulator-port", str(self.sim_port),
                   "--latency-ms", "5", *args]
        if data_dir:
            command += ["--data-dir", str(root / "data")]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(command, env=full_env, stdout=out, stderr=err, start_new_session=True)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float, stream: str = "stderr") -> None:
        deadline = time.monotonic() + timeout
        while text not in getattr(self, stream):
            assert self.proc.poll() is None, f"dev exited {self.proc.returncode}:\n{self.stdout}\n{self.stderr}"
            assert time.monotonic() < deadline, f"{text!r} not printed within {timeout:g}s:\n{self.stdout}\n{self.stderr}"
            time.sleep(0.1)

    def child(self, marker: str) -> psutil.Process:
        """The child of dev whose command line contains `marker`."""
        for proc in psutil.Process(self.proc.pid).children():
            if marker in " ".join(proc.cmdline()):
                return proc
        raise LookupError(f"no child of dev runs {marker!r}")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        left = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for proc in left:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture
def dev(tmp_path):
    running = Dev(tmp_path)
    yield running
    running.stop()


def test_dev_restarts_a_killed_child_and_stops_everything_when_one_keeps_dying(dev):
    dev.wait_for("Ctrl-C stops everything.", timeout=60, stream="stdout")
    log_dir = dev.root / "data" / "logs"
    assert {"redis.log", "simulator.log", "worker.log", "beat.log", "api.log"} <= {p.name for p in log_dir.iterdir()}

    # SIGKILL the whole worker (its pool too) and the simulator: both come back and a batch completes.
    worker, simulator = dev.child("celery -A workers.celery_app worker"), dev.child("-m simulator")
    os.killpg(worker.pid, signal.SIGKILL)
    simulator.kill()
    dev.wait_for("worker exited (killed by SIGKILL); restarting it in 1s", timeout=10)
    dev.wait_for("simulator exited (killed by SIGKILL); restarting it in 1s", timeout=10)
    dev.wait_for("worker restarted", timeout=10)
    dev.wait_for("simulator restarted", timeout=10)
    assert dev.child("celery -A workers.celery_app worker").pid != worker.pid
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{dev.api_port}/v1", api_key=DEV_API_KEY, max_retries=5)
    batch = wait_terminal(client, submit(client, chat_lines(50)).id, timeout=60)
    assert batch.status == "completed"
    assert_exactly_once(client, batch, {f"req-{i}" for i in range(50)})

    # Now the simulator cannot start again: its port is taken. Third death within a minute: dev gives up.
    children = dev.descendants()
    simulator = dev.child("-m simulator")
    simulator.kill()
    simulator.wait(5)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT of the killed server
        squatter.bind(("127.0.0.1", dev.sim_port))
        squatter.listen()
        assert dev.proc.wait(timeout=60) == 1
    err = dev.stderr
    assert "simulator exited (killed by SIGKILL); restarting it in 2s" in err
    assert "stopping: simulator died 3 times within 60s" in err
    assert f"last lines of {log_dir / 'simulator.log'}:" in err
    assert "address already in use" in err.split("last lines of")[-1]
    time.sleep(0.5)
    assert [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == [], \
        "dev left processes running"


# ---- ports ----------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_make_run_passes_port_and_simulator_port_to_dev():
    printed = subprocess.run(["make", "-n", "run", "PORT=8080", "SIMULATOR_PORT=9091"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    assert "batchgate dev --port 8080 --simulator-port 9091" in printed
    default = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "batchgate dev --port 8000 --simulator-port 8001" in default


def test_dev_moves_the_simulator_when_its_port_is_taken(tmp_path):
    with socket.socket() as squatter:  # a program already listening on the simulator's port (8001 for a user)
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        dev = Dev(tmp_path, sim_port=taken)
        try:
            dev.wait_for("Ctrl-C stops everything.", timeout=60, stream="stdout")
            out = dev.stdout
            assert f"port {taken} is taken; the simulator uses " in out
            moved = int(out.split("the simulator uses ")[1].split()[0])
            assert moved != taken
            assert f"simulator (the default upstream) at http://127.0.0.1:{moved}/v1" in out
            assert f"batchgate API at http://127.0.0.1:{dev.api_port}/v1" in out
            # The workers send to the port the simulator got, and a batch runs end to end.
            worker = dev.child("celery -A workers.celery_app worker")
            assert worker.environ()["BATCHGATE_UPSTREAM_BASE_URL"] == f"http://127.0.0.1:{moved}/v1"
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{dev.api_port}/v1", api_key=DEV_API_KEY)
            batch = wait_terminal(client, submit(client, chat_lines(20)).id, timeout=60)
            assert batch.status == "completed" and batch.request_counts.completed == 20
            assert dev.proc.poll() is None
        finally:
            dev.stop()


def test_dev_refuses_an_api_port_in_use(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHGATE_")}
        done = subprocess.run([BATCHGATE, "dev", "--port", str(port), "--data-dir", str(tmp_path / "data")],
                              env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"port {port} is in use" in done.stderr and "PORT=" in done.stderr
    assert "batchgate API at" not in done.stdout


# ---- dev's children end with it --------------------------------------------------------------------------------


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("how", ["SIGHUP when running", "SIGTERM during start-up", "SIGKILL when running"])
def test_no_child_outlives_dev(tmp_path, how):
    dev = Dev(tmp_path)
    try:
        if how == "SIGTERM during start-up":
            # As soon as redis-server, the simulator and a worker run, before the API answers.
            deadline = time.monotonic() + 60
            while not any("celery" in " ".join(p.cmdline()) for p in _alive(dev.descendants())):
                assert time.monotonic() < deadline and dev.proc.poll() is None, dev.stderr
                time.sleep(0.02)
            assert "batchgate API at" not in dev.stdout
        else:
            dev.wait_for("Ctrl-C stops everything.", timeout=60, stream="stdout")
            time.sleep(1)  # the worker's pool is up
        children = dev.descendants()
        assert len(children) >= 3
        if how.startswith("SIGHUP"):
            dev.proc.send_signal(signal.SIGHUP)
        elif how.startswith("SIGTERM"):
            dev.proc.send_signal(signal.SIGTERM)
        else:
            dev.proc.kill()
        signalled = time.monotonic()
        dev.proc.wait(timeout=30)
        while _alive(children) and time.monotonic() - signalled < 15:
            time.sleep(0.05)
        took = time.monotonic() - signalled
        left = [" ".join(p.cmdline()) for p in _alive(children)]
        assert left == [], f"{how}: dev left {left}"
        print(f"{how}: {len(children)} children gone {took:.2f}s after the signal")
        if how != "SIGTERM during start-up":
            assert not _listening(dev.api_port) and not _listening(dev.sim_port)
        if how.startswith("SIGKILL"):
            assert took < 5
        else:
            assert "stopping…" in dev.stdout
    finally:
        dev.stop()


def test_dev_takes_its_data_dir_from_the_environment(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    dev = Dev(tmp_path, data_dir=False, env={"BATCHGATE_DATA_DIR": str(elsewhere)})
    try:
        dev.wait_for("Ctrl-C stops everything.", timeout=60, stream="stdout")
        assert f"logs of each process in {elsewhere / 'logs'}/" in dev.stdout
        assert {"api.log", "worker.log", "redis.log"} <= {p.name for p in (elsewhere / "logs").iterdir()}
        assert dev.child("uvicorn api.main:app").environ()["BATCHGATE_DATA_DIR"] == str(elsewhere)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{dev.api_port}/v1", api_key=DEV_API_KEY)
        batch = wait_terminal(client, submit(client, chat_lines(5)).id, timeout=60)
        assert batch.status == "completed"
        stored = [p for p in elsewhere.rglob("*") if p.is_file() and "logs" not in p.parts and "redis" not in p.parts]
        assert stored, "the batch's files are not under BATCHGATE_DATA_DIR"
        assert not (tmp_path / "data").exists()
    finally:
        dev.stop()


# ---- the console --------------------------------------------------------------------------------------------------


def test_dev_console_shows_start_up_and_one_line_per_batch_event(dev):
    dev.wait_for("Ctrl-C stops everything.", timeout=60, stream="stdout")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{dev.api_port}/v1", api_key=DEV_API_KEY)
    batch = wait_terminal(client, submit(client, chat_lines(100)).id, timeout=60)
    assert batch.status == "completed"
    dev.wait_for(f"{batch.id} completed: 100/100 ok, 0 failed in ", timeout=10, stream="stdout")
    # A bad batch: its failure and the reason.
    bad = wait_terminal(client, submit(client, b'{"custom_id": "x"}\n').id, timeout=60)
    assert bad.status == "failed"
    dev.wait_for(f"{bad.id} failed", timeout=10, stream="stdout")
    time.sleep(12)  # past a sweep (every 10 s in dev): sweeps print nothing
    console = (dev.stdout + dev.stderr).splitlines()
    print("\n".join(console))
    assert len(console) <= 15, console
    assert not [line for line in console if line.lstrip().startswith("{")], "JSON on dev's console"
    created = [line for line in console if f"{batch.id} created: /v1/chat/completions" in line]
    assert len(created) == 1
    assert len([line for line in console if f"{batch.id} completed: 100/100 ok, 0 failed in " in line]) == 1
    failed = [line for line in console if f"{bad.id} failed" in line]
    assert len(failed) == 1 and "missing_required_parameter" in failed[0] and "(line 1)" in failed[0]
    assert f"dashboard at http://127.0.0.1:{dev.api_port}/ui" in dev.stdout
    # The log files hold the text lines too, and no line per HTTP request or per sweep.
    api_log = (dev.root / "data" / "logs" / "api.log").read_text()
    assert f"{batch.id} created" in api_log and "GET /v1/batches/" not in api_log
    worker_log = (dev.root / "data" / "logs" / "worker.log").read_text()
    assert "batchgate.sweep" not in worker_log and "succeeded in" not in worker_log


def test_a_deployment_logs_json_lines_with_the_batch_events(make_stack):
    dep = make_stack(log_format="json").start(workers=1, concurrency=1)
    client = dep.client()
    batch = wait_terminal(client, submit(client, chat_lines(10)).id, timeout=60)
    assert batch.status == "completed"
    deadline = time.monotonic() + 10
    while f"{batch.id} completed" not in (dep.root / "logs" / "w1.log").read_text():
        assert time.monotonic() < deadline, dep.logs()
        time.sleep(0.2)
    records = []
    for name in ("api.log", "w1.log"):
        for line in (dep.root / "logs" / name).read_text().splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))  # every log line is one JSON object
            else:
                assert not line[:4].isdigit(), f"a text log line in a JSON deployment: {line}"
    events = {r["message"].split(":")[0]: r for r in records if r["logger"] == "batchgate.events"}
    assert events[f"{batch.id} created"]["batch_id"] == batch.id
    assert events[f"{batch.id} completed"]["message"].startswith(f"{batch.id} completed: 10/10 ok, 0 failed in ")
    assert any(r["logger"] == "batchgate.access" for r in records), "deployments keep their access lines"


# ---- an upstream that cannot be reached ---------------------------------------------------------------------------


def test_an_unreachable_upstream_is_reported_once_with_its_host_and_port(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    dev = Dev(tmp_path, env={"BATCHGATE_UPSTREAM_BASE_URL": f"http://127.0.0.1:{closed}/v1",
                             "BATCHGATE_UPSTREAM_MAX_RETRIES": "3", "BATCHGATE_RETRY_BASE_S": "0.05",
                             "BATCHGATE_RETRY_MAX_S": "0.2"})
    try:
        dev.wait_for("Ctrl-C stops everything.", timeout=60, stream="stdout")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{dev.api_port}/v1", api_key=DEV_API_KEY)
        batch = wait_terminal(client, submit(client, chat_lines(20)).id, timeout=60)
        assert batch.status == "completed" and batch.request_counts.failed == 20
        dev.wait_for(f"{batch.id} completed: 0/20 ok, 20 failed", timeout=10, stream="stdout")
        warning = f"upstream 'default' at 127.0.0.1:{closed} cannot be reached"
        console = [line for line in dev.stdout.splitlines() if warning in line]
        assert len(console) == 1, dev.stdout
        assert "WARNING worker" in console[0] and "upstream_connect_refused" in console[0]
        logged = [line for line in (dev.root / "data" / "logs" / "worker.log").read_text().splitlines()
                  if warning in line]
        assert len(logged) == 1
    finally:
        dev.stop()


def test_reachability_warns_again_only_after_the_provider_answered_in_between(caplog):
    from types import SimpleNamespace

    from shared.providers import Provider
    from workers import reachability

    reachability.reset()
    provider = Provider(name="p", base_url="https://user:secret@llm.internal:8443/v1")
    refused = SimpleNamespace(status_code=None, error_code="upstream_connect_refused", error_message="refused")
    timeout = SimpleNamespace(status_code=None, error_code="request_timeout", error_message="slow")
    answer = SimpleNamespace(status_code=500, error_code=None, error_message=None)
    with caplog.at_level("WARNING", logger="batchgate.upstream"):
        for outcome in [refused, refused, timeout, refused, refused, refused]:
            reachability.observe(provider, outcome)
        assert len(caplog.records) == 1
        assert "upstream 'p' at llm.internal:8443 cannot be reached" in caplog.records[0].getMessage()
        assert "secret" not in caplog.records[0].getMessage()
        reachability.observe(provider, answer)
        for _ in range(5):
            reachability.observe(provider, refused)
        assert len(caplog.records) == 2 and "no longer answers" in caplog.records[1].getMessage()
    reachability.reset()


# ---- make venv ----------------------------------------------------------------------------------------------------


def test_make_venv_installs_without_the_editable_installation_warning(tmp_path):
    """The Makefile's own install line, run into a fresh venv (without the dependencies, for time)."""
    lines = [line for line in subprocess.run(["make", "-n", "-B", "venv"], cwd=ROOT, capture_output=True,
                                             text=True, check=True).stdout.splitlines() if "pip install" in line]
    assert len(lines) == 2 and "--upgrade pip" in lines[0]  # a recent pip shows the build backend's warnings
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run(lines[0].replace(".venv/bin/python", python), shell=True, check=True, timeout=240)
    command = lines[1].replace(".venv/bin/python", python).replace(" -e '.[dev]'", f" --no-deps -e '{ROOT}'")
    done = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    if done.returncode != 0 and "setuptools" in done.stderr and "No matching distribution" in done.stderr:
        pytest.skip("no package index to fetch the build backend from")
    assert done.returncode == 0, done.stderr
    assert "Editable installation" not in done.stdout + done.stderr
    # The install is editable: the entry point runs this worktree's code.
    shown = subprocess.run([str(venv / "bin" / "python"), "-c", "import cli; print(cli.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert shown.strip() == str(ROOT / "cli" / "__init__.py")
    assert (venv / "bin" / "batchgate").exists()
