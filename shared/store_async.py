"""The API's non-blocking reads of batches, the routes clients poll: one asyncio Redis round trip a retrieve.

Writes stay in `Store`; these reads share its key layout and decoding, so the two cannot drift apart.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from shared.schemas import Batch
from shared import keys
from shared.settings import Settings
from shared.store_client import client_options, make_client
from shared.store import Page, build_batches, decode_batch_reads, page_bound, queue_batch_reads, queue_position_reads


class AsyncBatchReader:
    def __init__(self, client: aioredis.Redis) -> None:
        self.r = client

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float | None = None, quick_retry: bool = False) -> "AsyncBatchReader":
        """See shared/store_client.py for the options."""
        return cls(aioredis.Redis.from_url(url, **client_options(timeout_s, quick_retry, asyncio=True)))

    @classmethod
    def from_settings(cls, settings: Settings, *, timeout_s: float | None = None,
                      quick_retry: bool = False) -> "AsyncBatchReader":
        """The deployment's Redis: `redis_url`, or the primary its Sentinels name (shared/store_client.py)."""
        return cls(make_client(settings, timeout_s=timeout_s, quick_retry=quick_retry, asyncio=True))

    async def get_batches(self, batch_ids: list[str], scope: str | None = None) -> list[Batch | None]:
        pipe = self.r.pipeline(transaction=False)
        queue_batch_reads(pipe, batch_ids)
        views = decode_batch_reads(batch_ids, await pipe.execute(), scope)
        waiting: list = []
        ranks: list = []
        if any(v is not None and v.waiting for v in views):
            pipe = self.r.pipeline(transaction=False)
            waiting = queue_position_reads(pipe, views)
            ranks = await pipe.execute()
        return build_batches(views, waiting, ranks)

    async def get_batch(self, batch_id: str, scope: str) -> Batch | None:
        return (await self.get_batches([batch_id], scope))[0]

    async def list_batch_ids(self, scope: str, limit: int, after: str | None) -> Page:
        index = keys.batches_index(scope)
        score = await self.r.zscore(index, after) if after is not None else None
        if after is not None and score is None:
            return Page([], False)
        ids = await self.r.zrevrangebyscore(index, page_bound(score, True), "-inf", start=0, num=limit + 1)
        return Page.of(ids, limit)

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    async def close(self) -> None:
        await self.r.aclose()
