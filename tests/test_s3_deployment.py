"""A deployment on the S3 blob store (a real moto server): files, parts, output and error files all in the bucket,
and two worker "hosts" with data directories of their own sharing one batch exactly once."""

from __future__ import annotations

import uuid

import pytest
from stack import Stack, assert_exactly_once, chat_lines, submit, wait_terminal

from shared.s3blobs import S3BlobStore, ensure_bucket

pytestmark = pytest.mark.timeout(240)


def s3_settings(endpoint: str) -> dict[str, str]:
    return {
        "BATCHGATE_BLOB_BACKEND": "s3",
        "BATCHGATE_S3_BUCKET": f"bg-{uuid.uuid4().hex[:12]}",
        "BATCHGATE_S3_PREFIX": "deployment-a",
        "BATCHGATE_S3_ENDPOINT_URL": endpoint,
        "BATCHGATE_S3_REGION": "us-east-1",
        "BATCHGATE_S3_ACCESS_KEY_ID": "test",
        "BATCHGATE_S3_SECRET_ACCESS_KEY": "test-secret-key",
    }


def bucket_store(env: dict[str, str]) -> S3BlobStore:
    store = S3BlobStore(env["BATCHGATE_S3_BUCKET"], endpoint_url=env["BATCHGATE_S3_ENDPOINT_URL"], region="us-east-1",
                        access_key_id="test", secret_access_key="test-secret-key")
    ensure_bucket(store)
    return store


def object_keys(store: S3BlobStore) -> list[str]:
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_batch_with_output_and_error_files_on_s3(make_stack, s3_endpoint):
    env = s3_settings(s3_endpoint)
    bucket = bucket_store(env)
    dep: Stack = make_stack(upstream_max_retries=0)
    dep.group.env.update(env)
    dep.start(workers=1, concurrency=2)
    dep.sim_config(error_rate=0.3, seed=7)
    client = dep.client()
    content = chat_lines(500)
    batch = submit(client, content)
    assert client.files.content(batch.input_file_id).read() == content

    final = wait_terminal(client, batch.id, timeout=120)
    assert final.status == "completed"
    out, err = assert_exactly_once(client, final, {f"req-{i}" for i in range(500)})
    assert out and err and all(line["response"]["status_code"] == 500 for line in err)

    keys = object_keys(bucket)
    assert all(key.startswith("deployment-a/") for key in keys)
    for file_id in (final.input_file_id, final.output_file_id, final.error_file_id):
        stored = [k for k in keys if file_id in k]
        assert len(stored) == 1, (file_id, keys)
        assert bucket.size(stored[0]) == client.files.retrieve(file_id).bytes
    assert not (dep.root / "data" / "blobs").exists(), "nothing may be written to the local disk"

    client.files.delete(final.output_file_id)
    assert not [k for k in object_keys(bucket) if final.output_file_id in k]


def test_two_worker_hosts_share_one_batch_exactly_once(make_stack, s3_endpoint, tmp_path):
    env = s3_settings(s3_endpoint)
    bucket_store(env)
    dep: Stack = make_stack(sim_latency_ms=20, chunk_max_requests=100)
    dep.group.env.update(env)
    dep.start_redis()
    dep.start_simulator()
    dep.start_api()
    hosts = {"host-a": tmp_path / "host-a", "host-b": tmp_path / "host-b"}
    for name, data_dir in hosts.items():
        dep.start_worker(name, concurrency=2, env={"BATCHGATE_DATA_DIR": str(data_dir)})
    dep.start_beat()
    client = dep.client()

    batch = submit(client, chat_lines(2000))
    final = wait_terminal(client, batch.id, timeout=180)
    assert final.status == "completed"
    out, err = assert_exactly_once(client, final, {f"req-{i}" for i in range(2000)})
    assert len(out) == 2000 and err == []

    committed = dep.store.chunk_commits(batch.id)
    assert len(committed) == 20
    nodes = {commit.extra["node"].split("@")[0] for commit in committed.values()}
    assert nodes == set(hosts), f"chunks ran on {nodes}"
    for data_dir in hosts.values():
        assert not (data_dir / "blobs").exists()
