"""A Celery app for fault tests: batchgate's own app, with a SIGKILL at one named instant.

Run a worker with `-A crashpoints` (tests/ on PYTHONPATH) and BATCHGATE_TEST_CRASH_AT set to a point below; the first
process to reach that point kills itself with SIGKILL, exactly as a crash or an OOM kill would, leaving the marker
file BATCHGATE_TEST_CRASH_MARKER behind (so the replacement process and the tests know it happened, and when).
Nothing here ships: the points wrap the real functions from outside.
"""

from __future__ import annotations

import functools
import os
import signal

from shared.lifecycle import Lifecycle
from shared.store_exec import ExecutionStore
from shared.store_forward import ForwardStore
from workers.celery_app import app

__all__ = ["app"]

POINT = os.environ.get("BATCHGATE_TEST_CRASH_AT", "")
MARKER = os.environ.get("BATCHGATE_TEST_CRASH_MARKER", "")


def _die_once() -> None:
    try:
        fd = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _after(owner: type, name: str, when=lambda result: True) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(result):
            _die_once()
        return result

    setattr(owner, name, wrapper)


def _before(owner: type, name: str, when=lambda *args, **kwargs: True) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            _die_once()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


if POINT == "after_plan":  # orchestrate saved the plan, has not started the batch
    _after(ExecutionStore, "save_plan")
elif POINT == "after_finalizing":  # finalize moved the batch to `finalizing`, has written no file
    _after(Lifecycle, "begin_finalize", lambda outcome: outcome.moved)
elif POINT == "after_terminal":  # finalize made the terminal move, has sent no webhook message
    _after(Lifecycle, "end", lambda outcome: outcome.moved)
elif POINT == "after_remote_upload":  # a forward step uploaded the input, has not recorded the provider's file id
    _before(ForwardStore, "save_forward", lambda *a, **kw: "provider_file_id" in kw)
elif POINT == "after_remote_create":  # a forward step created the provider's batch, has not recorded its id
    _before(ForwardStore, "save_forward", lambda *a, **kw: "provider_batch_id" in kw)
elif POINT:
    raise ValueError(f"unknown crash point {POINT!r}")
