"""Redis store for file and batch records, their per-scope indexes and a batch's execution state.

Every record belongs to a scope (a tenant, optionally narrowed to one end user). Listings are sorted sets scored by
a global sequence so cursor pagination is a total order even when many objects share a second.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

import orjson
import redis

from shared import lua, metrics
from shared.schemas import Batch, FileObject

PREFIX = "bg"
ACTIVE_BATCHES = f"{PREFIX}:active"
FILE_EXPIRY = f"{PREFIX}:files:expiry"


def _scope_tag(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:20]


def file_key(file_id: str) -> str:
    return f"{PREFIX}:file:{file_id}"


def batch_index_key(scope: str) -> str:
    """A scope's batches, scored by creation sequence."""
    return f"{PREFIX}:batches:{_scope_tag(scope)}"


def batch_key(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}"


@dataclass(frozen=True)
class FileRecord:
    file: FileObject
    scope: str
    blob_key: str


@dataclass(frozen=True)
class ChunkSpec:
    """A contiguous byte range of the input file holding `n_lines` requests, the first at line `first_line`."""

    index: int
    start: int
    end: int
    first_line: int
    n_lines: int

    def encode(self) -> str:
        return f"{self.start},{self.end},{self.first_line},{self.n_lines}"

    @classmethod
    def decode(cls, index: int, raw: str | bytes) -> "ChunkSpec":
        text = raw.decode() if isinstance(raw, bytes) else raw
        start, end, first_line, n_lines = (int(x) for x in text.split(","))
        return cls(index, start, end, first_line, n_lines)


@dataclass(frozen=True)
class Page:
    ids: list[str]
    has_more: bool

    @classmethod
    def of(cls, ids: list[str], limit: int) -> "Page":
        """A page from `limit + 1` ids read: the extra one only says there are more."""
        return cls(ids[:limit], len(ids) > limit)


class Store:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._transition = client.register_script(lua.TRANSITION)
        self._commit_chunk = client.register_script(lua.COMMIT_CHUNK)
        self._set_progress = client.register_script(lua.SET_PROGRESS)
        self._renew_lease = client.register_script(lua.RENEW_LEASE)
        self._release_lease = client.register_script(lua.RELEASE_LEASE)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float | None = None, retry: redis.retry.Retry | None = None) -> "Store":
        """`timeout_s` bounds connecting and each reply (redis-py's default otherwise); `retry` replaces its policy."""
        options: dict = {} if timeout_s is None else {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        if retry is not None:
            options["retry"] = retry
        return cls(redis.Redis.from_url(url, decode_responses=True, health_check_interval=30, **options))

    def next_seq(self) -> int:
        return int(self.r.incr(f"{PREFIX}:seq"))

    # ---- pagination -------------------------------------------------------------------------------------------

    def _page(self, index: str, limit: int, after: str | None, descending: bool) -> Page:
        score = self.r.zscore(index, after) if after is not None else None
        if after is not None and score is None:
            return Page([], False)
        bound = page_bound(score, descending)
        if descending:
            ids = self.r.zrevrangebyscore(index, bound, "-inf", start=0, num=limit + 1)
        else:
            ids = self.r.zrangebyscore(index, bound, "+inf", start=0, num=limit + 1)
        return Page.of(ids, limit)

    # ---- files ------------------------------------------------------------------------------------------------

    def _file_indexes(self, scope: str, purpose: str) -> tuple[str, str]:
        tag = _scope_tag(scope)
        return f"{PREFIX}:files:{tag}", f"{PREFIX}:files:{tag}:{purpose}"

    def put_file(self, record: FileRecord) -> None:
        seq = self.next_seq()
        by_scope, by_purpose = self._file_indexes(record.scope, record.file.purpose)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            file_key(record.file.id),
            mapping={"json": record.file.model_dump_json(), "scope": record.scope, "blob": record.blob_key},
        )
        pipe.zadd(by_scope, {record.file.id: seq})
        pipe.zadd(by_purpose, {record.file.id: seq})
        if record.file.expires_at is not None:
            pipe.zadd(FILE_EXPIRY, {record.file.id: record.file.expires_at})
        pipe.execute()

    def get_file(self, file_id: str) -> FileRecord | None:
        raw = self.r.hgetall(file_key(file_id))
        if not raw or "json" not in raw:
            return None
        return FileRecord(FileObject.model_validate_json(raw["json"]), raw["scope"], raw["blob"])

    def get_files(self, file_ids: Iterable[str]) -> list[FileObject]:
        ids = list(file_ids)
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for file_id in ids:
            pipe.hget(file_key(file_id), "json")
        return [FileObject.model_validate_json(raw) for raw in pipe.execute() if raw]

    def list_file_ids(self, scope: str, purpose: str | None, limit: int, after: str | None, descending: bool) -> Page:
        by_scope, by_purpose = self._file_indexes(scope, purpose or "")
        return self._page(by_purpose if purpose else by_scope, limit, after, descending)

    def delete_file(self, record: FileRecord) -> bool:
        by_scope, by_purpose = self._file_indexes(record.scope, record.file.purpose)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(file_key(record.file.id))
        pipe.zrem(by_scope, record.file.id)
        pipe.zrem(by_purpose, record.file.id)
        pipe.zrem(FILE_EXPIRY, record.file.id)
        return bool(pipe.execute()[0])

    def forget_file_expiry(self, file_id: str) -> None:
        self.r.zrem(FILE_EXPIRY, file_id)

    def expired_file_ids(self, now: int, limit: int = 500) -> list[str]:
        return self.r.zrangebyscore(FILE_EXPIRY, "-inf", now, start=0, num=limit)

    # ---- batches ----------------------------------------------------------------------------------------------

    def put_batch(self, batch: Batch, scope: str, extra: dict[str, str]) -> None:
        seq = self.next_seq()
        fields = {
            "scope": scope,
            "status": batch.status,
            "endpoint": batch.endpoint,
            "input_file_id": batch.input_file_id,
            "completion_window": batch.completion_window,
            "created_at": str(batch.created_at),
            "expires_at": str(batch.expires_at),
            "metadata": orjson.dumps(batch.metadata).decode(),
            "updated_at": str(batch.created_at),
            **extra,
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(batch_key(batch.id), mapping=fields)
        pipe.zadd(batch_index_key(scope), {batch.id: seq})
        pipe.zadd(ACTIVE_BATCHES, {batch.id: batch.created_at})
        pipe.execute()

    def batch_fields(self, batch_id: str) -> dict[str, str]:
        return self.r.hgetall(batch_key(batch_id))

    def get_batch(self, batch_id: str) -> Batch | None:
        return self.get_batches([batch_id])[0]

    def get_batches(self, batch_ids: list[str], scope: str | None = None) -> list[Batch | None]:
        """The batches, None for each that does not exist (or, given `scope`, lies outside it); one round trip."""
        pipe = self.r.pipeline(transaction=False)
        queue_batch_reads(pipe, batch_ids)
        return decode_batch_reads(batch_ids, pipe.execute(), scope)

    def set_batch_fields(self, batch_id: str, fields: dict[str, str]) -> None:
        self.r.hset(batch_key(batch_id), mapping=fields)

    def transition(
        self,
        batch_id: str,
        from_statuses: Iterable[str],
        to_status: str,
        now: int,
        *,
        timestamp_field: str | None = None,
        fields: dict[str, str] | None = None,
        terminal: bool = False,
    ) -> tuple[bool, str]:
        """Compare-and-set the status. Returns (moved, status before the call)."""
        froms = list(from_statuses)
        argv: list[str] = [to_status, str(now), timestamp_field or "", "1" if terminal else "0", batch_id, str(len(froms))]
        argv += froms
        for key, value in (fields or {}).items():
            argv += [key, value]
        moved, status = self._transition(keys=[batch_key(batch_id), ACTIVE_BATCHES, metrics.COUNTERS], args=argv)
        return bool(moved), status

    def active_batch_ids(self, limit: int = 10_000) -> list[str]:
        return self.r.zrange(ACTIVE_BATCHES, 0, limit - 1)

    # ---- execution state --------------------------------------------------------------------------------------

    def save_plan(self, batch_id: str, chunks: list[ChunkSpec], fields: dict[str, str]) -> None:
        key = f"{batch_key(batch_id)}:plan"
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(key)
        if chunks:
            pipe.rpush(key, *(c.encode() for c in chunks))
        pipe.hset(batch_key(batch_id), mapping={**fields, "n_chunks": str(len(chunks))})
        pipe.execute()

    def plan(self, batch_id: str) -> list[ChunkSpec]:
        return [ChunkSpec.decode(i, raw) for i, raw in enumerate(self.r.lrange(f"{batch_key(batch_id)}:plan", 0, -1))]

    def chunk(self, batch_id: str, index: int) -> ChunkSpec | None:
        raw = self.r.lindex(f"{batch_key(batch_id)}:plan", index)
        return ChunkSpec.decode(index, raw) if raw is not None else None

    def done_chunks(self, batch_id: str) -> set[int]:
        return {int(x) for x in self.r.smembers(f"{batch_key(batch_id)}:done")}

    def commit_chunk(self, batch_id: str, index: int, counts: dict, n_chunks: int) -> tuple[bool, bool]:
        """Record a chunk's final counts once. Returns (this call committed it, every chunk is now committed)."""
        key = batch_key(batch_id)
        committed, done, total = self._commit_chunk(
            keys=[f"{key}:done", f"{key}:counts", f"{key}:progress"],
            args=[index, orjson.dumps(counts).decode(), n_chunks],
        )
        return bool(committed), int(done) >= int(total)

    def chunk_counts(self, batch_id: str) -> dict[int, dict]:
        raw = self.r.hgetall(f"{batch_key(batch_id)}:counts")
        return {int(k): orjson.loads(v) for k, v in raw.items()}

    def set_progress(self, batch_id: str, index: int, completed: int, failed: int) -> None:
        key = batch_key(batch_id)
        self._set_progress(keys=[f"{key}:done", f"{key}:progress"], args=[index, completed, failed])

    def stop_reason(self, batch_id: str) -> str | None:
        """Why a running batch's chunks must stop sending: 'cancelled', 'expired', or None to go on."""
        status, stop = self.r.hmget(batch_key(batch_id), ["status", "stop"])
        if stop:
            return stop
        if status in ("cancelling", "cancelled"):
            return "cancelled"
        if status in ("expired",):
            return "expired"
        return None

    def chunk_attempt(self, batch_id: str, index: int) -> int:
        return int(self.r.hincrby(f"{batch_key(batch_id)}:attempts", str(index), 1))

    def acquire_lease(self, batch_id: str, index: int, token: str, ttl_s: float) -> bool:
        return bool(self.r.set(f"{batch_key(batch_id)}:lease:{index}", token, nx=True, px=int(ttl_s * 1000)))

    def renew_lease(self, batch_id: str, index: int, token: str, ttl_s: float) -> bool:
        return bool(self._renew_lease(keys=[f"{batch_key(batch_id)}:lease:{index}"], args=[token, int(ttl_s * 1000)]))

    def release_lease(self, batch_id: str, index: int, token: str) -> None:
        self._release_lease(keys=[f"{batch_key(batch_id)}:lease:{index}"], args=[token])

    def lease_held(self, batch_id: str, indexes: list[int]) -> list[bool]:
        pipe = self.r.pipeline(transaction=False)
        for index in indexes:
            pipe.exists(f"{batch_key(batch_id)}:lease:{index}")
        return [bool(x) for x in pipe.execute()]


def page_bound(after_score: float | None, descending: bool) -> str:
    """Where a page starts: just past the cursor's score, else at the newest (or oldest) end."""
    if after_score is not None:
        return f"({int(after_score)}"
    return "+inf" if descending else "-inf"


def queue_batch_reads(pipe, batch_ids: list[str]) -> None:
    """Queue what a Batch is built from on a pipeline, sync or asyncio alike: its hash, committed and live counts."""
    for batch_id in batch_ids:
        pipe.hgetall(batch_key(batch_id))
        pipe.hvals(f"{batch_key(batch_id)}:counts")
        pipe.hvals(f"{batch_key(batch_id)}:progress")


def decode_batch_reads(batch_ids: list[str], raw: list, scope: str | None = None) -> list[Batch | None]:
    out: list[Batch | None] = []
    for i, batch_id in enumerate(batch_ids):
        fields, committed, progress = raw[3 * i : 3 * i + 3]
        visible = bool(fields) and (scope is None or fields.get("scope") == scope)
        out.append(batch_from_fields(batch_id, fields, committed, progress) if visible else None)
    return out


def _sum_counts(committed: list[str], progress: list[str]) -> tuple[int, int]:
    completed = failed = 0
    for raw in committed:
        counts = orjson.loads(raw)
        completed += counts["completed"]
        failed += counts["failed"]
    for raw in progress:
        c, f = raw.split(":")
        completed += int(c)
        failed += int(f)
    return completed, failed


_TIMESTAMPS = (
    "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
    "cancelled_at",
)


def batch_from_fields(batch_id: str, f: dict[str, str], committed: list[str], progress: list[str]) -> Batch:
    if "completed" in f:
        completed, failed = int(f["completed"]), int(f["failed"])
    else:
        completed, failed = _sum_counts(committed, progress)
    data: dict = {
        "id": batch_id,
        "endpoint": f["endpoint"],
        "model": f.get("model") or None,
        "errors": orjson.loads(f["errors"]) if f.get("errors") else None,
        "input_file_id": f["input_file_id"],
        "completion_window": f.get("completion_window", "24h"),
        "status": f["status"],
        "output_file_id": f.get("output_file_id") or None,
        "error_file_id": f.get("error_file_id") or None,
        "created_at": int(f["created_at"]),
        "request_counts": {"total": int(f.get("total", 0)), "completed": completed, "failed": failed},
        "usage": orjson.loads(f["usage"]) if f.get("usage") else None,
        "metadata": orjson.loads(f["metadata"]) if f.get("metadata") else None,
    }
    for name in _TIMESTAMPS:
        data[name] = int(f[name]) if f.get(name) else None
    return Batch.model_validate(data)
