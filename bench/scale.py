"""Scale-out: the same latency-bound batch with 1, 2 and 4 worker processes, each with the same senders.

Prints requests/s per setting and the ratio against one process measured in the same run. The upstream is nginx
answering after the latency (echo module) when installed, else the simulator.
Usage: python -m bench.scale [--requests 8000] [--senders 64] [--latency-ms 100] [--processes 1 2 4]
"""

from __future__ import annotations

import argparse

from contextlib import ExitStack

from bench.common import chat_input, deployment, run_batch
from bench.nginx_upstream import can_delay, nginx_upstream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=8_000)
    parser.add_argument("--senders", type=int, default=64, help="in-flight requests per worker process")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    content = chat_input(args.requests)
    baseline: float | None = None
    with ExitStack() as upstreams:
        if can_delay():
            upstream = {"upstream_base_url": upstreams.enter_context(nginx_upstream(args.latency_ms))}
        else:
            upstream = {"sim_latency_ms": args.latency_ms}
        print(f"upstream: {'nginx' if can_delay() else 'simulator'} at {args.latency_ms:g} ms")
        for processes in args.processes:
            with deployment(workers=1, concurrency=processes, upstream_max_concurrency=args.senders,
                            **upstream) as dep:
                seconds, batch = run_batch(dep, content)
            baseline = report(processes, args, seconds, batch, baseline)


def report(processes: int, args: argparse.Namespace, seconds: float, batch: object, baseline: float | None) -> float:
    assert batch.status == "completed" and batch.request_counts.completed == args.requests, batch
    rps = args.requests / seconds
    baseline = baseline or rps
    ideal = args.requests * args.latency_ms / 1000 / (processes * args.senders)
    print(f"{processes} worker process(es) x {args.senders} senders: {rps:,.0f} req/s ({seconds:.2f} s, "
          f"ideal {ideal:.2f} s); x{rps / baseline:.2f} of one process")
    return baseline


if __name__ == "__main__":
    main()
