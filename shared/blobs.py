"""Blob storage for file contents and a batch's part files.

Writes are atomic (a temp file renamed into place), so a reader sees a whole blob or none, and a re-run that
rewrites a part replaces it whole. Reads stream; ranged reads serve a chunk's byte range.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator, Protocol

if TYPE_CHECKING:
    from shared.settings import Settings

COPY_BUFFER = 1024 * 1024


class BlobStore(Protocol):
    def writer(self, key: str) -> "contextmanager[BinaryIO]": ...
    def put(self, key: str, data: bytes) -> None: ...
    def open(self, key: str) -> BinaryIO: ...
    def read_range(self, key: str, start: int, end: int) -> bytes: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def link(self, src: str, dest: str) -> None: ...


class BlobNotFound(FileNotFoundError):
    pass


def iter_blob(store: BlobStore, key: str, buffer: int = COPY_BUFFER) -> Iterator[bytes]:
    """A blob's bytes in blocks, from any store."""
    with store.open(key) as fh:
        while block := fh.read(buffer):
            yield block


def concat_blobs(store: BlobStore, keys: Iterable[str], dest: str, on_blob: Callable[[], object] | None = None
                 ) -> int:
    """Join blobs in order into `dest`, streaming through one writer (one multipart upload on S3); returns the
    bytes written. Memory stays at a block (a part on S3) whatever the sizes. `on_blob` is called before each blob
    (a long join keeps its lease alive with it). A missing blob raises BlobNotFound and leaves `dest` unwritten."""
    written = 0
    with store.writer(dest) as out:
        for key in keys:
            if on_blob is not None:
                on_blob()
            for block in iter_blob(store, key):
                out.write(block)
                written += len(block)
    return written


class LocalBlobStore:
    """Blobs as files below one directory (a local disk, or a volume shared by every host)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"blob key escapes the store: {key!r}")
        return path

    @contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def put(self, key: str, data: bytes) -> None:
        with self.writer(key) as fh:
            fh.write(data)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc

    def read_range(self, key: str, start: int, end: int) -> bytes:
        with self.open(key) as fh:
            fh.seek(start)
            return fh.read(end - start)

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def link(self, src: str, dest: str) -> None:
        """Make `dest` a second name for `src`'s bytes (a hard link, else a copy), so deleting `src` spares it."""
        source, target = self._path(src), self._path(dest)
        if not source.exists():
            raise BlobNotFound(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)



def make_blob_store(settings: "Settings") -> BlobStore:
    """The blob store the settings choose: a directory below `data_dir`, or an S3-compatible bucket."""
    if settings.blob_backend == "local":
        return LocalBlobStore(Path(settings.data_dir) / "blobs")
    if settings.blob_backend == "s3":
        from shared.s3blobs import S3BlobStore  # boto3 is imported only by deployments that use it

        secret = settings.s3_secret_access_key
        return S3BlobStore(
            settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
            part_size=settings.s3_part_size_mb * 1024 * 1024,
        )
    raise ValueError(f"BATCHGATE_BLOB_BACKEND must be 'local' or 's3', not {settings.blob_backend!r}")
