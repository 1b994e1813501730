"""The client commands of `batchgate`: submit, status, list, cancel, download and retry, through the official `openai`
SDK."""

from __future__ import annotations

import functools
import itertools
import json
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import openai
import typer
from openai.types import Batch
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
POLL_INTERVAL_S = 1.0
TERMINAL = ("completed", "failed", "expired", "cancelled")
EXIT_API_ERROR = 1
EXIT_INTERRUPTED = 130
_EXIT_BY_STATUS = {"failed": 4, "expired": 5, "cancelled": 6}

# No markup (messages and paths may hold brackets); long lines (ids, paths) wrap in the terminal, not in the text.
console = Console(highlight=False, markup=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)

BaseUrl = Annotated[str, typer.Option(
    "--base-url", envvar="OPENAI_BASE_URL", help="The batchgate API, ending in /v1.")]
ApiKey = Annotated[Optional[str], typer.Option(
    "--api-key", envvar="OPENAI_API_KEY", show_default=False, help="Your batchgate API key.")]


# ---- pure helpers -------------------------------------------------------------------------------------------------


def exit_code(status: str, failed: int = 0) -> int:
    """How a batch ended, as the exit code of `submit --wait` and `status`; 0 for a batch still running."""
    if status == "completed":
        return 3 if failed else 0
    return _EXIT_BY_STATUS.get(status, 0)


def parse_metadata(items: list[str]) -> dict[str, str] | None:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="--metadata")
        pairs[key] = value
    return pairs or None


class Throughput:
    """Requests per second over the polls of the last `window_s` seconds."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, t: float, done: int) -> None:
        self.samples.append((t, done))
        while len(self.samples) > 2 and t - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def rate(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None


def eta_seconds(remaining: int, rate: float | None) -> float | None:
    if remaining <= 0:
        return 0.0
    if not rate or rate <= 0:
        return None
    return remaining / rate


def format_rate(rate: float | None) -> str:
    return "– req/s" if rate is None else f"{rate:,.1f} req/s"


def format_duration(seconds: float | None) -> str:
    """`0:07`, `12:30`, `2:05:00`; `–:––` when unknown."""
    if seconds is None:
        return "–:––"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def format_timestamp(ts: int | None) -> str:
    return "–" if ts is None else datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def format_age(seconds: float) -> str:
    """`12s ago`, `5m ago`, `3h ago`, `2d ago`."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{max(int(seconds), 0)}s ago"


def counts_of(batch: Batch) -> tuple[int, int, int]:
    c = batch.request_counts
    return (c.completed, c.failed, c.total) if c else (0, 0, 0)


def progress_fields(batch: Batch, rate: float | None) -> dict:
    """What the progress bar shows for one poll: keyword arguments of `Progress.update`."""
    completed, failed, total = counts_of(batch)
    done = completed + failed
    eta = eta_seconds(total - done, rate) if total else None
    return {
        "description": batch.status,
        "completed": done,
        "total": total or None,  # an unknown total (still validating) pulses
        "counts": f"{done}/{total} · {completed} ok · {failed} failed" if total
        else "no requests" if batch.status in TERMINAL else "counting requests",
        "speed": format_rate(rate),
        "eta": format_duration(eta),
    }


def result_paths(directory: Path, stem: str, batch_id: str) -> tuple[Path, Path]:
    return directory / f"{stem}.{batch_id}.output.jsonl", directory / f"{stem}.{batch_id}.errors.jsonl"


def status_rows(batch: Batch) -> list[tuple[str, str]]:
    completed, failed, total = counts_of(batch)
    rows = [
        ("id", batch.id),
        ("status", batch.status),
        ("endpoint", batch.endpoint),
        ("model", batch.model or "–"),
        ("requests", f"{completed} completed, {failed} failed, {total} total"),
        ("input file", batch.input_file_id),
        ("output file", batch.output_file_id or "–"),
        ("error file", batch.error_file_id or "–"),
        ("created", format_timestamp(batch.created_at)),
    ]
    for name in ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"):
        ts = getattr(batch, f"{name}_at")
        if ts is not None:
            rows.append((name.replace("_", " "), format_timestamp(ts)))
    if batch.expires_at is not None and batch.status not in TERMINAL:
        rows.append(("expires", format_timestamp(batch.expires_at)))
    if batch.usage is not None:
        u = batch.usage
        rows.append(("usage", f"{u.input_tokens} input + {u.output_tokens} output = {u.total_tokens} tokens"))
    if batch.metadata:
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in batch.metadata.items())))
    extra = batch.model_extra or {}
    if extra.get("retry_of"):
        rows.append(("retry of", extra["retry_of"]))
    if extra.get("retried_by"):
        rows.append(("retried by", ", ".join(extra["retried_by"])))
    return rows


LIST_COLUMNS = ("id", "status", "done", "failed", "created", "model")


def list_row(batch: Batch, now: float) -> tuple[str, ...]:
    completed, failed, total = counts_of(batch)
    return (batch.id, batch.status, f"{completed + failed}/{total}", str(failed),
            format_age(now - batch.created_at), batch.model or "–")


def batch_table(rows: list[tuple[str, ...]]) -> Table:
    """A table of batches in which, on a narrow terminal, only the model column is shortened."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1), collapse_padding=True)
    for name in LIST_COLUMNS:
        table.add_column(name, no_wrap=name != "model", overflow="ellipsis")
    for row in rows:
        table.add_row(*row)
    return table


# ---- plumbing -----------------------------------------------------------------------------------------------------


def api_error_message(exc: Exception) -> str:
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        return f"{body.get('message') or exc.message} (HTTP {exc.status_code})"
    if isinstance(exc, openai.APIConnectionError):
        return f"could not reach {exc.request.url}: {exc.message}"
    return str(exc)


def reports_errors(command):
    """Turn the SDK's and the file system's errors into one clean line on stderr and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (openai.OpenAIError, OSError) as exc:
            fail(api_error_message(exc))

    return wrapper


def fail(message: str) -> NoReturn:
    err_console.print(Text.assemble(("Error:", "bold red"), " ", message))
    raise typer.Exit(EXIT_API_ERROR)


def make_client(base_url: str, api_key: str | None) -> openai.OpenAI:
    if not api_key:
        raise typer.BadParameter("set OPENAI_API_KEY or pass --api-key (`batchgate dev` prints its key)",
                                 param_hint="--api-key")
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=2)


def save_file(client: openai.OpenAI, file_id: str, path: Path) -> Path:
    """Stream a file's content to `path` (through a `.part` file, so a broken download leaves no truncated copy)."""
    partial = path.with_name(path.name + ".part")
    with client.files.with_streaming_response.content(file_id) as response, partial.open("wb") as out:
        for chunk in response.iter_bytes():
            out.write(chunk)
    partial.replace(path)
    return path


def save_results(client: openai.OpenAI, batch: Batch, directory: Path, stem: str) -> list[Path]:
    output, errors = result_paths(directory, stem, batch.id)
    saved = []
    for file_id, path in ((batch.output_file_id, output), (batch.error_file_id, errors)):
        if file_id:
            saved.append(save_file(client, file_id, path))
    return saved


def wait_for(client: openai.OpenAI, batch: Batch) -> Batch:
    """Poll about once a second until the batch ends, with a live progress bar. Ctrl-C raises KeyboardInterrupt."""
    meter = Throughput()
    with Progress(
        TextColumn("[bold]{task.description:<11}"),
        BarColumn(),
        TextColumn("{task.fields[counts]}"),
        TextColumn("· {task.fields[speed]} · ETA {task.fields[eta]} ·"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = None
        while True:
            meter.add(time.monotonic(), sum(counts_of(batch)[:2]))
            fields = progress_fields(batch, meter.rate())
            if task is None:
                task = progress.add_task(**fields)
            else:
                progress.update(task, **fields)
            if batch.status in TERMINAL:
                return batch
            time.sleep(POLL_INTERVAL_S)
            batch = client.batches.retrieve(batch.id)


def print_summary(batch: Batch, saved: list[Path]) -> None:
    completed, failed, total = counts_of(batch)
    colour = {"completed": "yellow" if failed else "green"}.get(batch.status, "red")
    console.print(Text.assemble(f"Batch {batch.id} ", (batch.status, f"bold {colour}"),
                                f": {completed} completed, {failed} failed, {total} total."))
    print_validation_errors(batch)
    for path in saved:
        console.print(f"  wrote {path}")


def print_validation_errors(batch: Batch) -> None:
    if batch.status != "failed" or not batch.errors or not batch.errors.data:
        return
    table = Table("line", "code", "message", title="Validation errors", title_justify="left")
    for error in batch.errors.data:
        table.add_row("–" if error.line is None else str(error.line), error.code or "", error.message or "")
    console.print(table)


# ---- commands -----------------------------------------------------------------------------------------------------


def wait_or_exit(client: openai.OpenAI, batch: Batch, more: str = "") -> Batch:
    """Follow the batch to its end; Ctrl-C stops following (the batch keeps running) with exit code 130."""
    try:
        return wait_for(client, batch)
    except KeyboardInterrupt:
        err_console.print(f"Stopped waiting; batch {batch.id} keeps running. "
                          f"Check it with `batchgate status {batch.id}`{more}.")
        raise typer.Exit(EXIT_INTERRUPTED) from None


@reports_errors
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="A JSONL file of requests.")],
    endpoint: Annotated[str, typer.Option(help="The endpoint every request goes to, e.g. /v1/chat/completions.")],
    completion_window: Annotated[str, typer.Option(help="How long the batch may take.")] = "24h",
    metadata: Annotated[Optional[list[str]], typer.Option(
        help="key=value to attach to the batch; repeatable.", show_default=False)] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Show progress until the batch ends, then download its results next to FILE.")] = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Upload FILE and start a batch on it; print the batch's id.

    \b
    Exit codes (with --wait; without it, 0 once the batch is created):
      0    completed, no request failed
      3    completed, some requests failed (see the .errors.jsonl file)
      4    failed, e.g. the file did not validate
      5    expired
      6    cancelled
      1    API or connection error
      2    usage error
      130  stopped waiting (Ctrl-C); the batch goes on

    \b
    Example:
      batchgate submit requests.jsonl --endpoint /v1/chat/completions --wait
      batchgate submit requests.jsonl --endpoint /v1/embeddings --metadata team=search
    """
    client = make_client(base_url, api_key)
    extra = parse_metadata(metadata or [])
    with file.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint,  # type: ignore[arg-type]
                                  completion_window=completion_window,  # type: ignore[arg-type]
                                  metadata=extra if extra else openai.omit)
    console.print(batch.id)
    if not wait:
        return
    batch = wait_or_exit(client, batch, f", fetch its results with `batchgate download {batch.id}`")
    saved = save_results(client, batch, file.parent, file.stem)
    print_summary(batch, saved)
    raise typer.Exit(exit_code(batch.status, counts_of(batch)[1]))


@reports_errors
def status(
    batch_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw batch object.")] = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Show a batch. Exits like `submit --wait` for a finished batch, 0 for one still running.

    \b
    Example:
      batchgate status batch_abc123
      batchgate status batch_abc123 --json
    """
    batch = make_client(base_url, api_key).batches.retrieve(batch_id)
    if as_json:
        print(batch.to_json(indent=2))
    else:
        grid = Table.grid(padding=(0, 2))
        for name, value in status_rows(batch):
            grid.add_row(Text(name, style="bold"), value)
        console.print(grid)
        print_validation_errors(batch)
    raise typer.Exit(exit_code(batch.status, counts_of(batch)[1]))


@reports_errors
def list_batches(
    limit: Annotated[int, typer.Option(min=1, help="How many batches to show.")] = 20,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """List your batches, newest first.

    \b
    Example:
      batchgate list --limit 5
    """
    client = make_client(base_url, api_key)
    batches = itertools.islice(client.batches.list(limit=min(limit, 100)), limit)  # the SDK fetches more pages
    rows = [list_row(batch, time.time()) for batch in batches]
    console.print(batch_table(rows) if rows else "No batches.")


@reports_errors
def cancel(
    batch_id: Annotated[str, typer.Argument(metavar="ID")],
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Cancel a batch: requests not yet sent are dropped, results so far are kept.

    \b
    Example:
      batchgate cancel batch_abc123
    """
    batch = make_client(base_url, api_key).batches.cancel(batch_id)
    console.print(f"Batch {batch.id} is {batch.status}.")


@reports_errors
def download(
    batch_id: Annotated[str, typer.Argument(metavar="ID")],
    directory: Annotated[Path, typer.Option("--dir", file_okay=False, help="Where to write the files.")] = Path("."),
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Write a finished batch's output and error files as <input>.<ID>.output.jsonl / .errors.jsonl.

    \b
    Example:
      batchgate download batch_abc123 --dir results/
    """
    client = make_client(base_url, api_key)
    batch = client.batches.retrieve(batch_id)
    if batch.status not in TERMINAL:
        fail(f"batch {batch.id} is {batch.status}, not finished; follow it with `batchgate status {batch.id}`.")
    try:
        stem = Path(client.files.retrieve(batch.input_file_id).filename).stem
    except openai.NotFoundError:
        stem = "batch"
    directory.mkdir(parents=True, exist_ok=True)
    saved = save_results(client, batch, directory, stem)
    print_summary(batch, saved)
    if not saved:
        console.print("It has no output or error file.")


@reports_errors
def retry(
    batch_id: Annotated[str, typer.Argument(metavar="ID")],
    code: Annotated[Optional[list[str]], typer.Option(
        "--code", metavar="CODE", help="Retry only the failed lines with this error code (as in errors_by_code, e.g. http_500, "
                       "rate_limit_exceeded, batch_expired); repeatable. Default: every failed line.",
        show_default=False)] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until the new batch ends.")] = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Start a new batch of a finished batch's failed lines; print the new batch's id.

    Same endpoint, window, metadata and priority; the requests as written. --wait exits like `submit --wait`.

    \b
    Example:
      batchgate retry batch_abc123
      batchgate retry batch_abc123 --code http_500 --code rate_limit_exceeded --wait
    """
    client = make_client(base_url, api_key)
    body = {"codes": code} if code else None
    batch = client.post(f"/batches/{batch_id}/retry", cast_to=Batch, body=body)
    console.print(batch.id)
    if not wait:
        return
    batch = wait_or_exit(client, batch)
    print_summary(batch, [])
    if batch.output_file_id or batch.error_file_id:
        console.print(f"  fetch its results with `batchgate download {batch.id}`")
    raise typer.Exit(exit_code(batch.status, counts_of(batch)[1]))


def follow_results(client: openai.OpenAI, batch_id: str, after: str | None, *, follow: bool, emit,
                   interval_s: float = POLL_INTERVAL_S, sleep=time.sleep) -> str | None:
    """Page through GET /batches/{id}/results from `after`, passing each line to `emit`. Without `follow`, stops when
    no more lines are ready; with it, waits for more until the batch has ended. Returns the cursor to resume from
    (None once every line of an ended batch was read)."""
    while True:
        params = {"limit": 100} | ({"after": after} if after else {})
        page = client.get(f"/batches/{batch_id}/results", cast_to=object, options={"params": params})
        for item in page["data"]:
            emit(item["line"])
        if page["next_cursor"] is None:
            return None
        after = page["next_cursor"]
        if not page["has_more"]:
            if not follow:
                return after
            sleep(interval_s)


@reports_errors
def results(
    batch_id: Annotated[str, typer.Argument(metavar="ID")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing lines as they finish, until the "
                                         "batch ends.")] = False,
    after: Annotated[Optional[str], typer.Option("--after", help="Resume after this cursor (printed on stderr "
                                                 "when the command stops early).")] = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Print a batch's finished lines, output and error lines alike, one JSON line each, as in the result files.

    \b
    Example:
      batchgate results batch_abc123 --follow > results.jsonl
    """
    client = make_client(base_url, api_key)

    def emit(line: dict) -> None:
        print(json.dumps(line, separators=(",", ":"), ensure_ascii=False), flush=True)

    cursor = after
    try:
        cursor = follow_results(client, batch_id, after, follow=follow, emit=emit)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if cursor is not None:
        err_console.print(f"more lines to come; resume with --after {cursor}")


COMMANDS = {"submit": submit, "status": status, "list": list_batches, "cancel": cancel, "download": download,
            "retry": retry, "results": results}
