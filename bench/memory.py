"""Memory: a 200 MB, 50,000-line input uploaded, run and downloaded; peak resident memory of every process.

The API's figure is its growth over its resident size before the upload (the baseline of the same run);
each worker process is reported at its peak. Usage: python -m bench.memory [--requests 50000] [--mb 200]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import orjson
import psutil

from bench.common import deployment, run_batch

MIB = 1024 * 1024


def padded_input(n: int, total_bytes: int) -> bytes:
    """n chat requests whose lines add up to about total_bytes."""
    skeleton = len(orjson.dumps({"custom_id": "r00000", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "bench-model", "messages": [{"role": "user", "content": ""}]}}))
    pad = "x" * max(0, total_bytes // n - skeleton - 1)
    return b"".join(
        orjson.dumps({"custom_id": f"r{i:05d}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "bench-model", "messages": [{"role": "user", "content": pad}]}}) + b"\n"
        for i in range(n)
    )


class PeakSampler(threading.Thread):
    """Polls the resident size of a process tree every 50 ms and keeps each process's peak."""

    def __init__(self, roots: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.peaks: dict[str, int] = {}
        self.done = threading.Event()

    def sample(self) -> None:
        for name, pid in self.roots.items():
            try:
                root = psutil.Process(pid)
                procs = [(name, root)] + [(f"{name} child {p.pid}", p) for p in root.children(recursive=True)]
                for label, proc in procs:
                    self.peaks[label] = max(self.peaks.get(label, 0), proc.memory_info().rss)
            except psutil.NoSuchProcess:
                continue

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--mb", type=int, default=200, help="input size in MB (10^6 bytes)")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    content = padded_input(args.requests, args.mb * 1_000_000)
    print(f"input: {len(content) / 1e6:,.1f} MB, {args.requests:,} lines")
    with deployment(workers=1, concurrency=args.processes) as dep:
        api_pid = dep.group.procs["api"].pid
        api_before = psutil.Process(api_pid).memory_info().rss
        redis_before = dep.store.memory_used()
        sampler = PeakSampler({"api": api_pid, "worker": dep.group.procs["w1"].pid})
        sampler.start()
        seconds, batch = run_batch(dep, content)
        assert batch.status == "completed" and batch.request_counts.completed == args.requests, batch
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "output.jsonl"
            dep.client().files.content(batch.output_file_id).write_to_file(out)
            lines = sum(1 for _ in out.open("rb"))
        assert lines == args.requests, lines
        redis_after = dep.store.memory_used()
        sampler.done.set()
        sampler.join()
        sampler.sample()
    del content
    print(f"batch: {seconds:.1f} s create -> completed; output downloaded, {lines:,} lines")
    api_peak = sampler.peaks["api"]
    print(f"api: {api_before / MIB:.1f} MiB before, peak {api_peak / MIB:.1f} MiB, "
          f"growth {(api_peak - api_before) / MIB:.1f} MiB (target < 64)")
    print(f"redis: used_memory grew {(redis_after - redis_before) / MIB:.2f} MiB for this batch and its files")
    for label, peak in sorted(sampler.peaks.items()):
        if label.startswith("worker"):
            print(f"{label}: peak {peak / MIB:.1f} MiB resident (target < 256)")


if __name__ == "__main__":
    main()
