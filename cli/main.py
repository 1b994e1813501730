"""The `batchgate` command."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import typer

from cli import client, stack
from cli.console import LogTail
from cli.supervisor import ChildKeepsDying, RestartPolicy, SupervisedGroup
from shared.settings import DEV_API_KEY, Settings

SIMULATOR_PORT = 8001

app = typer.Typer(no_args_is_help=True)

# typer labels every option with its type; for a flag (--wait, --json, --help) that label is a meaningless <bool>.
_display_type = typer.core.TyperOption.display_type_rich


def _no_type_for_flags(self, ctx):
    return None if self.is_flag else _display_type(self, ctx)


typer.core.TyperOption.display_type_rich = _no_type_for_flags


@app.callback()
def main() -> None:
    """batchgate: a self-hosted, OpenAI-compatible Batch API.

    \b
    Example:
      batchgate dev         # in one terminal: the API on :8000 and the rest
      export OPENAI_BASE_URL=http://127.0.0.1:8000/v1
      export OPENAI_API_KEY=sk-batchgate-dev
      batchgate submit requests.jsonl --endpoint /v1/chat/completions --wait
      batchgate list
    """


@app.command()
def dev(
    port: int = typer.Option(8000, help="Port of the API."),
    workers: int = typer.Option(2, help="Worker processes."),
    data_dir: Path = typer.Option(Path("./data"), envvar="BATCHGATE_DATA_DIR",
                                  help="Where files, logs and the private Redis keep their data."),
    simulator_port: int = typer.Option(
        SIMULATOR_PORT, help="Port of the built-in upstream simulator; a free one is used instead when it is taken."),
    latency_ms: float = typer.Option(50.0, help="Latency of the simulator's answers."),
) -> None:
    """Run the API, a worker, beat, the simulator (and Redis if none is configured) in the foreground.

    A process that dies is started again after 1 s, 2 s, ...; 3 deaths of one within a minute stop everything.

    Each process writes to <data-dir>/logs/<name>.log; the console shows one line per batch event, and warnings.

    \b
    Example:
      batchgate dev
      batchgate dev --port 8080 --simulator-port 8091 --workers 4
      BATCHGATE_UPSTREAM_BASE_URL=http://127.0.0.1:11434/v1 batchgate dev
    """
    if stack.port_taken(port):
        typer.echo(f"port {port} is in use (another batchgate dev?): choose another with "
                   f"`batchgate dev --port {port + 80}` or `make run PORT={port + 80}`", err=True)
        raise typer.Exit(1)
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir = data_dir / "logs"
    # Every child dies with dev, however dev ends (kill -9 too); Ctrl-C, SIGTERM and a closed terminal (SIGHUP)
    # stop them in order first. From here on, any of the three ends up in `finally`, even during start-up.
    log_dir.mkdir(exist_ok=True)
    console = LogTail(log_dir)  # batch events, warnings and errors of every child, one console line each
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()
        raise KeyboardInterrupt

    def tick() -> None:
        # The signal's KeyboardInterrupt can land inside library code that swallows it; the flag still stops dev.
        if stopping.is_set():
            raise KeyboardInterrupt
        for line in console.poll():
            _say(line)

    children = SupervisedGroup(stack.ProcessGroup(log_dir=log_dir, die_with_parent=True), RestartPolicy(),
                               report=lambda line: _say(line, err=True), tick=tick)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT even when started with it ignored
        signal.signal(signum, on_signal)
    try:
        env: dict[str, str] = {}
        if os.environ.get("BATCHGATE_REDIS_SENTINELS"):
            # Redis behind Sentinels: every child reads BATCHGATE_REDIS_SENTINELS and _MASTER (and the passwords)
            # from the environment it inherits, and asks the Sentinels for the primary.
            settings = Settings()
            where = f"the primary {settings.redis_master!r} of the Sentinels {settings.redis_sentinels}"
            typer.echo(f"Redis: {where}")
            children.wait_until(lambda: stack.redis_answers(settings), 10, where)
        else:
            redis_url = os.environ.get("BATCHGATE_REDIS_URL")
            if not redis_url:
                redis_port = stack.free_port()
                (data_dir / "redis").mkdir(exist_ok=True)
                children.start("redis", stack.redis_command(redis_port, data_dir / "redis", appendonly=True))
                redis_url = f"redis://127.0.0.1:{redis_port}/0"
                typer.echo(f"started a private redis-server at {redis_url}")
            children.wait_until(lambda: stack.redis_answers(redis_url), 10, f"Redis at {redis_url}")
            env["BATCHGATE_REDIS_URL"] = redis_url

        env |= {
            "BATCHGATE_DATA_DIR": str(data_dir),
            "BATCHGATE_DEV_MODE": "1",
            "BATCHGATE_SWEEP_INTERVAL_S": os.environ.get("BATCHGATE_SWEEP_INTERVAL_S", "10"),
            # Logs for people: text lines, no line per HTTP request (deployments keep JSON and access lines).
            "BATCHGATE_LOG_FORMAT": os.environ.get("BATCHGATE_LOG_FORMAT", "text"),
            "BATCHGATE_ACCESS_LOG": os.environ.get("BATCHGATE_ACCESS_LOG", "0"),
        }
        simulator_health = None
        if "BATCHGATE_UPSTREAM_BASE_URL" not in os.environ and "BATCHGATE_PROVIDERS_FILE" not in os.environ:
            if stack.port_taken(simulator_port):
                taken, simulator_port = simulator_port, stack.free_port()
                typer.echo(f"port {taken} is taken; the simulator uses {simulator_port} instead")
            children.start("simulator", stack.simulator_command(simulator_port, latency_ms))
            simulator_health = f"http://127.0.0.1:{simulator_port}/health"
            env["BATCHGATE_UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{simulator_port}/v1"
            typer.echo(f"simulator (the default upstream) at http://127.0.0.1:{simulator_port}/v1, "
                       f"{latency_ms:g} ms latency")
        children.group.env.update(env)
        children.start("worker", stack.worker_command(workers, name="dev"))
        children.start("beat", stack.beat_command(data_dir / "celerybeat-schedule"))
        children.start("api", stack.api_command(port))
        healthz = f"http://127.0.0.1:{port}/healthz"
        children.wait_until(lambda: stack.http_answers(healthz), 30, f"the API at {healthz}")
        if simulator_health:
            children.wait_until(lambda: stack.http_answers(simulator_health), 30, f"the simulator at {simulator_health}")
        typer.echo(f"batchgate API at http://127.0.0.1:{port}/v1, dashboard at http://127.0.0.1:{port}/ui")
        if not os.environ.get("BATCHGATE_API_KEYS"):
            typer.echo(f"development API key: {DEV_API_KEY}")
        typer.echo(f"logs of each process in {log_dir}/")
        typer.echo("Ctrl-C stops everything.")
        children.run()
    except ChildKeepsDying as gave_up:
        typer.echo(f"stopping: {gave_up.name} died {gave_up.decision.deaths} times within "
                   f"{gave_up.decision.window_s:g}s (last: {gave_up.exit_status})", err=True)
        if gave_up.last_lines:
            typer.echo(f"last lines of {gave_up.log_file}:", err=True)
            for line in gave_up.last_lines:
                typer.echo(f"  {line}", err=True)
        raise typer.Exit(1) from None
    except TimeoutError as exc:
        typer.echo(f"stopping: {exc}; see {log_dir}/", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        _say("stopping…")
    finally:
        children.stop_all()


def _say(line: str, err: bool = False) -> None:
    """Print to the console, which may be gone (a closed terminal): dev still stops its children."""
    try:
        typer.echo(line, err=err)
    except OSError:
        pass


for _name, _command in client.COMMANDS.items():
    app.command(_name)(_command)


if __name__ == "__main__":
    app()
