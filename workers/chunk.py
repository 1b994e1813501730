"""Running one chunk: send its requests, write its output and error parts, commit its counts once.

A chunk never raises for a request's failure (that is an error line), and running it again is harmless: its parts
are written under a key unique to the run, and only the first run to commit is the one finalize reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import orjson

from shared import metrics
from shared.ids import batch_request_id
from shared.providers import Provider
from shared.schemas import TERMINAL_STATUSES
from shared.store import ChunkSpec, Store
from workers.runtime import Runtime
from workers.upstream import Outcome, UpstreamCaller
from workers.usage import Usage
from workers.validation import iter_chunk_lines

log = logging.getLogger("batchgate.chunk")

STOP_ERRORS = {
    "cancelled": ("batch_cancelled", "This request was not executed because the batch was cancelled."),
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
}
GAVE_UP = (
    "processing_error",
    "This request could not be processed: the worker running it failed repeatedly.",
)
DEADLINE = ("request_timeout", "This request did not finish within the chunk's time limit.")


class LeaseHeld(Exception):
    """Another live run holds this chunk; try again once its lease would have lapsed."""

    def __init__(self, retry_in: float) -> None:
        super().__init__(f"chunk lease held; retry in {retry_in:.1f}s")
        self.retry_in = retry_in


def batch_input_key(batch_id: str) -> str:
    return f"batches/{batch_id}/input.jsonl"


def part_key(batch_id: str, index: int, run: str, kind: str) -> str:
    return f"batches/{batch_id}/parts/{index:05d}-{run}.{kind}.jsonl"


@dataclass
class ChunkLines:
    """Result lines in input order; `ok` marks which belong to the output file."""

    lines: list[bytes | None]
    ok: list[bool]
    usage: Usage = field(default_factory=Usage)
    completed: int = 0
    failed: int = 0

    @classmethod
    def empty(cls, n: int) -> "ChunkLines":
        return cls([None] * n, [False] * n)

    def put(self, pos: int, line: bytes, ok: bool) -> None:
        self.lines[pos] = line
        self.ok[pos] = ok
        if ok:
            self.completed += 1
        else:
            self.failed += 1


def error_line(batch_id: str, line_no: int, custom_id: str, code: str, message: str) -> bytes:
    return orjson.dumps(
        {
            "id": batch_request_id(batch_id, line_no),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    )


def outcome_line(batch_id: str, line_no: int, custom_id: str, outcome: Outcome) -> bytes:
    if outcome.status_code is None:
        return error_line(batch_id, line_no, custom_id, outcome.error_code or "request_failed", outcome.error_message or "")
    return orjson.dumps(
        {
            "id": batch_request_id(batch_id, line_no),
            "custom_id": custom_id,
            "response": {"status_code": outcome.status_code, "request_id": outcome.request_id, "body": outcome.body},
            "error": None,
        }
    )


@dataclass
class RunState:
    stop: str | None = None


def _flush_metrics(store: Store, caller: UpstreamCaller) -> None:
    if caller.limiter is not None and caller.limiter.waited_s:
        caller.metrics.inc("limiter_wait_ms", caller.provider.name, int(caller.limiter.waited_s * 1000))
        caller.limiter.waited_s = 0.0
    caller.metrics.flush(store.r)


async def _heartbeat(store: Store, batch_id: str, spec: ChunkSpec, token: str, lines: ChunkLines, state: RunState,
                     caller: UpstreamCaller, interval: float, lease_s: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            state.stop = store.stop_reason(batch_id)
            store.set_progress(batch_id, spec.index, lines.completed, lines.failed)
            store.renew_lease(batch_id, spec.index, token, lease_s)
            _flush_metrics(store, caller)
        except Exception:  # noqa: BLE001 - a Redis blip must not stop the requests in flight
            log.warning("heartbeat of %s chunk %d failed", batch_id, spec.index, exc_info=True)


async def send_requests(rt: Runtime, provider: Provider, batch_id: str, endpoint: str, spec: ChunkSpec,
                        requests: list[tuple[int, dict]], token: str) -> ChunkLines:
    """Send a chunk's requests through `max_concurrency` senders pulling from one queue of positions."""
    settings = rt.settings
    lines = ChunkLines.empty(len(requests))
    state = RunState(stop=rt.store.stop_reason(batch_id))
    caller = UpstreamCaller(rt.session(provider), provider, base_s=settings.retry_base_s, max_s=settings.retry_max_s,
                            limiter=rt.limiter(provider))
    url = provider.url_for(endpoint)
    positions = iter(range(len(requests)))

    def stopped() -> bool:
        return state.stop is not None

    async def sender() -> None:
        for pos in positions:
            line_no, obj = requests[pos]
            if state.stop:
                code, message = STOP_ERRORS[state.stop]
                lines.put(pos, error_line(batch_id, line_no, obj["custom_id"], code, message), False)
                continue
            outcome = await caller.call(url, obj["body"], should_stop=stopped)
            if outcome.ok:
                lines.usage.add(outcome.body)
            lines.put(pos, outcome_line(batch_id, line_no, obj["custom_id"], outcome), outcome.ok)

    heartbeat = asyncio.create_task(
        _heartbeat(rt.store, batch_id, spec, token, lines, state, caller, settings.progress_interval_s,
                   settings.chunk_lease_s)
    )
    senders = [asyncio.create_task(sender()) for _ in range(min(provider.max_concurrency, len(requests)))]
    try:
        _, pending = await asyncio.wait(senders, timeout=settings.chunk_time_limit_s * 0.9)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        _flush_metrics(rt.store, caller)
    for pos, line in enumerate(lines.lines):
        if line is None:
            line_no, obj = requests[pos]
            lines.put(pos, error_line(batch_id, line_no, obj["custom_id"], *DEADLINE), False)
    return lines


def _write_part(rt: Runtime, key: str, parts: list[bytes]) -> None:
    if parts:
        rt.blobs.put(key, b"\n".join(parts) + b"\n")


def run_chunk(rt: Runtime, batch_id: str, index: int, node: str = "") -> bool:
    """Run chunk `index` of a batch. Returns True when this run's commit completed the batch's last chunk.

    `node` names the worker that ran it; it is kept with the chunk's counts for operators (and the tests).
    """
    store = rt.store
    fields = store.batch_fields(batch_id)
    if not fields or fields.get("status") in TERMINAL_STATUSES:
        return False
    spec = store.chunk(batch_id, index)
    if spec is None or index in store.done_chunks(batch_id):
        return False
    token = uuid.uuid4().hex[:16]
    started = time.time()
    if not store.acquire_lease(batch_id, index, token, rt.settings.chunk_lease_s):
        raise LeaseHeld(rt.settings.chunk_lease_s / 2)
    try:
        attempt = store.chunk_attempt(batch_id, index)
        if attempt > 1:
            metrics.increment(store.r, "chunk_reruns")
        data = rt.blobs.read_range(batch_input_key(batch_id), spec.start, spec.end)
        requests = list(iter_chunk_lines(data, spec.first_line))
        if attempt > rt.settings.chunk_max_attempts:
            log.error("%s chunk %d failed %d times; writing error lines", batch_id, index, attempt - 1)
            lines = ChunkLines.empty(len(requests))
            for pos, (line_no, obj) in enumerate(requests):
                lines.put(pos, error_line(batch_id, line_no, obj["custom_id"], *GAVE_UP), False)
        else:
            provider = rt.providers.get(fields.get("provider", "")) or rt.providers.for_model(fields.get("model"))
            lines = rt.run(send_requests(rt, provider, batch_id, fields["endpoint"], spec, requests, token))
        out = [line for line, ok in zip(lines.lines, lines.ok) if ok]
        err = [line for line, ok in zip(lines.lines, lines.ok) if not ok]
        _write_part(rt, part_key(batch_id, index, token, "out"), out)  # type: ignore[arg-type]
        _write_part(rt, part_key(batch_id, index, token, "err"), err)  # type: ignore[arg-type]
        counts = {"completed": len(out), "failed": len(err), "usage": lines.usage.as_list(), "run": token,
                  "started": round(started, 3), "finished": round(time.time(), 3), "attempt": attempt, "node": node}
        committed, all_done = store.commit_chunk(batch_id, index, counts, int(fields["n_chunks"]))
        return committed and all_done
    finally:
        store.release_lease(batch_id, index, token)
