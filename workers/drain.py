"""A worker pod's preStop hook (deploy/k8s/worker.yaml): `python -m workers.drain [node]`.

It marks the node stopping in Redis, as the warm shutdown that SIGTERM starts does (workers/celery_app.py), only
earlier: the node's runners finish the chunks in hand and take no new one while Kubernetes counts down the grace
period, and the other workers take the rest. The node is `celery@<hostname>`, Celery's default name, unless given.
Without Redis it does nothing (the runners then stop at their budget); it always exits 0, so the pod still stops.
"""

from __future__ import annotations

import socket
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    node = args[0] if args else f"celery@{socket.gethostname()}"
    from workers.celery_app import _stop_taking_chunks

    _stop_taking_chunks(sender=node)
    print(f"batchgate: {node} takes no new chunk", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
