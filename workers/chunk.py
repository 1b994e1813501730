"""Running one chunk: send its requests, make each finished line durable within moments, commit its counts once.

A chunk never raises for a request's failure (that is an error line). Its finished lines are written in small
segments as they finish (see shared/store_exec.py), so a run that dies re-sends at most the requests it had in
flight or had not yet made durable; the next run skips every durable position. Only the lease holder may write, and
only the first commit of a chunk counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from shared import lines as wire
from shared.blob_keys import batch_input_key, segment_key
from shared.blobs import BlobNotFound
from shared.lifecycle import BatchRecord, Ending
from shared.lines import InputLine, ResultLine
from shared.metrics import MetricsBuffer
from shared.providers import Provider
from shared.store_exec import ChunkCommit, ChunkSpec, Segment, SegmentRejected
from workers.routing import Router
from workers.runtime import Runtime
from workers.upstream import UpstreamCaller
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


class InputLost(Exception):
    """Neither the batch's copy of its input nor the uploaded file is in the blob store any more."""


def read_chunk_input(rt: Runtime, record: BatchRecord, spec: ChunkSpec) -> bytes:
    """The chunk's input bytes: from the batch's copy, else from the uploaded file (same bytes, same offsets)."""
    try:
        return rt.blobs.read_range(batch_input_key(record.id), spec.start, spec.end)
    except BlobNotFound:
        pass
    uploaded = rt.store.get_file(record.spec.input_file_id)
    if uploaded is not None:
        try:
            return rt.blobs.read_range(uploaded.blob_key, spec.start, spec.end)
        except BlobNotFound:
            pass
    raise InputLost(record.id)


@dataclass
class SegmentWriter:
    """Collects a run's finished lines and makes them durable: blobs first, then the fenced record in Redis."""

    rt: Runtime
    batch_id: str
    index: int
    token: str
    segments: list[Segment] = field(default_factory=list)
    pending: list[tuple[int, bytes, bool]] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    finished: set[int] = field(default_factory=set)
    rejected: bool = False
    attempts: int = 0
    codes: Counter = field(default_factory=Counter)  # error codes of the pending error lines
    tenant: str = ""  # the batch's tenant, for the per-tenant line counter
    # The /metrics counters of lines made durable, sent with the run's other metrics (heartbeat, end of the run):
    # lines by tenant and error lines by code, label sets bounded by the configured tenants and the error codes.
    metrics: MetricsBuffer = field(default_factory=MetricsBuffer)

    def add(self, pos: int, line: ResultLine, body: object = None) -> None:
        self.pending.append((pos, wire.encode(line), line.ok))
        self.finished.add(pos)
        if not line.ok:
            self.codes[line.code] += 1
        if line.ok and body is not None:
            self.usage.add(body)

    def flush(self) -> None:
        if not self.pending or self.rejected:
            return
        # Every attempt writes blobs of its own: a commit whose reply was lost may have been recorded, and its blobs
        # must then stay exactly as recorded (the retry's positions are refused, and the next run carries on).
        seq = self.attempts
        self.attempts += 1
        out = [raw for _, raw, ok in self.pending if ok]
        err = [raw for _, raw, ok in self.pending if not ok]
        run = self.token
        if out:
            self.rt.blobs.put(segment_key(self.batch_id, self.index, run, seq, "out"), b"\n".join(out) + b"\n")
        if err:
            self.rt.blobs.put(segment_key(self.batch_id, self.index, run, seq, "err"), b"\n".join(err) + b"\n")
        codes = dict(self.codes)
        segment = Segment(run, seq, len(out), len(err), self.usage.as_list(), [pos for pos, _, _ in self.pending],
                          codes)
        try:
            self.rt.store.commit_segment(self.batch_id, self.index, self.token, segment, self.rt.settings.chunk_lease_s)
        except SegmentRejected:
            self.rejected = True
            raise
        self.segments.append(segment)
        self.metrics.inc("tenant_lines", self.tenant, len(self.pending))
        for code, n in codes.items():
            self.metrics.inc("error_lines", code, n)
        self.pending.clear()
        self.codes.clear()
        self.usage = Usage()

    def flush_metrics(self) -> None:
        try:
            self.metrics.flush(self.rt.store)
        except Exception:  # noqa: BLE001 - counters kept for the next flush; a Redis blip must not undo a commit
            log.warning("%s chunk %d: could not count lines in the metrics", self.batch_id, self.index, exc_info=True)

    def try_flush(self) -> None:
        """Flush, keeping the lines pending when Redis or the blob store is briefly unreachable."""
        try:
            self.flush()
        except SegmentRejected:
            log.warning("%s chunk %d: lease lost; this run stops without committing", self.batch_id, self.index)
        except Exception:  # noqa: BLE001 - a storage blip: the lines stay pending for the next flush
            log.warning("%s chunk %d: could not make lines durable yet", self.batch_id, self.index, exc_info=True)


@dataclass
class RunState:
    stop: str | None = None
    senders: list[asyncio.Task] = field(default_factory=list)


def _flush_metrics(rt: Runtime, router: Router, writer: SegmentWriter) -> None:
    writer.flush_metrics()
    for caller in router.callers():
        if caller.limiter is not None and caller.limiter.waited_s:
            router.metrics.inc("limiter_wait_ms", caller.provider.name, int(caller.limiter.waited_s * 1000))
            caller.limiter.waited_s = 0.0
    router.metrics.flush(rt.store)


async def _heartbeat(rt: Runtime, batch_id: str, writer: SegmentWriter, state: RunState, router: Router) -> None:
    settings = rt.settings
    while True:
        await asyncio.sleep(settings.progress_interval_s)
        try:
            state.stop = rt.store.stop_reason(batch_id)
            if state.stop == "expired":
                for task in state.senders:  # past its window nothing more is sent, nor waited for
                    task.cancel()
            writer.try_flush()
            if not writer.rejected:
                rt.store.renew_lease(batch_id, writer.index, writer.token, settings.chunk_lease_s)
            _flush_metrics(rt, router, writer)
        except Exception:  # noqa: BLE001 - a Redis blip must not stop the requests in flight
            log.warning("heartbeat of %s chunk %d failed", batch_id, writer.index, exc_info=True)


async def send_requests(rt: Runtime, provider: Provider, record: BatchRecord,
                        requests: list[tuple[int, int, InputLine]], writer: SegmentWriter,
                        on_drained: Callable[[], None] = lambda: None) -> None:
    """Send requests through up to `max_concurrency` senders pulling from one queue; every one ends as a line.

    The senders share the process's slots for the provider with every other chunk the process runs, so a chunk
    started while this one's last wave is in flight fills each slot as it frees. `on_drained` is called once every
    request has been taken by a sender. Which provider each request goes to (weights, fallbacks, circuit breakers)
    is the router's (workers/routing.py); each provider has its own slots, limiter and session.
    """
    settings = rt.settings
    batch_id = record.id
    state = RunState(stop=rt.store.stop_reason(batch_id))
    router = Router(
        rt.providers, record.spec.tenant, record.spec.endpoint, record.state.model, provider, record.state.pinned,
        lambda p, metrics: UpstreamCaller(rt.session(p), p, base_s=settings.retry_base_s, max_s=settings.retry_max_s,
                                          limiter=rt.limiter(p), metrics=metrics),
        rt.slots)
    durable_every = settings.durable_every_lines or provider.max_concurrency

    def pull():
        yield from requests
        on_drained()

    queue = pull()

    def stopped() -> bool:
        return state.stop is not None

    async def sender() -> None:
        for pos, line_no, request in queue:
            if writer.rejected:
                return
            if state.stop:
                writer.add(pos, wire.error_line(batch_id, line_no, request.custom_id, *STOP_ERRORS[state.stop]))
            else:
                outcome, via = await router.send(bytes(request.body), stopped)
                if outcome.status_code is None:
                    line = wire.error_line(batch_id, line_no, request.custom_id,
                                           outcome.error_code or "request_failed", outcome.error_message or "", via)
                else:
                    line = wire.response_line(batch_id, line_no, request.custom_id, outcome.status_code,
                                              outcome.request_id or "", outcome.body, via)
                writer.add(pos, line, outcome.body if outcome.ok else None)
            if len(writer.pending) >= durable_every:
                writer.try_flush()

    heartbeat = asyncio.create_task(_heartbeat(rt, batch_id, writer, state, router))
    state.senders = [asyncio.create_task(sender()) for _ in range(min(router.concurrency, len(requests)))]
    if not state.senders:
        on_drained()
    try:
        if state.senders:
            _, pending = await asyncio.wait(state.senders, timeout=settings.chunk_time_limit_s * 0.9)
            for task in pending:
                task.cancel()
            for result in await asyncio.gather(*state.senders, return_exceptions=True):
                if isinstance(result, Exception):
                    log.error("%s chunk %d: a sender failed", batch_id, writer.index, exc_info=result)
    finally:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        _flush_metrics(rt, router, writer)
    # Whatever did not finish: cut off by expiry, or by the chunk's time limit.
    unfinished = STOP_ERRORS["expired"] if state.stop == "expired" else DEADLINE
    for pos, line_no, request in requests:
        if pos not in writer.finished:
            writer.add(pos, wire.error_line(batch_id, line_no, request.custom_id, *unfinished))


def _close_all(writer: SegmentWriter, batch_id: str, requests: list[tuple[int, int, InputLine]],
               code: str, message: str) -> None:
    for pos, line_no, request in requests:
        writer.add(pos, wire.error_line(batch_id, line_no, request.custom_id, code, message))


@dataclass
class ChunkRun:
    """A run of one chunk that holds its lease: the requests still to end as lines, and how they end."""

    record: BatchRecord
    index: int
    token: str
    started: float
    attempt: int
    earlier: list[Segment]
    resumed: int
    requests: list[tuple[int, int, InputLine]]
    writer: SegmentWriter
    close: tuple[str, str] | None  # the error every line gets instead of being sent
    provider: Provider | None


def begin_chunk(rt: Runtime, batch_id: str, index: int, close: str | None = None) -> ChunkRun | None:
    """Take the chunk's lease and read what is left of it. None when there is nothing to run; raises LeaseHeld."""
    store = rt.store
    record = store.batch_record(batch_id)
    if record is None or record.state.terminal or not record.state.planned:
        return None
    spec = store.chunk(batch_id, index)
    if spec is None or index in store.done_chunks(batch_id):
        return None
    token = uuid.uuid4().hex[:16]
    started = time.time()
    if not store.acquire_lease(batch_id, index, token, rt.settings.chunk_lease_s):
        if close:
            return None
        raise LeaseHeld(rt.settings.chunk_lease_s / 2)
    try:
        attempt = 0 if close else store.chunk_attempt(batch_id, index)
        if attempt > 1:
            store.increment("chunk_reruns")
        earlier = store.begin_run(batch_id, index, token)
        finished = store.finished_positions(batch_id, index, spec.n_lines)
        try:
            data = read_chunk_input(rt, record, spec)
        except InputLost:
            log.error("%s: input lost from the blob store; the batch fails", batch_id)
            rt.lifecycle.end(record, "lose", time.time(), Ending(errors=[{
                "code": "input_lost", "line": None, "param": None,
                "message": "The batch's input file is no longer in storage; upload it again and create a new batch."}]))
            store.release_lease(batch_id, index, token)
            return None
        requests = [(pos, line_no, request)
                    for pos, (line_no, request) in enumerate(iter_chunk_lines(data, spec.first_line))
                    if pos not in finished]
        del data
    except BaseException:
        store.release_lease(batch_id, index, token)
        raise
    closing = None
    provider = None
    if close:
        closing = STOP_ERRORS[close]
    elif attempt > rt.settings.chunk_max_attempts:
        log.error("%s chunk %d failed %d times; writing error lines", batch_id, index, attempt - 1)
        closing = GAVE_UP
    else:
        provider = rt.providers.get(record.state.provider or "") or rt.providers.for_model(record.state.model)
    return ChunkRun(record, index, token, started, attempt, earlier, len(finished), requests,
                    SegmentWriter(rt, batch_id, index, token, tenant=record.spec.tenant), closing, provider)


def end_chunk(rt: Runtime, run: ChunkRun, node: str) -> bool:
    """Make the run's last lines durable and commit the chunk. True when this commit completed the batch."""
    batch_id, index, token = run.record.id, run.index, run.token
    try:
        run.writer.flush()
        if run.writer.rejected:
            # A segment was refused (the lease was lost, or a recorded segment's reply was lost and its lines were
            # offered again): the lines still pending are not durable, so committing now would drop them.
            log.warning("%s chunk %d: a segment was refused; the next run carries on from the durable lines",
                        batch_id, index)
            return False
        segments = run.earlier + run.writer.segments
        usage = Usage()
        for segment in segments:
            usage.merge(segment.usage)
        commit = ChunkCommit(
            completed=sum(s.out for s in segments), failed=sum(s.err for s in segments), usage=usage.as_list(),
            segments=segments,
            extra={"run": token, "attempt": run.attempt, "node": node, "started": round(run.started, 3),
                   "finished": round(time.time(), 3), "resumed": run.resumed},
        )
        committed, all_done = rt.store.commit_chunk(batch_id, index, token, commit, run.record.state.n_chunks or 0)
        return committed and all_done
    except SegmentRejected:
        log.warning("%s chunk %d: lease lost; another run carries on from the durable lines", batch_id, index)
        return False
    finally:
        rt.store.release_lease(batch_id, index, token)
        run.writer.flush_metrics()


async def run_chunk_async(rt: Runtime, batch_id: str, index: int, node: str = "",
                          on_drained: Callable[[], None] = lambda: None) -> bool:
    """Run chunk `index` inside the process's event loop, beside other chunks. True when it completed the batch.

    `on_drained` is called as soon as every request of the chunk is in a sender's hands (or there is none). Its
    start (reading its input) and end (its last segment, its commit) run in a thread, so a slow blob store does not
    stall the senders of the other chunks the process runs meanwhile.
    """
    try:
        run = await asyncio.to_thread(begin_chunk, rt, batch_id, index)
    except BaseException:
        on_drained()
        raise
    if run is None:
        on_drained()
        return False
    try:
        if run.close is not None:
            _close_all(run.writer, batch_id, run.requests, *run.close)
            on_drained()
        else:
            await send_requests(rt, run.provider, run.record, run.requests, run.writer, on_drained)
    except BaseException:
        rt.store.release_lease(batch_id, index, run.token)
        raise
    return await asyncio.to_thread(end_chunk, rt, run, node)


def run_chunk(rt: Runtime, batch_id: str, index: int, node: str = "", close: str | None = None) -> bool:
    """Run chunk `index` of a batch on its own. Returns True when this run's commit completed the batch's last chunk.

    With `close` ("cancelled" or "expired") nothing is sent: every line not yet durable gets that reason's error.
    `node` names the worker that ran it; it is kept with the chunk's commit for operators (and the tests).
    """
    if close is None:
        return rt.run(run_chunk_async(rt, batch_id, index, node))
    run = begin_chunk(rt, batch_id, index, close)
    if run is None:
        return False
    _close_all(run.writer, batch_id, run.requests, *run.close)
    return end_chunk(rt, run, node)
