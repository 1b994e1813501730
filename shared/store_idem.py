"""Idempotency-Key answers in Redis: a claim while the first request works, then its final answer for 24 h."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from shared import keys, lua


@dataclass(frozen=True)
class KeptAnswer:
    state: str  # "pending" (the first request is working) or "done"
    fingerprint: str
    status: int
    body: bytes


class IdempotencyStore:
    r: redis.Redis

    def __init__(self, client: redis.Redis) -> None:
        self._claim_idem = client.register_script(lua.CLAIM_IDEMPOTENCY)
        self._finish_idem = client.register_script(lua.FINISH_IDEMPOTENCY)
        self._release_idem = client.register_script(lua.RELEASE_IDEMPOTENCY)
        self._renew_idem = client.register_script(lua.RENEW_IDEMPOTENCY)

    def claim_idempotency(self, scope: str, key: str, fingerprint: str, pending_s: float) -> KeptAnswer | None:
        """None when this request claimed the key (it does the work); else what the key holds."""
        got = self._claim_idem(keys=[keys.idempotency(scope, key)], args=[fingerprint, int(pending_s * 1000)])
        if got[0] == "claimed":
            return None
        state, fp, status, body = got
        return KeptAnswer(state, fp, int(status or 0), body.encode() if isinstance(body, str) else body)

    def finish_idempotency(self, scope: str, key: str, fingerprint: str, status: int, body: bytes,
                           ttl_s: float) -> None:
        self._finish_idem(keys=[keys.idempotency(scope, key)], args=[fingerprint, status, body, int(ttl_s * 1000)])

    def renew_idempotency(self, scope: str, key: str, fingerprint: str, pending_s: float) -> None:
        self._renew_idem(keys=[keys.idempotency(scope, key)], args=[fingerprint, int(pending_s * 1000)])

    def release_idempotency(self, scope: str, key: str, fingerprint: str) -> None:
        self._release_idem(keys=[keys.idempotency(scope, key)], args=[fingerprint])
