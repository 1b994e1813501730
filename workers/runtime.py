"""Per-process resources of a worker: one event loop, one aiohttp session per provider, one Redis store.

They are created lazily in the process that uses them (after the prefork fork), and kept for every chunk that
process runs, so connections to the upstream are reused across chunks.
"""

from __future__ import annotations

import asyncio
import os

import aiohttp

from shared.blobs import BlobStore, make_blob_store
from shared.lifecycle import Lifecycle
from shared.providers import Provider, ProviderRegistry, get_registry
from shared.settings import Settings, get_settings
from shared.store import Store
from shared.store_ratelimit import LimiterStore
from workers.ratelimit import ProviderLimiter


def _loop_factory():
    try:
        import uvloop
    except ImportError:  # uvloop is optional (it ships with uvicorn[standard]); asyncio's own loop works too
        return None
    return uvloop.new_event_loop


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.pid = os.getpid()
        self.settings = settings
        self.store = Store.from_settings(settings)
        self.blobs: BlobStore = make_blob_store(settings)
        self.providers: ProviderRegistry = get_registry()
        self.lifecycle = Lifecycle(self.store, cleanup_delay_s=settings.cleanup_delay_s,
                                   wants_webhooks=lambda tenant: self.providers.webhook(tenant) is not None,
                                   cost=self.providers.cost)
        self.runner = asyncio.Runner(loop_factory=_loop_factory())
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._limiters: dict[str, ProviderLimiter] = {}
        self._limiter_store: LimiterStore | None = None
        self._slots: dict[str, asyncio.Semaphore] = {}

    def warm_up(self) -> None:
        try:
            self.store.ping()
        except Exception:  # noqa: BLE001 - Redis may be down at start; the first task will wait for it instead
            pass

    def session(self, provider: Provider) -> aiohttp.ClientSession:
        session = self._sessions.get(provider.name)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=provider.max_concurrency, ttl_dns_cache=300)
            session = aiohttp.ClientSession(connector=connector, json_serialize=None, raise_for_status=False)
            self._sessions[provider.name] = session
        return session

    def slots(self, provider: Provider) -> asyncio.Semaphore:
        """The process's `max_concurrency` request slots for a provider, shared by every chunk it runs at once."""
        slots = self._slots.get(provider.name)
        if slots is None:
            slots = self._slots[provider.name] = asyncio.Semaphore(provider.max_concurrency)
        return slots

    def limiter(self, provider: Provider) -> ProviderLimiter | None:
        """The provider's shared limiter, or None when it has no limits (then nothing is spent on one)."""
        if not ProviderLimiter.needed(provider):
            return None
        limiter = self._limiters.get(provider.name)
        if limiter is None:
            if self._limiter_store is None:
                self._limiter_store = LimiterStore.from_settings(self.settings)
            limiter = self._limiters[provider.name] = ProviderLimiter(self._limiter_store, provider)
        return limiter

    def run(self, coro):
        return self.runner.run(coro)

    def close(self) -> None:
        async def _close_all() -> None:
            for session in self._sessions.values():
                await session.close()
            if self._limiter_store is not None:
                await self._limiter_store.close()

        try:
            self.runner.run(_close_all())
        finally:
            self.runner.close()


_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        _runtime = Runtime(get_settings())
    return _runtime


def close_runtime() -> None:
    global _runtime
    if _runtime is not None and _runtime.pid == os.getpid():
        _runtime.close()
    _runtime = None
