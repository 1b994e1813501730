"""Throughput: one N-request batch through batchgate against a bare aiohttp loop at the same total concurrency.

Two upstreams: nginx answering at once (batchgate's own overhead) and answering after 100 ms (latency-bound; nginx
with the echo module when installed, else the simulator).
Usage: python -m bench.throughput [--requests 20000] [--processes 4] [--concurrency 256] [--latency-ms 100]
       [--only zero|latency] [--upstream nginx|simulator] [--runs 5]
The issue-15 check of a lone batch: --requests 10000 --processes 2 --concurrency 128 --only latency --runs 5
"""

from __future__ import annotations

import argparse
import statistics

import orjson

from bench.common import chat_input, deployment, run_batch
from bench.nginx_upstream import can_delay, nginx_upstream
from bench.raw_loop import raw_loop


def bodies(n: int) -> list[bytes]:
    return [orjson.dumps(orjson.loads(line)["body"]) for line in chat_input(n).splitlines()]


def measure(label: str, n: int, processes: int, per_process: int, latency_ms: float = 0, runs: int = 1,
            **settings: object) -> None:
    """Alternate the bare loop and batchgate `runs` times in one deployment; print the medians side by side."""
    total = processes * per_process
    raw_times, batch_times = [], []
    with deployment(workers=1, concurrency=processes, upstream_max_concurrency=per_process, **settings) as dep:
        upstream = settings.get("upstream_base_url") or f"http://127.0.0.1:{dep.sim_port}/v1"
        run_batch(dep, chat_input(min(n, 500)))  # warm the workers' connections and code paths
        for _ in range(runs):
            raw_s, ok = raw_loop(f"{upstream}/chat/completions", bodies(n), total)
            assert ok == n, f"raw loop: {ok} of {n} answered 200"
            batch_s, batch = run_batch(dep, chat_input(n))
            assert batch.status == "completed" and batch.request_counts.completed == n, batch
            raw_times.append(raw_s)
            batch_times.append(batch_s)
    raw_s, batch_s = statistics.median(raw_times), statistics.median(batch_times)
    runs_note = f" (median of {runs})" if runs > 1 else ""
    print(f"{label}: raw aiohttp loop {n / raw_s:,.0f} req/s ({raw_s:.2f} s){runs_note}")
    print(f"{label}: batchgate        {n / batch_s:,.0f} req/s ({batch_s:.2f} s, create -> completed){runs_note}")
    print(f"{label}: ratio batchgate time / raw time = {batch_s / raw_s:.2f}")
    if latency_ms:
        ideal = n * latency_ms / 1000 / total
        print(f"{label}: ideal {ideal:.2f} s | bare loop {raw_s / ideal:.3f}x ideal | batchgate {batch_s / ideal:.3f}x "
              f"ideal | batchgate - bare loop = {(batch_s - raw_s) / ideal:+.3f}")
        print(f"{label}: each run, batchgate / ideal: {', '.join(f'{t / ideal:.3f}' for t in batch_times)}; "
              f"bare loop / ideal: {', '.join(f'{t / ideal:.3f}' for t in raw_times)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=4, help="worker processes (each with concurrency ÷ processes senders)")
    parser.add_argument("--concurrency", type=int, default=256, help="total in-flight requests")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--only", choices=["zero", "latency"], default=None)
    parser.add_argument("--runs", type=int, default=1, help="runs of each, alternating; medians are printed")
    parser.add_argument("--upstream", choices=["nginx", "simulator"], default="nginx",
                        help="latency-bound upstream (nginx needs the echo module; else the simulator is used)")
    args = parser.parse_args()
    per_process = max(1, args.concurrency // args.processes)
    if args.only in (None, "zero"):
        with nginx_upstream() as base_url:
            measure("zero-latency (nginx)", args.requests, args.processes, per_process, runs=args.runs,
                    upstream_base_url=base_url)
    if args.only in (None, "latency"):
        if args.upstream == "nginx" and can_delay():
            with nginx_upstream(args.latency_ms) as base_url:
                measure(f"{args.latency_ms:g} ms (nginx)", args.requests, args.processes, per_process,
                        latency_ms=args.latency_ms, runs=args.runs, upstream_base_url=base_url)
        else:
            measure(f"{args.latency_ms:g} ms (simulator)", args.requests, args.processes, per_process,
                    latency_ms=args.latency_ms, runs=args.runs, sim_latency_ms=args.latency_ms)


if __name__ == "__main__":
    main()
