"""What the results and per-request status routes read of a running batch (shared/results.py): its custom_id index,
a chunk's commit or durable segments, whether a chunk is held by a run, and whether a position is durable.

Read-only, apart from the custom_id index orchestrate writes once the input is valid. The index goes with the batch's
other working keys at clean-up (BatchKeys.working).
"""

from __future__ import annotations

from typing import Sequence

from shared import keys
from shared.store_exec import ChunkCommit, Segment

INDEX_WRITE_BATCH = 1000


class ResultsStore:
    r: object

    def save_custom_ids(self, batch_id: str, custom_ids: Sequence[str]) -> None:
        """Index the batch's requests by custom_id: custom_id -> its 0-based place among the input's requests."""
        key = keys.BatchKeys(batch_id).custom_ids
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(key)
        for start in range(0, len(custom_ids), INDEX_WRITE_BATCH):
            pipe.hset(key, mapping={cid: start + i for i, cid in enumerate(custom_ids[start:start + INDEX_WRITE_BATCH])})
        pipe.execute()

    def custom_id_place(self, batch_id: str, custom_id: str) -> int | None:
        raw = self.r.hget(keys.BatchKeys(batch_id).custom_ids, custom_id)
        return int(raw) if raw is not None else None

    def has_custom_id_index(self, batch_id: str) -> bool:
        return bool(self.r.exists(keys.BatchKeys(batch_id).custom_ids))

    def result_commit(self, batch_id: str, index: int) -> ChunkCommit | None:
        """The chunk's commit, once it has committed: its segment list is then final."""
        raw = self.r.hget(keys.BatchKeys(batch_id).counts, str(index))
        return ChunkCommit.decode(raw) if raw is not None else None

    def result_segments(self, batch_id: str, index: int, start: int = 0) -> list[Segment]:
        """The chunk's durable segments from `start` on, in the order they were recorded (append-only)."""
        return [Segment.decode(raw) for raw in self.r.lrange(keys.BatchKeys(batch_id).segments(index), start, -1)]

    def chunk_lease_held(self, batch_id: str, index: int) -> bool:
        return bool(self.r.exists(keys.BatchKeys(batch_id).lease(index)))

    def position_durable(self, batch_id: str, index: int, pos: int) -> bool:
        return bool(self.r.getbit(keys.BatchKeys(batch_id).finished(index), pos))
