"""The scheduler's state in Redis: which released chunk any worker, on any host, runs next.

A planned batch's chunks are *released*: their indexes go on the batch's ready list, the batch joins its tenant's
round robin and the tenant joins the fair queue. A worker process *takes* one chunk at a time (shared/lua.py
TAKE_CHUNK says in what order). What was taken and not committed is found by the sweeper (a chunk neither ready,
leased nor done) and released again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import redis

from shared import keys, lua
from shared.lifecycle import IN_PROGRESS, QUEUED, TERMINAL, VALIDATING

# A batch with less than this share of its completion window left runs before any other of its tenant's batches.
URGENT_FRACTION = 0.25
CANDIDATES_PER_TENANT = 64
# pending_requests reads at most this many unfinished batches (the oldest), so a scrape stays cheap however many wait.
PENDING_SCAN_LIMIT = 1000


@dataclass(frozen=True)
class Taken:
    batch_id: str
    index: int
    tenant: str


class SchedulerStore:
    r: redis.Redis

    def __init__(self, client: redis.Redis) -> None:
        self._release = client.register_script(lua.RELEASE_CHUNKS)
        self._take = client.register_script(lua.TAKE_CHUNK)
        self._admit = client.register_script(lua.ADMIT)
        self._pending_lines = client.register_script(lua.PENDING_LINES)
        self._terminal = "," + ",".join(sorted(TERMINAL)) + ","

    def release_chunks(self, batch_id: str, tenant: str, weight: float, indexes: list[int]) -> None:
        if not indexes:
            return
        self._release(keys=[keys.SCHED_TENANTS, keys.SCHED_STATE, keys.BatchKeys(batch_id).ready,
                            keys.sched_batches(tenant)],
                      args=[batch_id, tenant, repr(float(weight)), *(str(i) for i in indexes)])

    def take_chunk(self, now: float) -> Taken | None:
        got = self._take(keys=[keys.SCHED_TENANTS, keys.SCHED_STATE],
                         args=[int(now), keys.batch(""), keys.BatchKeys.READY_SUFFIX, keys.BatchKeys.PLAN_SUFFIX,
                               keys.SCHED_BATCHES_PREFIX, URGENT_FRACTION, self._terminal, CANDIDATES_PER_TENANT])
        if not got:
            return None
        batch_id, index, tenant = got
        return Taken(batch_id, int(index), tenant)

    def mark_stopping(self, node: str, ttl_s: int) -> None:
        self.r.set(keys.stopping_node(node), "1", ex=ttl_s)

    def clear_stopping(self, node: str) -> None:
        self.r.delete(keys.stopping_node(node))

    def should_hand_over(self, node: str, control_queue: str) -> bool:
        """Whether a runner on `node` should take no new chunk: control messages wait, or the node is stopping."""
        pipe = self.r.pipeline(transaction=False)
        pipe.llen(control_queue)
        pipe.exists(keys.stopping_node(node))
        waiting, stopping = pipe.execute()
        return bool(waiting) or bool(stopping)

    def ready_chunks(self, batch_id: str) -> set[int]:
        return {int(i) for i in self.r.lrange(keys.BatchKeys(batch_id).ready, 0, -1)}

    def tenants_with_work(self) -> int:
        return int(self.r.zcard(keys.SCHED_TENANTS))

    def pending_requests(self, limit: int = PENDING_SCAN_LIMIT) -> Counter[tuple[str, str]]:
        """Requests of running batches waiting to be sent or answered, by the batch's (provider, model): the lines
        of released chunks no runner took yet plus the lines not yet durable of the chunks running (both: every
        chunk not committed, less its durable lines). Batches forwarded whole to a provider's batch API are left
        out. One pipelined round trip of one short script per batch, over at most `limit` unfinished batches (the
        oldest): the work of a scrape is bounded by limit x chunks per batch."""
        batch_ids = self.r.zrange(keys.ACTIVE_BATCHES, 0, limit - 1)
        out: Counter[tuple[str, str]] = Counter()
        if not batch_ids:
            return out
        pipe = self.r.pipeline(transaction=False)
        for batch_id in batch_ids:
            bk = keys.BatchKeys(batch_id)
            self._pending_lines(keys=[bk.record, bk.plan, bk.done, bk.progress], args=[IN_PROGRESS], client=pipe)
        for got in pipe.execute():
            if got:
                provider, model, pending = got
                out[(provider, model)] += int(pending)
        return out

    def last_take(self) -> float:
        """When a runner last took a chunk (0 when none ever did)."""
        return float(self.r.hget(keys.SCHED_STATE, "taken_at") or 0)

    # ---- the queue of batches over their tenant's cap -----------------------------------------------------------

    def admit(self, tenant: str, cap: int, batch_id: str = "", place: float = 0.0) -> list[str]:
        """Admit the tenant's waiting batches that fit, in order; `batch_id` (at `place` in line) asks to start."""
        got = self._admit(keys=[keys.SCHED_ENQUEUED, keys.sched_waiting(tenant)],
                          args=[tenant, cap, keys.batch(""), batch_id, repr(place), f",{VALIDATING},{QUEUED},"])
        return list(got or [])

    def enqueued_requests(self, tenant: str) -> int:
        return int(self.r.hget(keys.SCHED_ENQUEUED, tenant) or 0)
