"""The Celery application: reliability settings from the research notes, queues, and the sweeper's schedule."""

from __future__ import annotations

from queue import Empty

from celery import Celery
from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_process_shutdown,
    worker_shutting_down,
)
from kombu.transport import redis as kombu_redis

from shared.logs import batch_id_var, configure_logging
from shared.queue import (
    CHUNKS_QUEUE,
    CONTROL_QUEUE,
    DELIVER_WEBHOOK,
    FINALIZE,
    FORWARD,
    ORCHESTRATE,
    RUN_CHUNK,
    RUN_WORK,
    SWEEP,
    transport_options,
)
from shared.settings import get_settings
from workers.pool import PoolAnnouncer


def finish_close_after_dead_brpop() -> None:
    """Let a Redis channel finish closing when the BRPOP it was waiting on died with the connection.

    Works around a crash of the whole worker node when Redis dies while tasks run (kombu 5.7.0 + celery 5.7.0, the
    latest releases; no release fixes it; no upstream report of this exact chain found). On a connection loss
    celery's consumer calls `connection.collect()` and then `connection.close()` (added for celery/celery#9705 by
    PR celery/celery#10242). kombu's redis `Channel.close()` first reads the reply of a BRPOP still in flight (added
    by celery/kombu#1733); on a dead socket that read raises a ConnectionError before the channel is marked closed.
    `collect()` swallows it, its `close_connection()` stops at the first channel whose close fails (the pidbox
    channel, deleting its auto-delete queue on the dead Redis) and it then detaches the transport from the
    Connection (`transport.client = None`). The later `close()` closes the half-closed default channel again:
    `QoS.restore_unacked()` for the tasks still running builds a new pool from `transport.client.hostname` and
    raises AttributeError, which `ignore_errors` does not catch, so `celery worker` exits with
    "Unrecoverable error: AttributeError(... 'hostname')" (the symptom of celery/kombu#582, another late close).

    A dead connection has no BRPOP reply left to read, so here a connection error ends that read and `close()`
    runs to the end the first time, while the transport is still attached. Unacked messages stay in Redis and
    come back by the visibility timeout, as on any connection loss. tests/test_redis_restarts.py fails once kombu
    fixes this, so the patch can go.
    """
    close = kombu_redis.Channel.close
    if getattr(close, "_batchgate_patched", False):
        return

    def close_tolerating_dead_brpop(self: kombu_redis.Channel) -> None:
        if getattr(self, "_in_poll", None):
            try:
                self._brpop_read()  # clears _in_poll whatever happens
            except Empty:
                pass
            except self.connection_errors:
                pass
        close(self)

    close_tolerating_dead_brpop._batchgate_patched = True  # type: ignore[attr-defined]
    close_tolerating_dead_brpop._batchgate_original = close  # type: ignore[attr-defined]
    kombu_redis.Channel.close = close_tolerating_dead_brpop


def make_app() -> Celery:
    settings = get_settings()
    app = Celery("batchgate", broker=settings.celery_broker_url, backend=settings.celery_result_backend)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.chunk_time_limit_s,
        task_soft_time_limit=int(settings.chunk_time_limit_s * 0.95),
        broker_transport_options=transport_options(settings),
        result_backend_transport_options=transport_options(settings),
        visibility_timeout=settings.visibility_timeout_s,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        result_backend_always_retry=True,
        result_backend_max_retries=10,
        result_expires=7 * 86400,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=CHUNKS_QUEUE,
        task_routes={
            ORCHESTRATE: {"queue": CONTROL_QUEUE},
            FINALIZE: {"queue": CONTROL_QUEUE},
            SWEEP: {"queue": CONTROL_QUEUE},
            DELIVER_WEBHOOK: {"queue": CONTROL_QUEUE},
            FORWARD: {"queue": CONTROL_QUEUE},
            RUN_CHUNK: {"queue": CHUNKS_QUEUE},
            RUN_WORK: {"queue": CHUNKS_QUEUE},
        },
        worker_max_tasks_per_child=1000,
        worker_hijack_root_logger=False,
        beat_schedule={"sweep": {"task": SWEEP, "schedule": settings.sweep_interval_s}},
    )
    app.conf.include = ["workers.tasks"]
    app.steps["worker"].add(PoolAnnouncer)
    return app


finish_close_after_dead_brpop()
app = make_app()


@setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: object) -> None:
    # Connecting this signal stops Celery configuring logging itself; every process logs our lines, and Celery's
    # own loggers keep the --loglevel given on the command line.
    configure_logging(get_settings(), celery_level=loglevel)


@task_prerun.connect
def _bind_batch(args=None, **_: object) -> None:
    batch_id_var.set(args[0] if args and isinstance(args[0], str) else None)


@task_postrun.connect
def _unbind_batch(**_: object) -> None:
    batch_id_var.set(None)


@worker_process_init.connect
def _open_process(**_: object) -> None:
    # Build the process's runtime (event loop, providers, Redis connection) now, not in a batch's first chunk.
    from workers.runtime import get_runtime

    get_runtime().warm_up()


@worker_process_shutdown.connect
def _close_process(**_: object) -> None:
    from workers.runtime import close_runtime

    close_runtime()


@worker_shutting_down.connect
def _stop_taking_chunks(sender: object = None, **_: object) -> None:
    # Runners on this node finish the chunks in hand and take no more; other nodes take the rest.
    from shared.store import Store

    try:
        Store.from_settings(get_settings(), timeout_s=2).mark_stopping(str(sender), 600)
    except Exception:  # noqa: BLE001 - without Redis the runners stop at their budget instead
        pass
