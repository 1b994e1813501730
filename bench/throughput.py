"""Throughput: one N-request batch through batchgate against a bare aiohttp loop at the same total concurrency.

Two upstreams: nginx answering at once (batchgate's own overhead) and answering after 100 ms (latency-bound; nginx
with the echo module when installed, else the simulator).
Usage: python -m bench.throughput [--requests 20000] [--processes 4] [--concurrency 256] [--latency-ms 100]
       [--only zero|latency] [--upstream nginx|simulator]
"""

from __future__ import annotations

import argparse

import orjson

from bench.common import chat_input, deployment, run_batch
from bench.nginx_upstream import can_delay, nginx_upstream
from bench.raw_loop import raw_loop


def bodies(n: int) -> list[bytes]:
    return [orjson.dumps(orjson.loads(line)["body"]) for line in chat_input(n).splitlines()]


def measure(label: str, n: int, processes: int, per_process: int, latency_ms: float = 0, **settings: object) -> None:
    total = processes * per_process
    with deployment(workers=1, concurrency=processes, upstream_max_concurrency=per_process, **settings) as dep:
        upstream = settings.get("upstream_base_url") or f"http://127.0.0.1:{dep.sim_port}/v1"
        raw_s, ok = raw_loop(f"{upstream}/chat/completions", bodies(n), total)
        assert ok == n, f"raw loop: {ok} of {n} answered 200"
        batch_s, batch = run_batch(dep, chat_input(n))
        assert batch.status == "completed" and batch.request_counts.completed == n, batch
    raw_rps, batch_rps = n / raw_s, n / batch_s
    print(f"{label}: raw aiohttp loop {raw_rps:,.0f} req/s ({raw_s:.2f} s)")
    print(f"{label}: batchgate        {batch_rps:,.0f} req/s ({batch_s:.2f} s, create -> completed)")
    print(f"{label}: ratio batchgate / raw = {batch_rps / raw_rps:.2f}")
    if latency_ms:
        ideal = n * latency_ms / 1000 / total
        print(f"{label}: ideal N x latency / concurrency = {ideal:.2f} s; batchgate / ideal = {batch_s / ideal:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=4, help="worker processes (each with concurrency ÷ processes senders)")
    parser.add_argument("--concurrency", type=int, default=256, help="total in-flight requests")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--only", choices=["zero", "latency"], default=None)
    parser.add_argument("--upstream", choices=["nginx", "simulator"], default="nginx",
                        help="latency-bound upstream (nginx needs the echo module; else the simulator is used)")
    args = parser.parse_args()
    per_process = max(1, args.concurrency // args.processes)
    if args.only in (None, "zero"):
        with nginx_upstream() as base_url:
            measure("zero-latency (nginx)", args.requests, args.processes, per_process, upstream_base_url=base_url)
    if args.only in (None, "latency"):
        if args.upstream == "nginx" and can_delay():
            with nginx_upstream(args.latency_ms) as base_url:
                measure(f"{args.latency_ms:g} ms (nginx)", args.requests, args.processes, per_process,
                        latency_ms=args.latency_ms, upstream_base_url=base_url)
        else:
            measure(f"{args.latency_ms:g} ms (simulator)", args.requests, args.processes, per_process,
                    latency_ms=args.latency_ms, sim_latency_ms=args.latency_ms)


if __name__ == "__main__":
    main()
