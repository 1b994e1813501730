"""An OpenAI-compatible upstream with a hard capacity: more than `--max-inflight` requests at once are answered 429.

Each POST counts itself in flight on arrival; when that makes more than the capacity, it is answered at once with
429 and `Retry-After` (seconds), else after `--latency-ms` with a small chat completion. GET /stats returns
{"answers", "by_status", "peak_inflight"} (every answer, retries included); POST /reset zeroes them.
Run: python tests/inflight_upstream.py --port N [--max-inflight 20] [--latency-ms 100] [--retry-after 1]
(tests/test_adaptive.py, bench/adaptive.py).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

from aiohttp import web


def make_app(max_inflight: int, latency_s: float, retry_after: str) -> web.Application:
    state = {"inflight": 0, "peak": 0, "by_status": Counter()}

    async def completion(request: web.Request) -> web.Response:
        await request.read()
        state["inflight"] += 1
        try:
            if state["inflight"] > max_inflight:
                state["by_status"]["429"] += 1
                return web.json_response(
                    {"error": {"message": "Too many requests in flight.", "type": "requests",
                               "param": None, "code": "rate_limit_exceeded"}},
                    status=429, headers={"Retry-After": retry_after})
            state["peak"] = max(state["peak"], state["inflight"])
            await asyncio.sleep(latency_s)
            state["by_status"]["200"] += 1
            return web.json_response({
                "id": f"chatcmpl-{time.monotonic_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": "inflight-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})
        finally:
            state["inflight"] -= 1

    async def stats(request: web.Request) -> web.Response:
        by_status = dict(state["by_status"])
        return web.json_response({"answers": sum(by_status.values()), "by_status": by_status,
                                  "peak_inflight": state["peak"]})

    async def reset(request: web.Request) -> web.Response:
        state["peak"] = 0
        state["by_status"].clear()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    app.router.add_post("/{tail:.*}", completion)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-inflight", type=int, default=20)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--retry-after", default="1")
    args = parser.parse_args()
    app = make_app(args.max_inflight, args.latency_ms / 1000, args.retry_after)
    web.run_app(app, host="127.0.0.1", port=args.port, print=lambda *_: print(f"ready {args.port}", flush=True),
                access_log=None, backlog=1024)


if __name__ == "__main__":
    main()
