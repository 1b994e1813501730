"""Files: upload, look-up, listing, deletion and content, each scoped to its owner."""

from __future__ import annotations

import hashlib

import logging
import time
import unicodedata
from typing import BinaryIO, Iterator

from shared.blobs import COPY_BUFFER, BlobStore
from shared.errors import (
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    invalid_parameter,
    missing_parameter,
)
from shared.ids import new_file_id
from shared.schemas import UPLOAD_PURPOSES, FileDeleted, FileObject, ListPage
from shared.settings import Settings
from shared.store import FileRecord, Store

log = logging.getLogger(__name__)

MAX_FILENAME_CHARS = 255
FILES_LIST_MAX = 10_000


def file_blob_key(file_id: str) -> str:
    return f"files/{file_id}"


def clean_filename(raw: str | None) -> str:
    """The name to show for an upload: its last path component, without control characters."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()
    if name in ("", ".", ".."):
        raise InvalidRequest("The uploaded file must have a file name.", param="file", code="invalid_file_name")
    return name[:MAX_FILENAME_CHARS]


def parse_expires_after(anchor: str | None, seconds: str | int | None) -> int | None:
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise invalid_parameter("expires_after[anchor]", "Invalid 'expires_after[anchor]': must be 'created_at'.")
    try:
        value = int(seconds)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise invalid_parameter(
            "expires_after[seconds]", "Invalid 'expires_after[seconds]': must be an integer."
        ) from None
    if not 3600 <= value <= 2_592_000:
        raise invalid_parameter(
            "expires_after[seconds]",
            f"Invalid 'expires_after[seconds]': {value} is outside the allowed range 3600 to 2592000.",
        )
    return value


def content_digest(source: BinaryIO | None) -> str:
    """The SHA-256 of an upload's bytes, read in pieces; the stream is rewound for its reader."""
    if source is None:
        return ""
    digest = hashlib.sha256()
    while piece := source.read(1024 * 1024):
        digest.update(piece)
    source.seek(0)
    return digest.hexdigest()


def create_file(
    store: Store,
    blobs: BlobStore,
    settings: Settings,
    scope: str,
    *,
    source: BinaryIO | None,
    filename: str | None,
    purpose: str | None,
    expires_anchor: str | None = None,
    expires_seconds: str | int | None = None,
) -> FileObject:
    if source is None:
        raise missing_parameter("file")
    if not purpose:
        raise missing_parameter("purpose")
    if purpose not in UPLOAD_PURPOSES:
        raise invalid_parameter(
            "purpose", f"Invalid 'purpose': '{purpose}'. Expected one of: {', '.join(UPLOAD_PURPOSES)}."
        )
    name = clean_filename(filename)
    if purpose == "batch" and not name.lower().endswith(".jsonl"):
        raise InvalidRequest("Invalid file format for Batch API. Must be .jsonl", param="file")
    ttl = parse_expires_after(expires_anchor, expires_seconds)
    if ttl is None and purpose == "batch":
        ttl = settings.batch_file_default_ttl_s

    file_id = new_file_id()
    key = file_blob_key(file_id)
    size = 0
    with blobs.writer(key) as out:
        while block := source.read(COPY_BUFFER):
            size += len(block)
            if size > settings.max_upload_bytes:
                raise PayloadTooLarge(
                    f"File is larger than the {settings.max_upload_bytes} byte limit.", param="file", code="file_too_large"
                )
            out.write(block)
    now = int(time.time())
    file = FileObject(
        id=file_id, bytes=size, created_at=now, expires_at=now + ttl if ttl else None, filename=name, purpose=purpose
    )
    try:
        store.put_file(FileRecord(file, scope, key))
    except Exception:
        discard_blob(blobs, key)  # no record, no blob: a failed upload leaves nothing behind
        raise
    return file


def discard_blob(blobs: BlobStore, key: str) -> None:
    """Delete a blob nothing refers to; a failure is logged, never raised over the error that caused it."""
    try:
        blobs.delete(key)
    except Exception:  # noqa: BLE001
        log.exception("could not delete the orphan blob %s", key)


def get_file_record(store: Store, scope: str, file_id: str) -> FileRecord:
    record = store.get_file(file_id)
    if record is None or record.scope != scope:
        raise NotFound(f"No such File object: {file_id}", param="id", code="file_not_found")
    return record


def list_files(
    store: Store, scope: str, *, purpose: str | None, limit: int | None, order: str | None, after: str | None
) -> ListPage[FileObject]:
    limit = FILES_LIST_MAX if limit is None else limit
    if not 1 <= limit <= FILES_LIST_MAX:
        raise invalid_parameter("limit", f"Invalid 'limit': must be between 1 and {FILES_LIST_MAX}.")
    order = order or "desc"
    if order not in ("asc", "desc"):
        raise invalid_parameter("order", "Invalid 'order': must be 'asc' or 'desc'.")
    page = store.list_file_ids(scope, purpose, limit, after, descending=order == "desc")
    files = store.get_files(page.ids)
    return ListPage[FileObject](
        data=files,
        first_id=files[0].id if files else None,
        last_id=files[-1].id if files else None,
        has_more=page.has_more,
    )


def delete_file(store: Store, blobs: BlobStore, scope: str, file_id: str) -> FileDeleted:
    record = get_file_record(store, scope, file_id)
    store.delete_file(record)
    blobs.delete(record.blob_key)
    return FileDeleted(id=file_id)


def file_content(store: Store, blobs: BlobStore, scope: str, file_id: str) -> tuple[FileRecord, Iterator[bytes]]:
    record = get_file_record(store, scope, file_id)
    try:
        handle = blobs.open(record.blob_key)
    except FileNotFoundError:
        raise NotFound(f"No such File object: {file_id}", param="id", code="file_not_found") from None

    def stream() -> Iterator[bytes]:
        with handle:
            while block := handle.read(COPY_BUFFER):
                yield block

    return record, stream()


def expire_files(store: Store, blobs: BlobStore, now: int) -> int:
    """Delete files past their `expires_at`; returns how many went."""
    removed = 0
    for file_id in store.expired_file_ids(now):
        record = store.get_file(file_id)
        if record is None:
            store.forget_file_expiry(file_id)
            continue
        store.delete_file(record)
        blobs.delete(record.blob_key)
        removed += 1
    return removed
