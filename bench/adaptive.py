"""Adaptive concurrency against an upstream of unknown capacity, next to a fixed concurrency set to that capacity.

The upstream (tests/inflight_upstream.py) answers 429 with `Retry-After: 1` whenever more than `--capacity`
requests are in flight. Two deployments in turn, 2 worker processes each, the same batch:
  adaptive  max_concurrency 200, adaptive = true (the limit is found by AIMD, up to 200 x 2 processes)
  fixed     max_concurrency 200, max_inflight = capacity (someone who knew the capacity and wrote it down)
Prints each run's time and the 429 share of every answer the upstream gave (retries included), and the adaptive
run's ratios to the fixed one measured in the same run.
Usage: python -m bench.adaptive [--requests 2000] [--capacity 20] [--latency-ms 100]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from bench.common import chat_input, run_batch
from bench.deployment import Deployment
from cli import stack

UPSTREAM = Path(__file__).resolve().parents[1] / "tests" / "inflight_upstream.py"


def start_upstream(capacity: int, latency_ms: float) -> tuple[subprocess.Popen, str]:
    port = stack.free_port()
    proc = subprocess.Popen([sys.executable, str(UPSTREAM), "--port", str(port), "--max-inflight", str(capacity),
                             "--latency-ms", str(latency_ms), "--retry-after", "1"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("ready"), "the upstream did not start"
    return proc, f"http://127.0.0.1:{port}"


def run(name: str, provider: str, upstream: str, requests: int) -> dict:
    httpx.post(f"{upstream}/reset", timeout=5).raise_for_status()
    with tempfile.TemporaryDirectory(prefix=f"batchgate-bench-{name}-") as tmp:
        root = Path(tmp)
        (root / "providers.toml").write_text(f'[providers.default]\nbase_url = "{upstream}/v1"\n'
                                             f'api_key = "sk-bench"\n{provider}')
        dep = Deployment(root, providers_file=root / "providers.toml", chunk_time_limit_s=600)
        try:
            dep.start(workers=1, concurrency=2, beat=True)
            seconds, batch = run_batch(dep, chat_input(requests), poll_s=0.2)
        finally:
            dep.stop()
    stats = httpx.get(f"{upstream}/stats", timeout=5).json()
    answers, n429 = stats["answers"], stats["by_status"].get("429", 0)
    print(f"{name:9s} {seconds:6.1f} s  completed {batch.request_counts.completed:,} failed "
          f"{batch.request_counts.failed:,}  upstream answers {answers:,}, 429s {n429:,} ({n429 / answers:.1%}), "
          f"peak in flight {stats['peak_inflight']}", flush=True)
    return {"seconds": seconds, "share": n429 / answers, "failed": batch.request_counts.failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--capacity", type=int, default=20)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    args = parser.parse_args()
    proc, upstream = start_upstream(args.capacity, args.latency_ms)
    try:
        print(f"{args.requests:,} requests, upstream capacity {args.capacity} in flight at {args.latency_ms:g} ms "
              f"(ideal at the capacity: {args.requests / args.capacity * args.latency_ms / 1000:.1f} s)")
        fixed = run("fixed", f"max_concurrency = 200\nmax_inflight = {args.capacity}\n", upstream, args.requests)
        adaptive = run("adaptive", "max_concurrency = 200\nadaptive = true\n", upstream, args.requests)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"adaptive / fixed-{args.capacity}: time {adaptive['seconds'] / fixed['seconds']:.2f}x; 429 share "
          f"{adaptive['share']:.1%} (fixed {fixed['share']:.1%}; target < 10 %); failed {adaptive['failed']}")


if __name__ == "__main__":
    main()
