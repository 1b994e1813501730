"""The global rate limiter: an upstream that answers 429 above its limit, batchgate configured at that limit.

Two worker processes share one limit through Redis; prints the 429s the upstream sent (target 0) and the rate
achieved as a ratio of the configured limit (target within 10%).
Usage: python -m bench.ratelimit [--requests 2000] [--rpm 600]
"""

from __future__ import annotations

import argparse

from bench.common import chat_input, deployment, run_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    with deployment(workers=1, concurrency=args.processes, upstream_rpm=args.rpm, sim_latency_ms=20) as dep:
        dep.sim_config(max_rpm=args.rpm)
        seconds, batch = run_batch(dep, chat_input(args.requests), poll_s=0.5)
        stats = dep.sim_stats()
    assert batch.status == "completed" and batch.request_counts.completed == args.requests, batch
    achieved = args.requests / seconds * 60
    print(f"limit {args.rpm}/min, {args.processes} worker processes, {args.requests:,} requests in {seconds:.1f} s")
    print(f"upstream 429s: {stats['by_status'].get('429', 0)} of {stats['requests']:,} requests")
    print(f"achieved {achieved:,.0f}/min; ratio to the limit {achieved / args.rpm:.3f} (target 0.90-1.00)")


if __name__ == "__main__":
    main()
