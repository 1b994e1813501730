"""A forwarded batch's state in Redis (batch_api = native; workers/forward.py): the provider's file and batch ids,
the chain of forward steps, the lease of the step running, and the provider's counts mirrored as live progress.

All of it is in the batch's record (or its working keys), none in a process, so any worker can take a forwarded
batch over.
"""

from __future__ import annotations

import redis

from shared import keys, lua

# The progress hash's entry that holds a forwarded batch's counts, as the provider reports them.
REMOTE_PROGRESS = "remote"


class ForwardStore:
    def __init__(self, client: redis.Redis) -> None:
        self._forward_chain = client.register_script(lua.FORWARD_CHAIN)

    r: redis.Redis

    def save_forward(self, batch_id: str, **values: object) -> None:
        """Record where forwarding stands (provider_file_id, provider_batch_id, the markers of a begun upload or
        create, the poll interval...); fields of the record, read back as BatchState."""
        self.r.hset(keys.batch(batch_id), mapping={name: str(value) for name, value in values.items()})

    def hand_on_forward(self, batch_id: str, expected: str | None, token: str, due_at: float) -> bool:
        """Make `token` the chain's next step, due at `due_at`, if the chain's token is `expected` (None: start a new
        chain whatever it was)."""
        return bool(self._forward_chain(keys=[keys.batch(batch_id)], args=[expected or "", token, f"{due_at:.3f}"]))

    def acquire_forward_lease(self, batch_id: str, token: str, ttl_s: float) -> bool:
        return bool(self.r.set(keys.BatchKeys(batch_id).forward_lease, token, nx=True, px=int(ttl_s * 1000)))

    def renew_forward_lease(self, batch_id: str, token: str, ttl_s: float) -> bool:
        return bool(self._renew_lease(keys=[keys.BatchKeys(batch_id).forward_lease],  # type: ignore[attr-defined]
                                      args=[token, int(ttl_s * 1000)]))

    def release_forward_lease(self, batch_id: str, token: str) -> None:
        self._release_lease(keys=[keys.BatchKeys(batch_id).forward_lease], args=[token])  # type: ignore[attr-defined]

    def forward_leased(self, batch_id: str) -> bool:
        return bool(self.r.exists(keys.BatchKeys(batch_id).forward_lease))

    def mirror_counts(self, batch_id: str, completed: int, failed: int) -> None:
        """The provider's request_counts as the batch's live progress (and a throttled sample of its history)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(keys.BatchKeys(batch_id).progress, REMOTE_PROGRESS, f"{int(completed)}:{int(failed)}")
        self.queue_progress_sample(pipe, batch_id)  # type: ignore[attr-defined]
        pipe.execute()
