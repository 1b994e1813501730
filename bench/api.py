"""API read load: GET /v1/batches/{id} and GET /v1/batches from a second process over 64 connections.

Prints requests/s and p50/p99 latency for each, beside GET /healthz (a Redis ping) measured in the same run as the
baseline. The load comes from wrk when installed (`apt-get install wrk`: it leaves the shared cores to the API),
else from an aiohttp client in a second Python process. Usage: python -m bench.api [--connections 64] [--seconds 10] [--batches 30] [--api-workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import re
import shutil
import statistics
import subprocess
import time

import aiohttp

from bench.common import TERMINAL, chat_input, deployment


async def _load(url: str, api_key: str, connections: int, seconds: float) -> tuple[int, list[float]]:
    latencies: list[float] = []
    errors = 0
    headers = {"authorization": f"Bearer {api_key}"}
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections), headers=headers) as session:
        async def client() -> None:
            nonlocal errors
            while (start := time.perf_counter()) < deadline:
                async with session.get(url) as resp:
                    await resp.read()
                    errors += resp.status != 200
                latencies.append(time.perf_counter() - start)
        await asyncio.gather(*(client() for _ in range(connections)))
    return errors, latencies


def _load_process(url: str, api_key: str, connections: int, seconds: float, out: multiprocessing.Queue) -> None:
    out.put(asyncio.run(_load(url, api_key, connections, seconds)))


def _ms(text: str) -> float:
    """wrk's durations (850.00us, 25.10ms, 1.20s) in milliseconds."""
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise ValueError(f"unexpected duration from wrk: {text!r}")


def measure_wrk(url: str, api_key: str, connections: int, seconds: float) -> tuple[float, float, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-H", f"Authorization: Bearer {api_key}", url],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "Non-2xx" not in out, out
    found = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rps, _ms(found["50"]), _ms(found["99"])


def measure(url: str, api_key: str, connections: int, seconds: float) -> tuple[float, float, float]:
    """requests/s, p50 ms, p99 ms, measured by a separate process."""
    if shutil.which("wrk"):
        return measure_wrk(url, api_key, connections, seconds)
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()
    proc = ctx.Process(target=_load_process, args=(url, api_key, connections, seconds, out))
    proc.start()
    errors, latencies = out.get()
    proc.join()
    assert errors == 0, f"{errors} non-200 answers from {url}"
    cuts = statistics.quantiles(latencies, n=100)
    return len(latencies) / seconds, cuts[49] * 1000, cuts[98] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--api-workers", type=int, default=2, help="uvicorn worker processes (docker-compose runs 2)")
    args = parser.parse_args()
    with deployment(workers=1, concurrency=2, api_workers=args.api_workers) as dep:
        client = dep.client()
        ids = []
        for _ in range(args.batches):
            file = client.files.create(file=("b.jsonl", io.BytesIO(chat_input(20))), purpose="batch")
            ids.append(client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                             completion_window="24h").id)
        while any(client.batches.retrieve(i).status not in TERMINAL for i in ids):
            time.sleep(0.2)
        root = f"http://127.0.0.1:{dep.api_port}"
        targets = [("GET /healthz (baseline)", f"{root}/healthz"),
                   ("GET /v1/batches/{id}", f"{root}/v1/batches/{ids[-1]}"),
                   ("GET /v1/batches", f"{root}/v1/batches")]
        print(f"{args.api_workers} API worker process(es); load: {'wrk' if shutil.which('wrk') else 'aiohttp'}, "
              f"{args.connections} connections, {args.seconds:g} s each")
        baseline = None
        for label, url in targets:
            rps, p50, p99 = measure(url, dep.api_key, args.connections, args.seconds)
            baseline = baseline or rps
            print(f"{label}: {rps:,.0f} req/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms; x{rps / baseline:.2f} of baseline")


if __name__ == "__main__":
    main()
