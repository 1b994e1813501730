"""The `batchgate` command."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import typer

from cli import client, stack
from shared.settings import DEV_API_KEY

app = typer.Typer(help="batchgate: a self-hosted, OpenAI-compatible Batch API.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """batchgate: a self-hosted, OpenAI-compatible Batch API."""


@app.command()
def dev(
    port: int = typer.Option(8000, help="Port of the API."),
    workers: int = typer.Option(2, help="Worker processes."),
    data_dir: Path = typer.Option(Path("./data"), help="Where files and the private Redis keep their data."),
    simulator_port: int = typer.Option(8001, help="Port of the built-in upstream simulator."),
    latency_ms: float = typer.Option(50.0, help="Latency of the simulator's answers."),
) -> None:
    """Run the API, a worker, beat, the simulator (and Redis if none is configured) in the foreground."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    group = stack.ProcessGroup(log_dir=None)
    redis_url = os.environ.get("BATCHGATE_REDIS_URL")
    if not redis_url:
        redis_port = stack.free_port()
        (data_dir / "redis").mkdir(exist_ok=True)
        group.start("redis", stack.redis_command(redis_port, data_dir / "redis", appendonly=True))
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        typer.echo(f"started a private redis-server at {redis_url}")
    stack.wait_for_redis(redis_url)

    env = {
        "BATCHGATE_REDIS_URL": redis_url,
        "BATCHGATE_DATA_DIR": str(data_dir),
        "BATCHGATE_DEV_MODE": "1",
        "BATCHGATE_SWEEP_INTERVAL_S": os.environ.get("BATCHGATE_SWEEP_INTERVAL_S", "10"),
    }
    if "BATCHGATE_UPSTREAM_BASE_URL" not in os.environ and "BATCHGATE_PROVIDERS_FILE" not in os.environ:
        group.start("simulator", stack.simulator_command(simulator_port, latency_ms))
        env["BATCHGATE_UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{simulator_port}/v1"
        typer.echo(f"simulator (the default upstream) at http://127.0.0.1:{simulator_port}/v1, {latency_ms:g} ms latency")
    group.env.update(env)
    group.start("worker", stack.worker_command(workers, name="dev"))
    group.start("beat", stack.beat_command(data_dir / "celerybeat-schedule"))
    group.start("api", stack.api_command(port))
    try:
        stack.wait_for_http(f"http://127.0.0.1:{port}/healthz")
        typer.echo(f"batchgate API at http://127.0.0.1:{port}/v1")
        if not os.environ.get("BATCHGATE_API_KEYS"):
            typer.echo(f"development API key: {DEV_API_KEY}")
        typer.echo("Ctrl-C stops everything.")
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while all(p.poll() is None for p in group.procs.values()):
            time.sleep(0.5)
        dead = [name for name, p in group.procs.items() if p.poll() is not None]
        typer.echo(f"stopping: {', '.join(dead)} exited", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        typer.echo("stopping…")
    finally:
        group.stop_all()


for _name, _command in client.COMMANDS.items():
    app.command(_name)(_command)


if __name__ == "__main__":
    app()
