"""Finalizing a batch: join its chunks' durable segments into the output and error files and end it.

Runs only when every chunk has committed, under a lease that a dead finalize loses within `chunk_lease_s`; it is
idempotent: the files have ids derived from the batch, every write replaces whole blobs, and the terminal move is a
compare-and-set that records usage, the webhook event and the clean-up outbox entry in the same transaction.

A segment missing from the blob store (Redis restored from a point before the batch's clean-up) does not wedge the
batch: its lines become `result_lost` error lines.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from shared import lines as wire
from shared.blobs import BlobNotFound, concat_blobs
from shared.file_service import file_blob_key
from shared.ids import derived_file_id
from shared.lifecycle import CANCELLING, FINALIZING, MOVES, BatchRecord, Ending
from shared.schemas import FileObject
from shared.store import FileRecord
from shared.store_exec import ChunkCommit
from shared.blob_keys import lost_lines_key, part_key, segment_key
from workers.chunk import InputLost, read_chunk_input
from workers.runtime import Runtime
from workers.usage import Usage
from workers.validation import iter_chunk_lines

log = logging.getLogger("batchgate.finalize")

# The verb that ends a batch, by why its chunks stopped.
_ENDINGS = {None: "complete", "cancelled": "end_cancelled", "expired": "expire"}
RESULT_LOST = ("result_lost", "The result of this request was lost in a storage failure (Redis was restored from an "
               "older state after the blobs were cleaned up); retry the request.")


@dataclass
class Assembly:
    """Where the files' lines are, and the counts they add up to."""

    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    codes: Counter = field(default_factory=Counter)  # the error lines by code
    usage: Usage = field(default_factory=Usage)


def _assemble(rt: Runtime, record: BatchRecord, commits: dict[int, ChunkCommit], check: bool) -> Assembly:
    """The blobs of every chunk in order. With `check`, a missing segment's lines become `result_lost` lines."""
    batch_id = record.id
    a = Assembly()
    for index in range(record.state.n_chunks or 0):
        commit = commits[index]
        if commit.segments is None:  # one part per chunk, as versions before segments wrote
            a.out += [part_key(batch_id, index, commit.run or "", "out")] if commit.completed else []
            a.err += [part_key(batch_id, index, commit.run or "", "err")] if commit.failed else []
            a.completed += commit.completed
            a.failed += commit.failed
            a.usage.merge(commit.usage)
            continue
        lost: list[int] = []
        for seg in commit.segments:
            keys = [(kind, segment_key(batch_id, index, seg.run, seg.seq, kind), n)
                    for kind, n in (("out", seg.out), ("err", seg.err)) if n]
            if check and not all(rt.blobs.exists(key) for _, key, _ in keys):
                lost += seg.pos
                continue
            for kind, key, _ in keys:
                (a.out if kind == "out" else a.err).append(key)
            a.completed += seg.out
            a.failed += seg.err
            a.codes.update(seg.codes)
            a.usage.merge(seg.usage)
        if lost:
            a.err.append(_write_lost(rt, record, index, sorted(lost)))
            a.failed += len(lost)
            a.codes[RESULT_LOST[0]] += len(lost)
    return a


def _write_lost(rt: Runtime, record: BatchRecord, index: int, positions: list[int]) -> str:
    spec = rt.store.chunk(record.id, index)
    assert spec is not None
    wanted = set(positions)
    data = read_chunk_input(rt, record, spec)
    lines = [wire.encode(wire.error_line(record.id, line_no, request.custom_id, *RESULT_LOST))
             for pos, (line_no, request) in enumerate(iter_chunk_lines(data, spec.first_line)) if pos in wanted]
    key = lost_lines_key(record.id, index)
    rt.blobs.put(key, b"\n".join(lines) + b"\n")
    log.error("%s chunk %d: %d results lost from storage; written as result_lost", record.id, index, len(lines))
    return key


def register_file(rt: Runtime, record: BatchRecord, kind: str, parts: list[str], now: int, renew) -> str | None:
    """Join `parts` into the batch's output or error file and register it as a File object (none if no parts)."""
    if not parts:
        return None
    file_id = derived_file_id(record.id, kind)
    size = concat_blobs(rt.blobs, parts, file_blob_key(file_id), on_blob=renew)
    ttl = record.spec.output_ttl_s or rt.settings.output_default_ttl_s
    file = FileObject(id=file_id, bytes=size, created_at=now, expires_at=now + ttl,
                      filename=f"{record.id}_{kind}.jsonl", purpose="batch_output")
    rt.store.put_file(FileRecord(file, record.spec.scope, file_blob_key(file_id)))
    return file_id


def finalize(rt: Runtime, batch_id: str) -> str | None:
    """End the batch if every chunk has committed. Returns the terminal status this call set, else None."""
    store = rt.store
    record = store.batch_record(batch_id)
    if record is None or record.state.terminal or not record.state.planned:
        return None
    commits = store.chunk_commits(batch_id)
    if len(commits) < (record.state.n_chunks or 0):
        return None
    token = uuid.uuid4().hex[:16]
    lease_s = rt.settings.chunk_lease_s
    if not store.acquire_finalize_lease(batch_id, token, lease_s):
        return None
    try:
        verb = _ENDINGS[store.stop_reason(batch_id)]
        if verb == "complete":
            outcome = rt.lifecycle.begin_finalize(record, time.time())
            if not outcome.moved and outcome.status != FINALIZING:
                if outcome.status != CANCELLING:
                    return None
                verb = "end_cancelled"

        def renew() -> None:
            store.renew_finalize_lease(batch_id, token, lease_s)

        now = int(time.time())
        def write_files(check: bool) -> tuple[Assembly, str | None, str | None]:
            a = _assemble(rt, record, commits, check=check)
            return (a, register_file(rt, record, "output", a.out, now, renew),
                    register_file(rt, record, "error", a.err, now, renew))

        try:
            try:
                a, output_file_id, error_file_id = write_files(check=False)
            except BlobNotFound:  # only then is every segment checked, a blob request each
                a, output_file_id, error_file_id = write_files(check=True)
        except (BlobNotFound, InputLost):
            rt.lifecycle.end(record, "lose", time.time(), Ending(errors=[{
                "code": "results_lost", "line": None, "param": None,
                "message": "The batch's results and input were lost in a storage failure; create the batch again."}]))
            log.error("batch %s: results and input lost from storage; failed", batch_id)
            return "failed"
        ending = Ending(completed=a.completed, failed=a.failed, usage=a.usage.as_list(),
                        output_file_id=output_file_id, error_file_id=error_file_id, codes=dict(a.codes))
        outcome = rt.lifecycle.end(record, verb, time.time(), ending)
        if not outcome.moved:
            return None
        status = MOVES[verb].to
        log.info("batch %s %s: %d completed, %d failed", batch_id, status, a.completed, a.failed)
        return status
    finally:
        store.release_finalize_lease(batch_id, token)
