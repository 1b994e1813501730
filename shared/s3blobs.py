"""Blob storage on an S3-compatible object store (AWS S3, MinIO, Ceph, moto, ...).

Same contract as `LocalBlobStore`: a writer's object appears only when its block exits cleanly (one PUT, or a
multipart upload completed on exit and aborted on error), reads stream, and memory stays within about one part.
"""

from __future__ import annotations

import io
import os
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from shared.blobs import BlobNotFound

MIN_PART_SIZE = 5 * 1024 * 1024  # S3 rejects smaller parts, except the last
DEFAULT_PART_SIZE = 8 * 1024 * 1024
DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys
# Objects up to CopyObject's own limit are copied in one request; larger ones by a managed multipart copy.
COPY_THRESHOLD = 5 * 1024**3
COPY_PART_SIZE = 256 * 1024 * 1024
READ_BUFFER = 1024 * 1024

_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_MISSING_BUCKET_CODES = {"404", "NoSuchBucket", "NotFound"}


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _check_key(key: str) -> None:
    if key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"blob key escapes the store: {key!r}")


class _BodyReader(io.RawIOBase):
    """A botocore StreamingBody as a raw stream, so io.BufferedReader can give it file semantics.

    StreamingBody iterates in fixed 1 KiB chunks, whereas callers iterate a blob line by line like a file.
    """

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._body.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class _PartWriter:
    """Buffers up to one part; the upload turns multipart only once more than a part has been written."""

    def __init__(self, client: Any, bucket: str, key: str, part_size: int) -> None:
        self._client = client
        self._bucket = bucket
        self._key = key
        self._part_size = part_size
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        written = len(view)
        while view:
            # A full buffer is sent only when more bytes follow, so a blob of exactly one part stays a single PUT.
            if len(self._buffer) >= self._part_size:
                self._send_part()
            room = self._part_size - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
        return written

    def _send_part(self) -> None:
        if self._upload_id is None:
            created = self._client.create_multipart_upload(Bucket=self._bucket, Key=self._key)
            self._upload_id = created["UploadId"]
        number = len(self._parts) + 1
        sent = self._client.upload_part(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=self._buffer
        )
        self._parts.append({"PartNumber": number, "ETag": sent["ETag"]})
        self._buffer = bytearray()

    def commit(self) -> None:
        if self._upload_id is None:
            self._client.put_object(Bucket=self._bucket, Key=self._key, Body=self._buffer)
            return
        self._send_part()
        self._client.complete_multipart_upload(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
        )

    def abort(self) -> None:
        self._buffer = bytearray()
        if self._upload_id is None:
            return
        try:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)
        except ClientError:
            pass  # best effort: the caller's exception matters more, and a lifecycle rule can reap the rest


class S3BlobStore:
    """Blobs as objects under `prefix` in one bucket; keys are '/'-separated paths, as with LocalBlobStore."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        client: Any = None,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes, got {part_size}")
        self.prefix = prefix.strip("/")
        if self.prefix:
            _check_key(self.prefix)
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self.part_size = part_size
        self._credentials = (access_key_id, secret_access_key)
        self._injected = client
        self._per_process: tuple[int, Any] | None = None

    @property
    def client(self) -> Any:
        """This process's S3 client: Celery's prefork workers fork after import, and a client must not cross a fork."""
        if self._injected is not None:
            return self._injected
        current = self._per_process
        pid = os.getpid()
        if current is None or current[0] != pid:
            current = (pid, self._new_client())
            self._per_process = current
        return current[1]

    def _new_client(self) -> Any:
        config = Config(
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=32,
            # Only what S3 requires: the newer default checksums on every upload trip up many S3-compatible stores.
            request_checksum_calculation="when_required",
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
        )
        access_key_id, secret_access_key = self._credentials
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )

    def _key(self, key: str) -> str:
        if not key:
            raise ValueError("blob key is empty")
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        out = _PartWriter(self.client, self.bucket, self._key(key), self.part_size)
        try:
            yield out  # type: ignore[misc]
        except BaseException:
            out.abort()
            raise
        try:
            out.commit()
        except BaseException:
            out.abort()
            raise

    def put(self, key: str, data: bytes) -> None:
        with self.writer(key) as fh:
            fh.write(data)

    def open(self, key: str) -> BinaryIO:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise BlobNotFound(key) from exc
            raise
        return io.BufferedReader(_BodyReader(body), buffer_size=READ_BUFFER)  # type: ignore[return-value]

    def read_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            if not self.exists(key):
                raise BlobNotFound(key)
            return b""
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end - 1}")
        except ClientError as exc:
            code = _error_code(exc)
            if code in _MISSING_CODES:
                raise BlobNotFound(key) from exc
            if code == "InvalidRange":  # the range starts at or past the end, where a file read gives nothing
                return b""
            raise
        with got["Body"] as body:
            return body.read()

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise BlobNotFound(key) from exc
            raise

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except BlobNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        """Delete `prefix` as a directory: the key itself and every key below `prefix/`."""
        _check_key(prefix)
        prefix = prefix.strip("/")
        if prefix:
            self.delete(prefix)
        base = f"{self.prefix}/{prefix}" if self.prefix and prefix else self.prefix or prefix
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{base}/" if base else "", PaginationConfig={"PageSize": DELETE_BATCH}
        )
        for page in pages:
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            for i in range(0, len(keys), DELETE_BATCH):
                self._delete_batch(keys[i : i + DELETE_BATCH])

    def _delete_batch(self, keys: list[dict[str, str]]) -> None:
        if not keys:
            return
        result = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
        errors = result.get("Errors", [])
        if errors:
            first = errors[0]
            raise OSError(f"could not delete {len(errors)} blobs, e.g. {first.get('Key')!r}: {first.get('Message')}")

    def link(self, src: str, dest: str) -> None:
        """Make `dest` a copy of `src` made by the store itself, so deleting `src` spares it."""
        source, target = self._key(src), self._key(dest)
        try:
            self.client.copy(
                {"Bucket": self.bucket, "Key": source},
                self.bucket,
                target,
                Config=TransferConfig(multipart_threshold=COPY_THRESHOLD, multipart_chunksize=COPY_PART_SIZE),
            )
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise BlobNotFound(src) from exc
            raise


def ensure_bucket(store: S3BlobStore) -> None:
    """Create the store's bucket unless it exists (for tests and development setups)."""
    client = store.client
    try:
        client.head_bucket(Bucket=store.bucket)
        return
    except ClientError as exc:
        if _error_code(exc) not in _MISSING_BUCKET_CODES:
            raise
    options: dict[str, Any] = {}
    region = client.meta.region_name
    if region and region != "us-east-1":
        options["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(Bucket=store.bucket, **options)
    except ClientError as exc:
        if _error_code(exc) != "BucketAlreadyOwnedByYou":
            raise
