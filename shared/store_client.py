"""How batchgate's processes connect to Redis, and which Redis errors mean "storage unavailable right now"."""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry as SyncRetry
from redis.sentinel import Sentinel as SyncSentinel

if TYPE_CHECKING:
    from shared.settings import Settings

# How long a question to a Sentinel may take: one that is down or frozen is skipped for the next.
SENTINEL_TIMEOUT_S = 1.0

# Redis, sync or asyncio client alike, could not serve a call now: down, frozen, loading its data, failing over.
# (BusyLoadingError, MaxConnectionsError and AuthenticationError are ConnectionErrors.)
STORAGE_UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.MasterDownError,
    redis_errors.TryAgainError,
    redis_errors.OutOfMemoryError,
)  # (MasterNotFoundError, "no Sentinel knows a primary now", is a ConnectionError too.)
STORAGE_ERROR = redis_errors.RedisError


def client_options(timeout_s: float | None, quick_retry: bool, *, asyncio: bool = False) -> dict:
    """Options of redis-py's clients. `timeout_s` bounds connecting and each reply (redis-py's default otherwise).

    With `quick_retry`, one quick retry on a connection error, none on a timeout. After Redis restarts, the asyncio
    client's first command on each pooled socket fails with a connection error (the server closed it); one retry on
    a fresh connection makes that a success instead of a 503. A timeout means Redis is frozen or overloaded: waiting
    again would double the time before the 503, and the client retries after Retry-After anyway.
    """
    options: dict = {"decode_responses": True, "health_check_interval": 30}
    if timeout_s is not None:
        options.update(socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    if quick_retry:
        retry_class = AsyncRetry if asyncio else SyncRetry
        options["retry"] = retry_class(ExponentialWithJitterBackoff(base=0.02, cap=0.1), 1,
                                       supported_errors=(redis_errors.ConnectionError,))
    return options


class _BlockingSentinelPool(AsyncSentinelPool, aioredis.BlockingConnectionPool):
    """An asyncio pool of connections to the primary the Sentinels name that waits for a free connection when all
    are in use (as aioredis.BlockingConnectionPool does for a plain URL)."""


def sentinel_kwargs(settings: "Settings", *, asyncio: bool = False) -> dict:
    """How to reach the Sentinels themselves (redis-py's and Celery's `sentinel_kwargs`).

    No retry: a Sentinel that is down or frozen is skipped for the next one at once. (redis-py's default retries a
    connection error three times with a backoff of seconds, so one dead Sentinel first in the list cost every new
    connection about 5 s, and a publish through kombu more than 10 s.)
    """
    retry_class = AsyncRetry if asyncio else SyncRetry
    options: dict = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S,
                     "retry": retry_class(NoBackoff(), 0)}
    if settings.redis_sentinel_password is not None:
        options["password"] = settings.redis_sentinel_password.get_secret_value()
    return options


def close_client(client: redis.Redis) -> None:
    """Close a sync client of make_client's, and its connections to the Sentinels when it has some."""
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    client.close()
    if manager is not None:
        manager.close()


def make_client(settings: "Settings", *, timeout_s: float | None = None, quick_retry: bool = False,
                asyncio: bool = False, max_connections: int | None = None, pool_timeout: float | None = None):
    """The one way batchgate's processes get a Redis client: `redis.Redis` (or its asyncio twin with `asyncio`) for
    `settings.redis_url`, or, with `settings.redis_sentinels`, for the primary the Sentinels name now.

    A Sentinel client asks the Sentinels for the primary on every new connection; a connection to a primary that
    died or was demoted fails (ConnectionError, or ReadOnlyError turned into one), and while no Sentinel names a
    primary the connect fails with MasterNotFoundError: all in STORAGE_UNAVAILABLE, so the API answers 503 and
    the workers wait and retry, as for a restarting Redis. `max_connections` (asyncio only): a pool of that many
    that waits up to `pool_timeout` for a free connection, instead of raising past redis-py's default limit.
    """
    options = client_options(timeout_s, quick_retry, asyncio=asyncio)
    blocking = max_connections is not None
    if blocking:
        assert asyncio, "a blocking pool is only used by the asyncio limiter store"
        options.update(max_connections=max_connections, timeout=pool_timeout)
    addresses = settings.sentinel_addresses()
    if not addresses:
        if not asyncio:
            return redis.Redis.from_url(settings.redis_url, **options)
        if blocking:
            return aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(settings.redis_url, **options))
        return aioredis.Redis.from_url(settings.redis_url, **options)
    if settings.redis_password is not None:
        options["password"] = settings.redis_password.get_secret_value()
    sentinel = (AsyncSentinel if asyncio else SyncSentinel)(addresses,
                                                            sentinel_kwargs=sentinel_kwargs(settings, asyncio=asyncio))
    if blocking:
        options["connection_pool_class"] = _BlockingSentinelPool
    client_class = aioredis.Redis if asyncio else redis.Redis
    return sentinel.master_for(settings.redis_master, redis_class=client_class, **options)
