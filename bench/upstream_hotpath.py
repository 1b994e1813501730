"""Micro-benchmark of the upstream call's success path: old vs new `send_once`, same server, interleaved runs.

A zero-latency aiohttp.web server in a subprocess answers every POST with one fixed ~1 KB chat completion
(Content-Length, JSON). The client sends N requests through `send_once` with C in flight on one aiohttp session
and reports requests/s and the client's CPU µs per request. `--old FILE` names a copy of the previous
workers/upstream.py (e.g. `git show <rev>:workers/upstream.py > /tmp/old_upstream.py`). Rounds alternate which goes
first, so both see the same machine load; compare medians.

    python -m bench.upstream_hotpath --old /tmp/old_upstream.py [--requests 20000] [--concurrency 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import inspect
import os
import statistics
import subprocess
import sys
import time

import aiohttp
import orjson

from cli.stack import free_port, wait_for_http

SERVER = r"""
import sys, orjson
from aiohttp import web
body = orjson.dumps({
    "id": "chatcmpl-AbCdEf1234567890AbCdEf123456", "object": "chat.completion", "created": 1700000000,
    "model": "sim-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there, this is a typical answer.\n " * 20},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 180, "total_tokens": 192},
})
async def answer(request):
    await request.read()
    return web.Response(body=body, content_type="application/json", headers={"x-request-id": "req_0123456789abcdef0123456789abcdef"})
app = web.Application()
app.router.add_post("/{tail:.*}", answer)
app.router.add_get("/health", lambda r: web.Response(text="ok"))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


async def run(module, url: str, n: int, concurrency: int) -> tuple[float, float]:
    from shared.providers import Provider

    provider = Provider(name="bench", base_url=url, api_key="sk-bench-secret-0123456789abcdefghijklmnopqrstuvwxyz",
                        timeout_s=30)
    caller = module.UpstreamCaller.__new__(module.UpstreamCaller)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, json_serialize=None, raise_for_status=False) as session:
        module.UpstreamCaller.__init__(caller, session, provider, base_s=0.01, max_s=0.01)
        body = orjson.dumps({"model": "sim-model", "messages": [{"role": "user", "content": "Say hello"}]})
        params = inspect.signature(module.send_once).parameters
        # The old send_once takes the provider; the new one the caller's ResponseRules.
        first = caller.rules if "rules" in params else provider
        send = module.send_once

        async def one() -> None:
            outcome = await send(session, first, url, body, caller.headers, caller.timeout)
            assert outcome.ok, outcome

        for _ in range(200):  # warm the pool
            await one()
        left = iter(range(n))

        async def sender() -> None:
            for _ in left:
                await one()

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        return n / (time.perf_counter() - wall), (time.process_time() - cpu) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="path of the previous workers/upstream.py")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="uvloop, as the workers run")
    args = parser.parse_args()
    port = free_port()
    # The server on one core, the client on the other: less noise from the scheduler moving them around.
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)],
                              preexec_fn=lambda: os.sched_setaffinity(0, {1}) if os.cpu_count() > 1 else None)
    if os.cpu_count() > 1:
        os.sched_setaffinity(0, {0})
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        modules = {"old": load(args.old, "old_upstream"), "new": load("workers/upstream.py", "new_upstream")}
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in modules}
        factory = None
        if args.loop == "uvloop":
            import uvloop

            factory = uvloop.new_event_loop
        for round_ in range(args.rounds):
            order = list(modules.items())
            for name, module in order if round_ % 2 == 0 else order[::-1]:  # neither always goes first
                gc.collect()
                with asyncio.Runner(loop_factory=factory) as runner:
                    results[name].append(runner.run(run(module, url, args.requests, args.concurrency)))
        for name, runs in results.items():
            rps = [r for r, _ in runs]
            cpu = [c for _, c in runs]
            print(f"{name}: {statistics.median(rps):,.0f} req/s (runs {', '.join(f'{r:,.0f}' for r in rps)}); "
                  f"client CPU {statistics.median(cpu):.1f} µs/request (runs {', '.join(f'{c:.1f}' for c in cpu)})")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
