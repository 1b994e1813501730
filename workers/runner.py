"""A worker process's runner: take the next chunk from the shared scheduler, run it, and take another while the
chunk's last wave is still in flight, so no sender slot waits for a chunk to drain.

Celery carries *tickets* (messages without a batch): a ticket starts a runner in a free process, which serves
chunks in the order the scheduler (shared/store_sched.py) gives until there is none or its time budget is spent.
Which batch a chunk comes from is decided when it is taken, so a small batch released after a big one is served
at the next take of any process, not after the big one's backlog.

A runner also hands its process back to Celery when control messages (orchestrate, finalize, the sweep) are waiting
and every process is serving chunks: it takes no new chunk, lets its last ones finish and sends a ticket to carry on.
So a new batch's orchestrate waits about one chunk's time, never a runner's whole budget. A node that is shutting
down has its runners take no new chunk either, so a warm shutdown waits only for the chunks in hand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from shared.lifecycle import BatchRecord
from shared.queue import CONTROL_QUEUE
from shared.store_client import STORAGE_ERROR
from workers import chunk
from workers.runtime import Runtime

log = logging.getLogger("batchgate.runner")


def release(rt: Runtime, record: BatchRecord, indexes: list[int]) -> None:
    """Hand a started batch's chunks to the scheduler."""
    tenant = record.spec.tenant
    rt.store.release_chunks(record.id, tenant, rt.providers.weight(tenant), indexes)


def tickets_for(rt: Runtime, n_chunks: int) -> int:
    """How many tickets to send for `n_chunks` newly released chunks: enough to wake every process that could help."""
    return max(1, min(n_chunks, rt.store.pool_processes() or 1))


async def _run_taken(rt: Runtime, batch_id: str, index: int, node: str, drained: asyncio.Event,
                     finished_batch: Callable[[str], None]) -> None:
    try:
        if await chunk.run_chunk_async(rt, batch_id, index, node, on_drained=drained.set):
            finished_batch(batch_id)
    except chunk.LeaseHeld:
        pass  # a live run holds it; if that run dies, the sweeper releases the chunk again
    except Exception:  # noqa: BLE001 - the sweeper releases a chunk that did not commit
        log.exception("chunk %d of %s failed; the sweeper will run it again", index, batch_id)
    finally:
        drained.set()


async def serve(rt: Runtime, node: str, budget_s: float, finished_batch: Callable[[str], None]) -> bool:
    """Run chunks until none is ready, `budget_s` has passed or control messages wait. True when it stopped early
    (chunks may be left for another ticket). Every ticket runs at least one chunk that is ready, so handing over
    always makes progress."""
    deadline = time.monotonic() + budget_s
    running: set[asyncio.Task] = set()
    taken_any = False
    try:
        while time.monotonic() < deadline:
            try:
                if taken_any and rt.store.should_hand_over(node, CONTROL_QUEUE):
                    return True
                taken = rt.store.take_chunk(time.time())
            except STORAGE_ERROR:
                log.warning("the scheduler is unreachable; trying again", exc_info=True)
                await asyncio.sleep(1.0)
                continue
            if taken is None:
                return False
            taken_any = True
            drained = asyncio.Event()
            task = asyncio.create_task(_run_taken(rt, taken.batch_id, taken.index, node, drained, finished_batch))
            running.add(task)
            task.add_done_callback(running.discard)
            await drained.wait()
        return True
    finally:
        if running:
            await asyncio.gather(*running, return_exceptions=True)
