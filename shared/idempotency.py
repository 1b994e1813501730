"""Idempotent writes: the first request with an Idempotency-Key does the work, the same request again gets its answer.

A key is scoped to the caller (tenant, and end user where there is one) and kept `idempotency_ttl_s` (24 h). Only a
final answer is kept (2xx and 4xx); a 5xx gives the key back, so a retry does the work. Identical requests arriving
together: the first claims the key, the others wait for its answer. The same key with another request is a 409.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import orjson

from shared.errors import APIError, Conflict, InvalidRequest
from shared.store import Store

MAX_KEY_LENGTH = 255
PENDING_S = 60.0  # a claim outlives a crashed first request only this long
POLL_S = 0.05


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    replayed: bool = False


def fingerprint(*parts: bytes | str) -> str:
    """What makes two requests the same: their kind and their content, hashed."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def check_key(values: list[str]) -> str:
    if len(values) > 1:
        raise InvalidRequest("The Idempotency-Key header was sent more than once.", code="duplicate_header")
    key = values[0]
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidRequest(f"An Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters.",
                             param="Idempotency-Key", code="invalid_idempotency_key")
    return key


class InProgress(APIError):
    status_code = 409

    def __init__(self) -> None:
        super().__init__("A request with this Idempotency-Key is still in progress; retry it shortly.",
                         code="idempotency_key_in_progress", headers={"retry-after": "1"})


async def _keep_claim(store: Store, scope: str, key: str, fp: str, call: Callable[..., Awaitable]) -> None:
    """Renew a claim while its request works, so a slow first request (a big upload to S3) keeps its key."""
    while True:
        await asyncio.sleep(PENDING_S / 3)
        try:
            await call(store.renew_idempotency, scope, key, fp, PENDING_S)
        except Exception:  # noqa: BLE001 - a Redis blip: the claim may lapse, and the answer is still kept at the end
            pass


async def once(store: Store, scope: str, key: str, fp: str, produce: Callable[[], Awaitable[Answer]], *,
               ttl_s: float, wait_s: float, call: Callable[..., Awaitable]) -> Answer:
    """Run `produce` once for (scope, key); `call(fn, *args)` runs a blocking store call off the event loop."""
    deadline = time.monotonic() + wait_s
    while True:
        kept = await call(store.claim_idempotency, scope, key, fp, PENDING_S)
        if kept is None:
            keep_alive = asyncio.create_task(_keep_claim(store, scope, key, fp, call))
            try:
                answer = await produce()
            except APIError as error:
                if error.status_code < 500:
                    await call(store.finish_idempotency, scope, key, fp, error.status_code,
                               orjson.dumps(error.envelope()), ttl_s)
                else:
                    await call(store.release_idempotency, scope, key, fp)
                raise
            except BaseException:
                await call(store.release_idempotency, scope, key, fp)
                raise
            finally:
                keep_alive.cancel()
            await call(store.finish_idempotency, scope, key, fp, answer.status, answer.body, ttl_s)
            return answer
        if kept.fingerprint != fp:
            raise Conflict("This Idempotency-Key was already used with a different request; send a new key for a "
                           "new request.", param="Idempotency-Key", code="idempotency_key_reused")
        if kept.state == "done":
            return Answer(kept.status, kept.body, replayed=True)
        if time.monotonic() > deadline:
            raise InProgress()
        await asyncio.sleep(POLL_S)
