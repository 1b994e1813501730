"""S3BlobStore against a real moto server on loopback (no network, no AWS credentials)."""

from __future__ import annotations

import multiprocessing
import os
import tracemalloc
import uuid

import pytest

from shared import s3blobs
from shared.blobs import BlobNotFound, LocalBlobStore, concat_blobs, iter_blob
from shared.s3blobs import MIN_PART_SIZE, S3BlobStore, ensure_bucket

MiB = 1024 * 1024
BUCKET = "batchgate-test"


@pytest.fixture(scope="module")
def moto_url(s3_endpoint):
    return s3_endpoint


def _store(url: str, prefix: str = "", **kwargs) -> S3BlobStore:
    return S3BlobStore(
        BUCKET,
        prefix=prefix,
        endpoint_url=url,
        region="us-east-1",
        access_key_id="test",
        secret_access_key="test",
        **kwargs,
    )


@pytest.fixture
def store(moto_url):
    made = _store(moto_url, prefix=f"t-{uuid.uuid4().hex}", part_size=MIN_PART_SIZE)
    ensure_bucket(made)
    return made


def _data(n: int, seed: int = 0) -> bytes:
    block = bytes((i * 31 + seed) % 251 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


def _pending_uploads(store: S3BlobStore) -> list:
    return store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix).get("Uploads", [])


def test_put_open_round_trip(store):
    store.put("files/a.jsonl", b'{"a": 1}\n{"b": 2}\nlast')
    with store.open("files/a.jsonl") as fh:
        assert fh.read(3) == b'{"a'
        assert fh.read() == b'": 1}\n{"b": 2}\nlast'
    assert b"".join(iter_blob(store, "files/a.jsonl", buffer=4)) == b'{"a": 1}\n{"b": 2}\nlast'


def test_open_iterates_lines_like_a_file(store, tmp_path):
    body = b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * (i % 700)) for i in range(3000)) + b"tail"
    store.put("in.jsonl", body)
    local = LocalBlobStore(tmp_path)
    local.put("in.jsonl", body)
    with store.open("in.jsonl") as remote, local.open("in.jsonl") as disk:
        assert list(remote) == list(disk)
    # Not only inside `with`: botocore's body enters as its urllib3 stream, which iterates lines, but a bare body
    # iterates 1 KiB chunks.
    remote, disk = store.open("in.jsonl"), local.open("in.jsonl")
    try:
        assert remote.readline() == disk.readline()
        assert list(remote) == list(disk)
    finally:
        remote.close()
        disk.close()


def test_empty_blob(store):
    store.put("empty", b"")
    assert store.exists("empty")
    assert store.size("empty") == 0
    assert store.open("empty").read() == b""


def test_writer_multipart_is_exact_and_invisible_until_exit(store):
    payload = _data(12 * MiB + 123)
    with store.writer("big.bin") as out:
        for i in range(0, len(payload), 700_000):
            out.write(payload[i : i + 700_000])
        assert _pending_uploads(store), "more than one part should have started a multipart upload"
        assert not store.exists("big.bin")
    assert store.size("big.bin") == len(payload)
    assert b"".join(iter_blob(store, "big.bin")) == payload
    assert not _pending_uploads(store)


def test_writer_one_big_write_and_exactly_one_part(store):
    payload = _data(11 * MiB, seed=3)
    store.put("one-write", payload)
    assert store.open("one-write").read() == payload
    store.put("one-part", payload[:MIN_PART_SIZE])
    assert store.read_range("one-part", 0, MIN_PART_SIZE) == payload[:MIN_PART_SIZE]
    assert not _pending_uploads(store)


def test_writer_memory_stays_within_about_one_part(store):
    block = _data(MiB)
    tracemalloc.start()
    try:
        with store.writer("streamed") as out:
            for _ in range(24):
                out.write(block)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * store.part_size, f"peak {peak / MiB:.1f} MiB for a {store.part_size / MiB:.0f} MiB part"
    assert store.size("streamed") == 24 * MiB


@pytest.mark.parametrize("size", [10, 7 * MiB])
def test_writer_aborted_by_exception_leaves_nothing(store, size):
    with pytest.raises(RuntimeError, match="boom"):
        with store.writer("broken") as out:
            out.write(_data(size))
            raise RuntimeError("boom")
    assert not store.exists("broken")
    assert not _pending_uploads(store)


def test_failed_rewrite_keeps_the_old_blob(store):
    store.put("k", b"old")
    with pytest.raises(RuntimeError):
        with store.writer("k") as out:
            out.write(_data(6 * MiB))
            raise RuntimeError
    assert store.open("k").read() == b"old"


def test_read_range(store):
    payload = _data(1000)
    store.put("r", payload)
    assert store.read_range("r", 0, 10) == payload[:10]
    assert store.read_range("r", 500, 1000) == payload[500:]
    assert store.read_range("r", 999, 1000) == payload[-1:]
    assert store.read_range("r", 990, 5000) == payload[990:]
    assert store.read_range("r", 7, 7) == b""
    assert store.read_range("r", 8, 7) == b""
    assert store.read_range("r", 1000, 1010) == b""
    with pytest.raises(BlobNotFound):
        store.read_range("nope", 0, 10)
    with pytest.raises(BlobNotFound):
        store.read_range("nope", 3, 3)


def test_size_exists_delete_and_missing(store):
    store.put("x/y", b"12345")
    assert store.exists("x/y") and store.size("x/y") == 5
    assert not store.exists("x")
    store.delete("x/y")
    store.delete("x/y")
    assert not store.exists("x/y")
    for call in (store.size, store.open, lambda k: list(iter_blob(store, k))):
        with pytest.raises(BlobNotFound):
            call("x/y")
    with pytest.raises(FileNotFoundError):
        store.open("never")


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/abs", "a/..", ""])
def test_rejects_escaping_keys(store, bad):
    with pytest.raises(ValueError):
        store.put(bad, b"x")


def test_part_size_floor(moto_url):
    with pytest.raises(ValueError):
        _store(moto_url, part_size=MIN_PART_SIZE - 1)


def test_delete_prefix_removes_only_that_directory(store, monkeypatch):
    monkeypatch.setattr(s3blobs, "DELETE_BATCH", 7)
    for i in range(20):
        store.put(f"batches/b1/parts/{i:03d}", b"p")
    store.put("batches/b1", b"self")
    store.put("batches/b10/keep", b"k")
    store.put("batches/b1x", b"k")
    store.put("files/f", b"k")
    store.delete_prefix("batches/b1")
    assert not store.exists("batches/b1")
    assert not any(store.exists(f"batches/b1/parts/{i:03d}") for i in range(20))
    assert store.exists("batches/b10/keep") and store.exists("batches/b1x") and store.exists("files/f")
    store.delete_prefix("batches/none")


def test_delete_prefix_whole_store_spares_other_prefixes(moto_url):
    a, b = _store(moto_url, prefix="dp-a"), _store(moto_url, prefix="dp-ab")
    ensure_bucket(a)
    a.put("k", b"a")
    b.put("k", b"b")
    a.delete_prefix("")
    assert not a.exists("k")
    assert b.exists("k")


def test_link_survives_deleting_the_source(store):
    store.put("src", b"linked bytes")
    store.link("src", "dst/copy")
    store.delete("src")
    assert store.open("dst/copy").read() == b"linked bytes"
    with pytest.raises(BlobNotFound):
        store.link("src", "dst/other")


def test_link_multipart_copy(store, monkeypatch):
    monkeypatch.setattr(s3blobs, "COPY_THRESHOLD", MIN_PART_SIZE)
    monkeypatch.setattr(s3blobs, "COPY_PART_SIZE", MIN_PART_SIZE)
    payload = _data(11 * MiB + 5, seed=9)
    store.put("big-src", payload)
    store.link("big-src", "big-dst")
    store.delete("big-src")
    assert store.size("big-dst") == len(payload)
    assert b"".join(iter_blob(store, "big-dst")) == payload


def test_concat(store):
    pieces = [_data(6 * MiB, 1), b"", b"tiny\n", _data(5 * MiB, 2), b"", _data(3 * MiB + 17, 3), b"z"]
    keys = [f"parts/{i}" for i in range(len(pieces))]
    for key, piece in zip(keys, pieces):
        store.put(key, piece)
    expected = b"".join(pieces)
    assert concat_blobs(store, keys, "joined") == len(expected)
    assert store.size("joined") == len(expected)
    assert b"".join(iter_blob(store, "joined")) == expected
    assert concat_blobs(store, ["parts/2", "parts/6"], "small") == 6
    assert store.open("small").read() == b"tiny\nz"
    assert concat_blobs(store, [], "none") == 0 and store.size("none") == 0
    assert not _pending_uploads(store)


def test_concat_missing_source_writes_nothing(store):
    store.put("a", _data(6 * MiB))
    with pytest.raises(BlobNotFound):
        concat_blobs(store, ["a", "missing"], "out")
    assert not store.exists("out")
    assert not _pending_uploads(store)


def test_prefix_isolation(moto_url):
    one, two, bare = _store(moto_url, prefix="iso-1"), _store(moto_url, prefix="/iso-2/"), _store(moto_url)
    ensure_bucket(one)
    one.put("same/key", b"one")
    two.put("same/key", b"two")
    assert one.open("same/key").read() == b"one"
    assert two.open("same/key").read() == b"two"
    assert bare.open("iso-2/same/key").read() == b"two"
    assert not bare.exists("same/key")
    two.delete_prefix("same")
    assert one.exists("same/key") and not two.exists("same/key")


def test_ensure_bucket_is_idempotent(moto_url):
    store = S3BlobStore(
        f"fresh-{uuid.uuid4().hex[:8]}",
        endpoint_url=moto_url,
        region="eu-west-1",
        access_key_id="test",
        secret_access_key="test",
    )
    ensure_bucket(store)
    ensure_bucket(store)
    store.put("k", b"v")
    assert store.open("k").read() == b"v"


def _child_put(store: S3BlobStore, parent_client_id: int) -> None:
    if id(store.client) == parent_client_id:
        os._exit(3)
    store.put("from-child", b"child")
    os._exit(0)


def test_client_is_recreated_after_fork(store):
    parent_client = store.client
    assert store.client is parent_client
    store.put("from-parent", b"parent")
    child = multiprocessing.get_context("fork").Process(target=_child_put, args=(store, id(parent_client)))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert store.client is parent_client
    assert store.open("from-child").read() == b"child"


def test_injected_client_is_used(moto_url, store):
    injected = _store(moto_url).client
    other = S3BlobStore(BUCKET, prefix=store.prefix, client=injected)
    other.put("via-injected", b"i")
    assert other.client is injected
    assert store.open("via-injected").read() == b"i"
