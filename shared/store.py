"""The Redis store: file and batch records, their per-scope indexes, and the atomic moves of a batch's status.

Every record belongs to a scope (a tenant, optionally narrowed to one end user). Listings are sorted sets scored by
a global sequence so cursor pagination is a total order even when many objects share a second. A batch's execution
state (plan, leases, durable results) is in `shared/store_exec.py`; operational state (metrics, usage, webhooks,
workers, locks, the clean-up outbox) in `shared/store_ops.py`. Key names are in `shared/keys.py`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import orjson
import redis

from shared import keys, lua
from shared.store_client import client_options, close_client, make_client
from shared.lifecycle import QUEUED, RETRIED_BY_PREFIX, BatchRecord, BatchSpec, Effects, Move
from shared.schemas import Batch, FileObject
from shared.store_exec import ExecutionStore
from shared.store_forward import ForwardStore
from shared.store_ops import OpsStore
from shared.store_sched import SchedulerStore
from shared.store_idem import IdempotencyStore
from shared.store_results import ResultsStore

if TYPE_CHECKING:
    from shared.settings import Settings


@dataclass(frozen=True)
class FileRecord:
    file: FileObject
    scope: str
    blob_key: str


@dataclass(frozen=True)
class Page:
    ids: list[str]
    has_more: bool

    @classmethod
    def of(cls, ids: list[str], limit: int) -> "Page":
        """A page from `limit + 1` ids read: the extra one only says there are more."""
        return cls(ids[:limit], len(ids) > limit)


class Store(ExecutionStore, OpsStore, SchedulerStore, IdempotencyStore, ForwardStore, ResultsStore):
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._apply_move = client.register_script(lua.APPLY_MOVE)
        ExecutionStore.__init__(self, client)
        OpsStore.__init__(self, client)
        SchedulerStore.__init__(self, client)
        IdempotencyStore.__init__(self, client)
        ForwardStore.__init__(self, client)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float | None = None, quick_retry: bool = False) -> "Store":
        """See shared/store_client.py for the options."""
        return cls(redis.Redis.from_url(url, **client_options(timeout_s, quick_retry)))

    @classmethod
    def from_settings(cls, settings: "Settings", *, timeout_s: float | None = None,
                      quick_retry: bool = False) -> "Store":
        """The deployment's Redis: `redis_url`, or the primary its Sentinels name (shared/store_client.py)."""
        return cls(make_client(settings, timeout_s=timeout_s, quick_retry=quick_retry))

    def ping(self) -> bool:
        return bool(self.r.ping())

    def close(self) -> None:
        close_client(self.r)

    def next_seq(self) -> int:
        return int(self.r.incr(keys.SEQ))

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

    def put_file(self, record: FileRecord) -> None:
        seq = self.next_seq()
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            keys.file_record(record.file.id),
            mapping={"json": record.file.model_dump_json(), "scope": record.scope, "blob": record.blob_key},
        )
        pipe.zadd(keys.files_index(record.scope), {record.file.id: seq})
        pipe.zadd(keys.files_index(record.scope, record.file.purpose), {record.file.id: seq})
        if record.file.expires_at is not None:
            pipe.zadd(keys.FILE_EXPIRY, {record.file.id: record.file.expires_at})
        pipe.execute()

    def get_file(self, file_id: str) -> FileRecord | None:
        raw = self.r.hgetall(keys.file_record(file_id))
        if not raw or "json" not in raw:
            return None
        return FileRecord(FileObject.model_validate_json(raw["json"]), raw["scope"], raw["blob"])

    def get_files(self, file_ids: Iterable[str]) -> list[FileObject]:
        ids = list(file_ids)
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for file_id in ids:
            pipe.hget(keys.file_record(file_id), "json")
        return [FileObject.model_validate_json(raw) for raw in pipe.execute() if raw]

    def list_file_ids(self, scope: str, purpose: str | None, limit: int, after: str | None, descending: bool) -> Page:
        return self._page(keys.files_index(scope, purpose or ""), limit, after, descending)

    def delete_file(self, record: FileRecord) -> bool:
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(keys.file_record(record.file.id))
        pipe.zrem(keys.files_index(record.scope), record.file.id)
        pipe.zrem(keys.files_index(record.scope, record.file.purpose), record.file.id)
        pipe.zrem(keys.FILE_EXPIRY, record.file.id)
        return bool(pipe.execute()[0])

    def forget_file_expiry(self, file_id: str) -> None:
        self.r.zrem(keys.FILE_EXPIRY, file_id)

    def expired_file_ids(self, now: int, limit: int = 500) -> list[str]:
        return self.r.zrangebyscore(keys.FILE_EXPIRY, "-inf", now, start=0, num=limit)

    # ---- batches ----------------------------------------------------------------------------------------------

    def put_batch(self, spec: BatchSpec, provider: str | None = None) -> None:
        """A new batch, `validating`, in its scope's index and the active set."""
        seq = self.next_seq()
        fields = {**spec.hash_fields(), "status": "validating", "updated_at": str(spec.created_at), "total": "0"}
        if provider:
            fields["provider"] = provider
            fields["provider_pinned"] = "1"  # the plan may rewrite `provider`, never this
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.batch(spec.id), mapping=fields)
        pipe.zadd(keys.batches_index(spec.scope), {spec.id: seq})
        pipe.zadd(keys.ACTIVE_BATCHES, {spec.id: spec.created_at})
        pipe.execute()

    def batch_record(self, batch_id: str) -> BatchRecord | None:
        fields = self.r.hgetall(keys.batch(batch_id))
        return BatchRecord.from_hash(batch_id, fields) if fields else None

    def get_batch(self, batch_id: str) -> Batch | None:
        return self.get_batches([batch_id])[0]

    def get_batches(self, batch_ids: list[str], scope: str | None = None) -> list[Batch | None]:
        """The batches, None for each that does not exist (or, given `scope`, lies outside it); one round trip."""
        pipe = self.r.pipeline(transaction=False)
        queue_batch_reads(pipe, batch_ids)
        views = decode_batch_reads(batch_ids, pipe.execute(), scope)
        pipe = self.r.pipeline(transaction=False)
        waiting = queue_position_reads(pipe, views)
        return build_batches(views, waiting, pipe.execute() if waiting else [])

    def list_batch_ids(self, scope: str, limit: int, after: str | None) -> Page:
        return self._page(keys.batches_index(scope), limit, after, descending=True)

    def apply_move(self, batch_id: str, move: Move, now: int, fields: dict[str, str], effects: Effects | None
                   ) -> tuple[bool, str]:
        """Compare-and-set the status with everything that goes with it (see shared/lifecycle.py).
        Returns (moved, the status before the call)."""
        if move.terminal and effects is None:
            raise ValueError(f"the terminal move {move.verb!r} needs its side effects")
        tenant = effects.tenant if effects else ""
        event = effects.webhook_event if effects and effects.webhook_event else ""
        argv: list = [move.to, now, move.timestamp, 1 if move.terminal else 0, batch_id, len(move.froms), *move.froms,
                      len(fields)]
        for name, value in fields.items():
            argv += [name, value]
        if effects is not None:
            argv += [tenant, *effects.usage, effects.completed, effects.failed, event, effects.webhook_type or "",
                     f"{effects.cleanup_at:.3f}", effects.cost_micros, effects.currency, effects.day]
        moved, status = self._apply_move(
            keys=[keys.batch(batch_id), keys.ACTIVE_BATCHES, keys.METRIC_COUNTERS, keys.usage(tenant),
                  keys.USAGE_TENANTS, keys.webhook_event(event), keys.WEBHOOKS_PENDING, keys.CLEANUP_OUTBOX,
                  keys.SCHED_ENQUEUED],
            args=argv,
        )
        return bool(moved), status

    def set_stop(self, batch_id: str, reason: str) -> bool:
        """Tell a batch's chunks to stop sending (the first reason given wins)."""
        return bool(self.r.hsetnx(keys.batch(batch_id), "stop", reason))

    def mark_sent(self, batch_id: str, what: str, now: float) -> None:
        """When an orchestrate or finalize message was last sent for the batch (so the sweeper does not repeat it)."""
        self.r.hset(keys.batch(batch_id), f"{what}_sent_at", str(int(now)))

    def stop_reason(self, batch_id: str) -> str | None:
        """Why a running batch's chunks must stop sending: 'cancelled', 'expired', or None to go on."""
        status, stop = self.r.hmget(keys.batch(batch_id), ["status", "stop"])
        if stop:
            return stop
        if status in ("cancelling", "cancelled"):
            return "cancelled"
        if status == "expired":
            return "expired"
        return None

    def active_batch_ids(self, limit: int = 10_000) -> list[str]:
        return self.r.zrange(keys.ACTIVE_BATCHES, 0, limit - 1)

    def forget_active(self, batch_id: str) -> None:
        self.r.zrem(keys.ACTIVE_BATCHES, batch_id)

    def add_retried_by(self, batch_id: str, retry_id: str) -> None:
        """Record on a batch that `retry_id` retries its failed lines: one field per retry, valued by a global
        sequence so they list in order (BatchRecord.from_hash reads them back), and no read-modify-write to race."""
        seq = self.next_seq()
        self.r.hset(keys.batch(batch_id), f"{RETRIED_BY_PREFIX}{retry_id}", str(seq))


def page_bound(after_score: float | None, descending: bool) -> str:
    """Where a page starts: just past the cursor's score, else at the newest (or oldest) end."""
    if after_score is not None:
        return f"({int(after_score)}"
    return "+inf" if descending else "-inf"


def queue_batch_reads(pipe, batch_ids: list[str]) -> None:
    """Queue what a Batch is built from on a pipeline, sync or asyncio alike: its hash, committed and live counts."""
    for batch_id in batch_ids:
        bk = keys.BatchKeys(batch_id)
        pipe.hgetall(bk.record)
        pipe.hvals(bk.counts)
        pipe.hvals(bk.progress)


@dataclass(frozen=True)
class BatchView:
    """A batch's record with its live counts, as read for the API."""

    record: BatchRecord
    completed: int
    failed: int
    codes: dict[str, int]

    @property
    def waiting(self) -> bool:
        return self.record.state.status == QUEUED


def decode_batch_reads(batch_ids: list[str], raw: list, scope: str | None = None) -> list[BatchView | None]:
    out: list[BatchView | None] = []
    for i, batch_id in enumerate(batch_ids):
        fields, committed, progress = raw[3 * i : 3 * i + 3]
        visible = bool(fields) and (scope is None or fields.get("scope") == scope)
        if not visible:
            out.append(None)
            continue
        record = BatchRecord.from_hash(batch_id, fields)
        codes: Counter = Counter()
        completed, failed = live_counts(committed, progress, None if record.state.errors_by_code is not None else codes)
        out.append(BatchView(record, completed, failed, dict(codes)))
    return out


def queue_position_reads(pipe, views: list[BatchView | None]) -> list[BatchView]:
    """Queue the reads of each waiting batch's place in line; returns the views they are for, in order."""
    waiting = [v for v in views if v is not None and v.waiting]
    for view in waiting:
        pipe.zrank(keys.sched_waiting(view.record.spec.tenant), view.record.id)
    return waiting


def build_batches(views: list[BatchView | None], waiting: list[BatchView], ranks: list) -> list[Batch | None]:
    position = {v.record.id: (None if rank is None else int(rank) + 1) for v, rank in zip(waiting, ranks)}
    return [None if v is None else v.record.to_batch(v.completed, v.failed, position.get(v.record.id), v.codes)
            for v in views]


def live_counts(committed: list[str], progress: list[str], codes: Counter | None = None) -> tuple[int, int]:
    """Completed and failed so far; adds the committed chunks' error codes to `codes` when given."""
    completed = failed = 0
    for raw in committed:
        counts = orjson.loads(raw)
        completed += counts["completed"]
        failed += counts["failed"]
        if codes is not None:
            for segment in counts.get("segments") or ():
                codes.update(segment.get("codes") or {})
    for raw in progress:
        c, f = raw.split(":")
        completed += int(c)
        failed += int(f)
    return completed, failed
