"""A batch's finished lines while it runs, and where one request stands: two batchgate extensions.

`GET /v1/batches/{id}/results?after=&limit=` pages through the lines finished so far, output and error lines in one
stream. `GET /v1/batches/{id}/requests/{custom_id}` answers one request's status, with its line once finished.

## The stream and its cursor

The output file is every chunk's output lines in chunk order (within a chunk, in the order of its segments); the
error file likewise (workers/finalize.py). While a batch runs, the stream is those same lines interleaved: chunk by
chunk, segment by segment in the chunk's recorded order (append-only: a re-run appends after the segments of the runs
before it, and the commit lists them in the same order), a segment's output lines then its error lines. A page never
goes past a chunk that has not committed: after serving what that chunk has made durable, it stops, and the next
page carries on inside the same chunk. So at any cursor, what was served is exactly the first `o` lines of the output
file and the first `e` lines of the error file, and the cursor records `o`, `e` and their byte offsets (`ob`, `eb`):
the bytes of a segment's lines are the bytes of the final files, which are the segments joined.

Once the batch has ended, pages come from the final files instead: the output file's lines from line `o` (byte `ob`),
then the error file's from line `e` (byte `eb`). The working segments may be gone by then (clean-up), the files
are not, and the cursor needs nothing else, so no line is served twice or skipped across the end, whenever it is read.
The cursor also holds the running position (chunk, segment, line within the segment) so a page while running starts
where the last ended without walking the chunks before it.

The price of the prefix rule: a line finished in a chunk after one still running is served once the earlier chunk
has committed (a batch's chunks run in order, so that is about one chunk's time). Forwarded batches
(`batch_api = "native"`) have no segments: their lines come once the batch has ended. A segment whose blob is
missing (Redis restored from before a clean-up) stops the page at it; at the end its requests are `result_lost`
lines of the error file, served from there.
"""

from __future__ import annotations

import base64
import binascii
from bisect import bisect_right
from dataclasses import dataclass, replace
from itertools import accumulate, islice
from typing import Iterator

import msgspec
import orjson

from shared import batch_service
from shared.blob_keys import segment_key
from shared.blobs import BlobNotFound, BlobStore, iter_blob
from shared.errors import NotFound, invalid_parameter
from shared.lifecycle import CANCELLING, FINALIZING, IN_PROGRESS, BatchRecord
from shared.store import Store
from shared.store_exec import Segment

PAGE_MAX = 100
PAGE_DEFAULT = 20
READ_WINDOW = 256 * 1024  # a page from a final file reads this much at a time (more for a longer line)
CURSOR_VERSION = "r1"
CANCELLED_CODE, EXPIRED_CODE = "batch_cancelled", "batch_expired"
BOM = b"\xef\xbb\xbf"


class _Head(msgspec.Struct):
    """What a result or input line is looked up by."""

    custom_id: str = ""


class _Outcome(msgspec.Struct):
    response: dict | None = None
    error: dict | None = None


_head = msgspec.json.Decoder(_Head)
_outcome = msgspec.json.Decoder(_Outcome)


def custom_id_of(raw: bytes) -> str | None:
    try:
        return _head.decode(raw).custom_id
    except msgspec.MsgspecError:
        return None


@dataclass(frozen=True)
class Cursor:
    """Served so far: the first `out` lines of the output file (`out_bytes` bytes) and the first `err` of the error
    file; while running, also where in the chunks the next line is (chunk, segment, lines of it served)."""

    out: int = 0
    err: int = 0
    out_bytes: int = 0
    err_bytes: int = 0
    chunk: int = 0
    seg: int = 0
    off: int = 0

    def encode(self) -> str:
        text = ".".join([CURSOR_VERSION, *(str(v) for v in (self.out, self.err, self.out_bytes, self.err_bytes,
                                                               self.chunk, self.seg, self.off))])
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> "Cursor":
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            version, *values = raw.split(".")
            numbers = [int(v) for v in values]
            if version != CURSOR_VERSION or len(numbers) != 7 or min(numbers) < 0:
                raise ValueError(raw)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise invalid_parameter("after", "Invalid 'after': not a cursor this endpoint returned "
                                             "(use the page's next_cursor).") from None
        return cls(*numbers)

    def served(self, kind: str, raw: bytes, **position: int) -> "Cursor":
        if kind == "output":
            return replace(self, out=self.out + 1, out_bytes=self.out_bytes + len(raw) + 1, **position)
        return replace(self, err=self.err + 1, err_bytes=self.err_bytes + len(raw) + 1, **position)


def page_limit(limit: int | None) -> int:
    limit = PAGE_DEFAULT if limit is None else limit
    if not 1 <= limit <= PAGE_MAX:
        raise invalid_parameter("limit", f"Invalid 'limit': must be between 1 and {PAGE_MAX}.")
    return limit


def _blob_lines(blobs: BlobStore, key: str) -> list[bytes]:
    with blobs.open(key) as fh:
        data = fh.read()
    return data.split(b"\n")[:-1] if data else []


def _segment_lines(blobs: BlobStore, batch_id: str, index: int, seg: Segment) -> list[tuple[str, bytes]] | None:
    """A segment's lines, output then error; None when its blobs are not (all) there."""
    try:
        out = _blob_lines(blobs, segment_key(batch_id, index, seg.run, seg.seq, "out")) if seg.out else []
        err = _blob_lines(blobs, segment_key(batch_id, index, seg.run, seg.seq, "err")) if seg.err else []
    except BlobNotFound:
        return None
    if len(out) != seg.out or len(err) != seg.err:
        return None
    return [("output", raw) for raw in out] + [("error", raw) for raw in err]


def _running(store: Store, blobs: BlobStore, batch_id: str, n_chunks: int, cursor: Cursor
             ) -> Iterator[tuple[str, bytes, Cursor]]:
    """Durable lines after `cursor`, chunk by chunk, stopping inside the first chunk that has not committed."""
    index, first_seg, first_off = cursor.chunk, cursor.seg, cursor.off
    while index < n_chunks:
        commit = store.result_commit(batch_id, index)  # read before the segments: a committed list is final
        if commit is not None:
            if commit.segments is None:  # one part per run (versions before segments): served once it has ended
                return
            segments = commit.segments[first_seg:]
        else:
            segments = store.result_segments(batch_id, index, first_seg)
        for n, seg in enumerate(segments):
            seg_no = first_seg + n
            lines = _segment_lines(blobs, batch_id, index, seg)
            if lines is None:
                return
            off = first_off if n == 0 else 0
            for kind, raw in lines[off:]:
                off += 1
                cursor = cursor.served(kind, raw, chunk=index, seg=seg_no, off=off)
                yield kind, raw, cursor
        if commit is None:
            return
        index, first_seg, first_off = index + 1, 0, 0


def _file_lines(blobs: BlobStore, key: str, start: int) -> Iterator[bytes]:
    """The lines of a blob from byte `start`, read a window at a time."""
    window = READ_WINDOW
    pos = start
    rest = b""
    while True:
        data = blobs.read_range(key, pos, pos + window)
        if not data:
            if rest:
                yield rest
            return
        pos += len(data)
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        yield from lines
        if not lines:
            window = min(window * 2, 64 * 1024 * 1024)  # a line longer than the window


def _final(store: Store, blobs: BlobStore, record: BatchRecord, cursor: Cursor) -> Iterator[tuple[str, bytes, Cursor]]:
    """Lines after `cursor` from the final files: the output file's, then the error file's."""
    for kind, file_id, start in (("output", record.state.output_file_id, cursor.out_bytes),
                                 ("error", record.state.error_file_id, cursor.err_bytes)):
        file = store.get_file(file_id) if file_id else None
        if file is None:  # no such file, or deleted by its owner: its lines are no longer served
            continue
        try:
            for raw in _file_lines(blobs, file.blob_key, start):
                if not raw.strip():  # (the files hold none; a stray blank line is passed over, not served)
                    cursor = replace(cursor.served(kind, raw), **{kind[:3]: getattr(cursor, kind[:3])})
                    continue
                cursor = cursor.served(kind, raw)
                yield kind, raw, cursor
        except BlobNotFound:
            continue


def results_page(store: Store, blobs: BlobStore, scope: str, batch_id: str, after: str | None,
                 limit: int | None) -> bytes:
    """The JSON of one page (shared/schemas.py ResultsPage), the lines spliced in as they are in the files."""
    limit = page_limit(limit)
    cursor = Cursor.decode(after) if after else Cursor()
    batch_service.get_batch(store, scope, batch_id)  # the 404 of an unknown id or another scope's
    record = store.batch_record(batch_id)
    if record is None:
        raise NotFound(f"No such Batch object: {batch_id}", param="id", code="batch_not_found")
    state = record.state
    if state.terminal:
        lines = _final(store, blobs, record, cursor)
    elif state.planned and not state.forwarded:
        n_chunks = state.n_chunks or 0
        if cursor.chunk > n_chunks:
            raise invalid_parameter("after", "Invalid 'after': not a cursor of this batch.")
        lines = _running(store, blobs, batch_id, n_chunks, cursor)
    else:
        lines = iter(())
    got = list(islice(lines, limit + 1))
    page, has_more = got[:limit], len(got) > limit
    ended = state.terminal and not has_more
    next_cursor = None if ended else (page[-1][2] if page else cursor).encode()
    items = b",".join(b'{"file":"%s","line":%s}' % (kind.encode(), raw) for kind, raw, _ in page)
    head = {"first_id": custom_id_of(page[0][1]) if page else None,
            "last_id": custom_id_of(page[-1][1]) if page else None,
            "next_cursor": next_cursor, "has_more": has_more}
    return b'{"object":"list","data":[' + items + b"]," + orjson.dumps(head)[1:]


# ---- one request's status ------------------------------------------------------------------------------------------


def line_status(raw: bytes) -> str:
    """A finished line's status: 2xx succeeded; batch_cancelled / batch_expired; anything else errored."""
    outcome = _outcome.decode(raw)
    response = outcome.response
    if response is not None and isinstance(response.get("status_code"), int) and 200 <= response["status_code"] < 300:
        return "succeeded"
    code = (outcome.error or {}).get("code")
    return {CANCELLED_CODE: "cancelled", EXPIRED_CODE: "expired"}.get(code, "errored")


def _chunk_of(store: Store, batch_id: str, place: int) -> tuple[int, int] | None:
    """(chunk index, position in the chunk) of the request at `place` among the input's requests."""
    plan = store.plan(batch_id)
    starts = [0, *accumulate(c.n_lines for c in plan)]
    if not plan or place >= starts[-1]:
        return None
    index = bisect_right(starts, place) - 1
    return index, place - starts[index]


def _durable_line(store: Store, blobs: BlobStore, batch_id: str, index: int, pos: int, custom_id: str
                  ) -> bytes | None:
    """The request's line from the chunk's segment holding its position, while the segments are kept."""
    commit = store.result_commit(batch_id, index)
    segments = commit.segments if commit is not None else store.result_segments(batch_id, index)
    for seg in segments or []:
        if pos in seg.pos:
            for _, raw in _segment_lines(blobs, batch_id, index, seg) or []:
                if custom_id_of(raw) == custom_id:
                    return raw
            return None
    return None


def _find_in(blobs: BlobStore, key: str, custom_id: str) -> bytes | None:
    """The line of `custom_id` in a JSONL blob, read once from the start."""
    rest = b""
    try:
        for block in iter_blob(blobs, key):
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            for raw in lines:
                raw = raw.removeprefix(BOM)
                if raw.strip() and custom_id_of(raw) == custom_id:
                    return raw
        return rest if rest.strip() and custom_id_of(rest) == custom_id else None
    except BlobNotFound:
        return None


def _in_files(store: Store, blobs: BlobStore, record: BatchRecord, custom_id: str) -> bytes | None:
    for file_id in (record.state.output_file_id, record.state.error_file_id):
        file = store.get_file(file_id) if file_id else None
        if file is not None and (raw := _find_in(blobs, file.blob_key, custom_id)) is not None:
            return raw
    return None


def _in_input(store: Store, blobs: BlobStore, record: BatchRecord, custom_id: str) -> bool:
    """Whether the batch's input has a request `custom_id` (before validation has indexed it)."""
    file = store.get_file(record.spec.input_file_id)
    return file is not None and _find_in(blobs, file.blob_key, custom_id) is not None


def _answer(custom_id: str, status: str, raw: bytes | None = None) -> bytes:
    head = orjson.dumps({"custom_id": custom_id, "status": status})[:-1]
    return head + b',"line":' + (raw if raw is not None else b"null") + b"}"


def request_status(store: Store, blobs: BlobStore, scope: str, batch_id: str, custom_id: str) -> bytes:
    """The JSON of `GET /v1/batches/{id}/requests/{custom_id}` (shared/schemas.py RequestStatus)."""
    batch_service.get_batch(store, scope, batch_id)
    record = store.batch_record(batch_id)
    missing = NotFound(f"No request with custom_id {custom_id[:200]!r} in batch {batch_id}.", param="custom_id",
                       code="request_not_found")
    if record is None:
        raise missing
    state = record.state
    place = store.custom_id_place(batch_id, custom_id)
    located = _chunk_of(store, batch_id, place) if place is not None and state.planned else None
    if state.terminal:
        raw = _durable_line(store, blobs, batch_id, *located, custom_id) if located else None
        raw = raw or _in_files(store, blobs, record, custom_id)
        if raw is not None:
            return _answer(custom_id, line_status(raw), raw)
        # No line: the batch ended before running it (failed validation, cancelled or expired before its start).
        indexed = store.has_custom_id_index(batch_id)
        if place is None and (indexed or not _in_input(store, blobs, record, custom_id)):
            raise missing
        return _answer(custom_id, {"expired": "expired", "cancelled": "cancelled"}.get(state.status, "errored"))
    if place is None:
        if state.planned or state.forwarded or store.has_custom_id_index(batch_id):
            raise missing
        if not _in_input(store, blobs, record, custom_id):  # not validated yet: look in the input itself
            raise missing
        return _answer(custom_id, "pending")
    if state.forwarded:
        running = state.status in (IN_PROGRESS, FINALIZING, CANCELLING)
        return _answer(custom_id, "in_progress" if running else "pending")
    if located is None:
        return _answer(custom_id, "pending")
    index, pos = located
    if store.position_durable(batch_id, index, pos):
        raw = _durable_line(store, blobs, batch_id, index, pos, custom_id)
        if raw is not None:
            return _answer(custom_id, line_status(raw), raw)
    if store.chunk_lease_held(batch_id, index):
        return _answer(custom_id, "in_progress")
    return _answer(custom_id, "pending")
