"""The physical limit: a bare asyncio + aiohttp loop sending the same requests at the same total concurrency."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson


async def _drive(url: str, bodies: list[bytes], concurrency: int, api_key: str) -> int:
    ok = 0
    queue = iter(bodies)
    headers = {"content-type": "application/json", "authorization": f"Bearer {api_key}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            nonlocal ok
            for body in queue:
                async with session.post(url, data=body, headers=headers) as resp:
                    orjson.loads(await resp.read())
                    ok += resp.status == 200
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


def raw_loop(url: str, bodies: list[bytes], concurrency: int, api_key: str = "") -> tuple[float, int]:
    """Seconds to send every body, and how many answered 200."""
    start = time.perf_counter()
    ok = asyncio.run(_drive(url, bodies, concurrency, api_key))
    return time.perf_counter() - start, ok
