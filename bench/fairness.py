"""Fairness: how the shared scheduler divides the workers between tenants and batches.

Four measurements on one deployment (2 processes x 64 senders, simulator at 50 ms unless told otherwise):
  small-after-big  tenant B's 64-line batch alone, then right after tenant A's 20,000-line batch
  shares 1:1, 3:1  two tenants each with a 10,000-line batch: each one's share of the lines finished while both run
  deadline         a 7 d batch, then a 1 h batch of the same tenant: which finishes first
Usage: python -m bench.fairness [--big 20000] [--each 10000] [--latency-ms 50] [--workers 1] [--only NAME]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bench.common import TERMINAL, chat_input
from bench.deployment import Deployment

KEYS = {"alpha": "sk-bench-alpha", "beta": "sk-bench-beta"}


def providers_toml(sim_port: int, concurrency: int, weights: dict[str, float]) -> str:
    text = (f'default = "sim"\n\n[providers.sim]\nbase_url = "http://127.0.0.1:{sim_port}/v1"\n'
            f"max_concurrency = {concurrency}\n")
    for tenant, weight in weights.items():
        text += f"\n[tenants.{tenant}]\nweight = {weight}\n"
    return text


@contextmanager
def fair_deployment(latency_ms: float, weights: dict[str, float], workers: int = 1, processes: int = 2,
                    concurrency: int = 64) -> Iterator[Deployment]:
    with tempfile.TemporaryDirectory(prefix="batchgate-fair-") as tmp:
        root = Path(tmp)
        dep = Deployment(root, sim_latency_ms=latency_ms, env={
            "BATCHGATE_DEV_MODE": "0", "BATCHGATE_API_KEYS": ",".join(f"{k}={t}" for t, k in KEYS.items()),
            "BATCHGATE_PROVIDERS_FILE": str(root / "providers.toml")})
        (root / "providers.toml").write_text(providers_toml(dep.sim_port, concurrency, weights))
        try:
            dep.start_redis()
            dep.start_simulator()
            dep.start_api()
            for i in range(workers):
                dep.start_worker(f"w{i + 1}", processes)
            dep.start_beat()
            yield dep
        finally:
            dep.stop()


class Tracked:
    """A batch created by one tenant, polled in the background: its progress over time and when it ended."""

    def __init__(self, dep: Deployment, tenant: str, n: int, window: str = "24h", tag: str = "") -> None:
        self.client = dep.client(api_key=KEYS[tenant])
        uploaded = self.client.files.create(file=(f"{tenant}{tag}.jsonl", io.BytesIO(chat_input(n))), purpose="batch")
        self.created = time.perf_counter()
        self.batch = self.client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                completion_window=window)
        self.samples: list[tuple[float, int]] = []
        self.ended: float | None = None
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while True:
            batch = self.client.batches.retrieve(self.batch.id)
            now = time.perf_counter()
            counts = batch.request_counts
            self.samples.append((now, (counts.completed + counts.failed) if counts else 0))
            if batch.status in TERMINAL:
                self.batch, self.ended = batch, now
                return
            time.sleep(0.05)

    def wait(self, timeout: float = 600) -> "Tracked":
        self._thread.join(timeout)
        assert self.ended is not None and self.batch.status == "completed", self.batch
        return self

    @property
    def seconds(self) -> float:
        return (self.ended or 0) - self.created

    def done_at(self, moment: float) -> int:
        done = 0
        for t, n in self.samples:
            if t > moment:
                break
            done = n
        return done


def shares(a: Tracked, b: Tracked) -> tuple[float, float]:
    """Each batch's share of the lines both finished between the later start and the earlier end, trimmed 10 %."""
    start = max(t for t, n in (next(s for s in x.samples if s[1] > 0) for x in (a, b)))
    end = min(a.ended, b.ended)
    start, end = start + (end - start) * 0.1, end - (end - start) * 0.1
    da, db = a.done_at(end) - a.done_at(start), b.done_at(end) - b.done_at(start)
    return da / (da + db), db / (da + db)


def small_after_big(latency_ms: float, big: int, workers: int) -> None:
    with fair_deployment(latency_ms, {"alpha": 1, "beta": 1}, workers=workers) as dep:
        Tracked(dep, "beta", 64, tag="warm").wait()
        solo = sorted(Tracked(dep, "beta", 64, tag=f"solo{i}").wait().seconds for i in range(3))[1]
        a = Tracked(dep, "alpha", big)
        while a.done_at(time.perf_counter()) == 0:
            time.sleep(0.02)
        b = Tracked(dep, "beta", 64, tag="after").wait()
        bound = max(3 * solo, solo + 2)
        print(f"small-after-big: B alone {solo:.2f} s; B after A's {big:,} lines {b.seconds:.2f} s "
              f"({b.seconds / solo:.1f}x; bound max(3x, +2 s) = {bound:.2f} s)")
        a.wait()
        print(f"small-after-big: A's {big:,} lines took {a.seconds:.2f} s")


def weighted(latency_ms: float, each: int, weights: tuple[float, float], workers: int) -> None:
    with fair_deployment(latency_ms, {"alpha": weights[0], "beta": weights[1]}, workers=workers) as dep:
        a = Tracked(dep, "alpha", each)
        b = Tracked(dep, "beta", each)
        a.wait(), b.wait()
        share_a, share_b = shares(a, b)
        want = weights[0] / sum(weights)
        print(f"shares {weights[0]:g}:{weights[1]:g}: alpha {share_a:.1%} beta {share_b:.1%} "
              f"(weights give {want:.1%}; off by {abs(share_a - want) / want:.1%} of it)")


def deadline(latency_ms: float, each: int, workers: int) -> None:
    with fair_deployment(latency_ms, {"alpha": 1}, workers=workers) as dep:
        week = Tracked(dep, "alpha", each, window="7d", tag="7d")
        time.sleep(0.5)
        hour = Tracked(dep, "alpha", each, window="1h", tag="1h")
        week.wait(), hour.wait()
        print(f"deadline: 7d batch ended {week.ended - week.created:.2f} s after its create, 1h batch "
              f"{hour.ended - hour.created:.2f} s after its own; the 1h batch "
              f"{'overtook' if hour.ended < week.ended else 'did not overtake'} the 7d one")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", type=int, default=20_000)
    parser.add_argument("--each", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--workers", type=int, default=1, help="worker hosts (celery worker commands) sharing Redis")
    parser.add_argument("--only", choices=["small", "shares", "deadline"])
    args = parser.parse_args()
    if args.only in (None, "small"):
        small_after_big(args.latency_ms, args.big, args.workers)
    if args.only in (None, "shares"):
        weighted(args.latency_ms, args.each, (1, 1), args.workers)
        weighted(args.latency_ms, args.each, (3, 1), args.workers)
    if args.only in (None, "deadline"):
        deadline(args.latency_ms, args.each, args.workers)


if __name__ == "__main__":
    main()
