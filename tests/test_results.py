"""Results while a batch runs (GET /v1/batches/{id}/results) and one request's status
(GET /v1/batches/{id}/requests/{custom_id}), end to end: real Redis, real Celery workers, the real openai SDK."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from stack import OTHER_API_KEY, TERMINAL, Stack, assert_exactly_once, chat_lines, read_lines, submit, wait_terminal

from shared.blob_keys import segment_key
from shared.results import Cursor

pytestmark = pytest.mark.e2e

N = 5000
BATCHGATE = str(Path(sys.executable).parent / "batchgate")
STATUS_ORDER = ["pending", "in_progress", "succeeded"]


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A slow upstream (20 ms, 8 senders a process): a 5,000-line batch runs for a few seconds. Working state is
    cleaned up 3 s after a batch ends, so reads after the end come from the final files alone."""
    stack = Stack(tmp_path_factory.mktemp("results"), sim_latency_ms=20, upstream_max_concurrency=8,
                  max_batch_lines=N, max_batch_input_bytes=8_000_000, cleanup_delay_s=3)
    stack.start(workers=1, concurrency=2)
    yield stack
    stack.stop()


def page(client: openai.OpenAI, batch_id: str, after: str | None = None, limit: int | None = None) -> dict:
    params = {k: v for k, v in (("after", after), ("limit", limit)) if v is not None}
    return client.get(f"/batches/{batch_id}/results", cast_to=object, options={"params": params})


def request_status(client: openai.OpenAI, batch_id: str, custom_id: str) -> dict:
    return client.get(f"/batches/{batch_id}/requests/{custom_id}", cast_to=object)


def read_to_end(client: openai.OpenAI, batch_id: str, after: str | None, limit: int = 100) -> list[dict]:
    """Every item from `after` on, once the batch has ended: pages until next_cursor is null."""
    items: list[dict] = []
    for _ in range(10_000):
        got = page(client, batch_id, after, limit)
        items += got["data"]
        if got["next_cursor"] is None:
            assert got["has_more"] is False
            return items
        assert got["data"] or not got["has_more"]
        after = got["next_cursor"]
    raise AssertionError("the stream did not end")


def final_lines(client: openai.OpenAI, batch) -> dict[str, tuple[str, dict]]:
    out = read_lines(client, batch.output_file_id)
    err = read_lines(client, batch.error_file_id)
    return {line["custom_id"]: ("output", line) for line in out} | {line["custom_id"]: ("error", line) for line in err}


def working_state_gone(stack: Stack, batch_id: str) -> bool:
    return not (stack.root / "data" / "blobs" / "batches" / batch_id).exists() and not stack.store.plan(batch_id)


def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_results_page_through_a_running_batch_and_every_cursor_resumes_without_a_repeat_or_a_gap(slow):
    client = slow.client()
    batch = submit(client, chat_lines(N))
    watched = f"req-{N - 1}"
    statuses: list[dict] = []
    stop = threading.Event()

    def poll_status() -> None:  # one request's status, from before the batch starts to its end
        while not stop.is_set():
            statuses.append(request_status(client, batch.id, watched))
            time.sleep(0.05)

    poller = threading.Thread(target=poll_status)
    poller.start()
    try:
        # Page while it runs, with page sizes that do not divide anything evenly, keeping every cursor handed out.
        walk: list[dict] = []  # every item in the order served
        cursors: list[tuple[str, int, bool]] = []  # (cursor, items served before it, handed out while running)
        after, served_running, pages_running = None, 0, 0
        sizes = [37, 100, 1, 64]
        while True:
            got = page(client, batch.id, after, sizes[len(cursors) % len(sizes)])
            now = client.batches.retrieve(batch.id)
            running = now.status not in TERMINAL
            walk += got["data"]
            if now.request_counts.completed + now.request_counts.failed < N:  # served while lines were unfinished
                served_running = len(walk)
                pages_running += bool(got["data"])
            if got["data"]:
                assert got["first_id"] == got["data"][0]["line"]["custom_id"]
                assert got["last_id"] == got["data"][-1]["line"]["custom_id"]
            else:
                assert got["first_id"] is None and got["last_id"] is None
            if got["next_cursor"] is None:
                break
            cursors.append((got["next_cursor"], len(walk), running))
            after = got["next_cursor"]
            if not got["has_more"]:
                time.sleep(0.05)
        final = wait_terminal(client, batch.id)
        until(lambda: statuses and statuses[-1]["status"] == "succeeded", 10, "the watched request's last status")
    finally:
        stop.set()
        poller.join()
    assert final.status == "completed"
    ids = {f"req-{i}" for i in range(N)}
    assert_exactly_once(client, final, ids)
    lines = final_lines(client, final)
    print(f"\n{served_running} of {N} lines served in {pages_running} pages while the batch ran; "
          f"{len(cursors)} cursors")
    assert 0 < served_running < N, "lines were read while others were still unfinished"
    assert pages_running >= 3

    # Every line once, each equal (as JSON) to its line in the final files, in the file it is in.
    assert len(walk) == N and {item["line"]["custom_id"] for item in walk} == ids
    for item in walk:
        assert (item["file"], item["line"]) == lines[item["line"]["custom_id"]]

    # The stream is the files' prefixes: at every cursor, the output and error lines served so far are the first
    # lines of each file, in order.
    out_order = [line["custom_id"] for line in read_lines(client, final.output_file_id)]
    served_out = [item["line"]["custom_id"] for item in walk if item["file"] == "output"]
    assert served_out == out_order

    # The same page from the same cursor, after the end: what follows a cursor does not depend on when it is read.
    assert page(client, batch.id, cursors[0][0], 50)["data"] == page(client, batch.id, cursors[0][0], 50)["data"]

    # Working state cleaned up: reads come from the final files only. From every cursor handed out (while running
    # and after), reading to the end yields exactly the lines not served before it, each once.
    until(lambda: working_state_gone(slow, batch.id), 30, "the clean-up of the batch's working state")
    distinct = {cursor: (before, running) for cursor, before, running in cursors}  # (an empty page repeats one)
    for cursor, (before, _) in distinct.items():
        rest = [item["line"]["custom_id"] for item in read_to_end(client, batch.id, cursor)]
        assert len(rest) == len(set(rest)) == N - before, cursor
        assert set(rest) == ids - {item["line"]["custom_id"] for item in walk[:before]}, cursor
    assert any(running for _, _, running in cursors)
    # Read whole after the end, from no cursor: every line once.
    whole = read_to_end(client, batch.id, None)
    assert sorted(item["line"]["custom_id"] for item in whole) == sorted(ids)
    assert page(client, batch.id, cursors[-1][0]) == {"object": "list", "data": [], "first_id": None,
                                                      "last_id": None, "next_cursor": None, "has_more": False}

    # The watched request: pending before it ran, then in_progress or not seen so, then succeeded with its line.
    seen = [s["status"] for s in statuses]
    steps = [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]
    assert steps[0] == "pending" and steps[-1] == "succeeded", steps
    assert [STATUS_ORDER.index(s) for s in steps] == sorted(STATUS_ORDER.index(s) for s in steps), steps
    assert all(s["line"] is None for s in statuses if s["status"] != "succeeded")
    assert all(s["line"] == lines[watched][1] for s in statuses if s["status"] == "succeeded")
    # After the clean-up the status is found in the final files.
    for custom_id in ("req-0", watched, f"req-{N // 2}"):
        got = request_status(client, batch.id, custom_id)
        assert got == {"custom_id": custom_id, "status": "succeeded", "line": lines[custom_id][1]}


def test_unknown_ids_other_tenants_and_bad_parameters(slow):
    client = slow.client()
    batch = wait_terminal(client, submit(client, chat_lines(10, prefix="small")).id)
    assert batch.status == "completed"
    # Before the clean-up (index in Redis) and after it (files scanned): an unknown custom_id is a 404.
    for _ in range(2):
        with pytest.raises(openai.NotFoundError) as missing:
            request_status(client, batch.id, "no-such-id")
        assert missing.value.body["code"] == "request_not_found"
        assert request_status(client, batch.id, "small-3")["status"] == "succeeded"
        until(lambda: working_state_gone(slow, batch.id), 30, "the clean-up")
    other = slow.client(api_key=OTHER_API_KEY)
    for call in (lambda: page(other, batch.id), lambda: request_status(other, batch.id, "small-3")):
        with pytest.raises(openai.NotFoundError) as refused:
            call()
        assert refused.value.body["code"] == "batch_not_found"
    with pytest.raises(openai.NotFoundError):
        page(client, "batch_00000000000000000000000000000000")
    for params in ({"limit": 0}, {"limit": 101}, {"after": "not-a-cursor"}, {"after": Cursor().encode()[:-3]}):
        with pytest.raises(openai.BadRequestError) as bad:
            page(client, batch.id, **params)
        assert bad.value.body["param"] in ("limit", "after")
    got = page(client, batch.id)
    assert len(got["data"]) == 10 and got["next_cursor"] is None and got["has_more"] is False
    assert page(client, batch.id, limit=3)["has_more"] is True


def test_a_lost_segment_stops_the_stream_at_it_and_ends_as_result_lost_lines(slow):
    """A segment blob gone before finalize (Redis restored from before a clean-up): while running, no page goes past
    it; at the end its requests are result_lost lines of the error file, served from there, every id once."""
    client = slow.client()
    n = 2000
    batch = submit(client, chat_lines(n, prefix="lost"))
    store = slow.store
    until(lambda: store.result_commit(batch.id, 0) is not None, 60, "chunk 0's commit")
    first, seg = store.result_commit(batch.id, 0).segments[:2]
    assert seg.out, "the simulator answers every request 2xx"
    blobs = slow.root / "data" / "blobs"
    (blobs / segment_key(batch.id, 0, seg.run, seg.seq, "out")).unlink()
    served_before = read_running(client, batch.id)
    final = wait_terminal(client, batch.id)
    assert final.status == "completed"
    assert served_before == first.out + first.err, "the page stopped at the lost segment"
    ids = {f"lost-{i}" for i in range(n)}
    out, err = assert_exactly_once(client, final, ids)
    assert len(err) == seg.out + seg.err and {line["error"]["code"] for line in err} == {"result_lost"}
    walk = read_to_end(client, batch.id, None)
    lines = final_lines(client, final)
    assert len(walk) == n and all((item["file"], item["line"]) == lines[item["line"]["custom_id"]] for item in walk)
    lost_id = err[0]["custom_id"]
    assert request_status(client, batch.id, lost_id) == {"custom_id": lost_id, "status": "errored", "line": err[0]}


def read_running(client: openai.OpenAI, batch_id: str) -> int:
    """Lines served from the start while the batch runs, paging until a page brings nothing new."""
    after, served = None, 0
    while True:
        got = page(client, batch_id, after, 100)
        served += len(got["data"])
        if not got["has_more"]:
            return served
        after = got["next_cursor"]


def test_cursors_round_trip_and_refuse_garbage():
    cursor = Cursor(out=3, err=1, out_bytes=900, err_bytes=120, chunk=2, seg=4, off=5)
    assert Cursor.decode(cursor.encode()) == cursor
    for text in ("", "x", "cjEuMS4y", Cursor().encode() + "A", json.dumps([1, 2])):
        with pytest.raises(Exception) as refused:
            Cursor.decode(text)
        assert getattr(refused.value, "param", None) == "after"


def test_cli_results_follow_prints_every_line_once_as_it_finishes(slow):
    client = slow.client()
    n = 1500
    batch = submit(client, chat_lines(n, prefix="cli"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(OPENAI_BASE_URL=slow.base_url, OPENAI_API_KEY=slow.api_key)
    follow = subprocess.Popen([BATCHGATE, "results", batch.id, "--follow"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    printed: list[tuple[str, int]] = []  # (line, unfinished requests when it was read)
    for text in follow.stdout:
        counts = client.batches.retrieve(batch.id).request_counts
        printed.append((text, n - counts.completed - counts.failed))
    assert follow.wait(timeout=60) == 0, follow.stderr.read()
    final = wait_terminal(client, batch.id)
    lines = final_lines(client, final)
    got = [json.loads(text) for text, _ in printed]
    assert sorted(line["custom_id"] for line in got) == sorted(f"cli-{i}" for i in range(n))
    assert all(line == lines[line["custom_id"]][1] for line in got)
    assert any(unfinished > 0 for _, unfinished in printed), "lines were printed while others were unfinished"
    # Without --follow it prints what is ready and stops; from the cursor it gives, the rest comes once.
    done = subprocess.run([BATCHGATE, "results", batch.id], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == n and done.stderr == ""


def test_the_openapi_schema_shows_both_routes_and_their_models(slow):
    schema = httpx.get(f"{slow.base_url.removesuffix('/v1')}/openapi.json", timeout=10).json()
    ok = schema["paths"]["/v1/batches/{batch_id}/results"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ResultsPage"}
    ok = schema["paths"]["/v1/batches/{batch_id}/requests/{custom_id}"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RequestStatus"}
    models = schema["components"]["schemas"]
    assert set(models["ResultsPage"]["properties"]) == {"object", "data", "first_id", "last_id", "next_cursor",
                                                         "has_more"}
    assert models["RequestStatus"]["properties"]["status"]["enum"] == [
        "pending", "in_progress", "succeeded", "errored", "cancelled", "expired"]
    assert set(models["ResultItem"]["properties"]) == {"file", "line"}


def test_a_forwarded_batch_serves_its_lines_once_it_has_ended(tmp_path):
    from test_native_batch import native_stack

    stack = native_stack(tmp_path / "native", forward_poll_min_s=0.5, forward_poll_max_s=1).start(workers=1,
                                                                                                 concurrency=2)
    try:
        stack.sim_config(batch_lines_per_s=200, batch_fail_after=None, batch_expire_after=None)
        client = stack.client()
        n = 600
        batch = submit(client, chat_lines(n, prefix="fwd"), extra_headers={"x-batchgate-provider": "native"})
        seen_running: list[tuple[str, int, str]] = []  # (batch status, lines served, a request's status)
        while (now := client.batches.retrieve(batch.id)).status not in TERMINAL:
            got = page(client, batch.id, limit=100)
            seen_running.append((now.status, len(got["data"]), request_status(client, batch.id, "fwd-5")["status"]))
            assert got["next_cursor"] is not None and got["has_more"] is False
            time.sleep(0.2)
        assert any(status == "in_progress" for status, _, _ in seen_running)
        assert all(served == 0 for _, served, _ in seen_running), "no line before the end"
        assert {s for _, _, s in seen_running} <= {"pending", "in_progress"}
        final = wait_terminal(client, batch.id)
        assert final.status == "completed"
        lines = final_lines(client, final)
        walk = read_to_end(client, batch.id, None, limit=77)
        assert sorted(item["line"]["custom_id"] for item in walk) == sorted(f"fwd-{i}" for i in range(n))
        assert all((item["file"], item["line"]) == lines[item["line"]["custom_id"]] for item in walk)
        assert request_status(client, batch.id, "fwd-5") == {"custom_id": "fwd-5", "status": "succeeded",
                                                            "line": lines["fwd-5"][1]}
        with pytest.raises(openai.NotFoundError):
            request_status(client, batch.id, "fwd-600")
    finally:
        stack.stop()
