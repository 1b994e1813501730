"""Retrying a finished batch's failed lines: `POST /v1/batches/{id}/retry`, a batchgate extension.

The lines of the old batch's error file are selected (all of them, or those whose code is in `codes`, the codes of
`request_counts.errors_by_code`); their requests are copied byte for byte, in input order, from the old batch's input
file into a new File object (purpose `batch`, named `<old id>-retry.jsonl`), and a new batch is made from it through
the ordinary create (validation, scheduler) with the old one's endpoint, window, metadata, priority, output expiry,
scope and provider. The new batch carries `retry_of`, the old one `retried_by`.
"""

from __future__ import annotations

import time
from typing import Any, BinaryIO, Iterable, Iterator

import msgspec

from shared import batch_service
from shared.blobs import BlobStore
from shared.errors import Conflict, InvalidRequest, NotFound, invalid_parameter
from shared.file_service import discard_blob, file_blob_key
from shared.ids import new_file_id
from shared.lifecycle import TERMINAL, WIRE_STATUS, BatchRecord
from shared.lines import LineError, LineResponse, ResultLine, decode_input
from shared.providers import ProviderRegistry
from shared.schemas import Batch, FileObject
from shared.scope import Principal
from shared.settings import Settings
from shared.store import FileRecord, Store

NOTHING_TO_RETRY = "nothing_to_retry"
INPUT_FILE_DELETED = "input_file_deleted"
ERROR_FILE_DELETED = "error_file_deleted"
NOT_FINISHED = "batch_not_finished"
MAX_CODES = 100
BOM = b"\xef\xbb\xbf"
_SKIP_PIECE = 1024 * 1024


class _Status(msgspec.Struct):
    status_code: int


class _ErrorHead(msgspec.Struct):
    """What selection reads of an error-file line: its custom_id and what its code is made of, not the body."""

    custom_id: str
    response: _Status | None = None
    error: LineError | None = None

    def code(self) -> str | None:
        # The rule is ResultLine.code's (shared/lines.py), so a filter matches errors_by_code exactly.
        response = None if self.response is None else LineResponse(self.response.status_code, "", None)
        return ResultLine("", self.custom_id, response, self.error).code


_head_decoder = msgspec.json.Decoder(_ErrorHead)


def parse_codes(body: Any) -> frozenset[str] | None:
    """The `codes` filter of the request body; None when every failed line is to be retried."""
    if body is None or body == {}:
        return None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    unknown = sorted(set(body) - {"codes"})
    if unknown:
        raise invalid_parameter(unknown[0][:64], f"Unknown parameter: '{unknown[0][:64]}'. The body may hold only "
                                                 "'codes'.")
    codes = body.get("codes")
    if codes is None:
        return None
    if (not isinstance(codes, list) or not codes or len(codes) > MAX_CODES
            or not all(isinstance(c, str) and 0 < len(c) <= 200 for c in codes)):
        raise invalid_parameter("codes", f"Invalid 'codes': expected a list of 1 to {MAX_CODES} error codes as in "
                                         "request_counts.errors_by_code, e.g. [\"rate_limit_exceeded\", \"http_500\"].")
    return frozenset(codes)


def select_failed(error_lines: Iterable[bytes], codes: frozenset[str] | None) -> set[str]:
    """The custom_ids of the error-file lines to retry: every one, or those whose code is in `codes`."""
    selected: set[str] = set()
    for raw in error_lines:
        if not raw.strip():
            continue
        try:
            head = _head_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # not a result line: nothing to select
        if codes is None or head.code() in codes:
            selected.add(head.custom_id)
    return selected


def input_lines(source: BinaryIO, max_line_bytes: int) -> Iterator[bytes]:
    """The input file's lines as written (a BOM before the first dropped); one past the limit is skipped unread."""
    first = True
    while raw := source.readline(max_line_bytes + 1):
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = source.readline(_SKIP_PIECE)
            first = False
            continue
        if first and raw.startswith(BOM):
            raw = raw[len(BOM):]
        first = False
        yield raw


def pick_lines(lines: Iterable[bytes], wanted: set[str]) -> Iterator[bytes]:
    """The input lines whose custom_id is wanted, byte-identical and in input order (each ending in a newline)."""
    left = set(wanted)
    for raw in lines:
        if not left:
            return
        if not raw.strip():
            continue
        try:
            custom_id = decode_input(raw).custom_id
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if custom_id in left:
            left.discard(custom_id)
            yield raw if raw.endswith(b"\n") else raw + b"\n"


def _read_lines(blobs: BlobStore, key: str) -> Iterator[bytes]:
    with blobs.open(key) as fh:
        yield from fh


def _finished_record(store: Store, scope: str, batch_id: str) -> BatchRecord:
    record = store.batch_record(batch_id)
    if record is None or record.spec.scope != scope:
        raise NotFound(f"No such Batch object: {batch_id}", param="id", code="batch_not_found")
    if record.state.status not in TERMINAL:
        status = WIRE_STATUS.get(record.state.status, record.state.status)
        raise Conflict(f"Batch {batch_id} is still '{status}'; only a finished batch (completed, failed, expired or "
                       "cancelled) can be retried.", code=NOT_FINISHED)
    return record


def _nothing(batch_id: str, record: BatchRecord, codes: frozenset[str] | None) -> InvalidRequest:
    have = record.state.errors_by_code or {}
    if codes is None:
        message = f"Batch {batch_id} has no failed lines to retry."
    else:
        listed = ", ".join(sorted(have)) or "none"
        message = (f"No failed line of batch {batch_id} has one of the codes {sorted(codes)}; "
                   f"its error codes are: {listed}.")
    return InvalidRequest(message, param="codes" if codes is not None else None, code=NOTHING_TO_RETRY)


def _input_deleted(batch_id: str, file_id: str) -> Conflict:
    return Conflict(f"The input file {file_id} of batch {batch_id} was deleted, so its requests cannot be sent "
                    "again.", param="input_file_id", code=INPUT_FILE_DELETED)


def retry_batch(store: Store, blobs: BlobStore, settings: Settings, providers: ProviderRegistry,
                principal: Principal, batch_id: str, body: Any) -> Batch:
    """A new batch of the finished batch's failed lines (see the module's doc); the caller enqueues it."""
    record = _finished_record(store, principal.scope, batch_id)
    codes = parse_codes(body)
    spec, state = record.spec, record.state
    source = store.get_file(spec.input_file_id)
    if source is None:
        raise _input_deleted(batch_id, spec.input_file_id)
    if state.error_file_id is None:
        raise _nothing(batch_id, record, codes)
    errors = store.get_file(state.error_file_id)
    if errors is None:
        raise Conflict(f"The error file {state.error_file_id} of batch {batch_id} was deleted, so its failed lines "
                       "are no longer known.", param="error_file_id", code=ERROR_FILE_DELETED)
    try:
        wanted = select_failed(_read_lines(blobs, errors.blob_key), codes)
    except FileNotFoundError:
        raise Conflict(f"The error file {state.error_file_id} of batch {batch_id} is gone from storage.",
                       param="error_file_id", code=ERROR_FILE_DELETED) from None
    if not wanted:
        raise _nothing(batch_id, record, codes)

    file_id = new_file_id()
    key = file_blob_key(file_id)
    size = count = 0
    try:
        with blobs.open(source.blob_key) as fh, blobs.writer(key) as out:
            for line in pick_lines(input_lines(fh, settings.max_line_bytes), wanted):
                out.write(line)
                size += len(line)
                count += 1
    except FileNotFoundError:
        discard_blob(blobs, key)
        raise _input_deleted(batch_id, spec.input_file_id) from None
    if count == 0:  # the failed lines' requests are not in the input (it was replaced?): nothing to send
        discard_blob(blobs, key)
        raise _nothing(batch_id, record, codes)
    now = int(time.time())
    ttl = settings.batch_file_default_ttl_s
    new_file = FileObject(id=file_id, bytes=size, created_at=now, expires_at=now + ttl if ttl else None,
                          filename=f"{batch_id}-retry.jsonl", purpose="batch")
    file_record = FileRecord(new_file, spec.scope, key)
    try:
        store.put_file(file_record)
    except Exception:
        discard_blob(blobs, key)
        raise

    create: dict[str, Any] = {"input_file_id": file_id, "endpoint": spec.endpoint,
                              "completion_window": spec.completion_window, "metadata": spec.metadata,
                              "priority": spec.priority}
    if spec.output_ttl_s is not None:
        create["output_expires_after"] = {"anchor": "created_at", "seconds": spec.output_ttl_s}
    # The same provider as the old batch (one no longer configured is chosen again by the model).
    provider = state.provider if state.provider in providers.providers else None
    try:
        provider = batch_service.check_provider(providers, principal.tenant, provider)
        native = provider is not None and providers.providers[provider].batch_api == "native"
        batch = batch_service.create_batch(store, settings, principal, create, provider=provider, native=native,
                                           retry_of=batch_id)
    except Exception:
        store.delete_file(file_record)  # no batch, no file: a refused retry leaves nothing behind
        discard_blob(blobs, key)
        raise
    store.add_retried_by(batch_id, batch.id)
    return batch
