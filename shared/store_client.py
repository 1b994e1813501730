"""How batchgate's processes connect to Redis, and which Redis errors mean "storage unavailable right now"."""

from __future__ import annotations

from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry as SyncRetry

# Redis, sync or asyncio client alike, could not serve a call now: down, frozen, loading its data, failing over.
# (BusyLoadingError, MaxConnectionsError and AuthenticationError are ConnectionErrors.)
STORAGE_UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.MasterDownError,
    redis_errors.TryAgainError,
    redis_errors.OutOfMemoryError,
)
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
