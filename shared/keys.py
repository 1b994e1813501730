"""Every Redis key batchgate writes, in one place. The store modules (shared/store*.py) are the only users.

A batch's keys share the `bg:batch:{id}` stem, so its execution state can be found and cleaned up as a group.
"""

from __future__ import annotations

import hashlib

PREFIX = "bg"

SEQ = f"{PREFIX}:seq"
ACTIVE_BATCHES = f"{PREFIX}:active"  # zset batch id -> created_at, every non-terminal batch
FILE_EXPIRY = f"{PREFIX}:files:expiry"  # zset file id -> expires_at
CLEANUP_OUTBOX = f"{PREFIX}:outbox:cleanup"  # zset batch id -> when its working blobs and keys may go
WEBHOOKS_PENDING = f"{PREFIX}:webhooks:pending"  # zset event id -> when it is next due
USAGE_TENANTS = f"{PREFIX}:usage:tenants"
METRIC_COUNTERS = f"{PREFIX}:metrics:counters"  # field "<name>|<label>" -> int
METRIC_LATENCY = f"{PREFIX}:metrics:latency"  # field "<provider>|<bucket index>", "|sum_ms", "|count"
SWEEPER_LOCK = f"{PREFIX}:sweeper:lock"
POOL_PREFIX = f"{PREFIX}:pool:"  # + worker node name -> its process count, with a short expiry
# The scheduler (shared/store_sched.py): which released chunk a worker runs next.
SCHED_TENANTS = f"{PREFIX}:sched:tenants"  # zset tenant -> virtual time, the tenants with chunks to run
SCHED_STATE = f"{PREFIX}:sched:state"  # hash: vnow, rr, taken_at, "w:<tenant>" weight, "vt:<tenant>" idle vtime
SCHED_BATCHES_PREFIX = f"{PREFIX}:sched:batches:"  # + tenant -> zset batch id -> round-robin turn
SCHED_WAITING_PREFIX = f"{PREFIX}:sched:waiting:"  # + tenant -> zset queued batch id -> creation sequence
SCHED_ENQUEUED = f"{PREFIX}:sched:enqueued"  # hash tenant -> requests of its admitted, unfinished batches


def stopping_node(node: str) -> str:
    """Set while a worker node shuts down: its runners take no new chunk."""
    return f"{PREFIX}:sched:stopping:{node}"


def sched_batches(tenant: str) -> str:
    return f"{SCHED_BATCHES_PREFIX}{tenant}"


def sched_waiting(tenant: str) -> str:
    return f"{SCHED_WAITING_PREFIX}{tenant}"


def scope_tag(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:20]


def file_record(file_id: str) -> str:
    return f"{PREFIX}:file:{file_id}"


def files_index(scope: str, purpose: str = "") -> str:
    """A scope's files (or those of one purpose), scored by creation sequence."""
    base = f"{PREFIX}:files:{scope_tag(scope)}"
    return f"{base}:{purpose}" if purpose else base


def idempotency(scope: str, key: str) -> str:
    """The answer kept for an Idempotency-Key of a scope."""
    return f"{PREFIX}:idem:{scope_tag(scope)}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def batches_index(scope: str) -> str:
    """A scope's batches, scored by creation sequence."""
    return f"{PREFIX}:batches:{scope_tag(scope)}"


def batch(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}"


class BatchKeys:
    """The keys of one batch's execution state."""

    PLAN_SUFFIX = ":plan"
    READY_SUFFIX = ":ready"

    def __init__(self, batch_id: str) -> None:
        stem = batch(batch_id)
        self.record = stem
        self.plan = f"{stem}{self.PLAN_SUFFIX}"  # list of encoded ChunkSpecs
        self.ready = f"{stem}{self.READY_SUFFIX}"  # list of chunk indexes released to the scheduler, not yet taken
        self.done = f"{stem}:done"  # set of committed chunk indexes
        self.counts = f"{stem}:counts"  # hash chunk index -> committed counts (json)
        self.progress = f"{stem}:progress"  # hash chunk index -> "completed:failed" durable so far
        self.attempts = f"{stem}:attempts"  # hash chunk index -> runs started
        self.redriven = f"{stem}:redriven"  # hash chunk index -> when the sweeper last re-sent it
        self.history = f"{stem}:history"  # list of "t_ms:completed:failed" progress samples (shared/progress.py)
        self.finalize_lease = f"{stem}:finalize-lease"
        self.forward_lease = f"{stem}:forward-lease"  # held by the one forward step running (workers/forward.py)
        self.finalize_lock_v1 = f"{stem}:finalize-lock"  # written by versions before the lifecycle module
        self.custom_ids = f"{stem}:custom-ids"  # hash custom_id -> its request's place in the input (0-based)
        self.stem = stem

    def lease(self, index: int) -> str:
        return f"{self.stem}:lease:{index}"

    def finished(self, index: int) -> str:
        """Bitmap of a chunk's positions whose result lines are durable."""
        return f"{self.stem}:finished:{index}"

    def segments(self, index: int) -> str:
        """List of a chunk's durable result segments (json records), in the order they were written."""
        return f"{self.stem}:segments:{index}"

    def working(self, n_chunks: int) -> list[str]:
        """Every execution key of the batch: what clean-up deletes once the batch has ended."""
        per_chunk = [k for i in range(n_chunks) for k in (self.lease(i), self.finished(i), self.segments(i))]
        return [self.plan, self.ready, self.done, self.counts, self.progress, self.attempts, self.redriven, self.finalize_lease,
                self.finalize_lock_v1, self.forward_lease, self.history, self.custom_ids, *per_chunk]


def usage(tenant: str) -> str:
    return f"{PREFIX}:usage:{tenant}"


def webhook_event(event_id: str) -> str:
    return f"{PREFIX}:event:{event_id}"


def rate_limit(provider: str) -> str:
    """The stem of a provider's shared limiter keys."""
    return f"{PREFIX}:rl:{provider}"


def rate_limit_pause(provider: str) -> str:
    """µs until which no request goes to the provider (a Retry-After)."""
    return f"{rate_limit(provider)}:pause"


def rate_limit_inflight(provider: str) -> str:
    """zset holder -> lease expiry (ms): the provider's requests in flight across every worker."""
    return f"{rate_limit(provider)}:inflight"


def adaptive_limit(provider: str) -> str:
    """A provider's adaptive (AIMD) in-flight limit and what it is derived from (hash; shared/lua.py ADAPTIVE_*)."""
    return f"{rate_limit(provider)}:adaptive"
