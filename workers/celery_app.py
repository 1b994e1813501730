"""The Celery application: reliability settings from the research notes, queues, and the sweeper's schedule."""

from __future__ import annotations

from celery import Celery
from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_process_shutdown,
)

from shared.logs import batch_id_var, configure_logging
from shared.queue import (
    CHUNKS_QUEUE,
    CONTROL_QUEUE,
    DELIVER_WEBHOOK,
    FINALIZE,
    ORCHESTRATE,
    RUN_CHUNK,
    SWEEP,
    transport_options,
)
from shared.settings import get_settings
from workers.pool import PoolAnnouncer


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
            RUN_CHUNK: {"queue": CHUNKS_QUEUE},
        },
        worker_max_tasks_per_child=1000,
        worker_hijack_root_logger=False,
        beat_schedule={"sweep": {"task": SWEEP, "schedule": settings.sweep_interval_s}},
    )
    app.conf.include = ["workers.tasks"]
    app.steps["worker"].add(PoolAnnouncer)
    return app


app = make_app()


@setup_logging.connect
def _setup_logging(**_: object) -> None:
    # Connecting this signal stops Celery configuring logging itself; every process logs our JSON lines.
    configure_logging(get_settings())


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
