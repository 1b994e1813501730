"""A small OpenAI-compatible upstream that serves only requests carrying exactly what it is told to require.

    python tests/strict_upstream.py --port N --name azure-a [--key K] [--auth api-key|bearer|none]
        [--api-version V] [--deployment D] [--header k=v ...] [--query k=v ...] [--status 503]

Without --deployment it serves POST /v1/chat/completions (and /v1/embeddings); with it, only
POST /openai/deployments/D/chat/completions (Azure OpenAI's layout). A request missing the key in the `--auth` form
(a Bearer token where `api-key` is required is refused too), the api-version, a required header or query parameter is
answered 401/400/404 as Azure does. `--status 503` answers every request so (a provider that is down but listening).
Every answer's completion names the upstream (`--name`), and `GET /_stats` counts what arrived:
{"requests", "served", "refused", "by_reason", "first_at", "last_at"} (times of the first and last request).
It prints "ready <port>" once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter

from aiohttp import web


def completion(name: str) -> dict:
    return {
        "id": f"chatcmpl-{name}", "object": "chat.completion", "created": 1700000000, "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"served by {name}"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def _pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def make_app(args: argparse.Namespace) -> web.Application:
    stats: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    headers, query = _pairs(args.header), _pairs(args.query)
    prefix = f"/openai/deployments/{args.deployment}" if args.deployment else "/v1"

    def refuse(status: int, code: str, message: str) -> web.Response:
        stats["refused"] += 1
        reasons[code] += 1
        return web.json_response({"error": {"code": code, "message": message}}, status=status)

    def why_not(request: web.Request) -> web.Response | None:
        if args.key is not None:
            bearer = request.headers.get("authorization", "")
            api_key = request.headers.get("api-key")
            if args.auth == "api-key" and (api_key != args.key or bearer):
                return refuse(401, "401", "Access denied due to invalid subscription key or wrong API endpoint.")
            if args.auth == "bearer" and (bearer != f"Bearer {args.key}" or api_key is not None):
                return refuse(401, "invalid_api_key", "Incorrect API key provided.")
        if args.auth == "none" and ("authorization" in request.headers or "api-key" in request.headers):
            return refuse(400, "unexpected_credentials", "This upstream takes no credentials.")
        if args.api_version and request.query.get("api-version") != args.api_version:
            return refuse(404, "404", "Resource not found")
        for name, value in headers.items():
            if request.headers.get(name) != value:
                return refuse(400, "missing_header", f"header {name} is required")
        for name, value in query.items():
            if request.query.get(name) != value:
                return refuse(400, "missing_query", f"query parameter {name} is required")
        return None

    times: dict[str, float] = {}

    async def serve(request: web.Request) -> web.Response:
        stats["requests"] += 1
        times.setdefault("first_at", time.time())
        times["last_at"] = time.time()
        await request.read()
        if not request.path.startswith(prefix + "/"):
            return refuse(404, "DeploymentNotFound", "The API deployment for this resource does not exist.")
        if args.status:
            stats["status"] += 1
            return web.json_response({"error": {"message": "unavailable", "code": "unavailable"}},
                                     status=args.status)
        refused = why_not(request)
        if refused is not None:
            return refused
        if args.latency_ms:
            await asyncio.sleep(args.latency_ms / 1000)
        stats["served"] += 1
        return web.json_response(completion(args.name))

    async def show_stats(request: web.Request) -> web.Response:
        return web.json_response({**stats, **times, "by_reason": dict(reasons)})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/_stats", show_stats)
    app.router.add_get("/health", health)
    app.router.add_route("POST", "/{tail:.*}", serve)
    return app


async def main(args: argparse.Namespace) -> None:
    runner = web.AppRunner(make_app(args), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    print(f"ready {args.port}", flush=True)
    await asyncio.Event().wait()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="strict")
    parser.add_argument("--key")
    parser.add_argument("--auth", default="bearer", choices=["bearer", "api-key", "none"])
    parser.add_argument("--api-version")
    parser.add_argument("--deployment")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--query", action="append", default=[])
    parser.add_argument("--status", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        asyncio.run(main(parse(sys.argv[1:])))
    except KeyboardInterrupt:
        sys.exit(0)
