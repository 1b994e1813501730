"""The `batchgate` client commands, run as real processes against a running deployment, and their pure helpers."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import typer
from openai.types import Batch
from rich.console import Console
from stack import OTHER_API_KEY, chat_lines, submit, wait_terminal

from cli import client as cli

BATCHGATE = str(Path(sys.executable).parent / "batchgate")
ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78])")
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")
ENDPOINT = ["--endpoint", "/v1/chat/completions"]


def cli_env(dep, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(OPENAI_BASE_URL=dep.base_url, OPENAI_API_KEY=dep.api_key, COLUMNS="80", TERM="xterm-256color")
    env.update(extra)
    return env


def run(dep, *args: object, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([BATCHGATE, *map(str, args)], env=cli_env(dep, **env), capture_output=True, text=True,
                          timeout=60)


def spawn(dep, *args: object) -> pexpect.spawn:
    env = {k: v for k, v in cli_env(dep).items() if k not in ("COLUMNS", "LINES")}  # Rich reads the pty's size
    return pexpect.spawn(BATCHGATE, [str(a) for a in args], env=env, dimensions=(40, 160),
                         encoding="utf-8", codec_errors="replace", timeout=60)


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def started(make_stack, **settings):
    return make_stack(sim_latency_ms=100, upstream_max_concurrency=8, **settings).start(workers=1, concurrency=2)


# ---- end to end ---------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_submit_wait_shows_live_progress_in_a_terminal(make_stack, tmp_path):
    dep = started(make_stack)
    src = tmp_path / "requests.jsonl"
    src.write_bytes(chat_lines(600))

    child = spawn(dep, "submit", src, *ENDPOINT, "--wait")
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    screen = ANSI.sub("", child.before)
    assert child.exitstatus == 0, screen

    seen = [int(n) for n in re.findall(r"\b(\d+)/600\b", screen)]
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    assert len({n for n in seen if 0 < n < 600}) >= 2, f"the bar did not advance in steps: {sorted(set(seen))}"
    assert seen[-1] == 600
    assert re.search(r"\d+\.\d req/s", screen) and "ETA" in screen

    batch_id = BATCH_ID.search(screen).group(0)
    output = tmp_path / f"requests.{batch_id}.output.jsonl"
    errors = tmp_path / f"requests.{batch_id}.errors.jsonl"
    assert str(output) in screen
    results = lines_of(output)
    assert sorted(r["custom_id"] for r in results) == sorted(f"req-{i}" for i in range(600))
    assert not errors.exists() or errors.read_text().strip() == ""


@pytest.mark.e2e
def test_failed_requests_exit_3_and_leave_an_errors_file(make_stack, tmp_path):
    dep = started(make_stack, upstream_max_retries=0)
    dep.sim_config(error_rate=1.0)
    src = tmp_path / "doomed.jsonl"
    src.write_bytes(chat_lines(5))

    result = run(dep, "submit", src, *ENDPOINT, "--wait", "--metadata", "team=cli", "--metadata", "run=1")
    assert result.returncode == 3, result.stdout + result.stderr
    batch_id = BATCH_ID.search(result.stdout).group(0)
    errors = lines_of(tmp_path / f"doomed.{batch_id}.errors.jsonl")
    assert sorted(e["custom_id"] for e in errors) == [f"req-{i}" for i in range(5)]
    assert "0 completed, 5 failed, 5 total" in result.stdout
    assert dep.client().batches.retrieve(batch_id).metadata == {"team": "cli", "run": "1"}

    status = run(dep, "status", batch_id)
    assert status.returncode == 3 and "completed" in status.stdout and "team=cli" in status.stdout


@pytest.mark.e2e
def test_invalid_file_exits_4_with_its_validation_errors(make_stack, tmp_path):
    dep = started(make_stack)
    src = tmp_path / "broken.jsonl"
    src.write_bytes(chat_lines(1) + b"this is not json\n" + chat_lines(1, prefix="other"))

    result = run(dep, "submit", src, *ENDPOINT, "--wait")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "failed" in result.stdout
    assert re.search(r"\b2\b.*invalid_json_line.*not parseable", result.stdout), result.stdout

    batch_id = BATCH_ID.search(result.stdout).group(0)
    status = run(dep, "status", batch_id, "--json")
    assert status.returncode == 4
    assert json.loads(status.stdout)["errors"]["data"][0]["line"] == 2


@pytest.mark.e2e
def test_interrupt_then_cancel_a_running_batch(make_stack, tmp_path):
    dep = started(make_stack)
    src = tmp_path / "long.jsonl"
    src.write_bytes(chat_lines(3000))

    child = spawn(dep, "submit", src, *ENDPOINT, "--wait")
    child.expect(r"[1-9]\d*/3000")  # running and counting
    child.sendintr()
    child.expect(pexpect.EOF, timeout=20)
    child.close()
    screen = ANSI.sub("", child.before)
    batch_id = BATCH_ID.search(screen).group(0)
    assert child.exitstatus == 130, screen
    assert f"batchgate status {batch_id}" in screen and f"batchgate download {batch_id}" in screen
    assert "Traceback" not in screen

    running = run(dep, "status", batch_id)  # Ctrl-C stopped the waiting, not the batch
    assert running.returncode == 0 and "in_progress" in running.stdout, running.stdout

    early = run(dep, "download", batch_id, "--dir", tmp_path / "out")
    assert early.returncode == 1 and "not finished" in early.stderr

    cancelled = run(dep, "cancel", batch_id)
    assert cancelled.returncode == 0 and re.search(r"cancell(ing|ed)", cancelled.stdout), cancelled
    after = run(dep, "status", batch_id)
    assert re.search(r"status\s+cancell(ing|ed)", after.stdout), after.stdout
    assert after.returncode in (0, 6)

    wait_terminal(dep.client(), batch_id, timeout=30)
    final = run(dep, "status", batch_id)
    assert final.returncode == 6 and re.search(r"status\s+cancelled", final.stdout)


@pytest.mark.e2e
def test_list_and_download_and_a_wrong_key(make_stack, tmp_path):
    dep = started(make_stack, upstream_max_retries=0)
    dep.sim_config(error_rate=0.5)
    client = dep.client()
    first = wait_terminal(client, submit(client, chat_lines(20)).id)
    second = wait_terminal(client, submit(client, chat_lines(20)).id)
    assert second.output_file_id and second.error_file_id  # some of each

    listed = run(dep, "list")
    assert listed.returncode == 0
    assert listed.stdout.index(second.id) < listed.stdout.index(first.id)  # newest first
    only = run(dep, "list", "--limit", "1")
    assert second.id in only.stdout and first.id not in only.stdout
    assert "No batches." in run(dep, "list", OPENAI_API_KEY=OTHER_API_KEY).stdout

    out = tmp_path / "out"
    got = run(dep, "download", second.id, "--dir", out)
    assert got.returncode == 0, got.stderr
    assert (out / f"input.{second.id}.output.jsonl").read_bytes() == client.files.content(second.output_file_id).read()
    assert (out / f"input.{second.id}.errors.jsonl").read_bytes() == client.files.content(second.error_file_id).read()
    assert not list(out.glob("*.part"))

    wrong = run(dep, "status", second.id, "--api-key", "sk-wrong-key-0000")
    assert wrong.returncode == 1
    assert "Incorrect API key provided" in wrong.stderr
    assert "Traceback" not in wrong.stderr + wrong.stdout
    missing = run(dep, "status", "batch_" + "0" * 32)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and "404" in missing.stderr


# ---- pure helpers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "failed", "code"), [
    ("completed", 0, 0), ("completed", 2, 3), ("failed", 0, 4), ("expired", 0, 5), ("cancelled", 1, 6),
    ("in_progress", 3, 0), ("validating", 0, 0), ("cancelling", 0, 0), ("finalizing", 0, 0),
])
def test_exit_codes(status, failed, code):
    assert cli.exit_code(status, failed) == code


def test_rate_and_eta_formatting():
    assert cli.format_duration(None) == "–:––"
    assert cli.format_duration(0) == "0:00"
    assert cli.format_duration(7.4) == "0:07"
    assert cli.format_duration(750) == "12:30"
    assert cli.format_duration(7500) == "2:05:00"
    assert cli.format_rate(None) == "– req/s"
    assert cli.format_rate(1234.56) == "1,234.6 req/s"
    assert cli.eta_seconds(100, 20.0) == 5.0
    assert cli.eta_seconds(100, None) is None and cli.eta_seconds(100, 0.0) is None
    assert cli.eta_seconds(0, None) == 0.0


def test_throughput_over_a_window_of_polls():
    meter = cli.Throughput(window_s=10)
    assert meter.rate() is None
    meter.add(0.0, 0)
    assert meter.rate() is None
    meter.add(1.0, 50)
    assert meter.rate() == 50.0
    for t in range(2, 30):
        meter.add(float(t), 50 + (t - 1) * 10)  # slows down to 10/s
    assert meter.rate() == pytest.approx(10.0)
    assert meter.samples[-1][0] - meter.samples[0][0] <= 11


def test_progress_fields_and_status_rows():
    batch = Batch.model_validate({
        "id": "batch_1", "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": "file-in",
        "completion_window": "24h", "status": "in_progress", "created_at": 1_700_000_000,
        "in_progress_at": 1_700_000_005, "model": "sim-model", "metadata": {"team": "cli"},
        "request_counts": {"completed": 110, "failed": 10, "total": 600},
    })
    fields = cli.progress_fields(batch, 40.0)
    assert fields["completed"] == 120 and fields["total"] == 600
    assert fields["counts"] == "120/600 · 110 ok · 10 failed"
    assert fields["speed"] == "40.0 req/s" and fields["eta"] == "0:12"

    rows = dict(cli.status_rows(batch))
    assert rows["status"] == "in_progress" and rows["model"] == "sim-model"
    assert rows["requests"] == "110 completed, 10 failed, 600 total"
    assert "in progress" in rows and "metadata" in rows and "completed" not in rows

    validating = batch.model_copy(update={"status": "validating", "request_counts": None})
    assert cli.progress_fields(validating, None)["total"] is None


def test_list_table_keeps_whole_ids_on_a_narrow_terminal():
    batch = Batch.model_validate({
        "id": "batch_" + "f" * 32, "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": "file-in",
        "completion_window": "24h", "status": "in_progress", "created_at": 1_700_000_000,
        "model": "a-model-with-a-rather-long-name", "request_counts": {"completed": 5, "failed": 1, "total": 3000},
    })
    row = cli.list_row(batch, now=1_700_000_000 + 125)
    assert row == (batch.id, "in_progress", "6/3000", "1", "2m ago", "a-model-with-a-rather-long-name")
    console = Console(width=80, file=io.StringIO())
    console.print(cli.batch_table([row, row]))
    text = console.file.getvalue()
    assert text.count(batch.id) == 2 and "6/3000" in text and "in_progress" in text
    assert max(map(len, text.splitlines())) <= 80
    assert [cli.format_age(s) for s in (0, 59, 60, 7200, 90000)] == ["0s ago", "59s ago", "1m ago", "2h ago", "1d ago"]


def test_metadata_and_result_paths():
    assert cli.parse_metadata(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}
    assert cli.parse_metadata([]) is None
    with pytest.raises(typer.BadParameter):
        cli.parse_metadata(["novalue"])
    out, err = cli.result_paths(Path("/d"), "requests", "batch_9")
    assert (out.name, err.name) == ("requests.batch_9.output.jsonl", "requests.batch_9.errors.jsonl")


def test_help_of_every_command_has_an_example_and_no_type_for_flags():
    batchgate = str(Path(sys.executable).parent / "batchgate")
    commands = [[]] + [[name] for name in ("dev", "submit", "status", "list", "cancel", "download", "retry",
                                                      "results")]
    env = {**os.environ, "COLUMNS": "100"}
    for command in commands:
        shown = subprocess.run([batchgate, *command, "--help"], capture_output=True, text=True, env=env, check=True)
        text = shown.stdout
        assert "<bool>" not in text, f"batchgate {' '.join(command)} --help:\n{text}"
        assert "Example:" in text and "batchgate " in text.split("Example:")[1], text
        assert "--help" in text
